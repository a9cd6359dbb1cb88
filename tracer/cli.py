"""The eptrace command."""
from __future__ import annotations

import functools
import json
import math
import os
import sys
from pathlib import Path

import click

from . import __version__, logs
from .episode_names import ACTIONS
from .outputs.secrets import redact
from .schema.document import ECS_VERSION, OCSF_VERSION
from .terminal import printable

# Only light modules at the top (tests/unit/test_light_imports.py): `eptrace run` through the daemon loads
# click, tracer.control, tracer.client and what they need; the tracer, the policy, the config, the
# schema's encoders and the network outputs load in the commands and options that use them.

# Exit statuses, documented in --help.
EXIT_BAD_INPUT = 2
EXIT_ALERTED = 3
EXIT_NOT_ROOT = 4
EXIT_KERNEL = 5
EXIT_INCOMPLETE = 6

log = logs.getLogger("eptrace")


class Failure(click.ClickException):
    """A one-line error with its own exit status; never a traceback."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"eptrace: error: {printable(redact(self.message))}", err=True)


def _set_up_logging(verbose: int, logging) -> None:
    """Diagnostics on stderr: 'eptrace: warning: ...', in the same style as the one-line errors."""
    class LowerLevelFormatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            record.levelname = record.levelname.lower()
            # Messages quote argv, names, paths (one line each) and output specs (never their secrets).
            return printable(redact(super().format(record)))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LowerLevelFormatter("eptrace: %(levelname)s: %(message)s"))
    logging.basicConfig(level=max(logging.WARNING - 10 * verbose, logging.DEBUG), handlers=[handler])


def _require_root() -> None:
    if os.geteuid() != 0:
        raise Failure("eptrace loads eBPF programs and must run as root: try again with sudo", EXIT_NOT_ROOT)


def _outputs(specs: tuple[str, ...], schema: str = "ecs", config=None):
    """The outputs: --output forms, else the config file's [output] specs, else stdout."""
    from .outputs import OutputsError, open_outputs
    try:
        return open_outputs(specs, config, schema)
    except OutputsError as e:
        raise Failure(str(e), EXIT_BAD_INPUT) from None


def _connect_early(mode: str):
    """Connect to the daemon for --daemon MODE before run's options are checked, so that its hello is on its way
    meanwhile. Returns what _daemon calls for the greeted connection (None: no daemon, auto): the errors of
    connecting wait for that call, after the options' own."""
    from . import control
    try:
        conn = control.connect_if_running(mode, greet=False)
    except control.DaemonError as e:
        error = e

        def failed():
            raise error
        return failed

    def greeted():
        if conn is not None:
            conn.greet()
        return conn
    return greeted


def _daemon(mode: str, in_process_only: dict[str, object], config=None, connecting=None):
    """The daemon's connection for --daemon MODE, or None (trace in-process). in_process_only: options
    that need a tracer of the run's own; config: a --config, which goes through the daemon only when its
    tracer settings are the daemon's (its [output], [metrics] and [policy] are the client's own);
    connecting: _connect_early's (else connect now)."""
    from . import control
    wanted = [option for option, value in in_process_only.items() if value]
    if wanted:
        if mode == "require":
            raise Failure(f"{', '.join(wanted)} needs a tracer of the run's own: it cannot be used through the "
                          "daemon (use --daemon never)", EXIT_BAD_INPUT)
        return None
    try:
        conn = connecting() if connecting is not None else control.connect_if_running(mode)
    except control.DaemonError as e:
        raise Failure(str(e), e.status) from None
    if conn is None or config is None:
        return conn
    from .client import config_differences
    try:
        differs = config_differences(conn, config)
    except control.DaemonError as e:
        raise Failure(str(e), e.status) from None
    if not differs:
        return conn
    conn.close()
    message = f"--config differs from the daemon's config in {', '.join(differs)}"
    if mode == "require":
        raise Failure(f"{message}: use --daemon never to trace with it in-process", EXIT_BAD_INPUT)
    log.info("%s: tracing in-process", message)
    return None


class FiniteFloatRange(click.FloatRange):
    """A FloatRange that refuses nan (which every range comparison lets through) and inf."""

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            name = param.opts[0] if param is not None else "a number"
            raise Failure(f"{name} must be a finite number of seconds, not {value!r}", EXIT_BAD_INPUT)
        return super().convert(number, param, ctx)


SCHEMA_OPTION = click.option("--schema", type=click.Choice(["ecs", "ocsf"]), default="ecs", show_default=True,
                             help=f"Document schema: ECS {ECS_VERSION}, or OCSF {OCSF_VERSION} (Network Activity "
                                  "4001, Process Activity 1007, Detection Finding 2004) for pipelines that want OCSF.")


def _episode_id(episode_id: str) -> str:
    from .episode_names import RegistryError, validate_id
    try:
        return validate_id(episode_id)
    except RegistryError as e:
        raise Failure(str(e), EXIT_BAD_INPUT) from None


def _labels(pairs: tuple[str, ...]) -> dict[str, str]:
    from .episode_names import RegistryError, parse_labels
    try:
        return parse_labels(pairs)
    except RegistryError as e:
        raise Failure(str(e), EXIT_BAD_INPUT) from None


def _capture(path: str | None, fanout=None):
    """The capture recorder; on an error, the outputs already made are closed first."""
    if not path:
        return None
    from .capture import CaptureError, Recorder
    try:
        return Recorder(path)
    except CaptureError as e:
        if fanout is not None:
            fanout.close()
        raise Failure(str(e), EXIT_BAD_INPUT) from None


def _check_written_paths(**paths: str | None) -> None:
    """--verdict, --capture: refused before anything is made when root must not write there (tracer.safefiles)."""
    from .safefiles import UnsafePathError, check_target
    for option, path in paths.items():
        if path:
            try:
                check_target(path, f"--{option}")
            except UnsafePathError as e:
                raise Failure(str(e), EXIT_BAD_INPUT) from None


CAPTURE_HELP = "Also record the input stream to PATH (msgpack), for 'eptrace replay'."


def _config(path: str | None):
    from .config import ConfigError, load
    try:
        return load(path)
    except ConfigError as e:
        raise Failure(str(e), EXIT_BAD_INPUT) from None


CONFIG_HELP = "A TOML file of detection thresholds and allowlists; every key has a default."
POLICY_HELP = "A TOML file with a [policy] table (README: Containing an episode); it replaces the config's."
ON_ALERT = click.Choice(list(ACTIONS))
ON_ALERT_HELP = "What to do to an episode on any alert, over its policy's on_alert."


def _policy_table(path: str | None) -> dict | None:
    """A --policy (or --config) file's [policy] table as written (checked first by _policy or _config), for the
    daemon or the state dir; None without one."""
    if path is None:
        return None
    import tomllib
    return tomllib.loads(open(path, "rb").read().decode()).get("policy")


def _policy(path: str | None):
    """A --policy file, checked (exit 2 before anything is traced), or None."""
    if path is None:
        return None
    from .config import ConfigError
    from .policy import load_file
    try:
        return load_file(path)
    except ConfigError as e:
        raise Failure(str(e), EXIT_BAD_INPUT) from None


def _with_on_alert(config, on_alert: str | None):
    import dataclasses
    return dataclasses.replace(config, on_alert=on_alert) if on_alert else config
METRICS_HELP = "Serve Prometheus metrics on ADDR:PORT (/metrics): records, losses, drops, queues, latency."


def _user(spec: str):
    """USER[:GROUP] (names or numbers) -> command.User, with the user's supplementary groups."""
    import grp
    import pwd
    from .command import User
    name, _, group = spec.partition(":")
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        if not name.isdigit():
            raise Failure(f"--user: no user {name!r}", EXIT_BAD_INPUT) from None
        entry = None
    uid = int(name) if entry is None else entry.pw_uid
    try:
        gid = (int(group) if group.isdigit() else grp.getgrnam(group).gr_gid) if group else \
            (entry.pw_gid if entry else uid)
    except KeyError:
        raise Failure(f"--user: no group {group!r}", EXIT_BAD_INPUT) from None
    groups = tuple(os.getgrouplist(entry.pw_name, gid)) if entry else (gid,)
    return User(uid=uid, gid=gid, groups=groups, name=entry.pw_name if entry else None,
                home=entry.pw_dir if entry else None)


def _metrics_address(address: str | None) -> str | None:
    host, _, port = (address or "").rpartition(":")
    if address and (not host or not port.isdigit() or not 0 < int(port) < 65536):
        raise Failure(f"--metrics-listen wants ADDR:PORT, e.g. 127.0.0.1:9464, not {address!r}", EXIT_BAD_INPUT)
    return address
OUTPUT_HELP = ("Where documents go (repeat for several): '-' (stdout, the default), 'file:PATH[?max_mb=N&keep=K]', "
               "'syslog+tcp|tls|udp|relp://HOST:PORT', 'forward://HOST:PORT', 'hec[s]://HOST:PORT?token_file=FILE', "
               "'es[s]://HOST:PORT/INDEX', 'kafka://BROKER[,BROKER...]/TOPIC'; see the README. Without it, the config's [output] specs.")

EPILOG = """\b
Exit status:
  0   success (run: the command's own status is passed through)
  2   bad input: an invalid episode id, label, output, config or cgroup; no daemon (--daemon require)
  3   run --fail-on-alert: the episode raised an alert (see --verdict)
  4   not running as root (run: unless through a daemon whose --socket-group you are in), or refused
      by the daemon's socket or by the daemon (another client's episode)
  5   the kernel refused the probes (see: eptrace doctor)
  6   run --fail-on-incomplete: the episode's record is incomplete (records lost, argv unread; see --verdict)
"""


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="eptrace")
@click.option("-v", "--verbose", count=True, help="More diagnostics on stderr (-vv for debug).")
@click.option("--state-dir", envvar="EPTRACE_STATE_DIR", type=click.Path(), default=None,
              help="Where registrations are kept [default: /var/lib/eptrace; env EPTRACE_STATE_DIR].")
@click.option("--pin-dir", envvar="EPTRACE_PIN_DIR", type=click.Path(file_okay=False), default=None,
              help="Where the probes are pinned, on bpffs [default: /sys/fs/bpf/eptrace; env EPTRACE_PIN_DIR].")
@click.option("--socket", "socket_path", envvar="EPTRACE_SOCKET", default=None, metavar="PATH",
              help="The daemon's control socket [default: /run/eptrace/eptrace.sock; env EPTRACE_SOCKET].")
@click.pass_context
def cli(ctx: click.Context, verbose: int, state_dir: str | None, pin_dir: str | None, socket_path: str | None) -> None:
    """Trace the network activity of AI-agent sandboxes, tagged by episode.

    eptrace attaches eBPF programs to the cgroups of sandbox episodes and streams one ECS JSON
    document per line for every socket, connection, flow and process inside them.

    \b
    Examples:
      sudo eptrace doctor                                   # can this host run eptrace?
      sudo eptrace run --episode ep-42 -- python3 agent.py  # trace one command as an episode
      sudo eptrace episode add --id ep-43 --cgroup /sys/fs/cgroup/unified/sandbox/ep-43
      sudo eptrace daemon --output file:/var/log/eptrace/events.ndjson
    """
    # run loads logging when it first logs, or when it loads more than its client path (run calls logs.ready())
    logs.configure(functools.partial(_set_up_logging, verbose), deferred=ctx.invoked_subcommand == "run")
    if state_dir:
        os.environ["EPTRACE_STATE_DIR"] = state_dir
    if pin_dir:
        os.environ["EPTRACE_PIN_DIR"] = os.path.abspath(pin_dir)
    if socket_path:
        os.environ["EPTRACE_SOCKET"] = os.path.abspath(socket_path)


# Options end at "--" or at the first argument that is not an option: the command starts there, and what
# follows reaches it untouched. A mistyped option before it is click's usage error (exit 2), before anything
# is loaded, never a command named "--outptu".
@cli.command(context_settings={"allow_interspersed_args": False})
@click.option("--episode", "episode_id", required=True, metavar="ID",
              help="Episode id: 1-128 characters of A-Z a-z 0-9 . _ : -")
@click.option("--output", "outputs", multiple=True, metavar="SPEC", help=OUTPUT_HELP)
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Extra labels.* on every event.")
@click.option("--grace", default=10.0, show_default=True, type=FiniteFloatRange(0, 3600), metavar="SECONDS",
              help="After CMD exits, how long to wait for its children and flows to finish.")
@click.option("--stats-interval", default=10.0, show_default=True, type=FiniteFloatRange(0.1, 86400),
              metavar="SECONDS", help="How often health metrics are emitted (and always at exit).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), metavar="FILE", help=CONFIG_HELP)
@click.option("--verdict", "verdict_path", type=click.Path(dir_okay=False, writable=True), metavar="PATH",
              help="Also write the end-of-episode summary as JSON to PATH.")
@click.option("--capture", "capture_path", type=click.Path(dir_okay=False), metavar="PATH", help=CAPTURE_HELP)
@click.option("--metrics-listen", metavar="ADDR:PORT", help=METRICS_HELP)
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False), metavar="FILE", help=POLICY_HELP)
@click.option("--on-alert", type=ON_ALERT, help=ON_ALERT_HELP)
@click.option("--user", "run_as", metavar="USER[:GROUP]",
              help="Run CMD as this user (name or uid), with its groups, so that it cannot signal eptrace.")
@SCHEMA_OPTION
@click.option("--fail-on-alert", is_flag=True,
              help=f"Exit {EXIT_ALERTED} if the episode raised any alert, whatever CMD's own status.")
@click.option("--fail-on-incomplete", is_flag=True,
              help=f"Exit {EXIT_INCOMPLETE} if the episode's record is incomplete (records lost, argv unread), "
                   f"whatever CMD's own status; --fail-on-alert's {EXIT_ALERTED} comes first.")
@click.option("--daemon", "daemon_mode", type=click.Choice(["auto", "never", "require"]), default="auto",
              envvar="EPTRACE_DAEMON", show_default=True,
              help="Trace through the eptrace daemon: when its socket answers (auto), never, or fail without it "
                   "(require). --metrics-listen, and a --config whose tracer settings differ from the daemon's, "
                   "trace in-process (require: refused). [env EPTRACE_DAEMON]")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED, metavar="-- CMD [ARGS]...")
def run(episode_id, outputs, labels, grace, stats_interval, config_path, verdict_path, capture_path,
        metrics_listen, policy_path, on_alert, run_as, schema, fail_on_alert, fail_on_incomplete, daemon_mode,
        command) -> None:
    """Run CMD as a traced episode, in a fresh cgroup of its own.

    Events stream until CMD and its children have exited and their flows are closed (at most
    --grace seconds after CMD). The cgroup is then removed and eptrace exits with CMD's status.
    When events go to stdout, CMD's own stdout is sent to stderr so that the stream stays clean.
    The probes fail closed: if eptrace dies, CMD's episode is killed, and its connects are refused
    meanwhile. Use --user so that CMD runs unprivileged and cannot signal eptrace at all.
    Without root, run works only through a daemon whose --socket-group you are in (the daemon moves
    CMD into its cgroup); a raw_sockets = false policy then sets no_new_privs (setuid programs in CMD
    lose their privileges).

    \b
    Examples:
      sudo eptrace run --episode ep-42 -- python3 agent.py --task 7
      sudo eptrace run --episode ep-42 --output file:/var/log/eptrace/ep-42.ndjson -- curl -s http://198.51.100.1/
      sudo eptrace run --episode ep-42 --label run=ppo-7 -- bash -c 'pip download requests'
    """
    # Through the daemon, run's client path loads logging only to log: whatever loads more sets it up first
    if daemon_mode == "never" or metrics_listen or config_path or policy_path or capture_path or schema != "ecs" \
            or not all(spec == "-" or spec.startswith("file:") for spec in outputs):
        logs.ready()
    # Connected first (not for in-process runs): the daemon's hello comes while the options are checked
    connecting = _connect_early(daemon_mode) if daemon_mode != "never" and not metrics_listen else None
    if connecting is not None:
        from . import client    # noqa: F401 (meanwhile too)
    _episode_id(episode_id)
    label_map = _labels(labels)
    # Without --config: None until this run traces in-process (the outputs and the daemon need no Config)
    config = _with_on_alert(_config(config_path), on_alert) if config_path else None
    policy = _policy(policy_path)
    metrics_listen = _metrics_address(metrics_listen)
    user = _user(run_as) if run_as else None
    in_process_only = {"--metrics-listen": metrics_listen}
    if os.geteuid() != 0:               # a socket-group member: through the daemon, which does what needs root
        if user is not None and (user.uid, user.gid) != (os.geteuid(), os.getegid()):
            raise Failure(f"--user {run_as} needs root (this run is not root)", EXIT_NOT_ROOT)
        user = None
        if daemon_mode == "never":
            _require_root()
        _check_written_paths(verdict=verdict_path, capture=capture_path)
        conn = _daemon(daemon_mode, in_process_only, config, connecting)
        if conn is None:
            raise Failure("eptrace loads eBPF programs and must run as root: try again with sudo, or through "
                          "an eptrace daemon whose --socket-group you are in" + (
                              f" (without {', '.join(o for o, v in in_process_only.items() if v)})"
                              if any(in_process_only.values()) else
                              " (with a --config whose tracer settings are the daemon's)" if config_path else ""),
                          EXIT_NOT_ROOT)
    else:
        _check_written_paths(verdict=verdict_path, capture=capture_path)
        conn = _daemon(daemon_mode, in_process_only, config, connecting)
    fanout = _outputs(outputs, schema, config)
    capture = _capture(capture_path, fanout)
    if conn is not None:
        from . import client, control
        try:
            verdict = client.run_episode(conn, episode_id, list(command), fanout, labels=label_map, grace_s=grace,
                                         user=user, policy=_policy_table(policy_path or config_path),
                                         on_alert=on_alert, capture=capture)
        except control.DaemonError as e:
            raise Failure(str(e), e.status) from None
        finally:
            fanout.close()
        _end_run(verdict, verdict_path, fail_on_alert, fail_on_incomplete, at_once=True)
    logs.ready()
    if config is None:
        config = _with_on_alert(_config(None), on_alert)
    from .kernel.cgroups import CgroupError
    from .kernel.loader import ProbeError
    from .session import run_episode
    try:
        verdict = run_episode(episode_id, list(command), fanout, labels=label_map, grace_s=grace,
                              stats_interval_s=stats_interval, config=config, capture=capture,
                              metrics_listen=metrics_listen, user=user, policy=policy)
    except ProbeError as e:
        raise Failure(str(e), EXIT_KERNEL) from None
    except CgroupError as e:
        raise Failure(str(e), EXIT_KERNEL) from None
    except ValueError as e:        # the metrics address cannot be bound
        raise Failure(str(e), EXIT_BAD_INPUT) from None
    _end_run(verdict, verdict_path, fail_on_alert, fail_on_incomplete)


def _end_run(verdict, verdict_path: str | None, fail_on_alert: bool, fail_on_incomplete: bool,
             at_once: bool = False) -> None:
    """The verdict on stderr and to --verdict, then run's exit status. at_once: everything is closed already
    (a daemon's client), so the interpreter's teardown is skipped (a tenth of a run's time through the daemon)."""
    from .verdict import write_verdict
    click.echo(verdict.human(), err=True)
    write_verdict(verdict, verdict_path)
    if fail_on_alert and verdict.alerted:
        status = EXIT_ALERTED
    else:
        status = EXIT_INCOMPLETE if fail_on_incomplete and not verdict.complete else verdict.exit_code
    if at_once:
        logs.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(status)
    sys.exit(status)


@cli.command()
@click.option("--output", "outputs", multiple=True, metavar="SPEC", help=OUTPUT_HELP)
@click.option("--stats-interval", default=10.0, show_default=True, type=FiniteFloatRange(0.1, 86400),
              metavar="SECONDS", help="How often health metrics are emitted (and always at exit).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), metavar="FILE", help=CONFIG_HELP)
@click.option("--capture", "capture_path", type=click.Path(dir_okay=False), metavar="PATH", help=CAPTURE_HELP)
@click.option("--metrics-listen", metavar="ADDR:PORT", help=METRICS_HELP)
@click.option("--on-alert", type=ON_ALERT, help=ON_ALERT_HELP)
@click.option("--socket", "socket_path", default=None, metavar="PATH",
              help="The control socket (mode 0600) [default: eptrace's --socket, /run/eptrace/eptrace.sock].")
@click.option("--socket-group", metavar="GROUP",
              help="Also let this group's members use the socket (mode 0660); other users are refused.")
@click.option("--detach-on-stop", is_flag=True,
              help="A clean stop (SIGINT, SIGTERM) also detaches the probes of registered episodes: they go "
                   "untraced, and not failed closed, until the next daemon, and their verdicts are marked incomplete "
                   "(untraced_while_stopped). By default they stay attached, recording and failing closed, so that "
                   "a restart misses nothing.")
@SCHEMA_OPTION
def daemon(outputs, stats_interval, config_path, capture_path, metrics_listen, on_alert, socket_path,
           socket_group, detach_on_stop, schema) -> None:
    """Trace every episode on the host, and serve the clients of the control socket, until SIGINT or SIGTERM.

    The probes are loaded once. Registered episodes ('eptrace episode add') are traced as soon as
    they are added, and their registrations survive a restart; 'eptrace run' and tracer.api start
    their episodes through the socket and get their own documents and verdict. The probes stay
    pinned: a daemon that is killed and restarted resumes every episode, and its clients reconnect.
    A clean stop ends the clients' episodes but leaves the registered ones attached (recording, and
    failing closed), for the next daemon to resume: see --detach-on-stop.
    'eptrace watch' is the same command.

    \b
    Examples:
      sudo eptrace daemon
      sudo eptrace daemon --socket-group eptrace --output file:/var/log/eptrace/events.ndjson?max_mb=100&keep=10
    """
    config = _with_on_alert(_config(config_path), on_alert)
    metrics_listen = _metrics_address(metrics_listen)
    _require_root()
    _check_written_paths(capture=capture_path)
    if socket_group:
        import grp
        try:
            grp.getgrnam(socket_group)
        except KeyError:
            raise Failure(f"--socket-group: no group {socket_group!r}", EXIT_BAD_INPUT) from None
    from .control import socket_path as default_socket
    from .registry import Registry, RegistryError
    registry = Registry()
    try:
        registry.list(strict=True)      # a bad registration is an error at start-up, skipped later
    except RegistryError as e:
        raise Failure(str(e), EXIT_BAD_INPUT) from None
    fanout = _outputs(outputs, schema, config)
    capture = _capture(capture_path, fanout)
    from .daemon import serve
    from .kernel.loader import ProbeError
    try:
        sys.exit(serve(fanout, registry, Path(os.path.abspath(socket_path)) if socket_path else default_socket(),
                       socket_group, stats_interval_s=stats_interval, config=config, capture=capture,
                       metrics_listen=metrics_listen, detach_on_stop=detach_on_stop))
    except ProbeError as e:
        raise Failure(str(e), EXIT_KERNEL) from None
    except (ValueError, OSError) as e:        # the metrics address or the socket cannot be bound
        raise Failure(str(getattr(e, "strerror", None) or e), EXIT_BAD_INPUT) from None


cli.add_command(daemon, "watch")


def _tell_daemon(op: str, **fields) -> dict | None:
    """Tell a running daemon (registrations changed); None when none runs."""
    from . import control
    try:
        conn = control.connect_if_running("auto")
    except control.DaemonError as e:
        log.warning("%s", e)
        return None
    if conn is None:
        return None
    try:
        return conn.request(op, **fields)
    except control.DaemonError as e:
        raise Failure(str(e), e.status) from None
    finally:
        conn.close()


@cli.group()
def episode() -> None:
    """Register the cgroups of episodes for the daemon ('eptrace daemon', alias 'eptrace watch').

    \b
    Examples:
      sudo eptrace episode add --id ep-43 --cgroup /sys/fs/cgroup/unified/sandbox/ep-43 --label run=ppo-7
      sudo eptrace episode ls
      sudo eptrace episode rm --id ep-43
    """


@episode.command("add")
@click.option("--id", "episode_id", required=True, metavar="ID", help="1-128 characters of A-Z a-z 0-9 . _ : -")
@click.option("--cgroup", required=True, metavar="PATH",
              help="An existing cgroup v2 directory (absolute, or relative to the cgroup2 mount).")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Extra labels.* on every event.")
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False), metavar="FILE", help=POLICY_HELP)
def episode_add(episode_id, cgroup, labels, policy_path) -> None:
    """Register an existing cgroup as an episode. Its descendants belong to it too."""
    from .registry import Registry, RegistryError
    _episode_id(episode_id)
    label_map = _labels(labels)
    _policy(policy_path)                # checked now; stored as written
    _require_root()
    try:
        reg = Registry().add(episode_id, cgroup, label_map, policy=_policy_table(policy_path))
    except RegistryError as e:
        raise Failure(str(e), EXIT_BAD_INPUT) from None
    traced = _tell_daemon("sync", id=episode_id)
    click.echo(f"registered episode {reg.id} for cgroup {printable(reg.cgroup)}"
               + ("" if traced is None else "; the daemon traces it" if reg.id in traced["registered"]
                  else "; the daemon cannot trace it (see its log)"), err=True)


@episode.command("rm")
@click.option("--id", "episode_id", required=True, metavar="ID")
@click.option("--verdict", "verdict_path", type=click.Path(dir_okay=False), metavar="PATH",
              help="Write the episode's final verdict as JSON to PATH (from the running daemon).")
def episode_rm(episode_id, verdict_path) -> None:
    """Stop tracing an episode (at once when the daemon runs); a frozen episode is killed."""
    from .kernel.cgroups import CgroupError
    from .registry import Registry, RegistryError
    from .session import episode_cgroups
    _episode_id(episode_id)
    _require_root()
    _check_written_paths(verdict=verdict_path)
    if verdict_path:
        from . import control
        try:
            control.Connection().close()
        except control.DaemonError as e:
            raise Failure(f"--verdict: {e}", e.status) from None
    try:
        for path in episode_cgroups(episode_id, Registry()):
            if (path / "cgroup.freeze").read_text().strip() == "1":
                (path / "cgroup.kill").write_text("1")     # frozen for forensics: ended, not left running
                log.warning("episode %s was frozen: killed its processes", episode_id)
        Registry().remove(episode_id)
    except (RegistryError, CgroupError, OSError) as e:
        raise Failure(str(e), EXIT_BAD_INPUT) from None
    if _tell_daemon("sync", id=episode_id) is not None and verdict_path:
        answer = _tell_daemon("verdict", id=episode_id)
        if answer:
            from .verdict import from_dict, write_verdict
            write_verdict(from_dict(answer["verdict"]), verdict_path)
    click.echo(f"removed episode {episode_id}", err=True)


@episode.command("verdict")
@click.option("--id", "episode_id", required=True, metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="The verdict as JSON (as run --verdict writes it).")
def episode_verdict(episode_id, as_json) -> None:
    """A registered episode's verdict so far (or its final one once removed), from the running daemon."""
    from . import control
    from .verdict import from_dict
    _episode_id(episode_id)
    try:
        conn = control.Connection()
        try:
            answer = conn.request("verdict", id=episode_id)
        finally:
            conn.close()
    except control.DaemonError as e:
        raise Failure(str(e), e.status) from None
    verdict = from_dict(answer["verdict"])
    click.echo(verdict.to_json() if as_json else verdict.human())


@episode.command("thaw")
@click.option("--id", "episode_id", required=True, metavar="ID")
def episode_thaw(episode_id) -> None:
    """Resume an episode frozen by on_alert = "freeze" (registered, or of a running 'eptrace run')."""
    from .registry import Registry
    from .session import episode_cgroups
    _episode_id(episode_id)
    _require_root()
    paths = episode_cgroups(episode_id, Registry())
    if not paths:
        raise Failure(f"no episode {episode_id} (registered or run)", EXIT_BAD_INPUT)
    for path in paths:
        (path / "cgroup.freeze").write_text("0")
    click.echo(f"thawed episode {episode_id}", err=True)


@episode.command("ls")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def episode_ls(as_json) -> None:
    """List registered episodes: id, cgroup and labels (with a daemon, also the episodes its clients run)."""
    from .registry import Registry, RegistryError
    try:
        registrations = Registry().list(strict=True)
    except RegistryError as e:
        raise Failure(str(e), EXIT_BAD_INPUT) from None
    listed = _tell_daemon("list")
    traced = {e["cgroup"]: e for e in listed["episodes"]} if listed else {}
    rows = [{**reg.__dict__, **({"traced": reg.cgroup in traced} if listed else {})} for reg in registrations]
    rows += [{"id": e["id"], "cgroup": e["cgroup"], "labels": e["labels"], "kind": e["kind"], "traced": True}
             for e in traced.values() if e["kind"] != "registered"]
    for row in rows:
        if as_json:
            click.echo(json.dumps(row))
        else:
            labels = " ".join(f"{k}={printable(v)}" for k, v in sorted(row["labels"].items()))
            kind = f"\t({row['kind']})" if "kind" in row else ""
            click.echo(f"{row['id']}\t{printable(row['cgroup'])}\t{labels}".rstrip() + kind)


@cli.command()
@click.argument("capture_path", metavar="PATH", type=click.Path(exists=True, dir_okay=False))
@click.option("--config", "config_path", type=click.Path(dir_okay=False), metavar="FILE", help=CONFIG_HELP)
@click.option("--output", "outputs", multiple=True, metavar="SPEC", help=OUTPUT_HELP)
@click.option("--all", "all_documents", is_flag=True, help="Every document, not only the alerts.")
def replay(capture_path, config_path, outputs, all_documents) -> None:
    """Re-run every detector on a capture, offline and without root.

    A capture is made with 'eptrace run --capture PATH' or 'eptrace watch --capture PATH'.
    Replay prints the alerts (with --all, every document) that the same pipeline raises
    from it, so that a new rule or threshold can be tried on old episodes.

    \b
    Examples:
      eptrace replay ep-42.capture
      eptrace replay ep-42.capture --config stricter.toml --all
    """
    config = _config(config_path)
    fanout = _outputs(outputs)      # replay prints; it never delivers to the config's outputs
    from .capture import CaptureError
    from .capture import replay as replay_capture
    from .outputs import KindFilter
    from .session import make_encoder
    sink = fanout if all_documents else KindFilter(fanout, {"alert"})
    try:
        tracer = replay_capture(capture_path, make_encoder(), sink, config=config)
    except CaptureError as e:
        raise Failure(str(e), EXIT_BAD_INPUT) from None
    finally:
        fanout.close()
    click.echo(f"replayed {tracer.stats['records_received']} records: {tracer.stats['alerts']} alert(s)", err=True)


@cli.command()
def doctor() -> None:
    """Check that this host can run eptrace, and say how to fix what is missing."""
    from .doctor import can_run, format_report, run_checks
    checks = run_checks()
    click.echo(format_report(checks))
    if not can_run(checks):
        sys.exit(EXIT_KERNEL if os.geteuid() == 0 else EXIT_NOT_ROOT)


@cli.command()
@click.option("--all", "everything", is_flag=True, help="Also the state of a live eptrace (it loses its probes).")
def unpin(everything) -> None:
    """Remove pinned probes that no live eptrace uses, detaching them.

    A tracer that dies leaves its probes pinned under the pin directory (see 'eptrace doctor'):
    they keep recording, and refuse the episodes' connects when fail-closed. A restarted watch
    resumes its own state; this command clears it instead, and the state of dead runs.

    \b
    Examples:
      sudo eptrace doctor          # lists the pinned state
      sudo eptrace unpin
    """
    _require_root()
    from .kernel import pins
    removed = 0
    for state in pins.list_state():
        if state.alive and not everything:
            click.echo(f"kept {state.path}: a live eptrace uses it (--all removes it anyway)", err=True)
            continue
        pins.remove(state.path)
        removed += 1
        click.echo(f"removed {state.path} ({state.links} links, {state.maps} maps)", err=True)
    if removed == 0:
        click.echo(f"nothing to remove under {pins.root()}", err=True)


def main() -> None:
    cli(prog_name="eptrace")


if __name__ == "__main__":
    main()

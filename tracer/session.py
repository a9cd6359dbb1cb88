"""The session lifecycle every way of tracing shares: open the outputs, trace, close, verdict.
In-process: one episode around a command (run_episode), an existing cgroup (CgroupTrace, the API),
or the whole host (trace_host: the daemon). tracer/client.py does the same through a daemon.

The probes (bcc) are imported only where a tracer is made: a daemon's client never loads them."""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from . import __version__
from .command import User, command_setup
from .config import Config
from .events import Metric
from .kernel import cgroups, pins
from .policy import Policy
from .registry import Registry, validate_id
from .verdict import Verdict, VerdictBuilder
from .watchdog import DONE

log = logging.getLogger(__name__)

RUN_PARENT = "eptrace"          # run's fresh cgroups live under <cgroup2>/eptrace/, as <id>@<pid>


def make_tracer(outputs, stats_interval_s: float, config: Config | None = None, capture=None,
                pin_dir: Path | None = None, fail_closed: bool = False):
    """pin_dir: pin the probes there (they outlive this process); fail_closed: and refuse the
    episodes' connects once no tracer has refreshed the liveness map for the configured timeout."""
    from .kernel.loader import Probes
    from .pipeline import Tracer
    config = config or Config()
    probes = Probes(ringbuf_pages=config.limits.ringbuf_pages, pin_dir=pin_dir)
    try:
        tracing = config.tracing
        timeout_ns = int(tracing.liveness_timeout_seconds * 1e9)
        probes.set_fail_closed(timeout_ns if fail_closed else 0, int(tracing.stall_timeout_seconds * 1e9),
                               episode_timeout_ns=timeout_ns)
        return Tracer(probes, make_encoder(), outputs, stats_interval_s=stats_interval_s, config=config,
                      capture=capture)
    except BaseException:
        probes.close(keep_pins=probes.resumed)
        raise


def serve_metrics(tracer, address: str | None):
    """The Prometheus endpoint of --metrics-listen, or None."""
    if not address:
        return None
    from .metrics_http import MetricsServer
    per_episode = tracer.config.metrics.per_episode
    return MetricsServer(address, lambda: tracer.stats_snapshot(per_episode=per_episode), per_episode)


def make_encoder():
    from .schema.ecs import EcsEncoder
    return EcsEncoder(host_name=socket.gethostname(), agent_version=__version__)


def clean_leftovers(tracer) -> None:
    """Run cgroups left by an eptrace that died, <id>@<pid>[.<n>] ('@' is in no id) whose pid is
    gone: kill what is in them, report each in a metric document, remove them; then unpin the
    probes of dead runs (after the kill, so that they keep refusing until then), each reported in a
    metric document with the records its ring buffer held that nobody read (counted, not delivered:
    their episode's cgroup is gone)."""
    parent = cgroups.cgroup2_mount() / RUN_PARENT
    for child in sorted(parent.iterdir()) if parent.is_dir() else []:
        episode_id, _, owner = child.name.rpartition("@")
        owner = owner.split(".")[0]
        if not child.is_dir() or not owner.isdigit() or Path(f"/proc/{owner}").exists():
            continue
        left = cgroups.pids(child)
        try:
            cgroups.kill_and_remove(child)
        except cgroups.CgroupError as e:
            log.warning("run cgroup %s left by a dead eptrace (pid %s): %s", child, owner, e)
            continue
        if left:
            log.warning("killed %d process(es) left by a dead eptrace (pid %s) in run cgroup %s",
                        len(left), owner, child)
        tracer.emit(Metric(timestamp_ns=time.time_ns(), stats={
            "leftover_run_cgroup": cgroups.relative(child), "leftover_episode_id": episode_id,
            "leftover_owner_pid": int(owner), "leftover_processes_killed": len(left)}))
    for path in pins.dead_run_dirs():
        records, nbytes = pins.undelivered(path)
        log.warning("removing the pinned probes of a dead eptrace run: %s (%d record(s) it never read are lost)",
                    path, records)
        tracer.emit(Metric(timestamp_ns=time.time_ns(), stats={
            "leftover_pin_dir": str(path), "records_undelivered": records, "bytes_undelivered": nbytes}))
        pins.remove(path)


def episode_cgroups(episode_id: str, registry: Registry) -> list[Path]:
    """The cgroups of an episode: its registration's, and those of running 'eptrace run's of that id."""
    found = [cgroups.resolve(reg.cgroup) for reg in registry.list() if reg.id == episode_id]
    parent = cgroups.cgroup2_mount() / RUN_PARENT
    if parent.is_dir():
        found += [c for c in parent.iterdir() if c.is_dir() and c.name.rpartition("@")[0] == episode_id]
    return found


def fresh_cgroup(episode_id: str, owner_pid: int) -> Path:
    """A new cgroup <id>@<owner pid>[.n]: killed and removed by the next eptrace once the owner is dead."""
    parent = cgroups.cgroup2_mount() / RUN_PARENT
    for attempt in range(100):
        suffix = f".{attempt}" if attempt else ""
        try:
            parent.mkdir(exist_ok=True)
            return cgroups.create(parent / f"{episode_id}@{owner_pid}{suffix}")
        except (FileExistsError, FileNotFoundError):   # taken, or the parent was just removed
            continue
    raise cgroups.CgroupError(f"cannot make a fresh cgroup for episode {episode_id} under {parent}")


def remove_run_cgroup(cgroup: Path) -> None:
    try:
        cgroups.kill_and_remove(cgroup)
    except cgroups.CgroupError as e:
        log.warning("%s", e)
    try:
        cgroup.parent.rmdir()       # the shared parent goes when the last run leaves it
    except OSError:
        pass


class _Stop:
    """Turns SIGINT/SIGTERM into a flag, so the loop can flush before exiting."""

    def __init__(self) -> None:
        self.signum: int | None = None
        signal.signal(signal.SIGINT, self._set)
        signal.signal(signal.SIGTERM, self._set)

    def _set(self, signum, _frame) -> None:
        self.signum = signum


def _start_watchdog(cgroup: Path, pin_dir: Path) -> tuple[subprocess.Popen, int]:
    """The process that kills the episode if this one dies (tracer/watchdog.py): outside the
    episode cgroup, in its own session; the pipe's write end is ours alone (not inherited)."""
    read_end, write_end = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "tracer.watchdog", str(cgroup), str(pin_dir)],
                                stdin=read_end, stdout=subprocess.DEVNULL, start_new_session=True,
                                cwd=Path(__file__).resolve().parents[1])
    except OSError:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return proc, write_end


def _stop_watchdog(watchdog: subprocess.Popen, pipe: int) -> None:
    """A clean end: the watchdog leaves the episode to us."""
    try:
        os.write(pipe, DONE)
    finally:
        os.close(pipe)
    try:
        watchdog.wait(timeout=5)
    except subprocess.TimeoutExpired:
        watchdog.kill()


def run_episode(episode_id: str, argv: list[str], outputs, labels: dict[str, str] | None = None,
                grace_s: float = 10.0, stats_interval_s: float = 10.0, config: Config | None = None,
                capture=None, metrics_listen: str | None = None, user: User | None = None,
                policy: Policy | None = None) -> Verdict:
    """Trace CMD in a fresh episode cgroup. The verdict's exit_code is CMD's status
    (128+N if it was killed by signal N). The probes are pinned and fail closed: if this
    process dies, a watchdog kills the episode, and until then its connects are refused."""
    validate_id(episode_id)
    pins.remove(pins.run_dir(os.getpid()))     # a dead run's, under our reused pid: never resumed
    tracer = make_tracer(outputs, stats_interval_s, config, capture, pin_dir=pins.run_dir(os.getpid()),
                         fail_closed=True)
    metrics = watchdog = None
    cgroup: Path | None = None
    try:
        metrics = serve_metrics(tracer, metrics_listen)
        builder = VerdictBuilder(episode_id)
        tracer.observers.append(builder.observe)
        clean_leftovers(tracer)
        cgroup = fresh_cgroup(episode_id, os.getpid())
        stop = _Stop()
        episode = tracer.add_episode(episode_id, cgroup, labels, policy)
        watchdog, watchdog_pipe = _start_watchdog(cgroup, tracer.probes.pin_dir)
        enter_cgroup, env, child_stdout = command_setup(cgroup, user, outputs,
                                                        tracer.policies.get(episode.cgroup_id))
        try:
            child = subprocess.Popen(argv, preexec_fn=enter_cgroup, stdout=child_stdout, env=env)
        except (OSError, subprocess.SubprocessError) as e:
            log.error("cannot start %s: %s", argv[0], getattr(e, "strerror", None) or e)
            builder.verdict.exit_code = 127 if isinstance(e, FileNotFoundError) else 126
            return builder.verdict
        status = _wait_for_command(tracer, child, stop)
        _wait_for_descendants(tracer, cgroup, grace_s, stop)
        _wait_for_flows(tracer, grace_s, stop)
        tracer.finish()
        builder.verdict.exit_code = status
        account(builder.verdict, tracer, episode.cgroup_id, alone=True)
        builder.verdict.connects_refused = tracer.probes.refused().get(episode.cgroup_id, 0)
        builder.verdict.denied = tracer.probes.denied().get(episode.cgroup_id, 0)
        return builder.verdict
    finally:
        if watchdog is not None:
            _stop_watchdog(watchdog, watchdog_pipe)
        if cgroup is not None:
            remove_run_cgroup(cgroup)      # before the probes go: nothing runs untraced
        _close(tracer, outputs, capture, metrics)


def account(verdict: Verdict, tracer, cgroup_id: int, alone: bool) -> None:
    """The verdict's completeness, from the episode's losses. alone: the tracer traced only this
    episode, so a loss the kernel could not attribute to an episode is this one's too."""
    losses = tracer.episode_losses(cgroup_id)
    if alone:
        tracer_wide = sum(n for reason, n in tracer.probes.lost().items() if reason != "argv_unread")
        attributed = sum(n for reason, n in tracer.probes.episode_lost(cgroup_id).items() if reason != "argv_unread")
        if tracer_wide > attributed:
            losses["unattributed"] = tracer_wide - attributed
    verdict.account(losses)


def _wait_for_command(tracer, child: subprocess.Popen, stop: _Stop) -> int:
    forwarded = False
    while child.poll() is None:
        if stop.signum is not None and not forwarded:
            child.send_signal(stop.signum)
            forwarded = True
        tracer.poll()
    return child.returncode if child.returncode >= 0 else 128 - child.returncode


def _wait_for_descendants(tracer, cgroup: Path, grace_s: float, stop: _Stop) -> None:
    deadline = time.monotonic() + grace_s
    while cgroups.pids(cgroup):
        if time.monotonic() > deadline or stop.signum is not None:
            log.warning("processes still running in episode cgroup %s after %.0fs: killing them", cgroup, grace_s)
            (cgroup / "cgroup.kill").write_text("1")
            break
        tracer.poll()
    while cgroups.pids(cgroup) and time.monotonic() < deadline + 5:
        tracer.poll()


def _wait_for_flows(tracer, grace_s: float, stop: _Stop) -> None:
    deadline = time.monotonic() + grace_s
    while tracer.flows.open_flows() and time.monotonic() < deadline and stop.signum is None:
        tracer.poll()
    tracer.drain()
    still_open = tracer.flows.open_flows()
    if still_open:
        log.warning("%d flow(s) still open %.0fs after the episode ended; not waiting longer", len(still_open), grace_s)


def trace_host(outputs, loop, stats_interval_s: float = 10.0, config: Config | None = None,
               capture=None, metrics_listen: str | None = None) -> int:
    """The daemon's session: the host's tracer on the pinned watch state, loop(tracer, stop) until
    SIGINT/SIGTERM, then close. A clean stop detaches everything unless loop returns True (episodes the
    next daemon resumes); after a failure (or SIGKILL) the pinned probes stay for the next daemon, and
    keep the episodes traced (and fail-closed) meanwhile."""
    config = config or Config()
    tracer = make_tracer(outputs, stats_interval_s, config, capture, pin_dir=pins.watch_dir(),
                         fail_closed=config.tracing.fail_closed)
    metrics = None
    detach = False
    stop = _Stop()
    try:
        metrics = serve_metrics(tracer, metrics_listen)
        clean_leftovers(tracer)
        keep = loop(tracer, stop)
        tracer.finish()
        detach = not keep
        return 0
    finally:
        _close(tracer, outputs, capture, metrics, keep_pins=not detach)


def report_resumption(tracer, attached: dict[str, int]) -> None:
    """A daemon that re-opened the pinned state of one that died: deliver what was recorded
    meanwhile, forget links of episodes unregistered meanwhile, and say how long it was away."""
    probes = tracer.probes
    forgotten = probes.forget_others()
    if forgotten:
        log.info("no longer tracing cgroup id(s) %s: unregistered or gone while watch was away", forgotten)
    before = tracer.stats["records_received"]
    tracer.drain()
    refreshed_ns, _, lost_reported = probes.previous_liveness
    refused = probes.refused()
    stats = {
        "tracer_resumed": True,
        "away_seconds": round((time.monotonic_ns() - refreshed_ns) / 1e9, 3) if refreshed_ns else None,
        "records_delivered_from_pins": tracer.stats["records_received"] - before,
        "records_lost_while_away": max(0, sum(probes.lost().values()) - lost_reported),
        # the same field as in every metric document (a number), and per episode as a list: ids are data
        "connects_refused": sum(refused.values()),
        "episode_connects_refused": [{"episode_id": episode_id, "count": refused.get(cgid, 0)}
                                     for episode_id, cgid in attached.items()],
    }
    log.warning("resumed the pinned probes %s s after the last tracer was seen alive; %d record(s) waiting",
                stats["away_seconds"], stats["records_delivered_from_pins"])
    tracer.emit(Metric(timestamp_ns=time.time_ns(), stats=stats))


def _close(tracer, outputs, capture, metrics, keep_pins: bool = False) -> None:
    """Detach the probes, then flush and close what the session opened."""
    tracer.probes.close(keep_pins=keep_pins)
    outputs.close()
    if capture:
        capture.close()
    if metrics:
        metrics.close()


class CgroupTrace:
    """An existing cgroup traced in-process for a while (tracer.api.trace_cgroup): a tracer of its own,
    read by a thread, until end() gives the verdict."""

    def __init__(self, episode_id: str, cgroup: Path, outputs, config: Config | None = None,
                 labels: dict[str, str] | None = None, policy: Policy | None = None):
        import threading
        self.episode_id, self.outputs = episode_id, outputs
        self.tracer = make_tracer(outputs, stats_interval_s=10.0, config=config)
        try:
            self.builder = VerdictBuilder(episode_id)
            self.tracer.observers.append(self.builder.observe)
            self.cgroup_id = self.tracer.add_episode(episode_id, cgroup, labels, policy).cgroup_id
        except BaseException:
            _close(self.tracer, outputs, None, None)
            raise
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="eptrace", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.tracer.poll()

    def end(self) -> Verdict:
        self._stop.set()
        self._thread.join()
        try:
            self.tracer.finish()
            account(self.builder.verdict, self.tracer, self.cgroup_id, alone=True)
            return self.builder.verdict
        finally:
            _close(self.tracer, self.outputs, None, None)

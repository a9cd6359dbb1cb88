"""The two ways to trace: one episode around a command (run), or every
registered episode (watch)."""
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
from .config import Config
from .kernel import cgroups
from .kernel.loader import Probes
from .pipeline import Tracer
from .registry import Registry, validate_id
from .verdict import Verdict, VerdictBuilder

log = logging.getLogger(__name__)

RUN_PARENT = "eptrace"          # run's fresh cgroups live under <cgroup2>/eptrace/, as <id>@<pid>
SYNC_INTERVAL_S = 0.5           # how often watch re-reads the registrations


def make_tracer(outputs, stats_interval_s: float, config: Config | None = None, capture=None) -> Tracer:
    probes = Probes(ringbuf_pages=(config or Config()).limits.ringbuf_pages)
    return Tracer(probes, make_encoder(), outputs, stats_interval_s=stats_interval_s, config=config,
                  capture=capture)


def serve_metrics(tracer: Tracer, address: str | None):
    """The Prometheus endpoint of --metrics-listen, or None."""
    if not address:
        return None
    from .metrics_http import MetricsServer
    return MetricsServer(address, tracer.stats_snapshot)


def make_encoder():
    from .schema.ecs import EcsEncoder
    return EcsEncoder(host_name=socket.gethostname(), agent_version=__version__)


def _remove_stale_run_cgroups(parent: Path) -> None:
    """Empty run cgroups left by an eptrace that was killed: <id>@<pid>[.<n>] ('@' is in no id)."""
    if not parent.is_dir():
        return
    for child in parent.iterdir():
        owner = child.name.rpartition("@")[2].split(".")[0]
        if child.is_dir() and owner.isdigit() and not Path(f"/proc/{owner}").exists() and not cgroups.pids(child):
            try:
                child.rmdir()
            except OSError:
                pass


def _fresh_cgroup(episode_id: str) -> Path:
    parent = cgroups.cgroup2_mount() / RUN_PARENT
    _remove_stale_run_cgroups(parent)
    for attempt in range(100):
        suffix = f".{attempt}" if attempt else ""
        try:
            parent.mkdir(exist_ok=True)
            return cgroups.create(parent / f"{episode_id}@{os.getpid()}{suffix}")
        except (FileExistsError, FileNotFoundError):   # taken, or the parent was just removed
            continue
    raise cgroups.CgroupError(f"cannot make a fresh cgroup for episode {episode_id} under {parent}")


def _remove_run_cgroup(cgroup: Path) -> None:
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


def run_episode(episode_id: str, argv: list[str], outputs, labels: dict[str, str] | None = None,
                grace_s: float = 10.0, stats_interval_s: float = 10.0, config: Config | None = None,
                capture=None, metrics_listen: str | None = None) -> Verdict:
    """Trace CMD in a fresh episode cgroup. The verdict's exit_code is CMD's status
    (128+N if it was killed by signal N)."""
    validate_id(episode_id)
    tracer = make_tracer(outputs, stats_interval_s, config, capture)
    metrics = serve_metrics(tracer, metrics_listen)
    builder = VerdictBuilder(episode_id)
    tracer.observers.append(builder.observe)
    cgroup = _fresh_cgroup(episode_id)
    stop = _Stop()
    try:
        episode = tracer.add_episode(episode_id, cgroup, labels)
        procs_file = str(cgroup / "cgroup.procs")

        def enter_cgroup() -> None:     # runs in the child before exec, so exec is traced
            with open(procs_file, "w") as f:
                f.write(str(os.getpid()))

        # stdout carries the event stream when it is an output: CMD's stdout goes to stderr then.
        child_stdout = sys.stderr if any(o.name == "stdout" for o in outputs.outputs) else None
        try:
            child = subprocess.Popen(argv, preexec_fn=enter_cgroup, stdout=child_stdout)
        except OSError as e:
            log.error("cannot start %s: %s", argv[0], e.strerror)
            builder.verdict.exit_code = 127 if isinstance(e, FileNotFoundError) else 126
            return builder.verdict
        status = _wait_for_command(tracer, child, stop)
        _wait_for_descendants(tracer, cgroup, grace_s, stop)
        _wait_for_flows(tracer, grace_s, stop)
        tracer.finish()
        builder.verdict.exit_code = status
        account(builder.verdict, tracer, episode.cgroup_id, alone=True)
        return builder.verdict
    finally:
        _close(tracer, outputs, capture, metrics)
        _remove_run_cgroup(cgroup)


def account(verdict: Verdict, tracer: Tracer, cgroup_id: int, alone: bool) -> None:
    """The verdict's completeness, from the episode's losses. alone: the tracer traced only this
    episode, so a loss the kernel could not attribute to an episode is this one's too."""
    losses = tracer.episode_losses(cgroup_id)
    if alone:
        tracer_wide = sum(n for reason, n in tracer.probes.lost().items() if reason != "argv_unread")
        attributed = sum(n for reason, n in tracer.probes.episode_lost(cgroup_id).items() if reason != "argv_unread")
        if tracer_wide > attributed:
            losses["unattributed"] = tracer_wide - attributed
    verdict.account(losses)


def _wait_for_command(tracer: Tracer, child: subprocess.Popen, stop: _Stop) -> int:
    forwarded = False
    while child.poll() is None:
        if stop.signum is not None and not forwarded:
            child.send_signal(stop.signum)
            forwarded = True
        tracer.poll()
    return child.returncode if child.returncode >= 0 else 128 - child.returncode


def _wait_for_descendants(tracer: Tracer, cgroup: Path, grace_s: float, stop: _Stop) -> None:
    deadline = time.monotonic() + grace_s
    while cgroups.pids(cgroup):
        if time.monotonic() > deadline or stop.signum is not None:
            log.warning("processes still running in episode cgroup %s after %.0fs: killing them", cgroup, grace_s)
            (cgroup / "cgroup.kill").write_text("1")
            break
        tracer.poll()
    while cgroups.pids(cgroup) and time.monotonic() < deadline + 5:
        tracer.poll()


def _wait_for_flows(tracer: Tracer, grace_s: float, stop: _Stop) -> None:
    deadline = time.monotonic() + grace_s
    while tracer.flows.open_flows() and time.monotonic() < deadline and stop.signum is None:
        tracer.poll()
    tracer.drain()
    still_open = tracer.flows.open_flows()
    if still_open:
        log.warning("%d flow(s) still open %.0fs after the episode ended; not waiting longer", len(still_open), grace_s)


def watch(outputs, registry: Registry, stats_interval_s: float = 10.0, config: Config | None = None,
          capture=None, metrics_listen: str | None = None) -> int:
    """Trace every registered episode until SIGINT/SIGTERM; registrations are re-read twice a second."""
    tracer = make_tracer(outputs, stats_interval_s, config, capture)
    metrics = serve_metrics(tracer, metrics_listen)
    stop = _Stop()
    attached: dict[str, int] = {}          # episode id -> cgroup id
    warned: set[tuple[str, str]] = set()   # (episode id, cgroup) that could not be traced: not retried
    try:
        next_sync = 0.0
        while stop.signum is None:
            if time.monotonic() >= next_sync:
                next_sync = time.monotonic() + SYNC_INTERVAL_S
                _sync(tracer, registry, attached, warned)
            tracer.poll()
        tracer.finish()
        return 0
    finally:
        _close(tracer, outputs, capture, metrics)


def _close(tracer: Tracer, outputs, capture, metrics) -> None:
    """Detach the probes, then flush and close what the session opened."""
    tracer.probes.close()
    outputs.close()
    if capture:
        capture.close()
    if metrics:
        metrics.close()


def _sync(tracer: Tracer, registry: Registry, attached: dict[str, int], warned: set[tuple[str, str]]) -> None:
    wanted = {reg.id: reg for reg in registry.list()}
    for episode_id, cgid in list(attached.items()):
        episode = tracer.episodes.get(cgid)
        gone = episode is None or not (cgroups.cgroup2_mount() / episode.cgroup_path.lstrip("/")).is_dir()
        if episode_id not in wanted or gone:
            tracer.remove_episode(cgid)
            del attached[episode_id]
            if gone and episode_id in wanted:
                log.warning("episode %s: its cgroup was removed; it stays registered", episode_id)
                warned.add((episode_id, wanted[episode_id].cgroup))
    for episode_id, reg in wanted.items():
        if episode_id in attached or (episode_id, reg.cgroup) in warned:
            continue
        try:
            path = cgroups.resolve(reg.cgroup)
            attached[episode_id] = tracer.add_episode(episode_id, path, reg.labels).cgroup_id
        except (cgroups.CgroupError, OSError) as e:
            log.warning("episode %s: cannot trace cgroup %s: %s", episode_id, reg.cgroup, e)
            warned.add((episode_id, reg.cgroup))

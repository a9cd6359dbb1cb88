"""The tracer's main loop: records -> decoding -> state -> schema -> outputs."""
from __future__ import annotations

import logging
import resource
import time
from collections import Counter
from pathlib import Path

from . import decoding, procfs
from .capture import FORMAT as CAPTURE_FORMAT
from .decoding import NetRecord, ProcessRecord, RecordType, SocketRecord
from .config import Config
from .detect import Engine
from .detect.argv import is_shell_or_interpreter
from .events import Episode, Metric, NetworkEvent, PayloadSeen, ProcessEvent, StdioSocket
from .kernel import cgroups
from .kernel.loader import Probes
from .state.episodes import Episodes
from .state.flows import FlowTable
from .state.processes import Processes

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 0.25
POLL_MS = 50          # how often the ring buffer is read: the latency of an event


class Clock:
    """Converts the probes' CLOCK_MONOTONIC stamps to wall-clock nanoseconds."""

    def __init__(self) -> None:
        self.sync()

    def sync(self) -> None:
        self.offset = time.time_ns() - time.monotonic_ns()

    def wall_ns(self, mono_ns: int) -> int:
        return mono_ns + self.offset


class Tracer:
    def __init__(self, probes: Probes, encoder, outputs, stats_interval_s: float = 10.0,
                 config: Config | None = None, proc=procfs, capture=None):
        """proc answers /proc lookups (tracer.procfs, or a capture's answers in replay);
        capture, a capture.Recorder, records the input stream."""
        self.probes = probes
        self.encoder = encoder
        self.outputs = outputs
        self.stats_interval_s = stats_interval_s
        self.clock = Clock()
        self.stats: Counter[str] = Counter()
        self.episodes = Episodes()
        self.proc = capture or proc           # a Recorder answers from /proc and keeps the answers
        self.capture = capture
        if capture:
            capture.write("meta", {"format": CAPTURE_FORMAT, "clock_offset": self.clock.offset})
        self.processes = Processes(wall_ns=self.clock.wall_ns, lookup=self.proc.process_info)
        self.config = config or Config()
        self.flows = FlowTable(emit=self.emit, resolve=self._context, wall_ns=self.clock.wall_ns,
                               observe=self._inspect,
                               update_interval_ns=int(self.config.flows.update_interval_seconds * 1e9),
                               lineage=self._lineage_pids)
        probes.set_flow_update_interval(self.flows.update_interval_ns)
        self.detectors = Engine(self.config, parent_of=self.processes.parent_of, flows=self.flows)
        self.observers: list = []          # callables that see every emitted event (verdicts)
        self._next_sweep = self._next_stats = time.monotonic()
        self._next_stats += stats_interval_s
        probes.open_records(self._on_record)

    def _lineage_pids(self, process) -> list[int]:
        pids = []
        while process is not None and len(pids) < 16:
            pids.append(process.pid)
            process = self.processes.parent_of(process)
        return pids

    # -- episodes -------------------------------------------------------------------
    def add_episode(self, episode_id: str, cgroup_path: Path, labels: dict[str, str] | None = None) -> Episode:
        cgid = self.probes.attach(cgroup_path)
        episode = Episode(id=episode_id, cgroup_path=cgroups.relative(cgroup_path), cgroup_id=cgid,
                          labels=dict(labels or {}))
        self.episodes.add(episode)
        if self.capture:
            self.capture.write("episode", episode.id, episode.cgroup_path, episode.cgroup_id, episode.labels)
        log.info("tracing episode %s (cgroup %s)", episode_id, episode.cgroup_path)
        return episode

    def remove_episode(self, cgroup_id: int) -> None:
        self.probes.detach(cgroup_id)
        episode = self.episodes.remove(cgroup_id)
        if episode:
            log.info("stopped tracing episode %s", episode.id)

    # -- records --------------------------------------------------------------------
    def _on_record(self, raw: bytes) -> None:
        self.stats["records_received"] += 1
        try:
            rec = decoding.decode(raw)
        except decoding.DecodeError as e:
            self.stats["records_undecodable"] += 1
            log.warning("dropped an undecodable record: %s", e)
            return
        if isinstance(rec, ProcessRecord):
            self._process_record(rec)
        else:
            self.flows.handle(rec)
        if self.capture:     # after the /proc answers it needed, so that replay has them first
            self.capture.write("rec", raw)

    def _context(self, rec: NetRecord | SocketRecord | ProcessRecord):
        """(episode, cgroup id, cgroup path, process) of a record's owner, or None."""
        owner = rec.header.owner
        episode = self.episodes.get(owner.episode_cgroup_id)
        if episode is None:
            self.stats["records_without_episode"] += 1
            return None
        cgroup_id = owner.cgroup_id or episode.cgroup_id
        path = self.episodes.cgroup_path(cgroup_id, episode)
        process = self.processes.get(owner) if owner.tgid else None
        return episode, cgroup_id, path, process

    def _process_record(self, rec: ProcessRecord) -> None:
        kind = rec.header.type
        if kind == RecordType.PROCESS_FORKED:
            self.processes.on_fork(rec)
        elif kind == RecordType.PROCESS_ARGS:
            self.processes.on_args(rec)
        elif kind == RecordType.STDIO_DUP:
            ctx = self._context(rec)
            if ctx is not None:
                self._check_stdio(rec.header.ts_ns, ctx, self.processes.get(rec.header.owner), (rec.child_pid,), "dup2")
        elif kind in (RecordType.PROCESS_EXEC, RecordType.PROCESS_EXITED):
            ctx = self._context(rec)
            if ctx is None:
                return
            episode, cgroup_id, path, _ = ctx
            if kind == RecordType.PROCESS_EXEC:
                proc, action = self.processes.on_exec(rec), "process_started"
            else:
                proc, action = self.processes.on_exit(rec), "process_ended"
            self.emit(ProcessEvent(action=action, timestamp_ns=self.clock.wall_ns(rec.header.ts_ns),
                                   episode=episode, cgroup_id=cgroup_id, cgroup_path=path, process=proc))
            if kind == RecordType.PROCESS_EXEC and is_shell_or_interpreter(proc.args, proc.executable):
                self._check_stdio(rec.header.ts_ns, ctx, proc, (0, 1), "exec")

    def _check_stdio(self, ts_ns: int, ctx, proc, fds, how: str) -> None:
        """Is there a network socket on these stdio fds? /proc says, while the process lives.

        /proc is read later than the record was made: if the process has exec'd since,
        the check is left to its own exec record, so the alert names the right program."""
        episode, cgroup_id, path, _ = ctx
        now = self.proc.process_info(proc.pid)
        if now is None or (proc.name and now.name and now.name != proc.name):
            return      # gone, or another program now (exe paths differ through symlinks; names do not)
        for fd in fds:
            found = self.proc.socket_on_fd(proc.pid, fd)
            if found is not None:
                transport, local, remote, state = found
                # dated when it was seen: /proc may show what happened after the record
                seen_ns = time.time_ns() if how == "exec" else self.clock.wall_ns(ts_ns)
                self._inspect(StdioSocket(seen_ns, episode, cgroup_id, path, proc, fd, how,
                                          transport, local, remote, state))
                return

    def _inspect(self, seen: PayloadSeen | StdioSocket) -> None:
        """First bytes, DNS queries, sockets on stdio: to the detectors only, not to the outputs."""
        for alert in self.detectors.observe(seen):
            self.stats["alerts"] += 1
            self.emit(alert)

    def emit(self, event) -> None:
        self.outputs.write(self.encoder.encode_document(event))
        self.stats["events_emitted"] += 1
        for observe in self.observers:
            observe(event)
        if isinstance(event, (NetworkEvent, ProcessEvent)):
            for alert in self.detectors.observe(event):
                self.stats["alerts"] += 1
                self.emit(alert)

    # -- loop -------------------------------------------------------------------------
    def poll(self, timeout_ms: int = POLL_MS) -> None:
        self.probes.poll(timeout_ms)
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL_S
            self._sweep(time.monotonic_ns(), final=False)
            self.outputs.flush()
        if now >= self._next_stats:
            self._next_stats = now + self.stats_interval_s
            self.clock.sync()
            if self.capture:
                self.capture.write("clock", self.clock.offset)
            self.emit_stats()

    def _sweep(self, now_ns: int, final: bool) -> None:
        if self.capture:
            self.capture.write("sweep", now_ns, final)
        self.flows.sweep(now_ns, final=final)

    def drain(self) -> None:
        """Read every record already in the ring buffer."""
        self.probes.poll(0)

    def stats_snapshot(self) -> dict:
        lost = self.probes.lost()
        stats: dict = {
            "records_received": self.stats["records_received"],
            "records_lost": sum(lost.values()),
            "records_lost_by_reason": lost,
            "records_undecodable": self.stats["records_undecodable"],
            "records_without_episode": self.stats["records_without_episode"],
            "events_emitted": self.stats["events_emitted"],
            "alerts": self.stats["alerts"],
            "episodes": len(self.episodes),
            "flows_open": len(self.flows.flows),
        }
        usage = resource.getrusage(resource.RUSAGE_SELF)     # this process only, not the episode
        stats["tracer_cpu_seconds"] = round(usage.ru_utime + usage.ru_stime, 3)
        stats["tracer_max_rss_bytes"] = usage.ru_maxrss * 1024
        # A list of objects, not a map keyed by the output spec: a spec holds dots and slashes, and SIEMs
        # would make a new field of every output (ECS custom fields have fixed names).
        stats["outputs"] = [{"output": o.name, "sent": o.sent, **drop_counters(o.dropped),
                             "queued": getattr(o, "queued", 0),
                             "spooled_bytes": o.spool.size() if hasattr(o, "spool") else 0,
                             "latency_s": round(getattr(o, "latency_s", 0.0), 6)}
                            for o in self.outputs.outputs]
        return stats

    def emit_stats(self) -> None:
        self.emit(Metric(timestamp_ns=time.time_ns(), stats=self.stats_snapshot()))

    def finish(self) -> None:
        """Resolve what is pending, report the final counters and flush."""
        self.drain()
        self._sweep(time.monotonic_ns(), final=True)
        self.emit_stats()
        self.outputs.flush()


def drop_counters(dropped: dict[str, int]) -> dict:
    """An output's drop counters with fixed names: `dropped` by our own reason (spool_full, io_error, ...,
    rejected), and what a receiver refused ("rejected:<its reason>") as a list under `rejected`, since
    the receiver's words are data, not field names."""
    fixed: dict[str, int] = {}
    rejected = []
    for reason, n in dropped.items():
        kind, _, detail = reason.partition(":")
        fixed[kind] = fixed.get(kind, 0) + n
        if detail:
            rejected.append({"reason": detail, "count": n})
    return {"dropped": fixed, "rejected": rejected} if rejected else {"dropped": fixed}

"""The tracer's main loop: records -> decoding -> state -> schema -> outputs."""
from __future__ import annotations

import dataclasses
import logging
import resource
import time
from collections import Counter
from pathlib import Path

from . import decoding, procfs
from .capture import FORMAT as CAPTURE_FORMAT
from .decoding import EXEC_HELD, NetRecord, ProcessRecord, RecordType, SocketRecord, is_loopback
from .config import Config
from .detect import Engine
from .detect.argv import is_shell_or_interpreter
from .events import Alert, Burst, Episode, IcmpEchoes, Metric, NetworkEvent, PayloadSeen, PipedShell, ProcessEvent, StdioSocket
from .kernel import cgroups
from .kernel.loader import Probes
from .detect.rules import EPISODE_CONTAINED
from .policy import PROTOCOLS as CUT_PROTOCOLS, Policy
from .state.episodes import Episodes
from .state.flows import FlowTable
from .state.pipes import PipeShells
from .state.processes import Processes
from .verdict import RECORD_LOSSES

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 0.25
POLL_MS = 50          # how often the ring buffer is read: the latency of an event
MAX_SSH_CONFIGS = 4096  # ssh clients whose config was read, remembered


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
        probes.set_icmp_large_payload(self.config.icmp.large_payload_bytes)
        self.detectors = Engine(self.config, parent_of=self.processes.parent_of, flows=self.flows,
                                ssh_forwarding=self._ssh_forwarding)
        self._ssh_configs: dict[tuple[int, int | None], str | None] = {}
        self.shells = PipeShells(self.proc, observe=self._inspect, lookup=self.processes.known)
        limits = self.config.limits
        probes.set_budget(limits.record_budget_per_second, limits.record_budget_burst)
        probes.set_ring_share(limits.ring_share_watermark_percent, limits.ring_share_per_second,
                              limits.ring_share_burst)
        self.flows.evicted = self._flow_evicted
        # What userspace could not keep or find, per episode cgroup id (the kernel's losses are in its maps).
        self.episode_counts: dict[int, Counter[str]] = {}
        # What each episode did, per episode cgroup id: the per-episode metrics (stats_snapshot(per_episode=True)).
        self.episode_activity: dict[int, Counter[str]] = {}
        self._removed_losses: dict[str, dict[str, int]] = {}   # episodes removed since the last metric
        self.observers: list = []          # callables that see every emitted event (verdicts)
        self.finished = False              # finish() ran (the daemon finishes before it saves its verdicts)
        self.on_document = None            # callable(event, document): the daemon's clients get theirs
        self._on_alert: dict[int, str] = {}             # episode cgroup id -> its own on_alert (a client's)
        self.policies: dict[int, Policy] = {}           # episode cgroup id -> its policy (own or the config's)
        self._contained: dict[int, set[str]] = {}       # episode cgroup id -> actions taken on it
        self.flows.denial = self._denial
        self._next_sweep = self._next_stats = time.monotonic()
        self._next_stats += stats_interval_s
        probes.open_records(self._on_record)

    def _lineage_pids(self, process) -> list[int]:
        pids = []
        while process is not None and len(pids) < 16:
            pids.append(process.pid)
            process = self.processes.parent_of(process)
        return pids

    def _ssh_forwarding(self, process) -> str | None:
        """What an ssh client's config makes it forward: read once per process (ssh -G costs ~50 ms)."""
        key = (process.pid, process.start_ns)
        if key not in self._ssh_configs:
            if len(self._ssh_configs) >= MAX_SSH_CONFIGS:
                self._ssh_configs.pop(next(iter(self._ssh_configs)))
            self._ssh_configs[key] = self.proc.ssh_forwarding(process.pid, process.args, process.start_ns)
        return self._ssh_configs[key]

    # -- episodes -------------------------------------------------------------------
    def add_episode(self, episode_id: str, cgroup_path: Path, labels: dict[str, str] | None = None,
                    policy: Policy | None = None, on_alert: str | None = None, fail_closed: bool = False) -> Episode:
        """policy: the episode's own, which replaces the config's [policy]; on_alert: the episode's own
        --on-alert (a daemon client's), over the config's; fail_closed: refused while no tracer is alive,
        whatever the tracer-wide choice (a run through the daemon, as run is in-process)."""
        policy = policy or self.config.policy
        cgid = self.probes.attach(cgroup_path, policy, fail_closed=fail_closed)
        if policy is not None:
            self.policies[cgid] = policy
        if on_alert:
            self._on_alert[cgid] = on_alert
        episode = Episode(id=episode_id, cgroup_path=cgroups.relative(cgroup_path), cgroup_id=cgid,
                          labels=dict(labels or {}))
        self.episodes.add(episode)
        if self.capture:
            self.capture.write("episode", episode.id, episode.cgroup_path, episode.cgroup_id, episode.labels)
        log.info("tracing episode %s (cgroup %s)", episode_id, episode.cgroup_path)
        return episode

    def remove_episode(self, cgroup_id: int) -> None:
        self.policies.pop(cgroup_id, None)
        self._on_alert.pop(cgroup_id, None)
        self._contained.pop(cgroup_id, None)
        counts = self._episode_losses(cgroup_id, self.probes.detach(cgroup_id))
        self.episode_counts.pop(cgroup_id, None)
        self.episode_activity.pop(cgroup_id, None)
        episode = self.episodes.remove(cgroup_id)
        if episode:
            self.shells.forget_episode(episode.id)
            if counts:
                self._removed_losses[episode.id] = counts
            log.info("stopped tracing episode %s", episode.id)

    # -- what an episode's record is missing -------------------------------------------
    def _count(self, cgroup_id: int, what: str, n: int = 1) -> None:
        self.episode_counts.setdefault(cgroup_id, Counter())[what] += n

    def _flow_evicted(self, flow) -> None:
        self.stats["flows_evicted"] += 1
        self._count(flow.episode.cgroup_id, "flows_evicted")

    def _episode_losses(self, cgroup_id: int, kernel: dict[str, int] | None = None) -> dict[str, int]:
        counts = dict(kernel if kernel is not None else self.probes.episode_lost(cgroup_id))
        counts.update(self.episode_counts.get(cgroup_id, {}))
        return {reason: n for reason, n in counts.items() if n}

    def episode_losses(self, cgroup_id: int) -> dict[str, int]:
        """Everything an episode's record lacks so far, by reason (nonzero counts only): the kernel's
        losses (tracer.kernel.loader.LOSS_REASONS) and userspace's (argv_from_proc, argv_missing,
        flows_evicted). tracer.verdict says which of them make a verdict incomplete."""
        return self._episode_losses(cgroup_id)

    # -- records --------------------------------------------------------------------
    def _on_record(self, raw: bytes) -> None:
        self.stats["records_received"] += 1
        try:
            rec = decoding.decode(raw)
        except decoding.DecodeError as e:
            self.stats["records_undecodable"] += 1
            log.warning("dropped an undecodable record: %s", e)
            return
        try:
            if isinstance(rec, ProcessRecord):
                self._process_record(rec)
            else:
                self.flows.handle(rec)
        except Exception:
            # A bug must not pass silently: ctypes would print it and drop the rest of the record's work
            # (an alert among it). Counted for the tracer, and for the episode as a gap in its record.
            self.stats["records_failed"] += 1
            self._count(rec.header.owner.episode_cgroup_id, "record_errors")
            if self.stats["records_failed"] <= 10:
                log.exception("a record of type %s failed in the tracer (its episode's verdict is incomplete)",
                              rec.header.type)
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
        if kind == RecordType.PROCESS_EXEC and rec.child_pid & EXEC_HELD and \
                self.episodes.get(rec.header.owner.episode_cgroup_id) is None:
            self.proc.resume(rec.header.owner.tgid)     # its episode is gone: never leave it stopped
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
                proc, action = self._exec(rec, episode), "process_started"
            else:
                proc, action = self.processes.on_exit(rec), "process_ended"
            self.emit(ProcessEvent(action=action, timestamp_ns=self.clock.wall_ns(rec.header.ts_ns),
                                   episode=episode, cgroup_id=cgroup_id, cgroup_path=path, process=proc))
            if kind == RecordType.PROCESS_EXEC and is_shell_or_interpreter(proc.args, proc.executable):
                self._check_stdio(rec.header.ts_ns, ctx, proc, (0, 1), "exec")

    def _exec(self, rec: ProcessRecord, episode) -> object:
        try:
            proc, from_proc = self.processes.on_exec(rec)
        finally:
            if rec.child_pid & EXEC_HELD:      # stopped by the probe until its argv was read
                self.proc.resume(rec.header.owner.tgid)
        if from_proc is not None:
            self._count(episode.cgroup_id, "argv_from_proc" if from_proc else "argv_missing")
        return proc

    def _check_stdio(self, ts_ns: int, ctx, proc, fds, how: str) -> None:
        """Is there a network socket on these stdio fds? /proc says, while the process lives.

        /proc is read later than the record was made: if the process has exec'd since,
        the check is left to its own exec record, so the alert names the right program."""
        episode, cgroup_id, path, _ = ctx
        now = self.proc.process_info(proc.pid)
        if now is None or (proc.name and now.name and now.name != proc.name):
            return      # gone, or another program now (exe paths differ through symlinks; names do not)
        if now.args and now.args != proc.args:
            # The same name with other argv: it exec'd a program of the same name since (sh -c ... then
            # sh -i), or it rewrote its argv. The alert names what holds the socket now; the later exec
            # record, if any, finds the same peer (one alert).
            proc = dataclasses.replace(proc, args=now.args)
        for fd in fds:
            found = self.proc.socket_on_fd(proc.pid, fd)
            if found is not None:
                transport, local, remote, state = found
                # dated when it was seen: /proc may show what happened after the record
                seen_ns = time.time_ns() if how == "exec" else self.clock.wall_ns(ts_ns)
                self._inspect(StdioSocket(seen_ns, episode, cgroup_id, path, proc, fd, how,
                                          transport, local, remote, state))
                return

    def _inspect(self, seen: PayloadSeen | StdioSocket | PipedShell | Burst | IcmpEchoes) -> None:
        """First bytes, DNS queries, sockets on stdio, shells on pipes, bursts, ICMP echo sums: to the detectors
        only, not to the outputs."""
        for alert in self.detectors.observe(seen):
            self.stats["alerts"] += 1
            self.emit(alert)
        if isinstance(seen, PayloadSeen):
            self.shells.on_event(seen)      # the first bytes of a flow: a pipeline may be complete now

    def emit(self, event) -> None:
        doc = self.encoder.encode_document(event)
        self.outputs.write(doc)
        if self.on_document is not None:
            self.on_document(event, doc)
        self.stats["events_emitted"] += 1
        for observe in self.observers:
            observe(event)
        self._count_activity(event)
        if isinstance(event, Alert) and event.rule is not EPISODE_CONTAINED:
            self._act_on(event)
        if isinstance(event, (NetworkEvent, ProcessEvent)):
            for alert in self.detectors.observe(event):
                self.stats["alerts"] += 1
                self.emit(alert)
            self.shells.on_event(event)

    def _count_activity(self, event) -> None:
        episode = getattr(event, "episode", None)
        if episode is None or self.episodes.get(episode.cgroup_id) is None:
            return
        if isinstance(event, Alert):
            what = "alerts"
        elif isinstance(event, NetworkEvent) and event.action == "connection_attempted":
            what = "connections"
        else:
            return
        self.episode_activity.setdefault(episode.cgroup_id, Counter())[what] += 1

    # -- containment ------------------------------------------------------------------
    def _denial(self, cgroup_id: int, entry: int) -> str:
        policy = self.policies.get(cgroup_id)
        return policy.describe(entry) if policy else Policy().describe(entry)

    def _act_on(self, alert: Alert) -> None:
        """The on_alert action for this alert's rule (--on-alert over the episode's policy): once per episode,
        but cut, which acts on each alert's own flows."""
        cgid = alert.episode.cgroup_id
        policy = self.policies.get(cgid)
        action = self._on_alert.get(cgid) or self.config.on_alert or (policy.action_for(alert.rule.name) if policy else "none")
        done = self._contained.setdefault(cgid, set())
        if action == "none" or action in done or "deny_network" in done and action == "cut":
            return
        if action != "cut":
            done.add(action)
        path = cgroups.cgroup2_mount() / alert.episode.cgroup_path.lstrip("/")
        details: dict = {"action": action, "rule": alert.rule.name, "rule_id": alert.rule.id}
        error = None
        try:
            if action == "deny_network":
                self.probes.contain(cgid, policy)
            elif action == "cut":
                cookies, destinations = self._evidence_flows(alert)
                if not cookies:
                    error = "the alert's evidence names no flow"
                else:
                    self.probes.cut(cgid, policy, sorted(cookies), sorted(destinations))
                details["flows_cut"] = len(cookies)
                details["destinations_denied"] = [_destination_text(*d) for d in sorted(destinations)]
            else:
                (path / ("cgroup.kill" if action == "kill" else "cgroup.freeze")).write_text("1")
        except OSError as e:
            error = f"{e.strerror or e}"
        if error:
            log.error("episode %s: cannot %s it after %s: %s", alert.episode.id, action, alert.rule.name, error)
        now = time.time_ns()
        evidence_ns = min((e.timestamp_ns for e in alert.evidence), default=alert.timestamp_ns)
        details.update(after_evidence_ms=round((now - evidence_ns) / 1e6, 3),
                       after_alert_ms=round((now - alert.timestamp_ns) / 1e6, 3), done=error is None)
        if error:
            details["error"] = error
        what = {"deny_network": "cut off its network (every connect, send and packet refused; processes live on)",
                "cut": f"cut {details.get('flows_cut', 0)} flow(s) of the alert and denied "
                       f"{', '.join(details.get('destinations_denied', [])) or 'no destination'}",
                "kill": "killed every process (cgroup.kill)", "freeze": "froze every process (cgroup.freeze)"}[action]
        self.stats["containment_actions"] += 1
        self.emit(Alert(rule=EPISODE_CONTAINED, timestamp_ns=now, episode=alert.episode, cgroup_id=alert.cgroup_id,
                        cgroup_path=alert.cgroup_path, process=alert.process,
                        message=(f"episode {alert.episode.id}: {what} on {alert.rule.name}, "
                                 f"{details['after_evidence_ms']} ms after its evidence")
                        if error is None else f"episode {alert.episode.id}: {action} failed: {error}",
                        risk_score=0.0, evidence=alert.evidence, containment=details))

    def _evidence_flows(self, alert: Alert) -> tuple[set[int], set[tuple[str, int, int]]]:
        """The sockets (cookies) of the alert's evidence, and the destinations of those the episode opened
        (address, port, IANA protocol): what cut cuts and denies. Loopback peers are the episode's own."""
        cookies, destinations = set(), set()
        for ev in alert.evidence:
            cookie = getattr(ev, "cookie", 0)
            if not cookie:
                continue
            cookies.add(cookie)
            flow = self.flows.flows.get(cookie)
            if flow is not None:
                remote, transport, outbound = flow.remote, flow.transport, flow.initiated
            else:
                remote, transport = getattr(ev, "destination", None), getattr(ev, "transport", None)
                outbound = getattr(ev, "direction", None) == "egress"
            if outbound and remote is not None and remote.ip and not is_loopback(remote.ip) \
                    and transport in CUT_PROTOCOLS:
                destinations.add((remote.ip, remote.port, CUT_PROTOCOLS[transport]))
        return cookies, destinations

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
        self.shells.flush(self.clock.wall_ns(now_ns))   # before the entry: its /proc answers come first
        if self.capture:
            self.capture.write("sweep", now_ns, final)
        self.flows.sweep(now_ns, final=final)

    def replay_sweep(self, now_ns: int, final: bool) -> None:
        """A captured sweep, replayed: what _sweep did after its /proc reads."""
        self.shells.flush(self.clock.wall_ns(now_ns))
        self.flows.sweep(now_ns, final=final)

    def drain(self) -> None:
        """Read every record already in the ring buffer."""
        self.probes.poll(0)

    def stats_snapshot(self, per_episode: bool = False) -> dict:
        """The health counters (every metric document carries them). per_episode adds "episode_activity",
        one entry per traced episode, for the Prometheus endpoint ([metrics] per_episode)."""
        lost = self.probes.lost()
        refused, denied = self.probes.refused(), self.probes.denied()
        stats: dict = {
            "records_received": self.stats["records_received"],
            "records_lost": sum(n for reason, n in lost.items() if reason in RECORD_LOSSES),
            "records_lost_by_reason": lost,
            "records_undecodable": self.stats["records_undecodable"],
            "records_failed": self.stats["records_failed"],
            "records_without_episode": self.stats["records_without_episode"],
            "ring_unread_max_bytes": self.probes.ring_unread_max(),
            "connects_refused": sum(refused.values()),   # while no tracer was alive
            "egress_denied": sum(denied.values()),        # refused by episode policies
            "containment_actions": self.stats["containment_actions"],
            "events_emitted": self.stats["events_emitted"],
            "alerts": self.stats["alerts"],
            "episodes": len(self.episodes),
            "flows_open": len(self.flows.flows),
            "evicted": {"flows": self.stats["flows_evicted"], "relay_index": self.flows.relay_index_evicted,
                        **self.processes.evicted, "cgroup_paths": self.episodes.paths_evicted,
                        "detector_state": self.detectors.evicted()},
        }
        # Per episode, what its record lacks (only episodes with something to report).
        by_episode = dict(self._removed_losses)
        kernel = self.probes.episodes_lost()        # one pass over the kernel's accounts, not one lookup each
        for episode in self.episodes:
            counts = self._episode_losses(episode.cgroup_id, kernel.get(episode.cgroup_id, {}))
            if counts:
                by_episode[episode.id] = counts
        # A list of objects, not a map keyed by episode id: ids are data, never field names (ECS custom fields).
        stats["episode_losses"] = [{"episode_id": e, "losses": counts} for e, counts in by_episode.items()]
        if per_episode:
            stats["episode_activity"] = [
                {"episode_id": e.id, **{k: self.episode_activity.get(e.cgroup_id, {}).get(k, 0)
                                        for k in ("connections", "alerts")},
                 "connects_refused": refused.get(e.cgroup_id, 0), "egress_denied": denied.get(e.cgroup_id, 0)}
                for e in self.episodes]
        usage = resource.getrusage(resource.RUSAGE_SELF)     # this process only, not the episode
        stats["tracer_cpu_seconds"] = round(usage.ru_utime + usage.ru_stime, 3)
        stats["tracer_max_rss_bytes"] = usage.ru_maxrss * 1024
        stats["tracer_rss_bytes"] = _current_rss()
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
        self._removed_losses.clear()

    def finish_episode(self, cgroup_id: int, now_ns: int | None = None) -> None:
        """One episode is over (the others go on): resolve its connection attempts still pending."""
        self.flows.sweep(now_ns or time.monotonic_ns(), final=True, episode_cgroup_id=cgroup_id)
        self.outputs.flush()

    def finish(self) -> None:
        """Resolve what is pending, report the final counters and flush (once)."""
        if self.finished:
            return
        self.finished = True
        self.drain()
        self._sweep(time.monotonic_ns(), final=True)
        self.emit_stats()
        self.outputs.flush()


def _destination_text(address: str, port: int, protocol: int) -> str:
    host = f"[{address}]" if ":" in address else address
    name = next(n for n, number in CUT_PROTOCOLS.items() if number == protocol)
    return f"{host}:{port}/{name}" if port else f"{host}/{name}"


def _current_rss() -> int:
    """Resident memory now (the peak above is mostly the probes' compiler, freed after start-up)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return 0


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

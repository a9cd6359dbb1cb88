"""An episode's verdict: what it did on the network and what it raised, for the
orchestrator that decides its reward (stderr summary, --verdict JSON, API)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from . import logs
from .terminal import printable

log = logs.getLogger(__name__)

MAX_DESTINATIONS = 200      # listed in full up to this many
DISTINCT_DESTINATIONS = 262144   # the count is exact up to this many (memory); beyond, every one counts
# Counted, but no gap in the record: argv the kernel could not read that /proc then supplied
# (argv_unread counts the kernel's side, argv_from_proc the recoveries, argv_missing the rest).
NOT_GAPS = frozenset({"argv_unread", "argv_from_proc"})
# Counts that are records the kernel did not send (the other reasons are userspace's, or argv).
RECORD_LOSSES = frozenset({"ringbuf_full", "no_socket_storage", "budget", "ring_share", "burst_budget",
                           "connects_map_full", "exit_codes_map_full", "sockets_map_full", "argv_map_full",
                           "unattributed"})


@dataclass
class Verdict:
    episode_id: str
    exit_code: int | None = None
    connections: int = 0            # outbound connection attempts (TCP and connected UDP)
    connections_failed: int = 0
    flows_ended: int = 0
    bytes_out: int = 0              # payload bytes sent by the sandbox
    bytes_in: int = 0
    destinations: list[str] = field(default_factory=list)
    destination_count: int = 0
    alerts: list[dict] = field(default_factory=list)
    records_lost: int = 0           # records of this episode the kernel could not send
    losses: dict[str, int] = field(default_factory=dict)   # all that was counted, by reason
    complete: bool = True           # False: part of the episode's activity is not in its record
    incomplete_reasons: list[str] = field(default_factory=list)
    connects_refused: int = 0       # connects and datagram sends refused while no tracer was alive (fail-closed)
    denied: int = 0                 # connects, sends, sockets and packets the episode's policy refused
    containment: list[dict] = field(default_factory=list)   # on_alert actions taken (episode_contained)

    @property
    def alerted(self) -> bool:
        return bool(self.alerts)

    @property
    def clean(self) -> bool:
        """No alert, and nothing missing: only then does the record vouch for the episode."""
        return self.complete and not self.alerted

    def account(self, losses: dict[str, int]) -> None:
        """Set the completeness fields from the episode's losses (Tracer.episode_losses)."""
        self.losses = {reason: n for reason, n in sorted(losses.items()) if n}
        self.incomplete_reasons = [reason for reason in self.losses if reason not in NOT_GAPS]
        self.complete = not self.incomplete_reasons
        self.records_lost = sum(n for reason, n in self.losses.items() if reason in RECORD_LOSSES)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "alerted": self.alerted, "clean": self.clean}, indent=2)

    def human(self) -> str:
        lines = [f"episode {self.episode_id}: exit {self.exit_code}, {self.connections} connection(s) "
                 f"({self.connections_failed} failed), {self.flows_ended} flow(s) ended, "
                 f"{self.bytes_out} B out / {self.bytes_in} B in, {self.destination_count} destination(s), "
                 f"{len(self.alerts)} alert(s), {self.records_lost} record(s) lost, "
                 + ("complete" if self.complete else "INCOMPLETE")]
        if not self.complete:
            lines.append("  incomplete: " + ", ".join(f"{r} {self.losses[r]}" for r in self.incomplete_reasons))
        if self.destinations:
            shown = self.destinations[:10]
            more = self.destination_count - len(shown)
            lines.append("  destinations: " + ", ".join(shown) + (f" and {more} more" if more > 0 else ""))
        if self.connects_refused:
            lines.append(f"  {self.connects_refused} connect(s) or send(s) refused while the tracer was not alive")
        if self.denied:
            lines.append(f"  {self.denied} connect(s), send(s), socket(s) or packet(s) refused by the policy")
        for action in self.containment:
            lines.append(f"  CONTAINED: {action['action']} on {action['rule']}, "
                         f"{action['after_evidence_ms']} ms after its evidence")
        for alert in self.alerts:
            lines.append(f"  ALERT {alert['rule']} (severity {alert['severity']}): {alert['message']}")
        return "\n".join(printable(line) for line in lines)      # argv, names: the sandbox's text


class VerdictBuilder:
    """Watches one episode's events as they are emitted."""

    def __init__(self, episode_id: str, cgroup_id: int | None = None):
        """cgroup_id: only that episode's events (a daemon may trace two episodes of one id)."""
        from .events import Alert, NetworkEvent    # here: a verdict's reader (a daemon's client) needs no events
        self._kinds = (Alert, NetworkEvent)
        self.verdict = Verdict(episode_id)
        self.cgroup_id = cgroup_id
        self._destinations: set[str] = set()

    def observe(self, event) -> None:
        episode = getattr(event, "episode", None)
        if episode is None or episode.id != self.verdict.episode_id or \
                (self.cgroup_id is not None and episode.cgroup_id != self.cgroup_id):
            return
        v = self.verdict
        Alert, NetworkEvent = self._kinds
        if isinstance(event, Alert) and event.containment is not None:
            v.containment.append(event.containment)
        elif isinstance(event, Alert):
            v.alerts.append({"rule": event.rule.name, "rule_id": event.rule.id, "severity": event.rule.severity,
                             "message": event.message, "pid": event.process.pid if event.process else None})
        elif isinstance(event, NetworkEvent):
            if event.action in ("connection_attempted", "udp_sent") and event.destination is not None:
                v.connections += event.action == "connection_attempted"
                v.connections_failed += event.outcome == "failure"
                dst = event.destination
                text = f"[{dst.ip}]:{dst.port}/{event.transport}" if ":" in (dst.ip or "") else \
                    f"{dst.ip}:{dst.port}/{event.transport}"
                if text not in self._destinations:
                    if len(self._destinations) < DISTINCT_DESTINATIONS:
                        self._destinations.add(text)
                    v.destination_count += 1
                    if len(v.destinations) < MAX_DESTINATIONS:
                        v.destinations.append(text)
            elif event.action == "flow_ended":
                v.flows_ended += 1
                inbound = event.direction == "ingress"
                sent, received = ((event.destination_bytes, event.source_bytes) if inbound
                                  else (event.source_bytes, event.destination_bytes))
                v.bytes_out += sent or 0
                v.bytes_in += received or 0


def from_dict(data: dict) -> Verdict:
    """A Verdict from its JSON form (the daemon's answers); derived fields (alerted, clean) are dropped."""
    known = {f for f in Verdict.__dataclass_fields__}
    return Verdict(**{k: v for k, v in data.items() if k in known})


def merge(earlier: Verdict, later: Verdict) -> Verdict:
    """One episode's verdict from two daemons (one died, the next resumed the episode): activity adds up;
    the kernel's counters (losses, refusals, denials) are cumulative in the pinned maps, so the larger counts."""
    v = Verdict(later.episode_id, exit_code=later.exit_code)
    for name in ("connections", "connections_failed", "flows_ended", "bytes_out", "bytes_in"):
        setattr(v, name, getattr(earlier, name) + getattr(later, name))
    seen = set(earlier.destinations)
    v.destinations = (earlier.destinations + [d for d in later.destinations if d not in seen])[:MAX_DESTINATIONS]
    v.destination_count = earlier.destination_count + later.destination_count - \
        sum(1 for d in later.destinations if d in seen)
    v.alerts = earlier.alerts + later.alerts
    v.containment = earlier.containment + later.containment
    v.connects_refused = max(earlier.connects_refused, later.connects_refused)
    v.denied = max(earlier.denied, later.denied)
    v.account({r: max(earlier.losses.get(r, 0), later.losses.get(r, 0)) for r in {*earlier.losses, *later.losses}})
    return v


def write_verdict(verdict: Verdict, path: str | None) -> None:
    """The session's last step: the verdict as JSON to path (tracer.safefiles), when asked."""
    if not path:
        return
    from .safefiles import UnsafePathError, write_atomically
    try:
        write_atomically(path, (verdict.to_json() + "\n").encode(), "--verdict")
    except (OSError, UnsafePathError) as e:
        log.error("cannot write the verdict to %s: %s", path, e)

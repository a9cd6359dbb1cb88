"""Detectors: small pure functions of events and state that yield findings.

The engine turns findings into alerts, once per rule and key (a flow, a
process, a destination), so a flood of events never floods the SIEM.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from ..config import Config, Exceptions
from ..decoding import is_loopback
from ..events import (Alert, Burst, IcmpEchoes, NetworkEvent, PayloadSeen, PipedShell, Process, ProcessEvent, Rule,
                      StdioSocket)

MAX_LINEAGE = 16     # ancestors looked at for a tunnel or miner command line
MAX_FIRED = 262144   # remembered (rule, key) pairs; beyond, the oldest are forgotten


@dataclass
class Finding:
    rule: Rule
    key: tuple               # alert once per (rule, key)
    message: str
    risk_score: float
    evidence: list[NetworkEvent] = field(default_factory=list)


@dataclass
class Context:
    """What detectors may read: the config, a process's ancestry, and open flows by cookie."""
    config: Config
    parent_of: Callable[[Process], Process | None]
    flows: object = None          # the state's FlowTable: open flows, local relays
    # what an ssh client's config files make it forward (tracer.sshconfig), once per process
    ssh_forwarding: Callable[[Process], str | None] = lambda process: None

    def flow_of(self, cookie: int):
        return self.flows.flows.get(cookie) if self.flows is not None else None

    def lineage(self, process: Process | None) -> Iterator[Process]:
        """The process, then its ancestors inside the episode."""
        seen = 0
        while process is not None and seen < MAX_LINEAGE:
            yield process
            process = self.parent_of(process)
            seen += 1

    def allowed(self, event, rule: Rule | None = None) -> bool:
        """Does the allowlist (with a rule: that rule's own, [allowlist.rules.NAME]) except this event?"""
        exceptions = self.config.allowlist if rule is None else self.config.allowlist.for_rule(rule.name)
        return exceptions is not None and excepts(exceptions, event)


def excepts(exceptions: Exceptions, event) -> bool:
    process = event.process
    if process is not None and exceptions.allows_executable(process.executable):
        return True
    if exceptions.domains and isinstance(event, PayloadSeen) and event.protocol == "dns":
        if exceptions.allows_domain((event.details.get("qname") or "").rstrip(".").lower()):
            return True
    dst = event.source if isinstance(event, Burst) and not event.egress else getattr(event, "destination", None)
    return dst is not None and exceptions.allows_destination(dst.ip, dst.port)


Event = NetworkEvent | ProcessEvent | PayloadSeen | StdioSocket | PipedShell | Burst | IcmpEchoes
Detector = Callable[[Event, Context], Iterable[Finding]]


class Engine:
    def __init__(self, config: Config, parent_of: Callable[[Process], Process | None], flows=None,
                 detectors: tuple[Detector, ...] | None = None,
                 ssh_forwarding: Callable[[Process], str | None] | None = None):
        from . import commands, dns, icmp, network, payloads, tunnels
        self.context = Context(config, parent_of, flows)
        if ssh_forwarding is not None:
            self.context.ssh_forwarding = ssh_forwarding
        # DNS, ICMP and tunnel detectors keep state of their own: fresh ones per engine
        self.detectors = detectors or (*network.DETECTORS, *commands.DETECTORS, *payloads.detectors(),
                                       *dns.detectors(), *icmp.detectors(), *tunnels.detectors())
        # Loopback connections inside the sandbox matter only as relays of a tunnel: only the
        # tunnel score sees them (this path runs for every connection of a busy sandbox).
        self._for_loopback = tuple(d for d in self.detectors if getattr(d, "sees_loopback", False))
        self._for_bursts = tuple(d for d in self.detectors if getattr(d, "sees_bursts", False))
        self._fired: dict[tuple, None] = {}
        self._fired_evicted = 0

    def evicted(self) -> int:
        """Entries the bounded tables of the detectors (and of alerts fired) forgot for room."""
        return self._fired_evicted + sum(getattr(d, "evicted", 0) for d in self.detectors)

    def observe(self, event: Event) -> list[Alert]:
        detectors = self.detectors
        if isinstance(event, Burst):
            detectors = self._for_bursts          # relay timing: only the tunnel detector reads it
            if self.context.allowed(event):
                return []
        elif isinstance(event, NetworkEvent) and _loopback_peer(event):
            detectors = self._for_loopback
        elif self.context.allowed(event):
            return []
        alerts = []
        for detector in detectors:
            for finding in detector(event, self.context):
                key = (finding.rule.name, event.episode.id, *finding.key)
                if key in self._fired or self.context.allowed(event, finding.rule):
                    continue
                if len(self._fired) >= MAX_FIRED:
                    self._fired.pop(next(iter(self._fired)))
                    self._fired_evicted += 1
                self._fired[key] = None
                alerts.append(Alert(rule=finding.rule, timestamp_ns=event.timestamp_ns, episode=event.episode,
                                    cgroup_id=event.cgroup_id, cgroup_path=event.cgroup_path,
                                    process=event.process, message=finding.message,
                                    risk_score=finding.risk_score, evidence=finding.evidence))
        return alerts


def _loopback_peer(event: NetworkEvent) -> bool:
    peer = event.source if event.direction == "ingress" else event.destination
    return peer is not None and is_loopback(peer.ip)


def who(process: Process | None) -> str:
    """'ssh (pid 42)' for messages."""
    if process is None:
        return "an unknown process"
    return f"{process.name or '?'} (pid {process.pid})"


def where(event: NetworkEvent) -> str:
    dst = event.destination
    if dst is None:
        return "an unknown destination"
    host = f"[{dst.ip}]" if dst.ip and ":" in dst.ip else (dst.ip or "*")
    return f"{host}:{dst.port}/{event.transport}" if dst.port else f"{host}/{event.transport}"

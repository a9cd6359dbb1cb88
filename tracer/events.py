"""Typed events: what decoding and state produce, and what schema turns into documents.

Times are nanoseconds since the Unix epoch (wall clock), already converted
from the kernel's monotonic clock by decoding.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Episode:
    id: str
    cgroup_path: str          # absolute path under the cgroup2 mount
    cgroup_id: int            # inode number of the cgroup directory
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Process:
    pid: int
    name: str = ""            # comm
    executable: str = ""
    args: list[str] = field(default_factory=list)
    parent_pid: int | None = None
    thread_id: int | None = None
    start_ns: int | None = None
    exit_code: int | None = None
    args_complete: bool = True  # False: the kernel could not read argv whole (args then come from /proc)


@dataclass(slots=True)
class Endpoint:
    ip: str | None            # None: not known (an unconnected socket bound to any address)
    port: int


@dataclass(slots=True)
class NetworkEvent:
    """One network lifecycle event of a sandbox; action is an event.action value."""
    action: str               # socket_created, connection_attempted, connection_established,
                              # connection_accepted, listening, udp_sent, flow_updated, flow_ended
    timestamp_ns: int
    episode: Episode
    cgroup_id: int            # the process's (or socket's) own cgroup, maybe a descendant
    cgroup_path: str
    process: Process | None
    cookie: int               # socket cookie, 0 when unknown
    network_type: str | None  # ipv4 / ipv6
    transport: str | None     # tcp, udp, icmp, ipv6-icmp, raw, packet, ...
    direction: str | None     # egress / ingress, seen from the sandbox
    source: Endpoint | None = None
    destination: Endpoint | None = None
    outcome: str | None = None          # success / failure / unknown
    error_message: str | None = None
    duration_ns: int | None = None
    source_bytes: int | None = None
    destination_bytes: int | None = None
    source_packets: int | None = None
    destination_packets: int | None = None
    protocol: str | None = None         # network.protocol from the first bytes: ssh, tls, http, dns, stratum
    protocol_details: dict | None = None  # e.g. {"sni": ...}, {"qname": ...}, {"method": ...}
    socket_family: str | None = None    # socket_created: AF_PACKET, AF_INET, ...
    socket_type: str | None = None      # SOCK_RAW, SOCK_DGRAM, ...
    socket_protocol: int | None = None
    denied_by: str | None = None        # the policy entry that refused it in the kernel (egress_denied)


@dataclass(slots=True)
class SocketActivity:
    """Internal (never a document): something a socket of an episode did, for the detectors only."""
    timestamp_ns: int
    episode: Episode
    cgroup_id: int
    cgroup_path: str
    process: Process | None
    cookie: int
    transport: str


@dataclass(slots=True)
class PayloadSeen(SocketActivity):
    """The first bytes of a flow one way, or a DNS query, named by tracer.protocols."""
    egress: bool
    source: Endpoint | None
    destination: Endpoint | None
    data: bytes
    protocol: str | None
    details: dict

    @property
    def direction(self) -> str:
        return "egress" if self.egress else "ingress"


@dataclass(slots=True)
class Burst(SocketActivity):
    """A flow's data resumed one way after a silence or a turn (the kernel's REC_BURST), for relay
    correlation; timestamp_ns is its first packet. source and destination are as the data went."""
    egress: bool
    bytes: int                # payload bytes of its first packet
    source: Endpoint | None
    destination: Endpoint | None

    @property
    def direction(self) -> str:
        return "egress" if self.egress else "ingress"


@dataclass(slots=True)
class IcmpEchoes(SocketActivity):
    """ICMP echo requests of an episode to one destination that carried data, as the kernel summed
    them (decoding.IcmpRecord); transport is icmp or ipv6-icmp. Counts since the first echo there."""
    socket_type: str          # SOCK_DGRAM (a ping socket) or SOCK_RAW
    source: Endpoint | None
    destination: Endpoint
    first_ns: int             # wall clock of the first echo to this destination
    echoes: int
    data_echoes: int
    data_bytes: int
    largest: int

    @property
    def direction(self) -> str:
        return "egress"


@dataclass(slots=True)
class StdioSocket:
    """Internal (never a document): a process has a network socket on stdin, stdout or stderr."""
    timestamp_ns: int
    episode: Episode
    cgroup_id: int
    cgroup_path: str
    process: Process
    fd: int
    how: str                  # "dup2" or "exec" (found when a shell or interpreter started)
    transport: str
    source: Endpoint          # the process's end
    destination: Endpoint     # the peer
    state: str

    @property
    def direction(self) -> str:
        return "egress"


@dataclass(slots=True)
class PipedShell:
    """Internal (never a document): a shell reading commands from stdin, fed through pipes or FIFOs by a
    process that holds a network connection, with its output going back to that process (or socket)."""
    timestamp_ns: int
    episode: Episode
    cgroup_id: int
    cgroup_path: str
    process: Process          # the shell
    holder_pid: int           # the process that holds the connection
    holder_name: str
    feed: str                 # how stdin is fed: "pipe:[12] <- nc (pid 40)", ...
    back: str                 # where stdout/stderr go
    transport: str
    source: Endpoint          # the holder's end of the connection
    destination: Endpoint     # the peer

    @property
    def direction(self) -> str:
        return "egress"


@dataclass(slots=True)
class ProcessEvent:
    action: str               # process_started / process_ended
    timestamp_ns: int
    episode: Episode
    cgroup_id: int
    cgroup_path: str
    process: Process


@dataclass(slots=True)
class Metric:
    """Tracer health: counters and gauges under eptrace.stats.*."""
    timestamp_ns: int
    stats: dict[str, int]


@dataclass(frozen=True, slots=True)
class Rule:
    """A detection rule as data: reviewable, stable, mapped to MITRE ATT&CK."""
    id: str                   # EPT-0001
    name: str                 # stable identifier: reverse_tunnel, ...
    description: str
    technique_id: str         # T1572: always the parent technique
    technique_name: str
    tactic_id: str            # TA0011
    tactic_name: str
    severity: int             # 0-100 (event.severity)
    subtechnique_id: str | None = None    # T1059.004, when the rule names a sub-technique of technique_id
    subtechnique_name: str | None = None  # its own name ("Unix Shell"), without the parent's

    @property
    def attack_id(self) -> str:
        """The most precise ATT&CK id: the sub-technique when there is one."""
        return self.subtechnique_id or self.technique_id


@dataclass(slots=True)
class Alert:
    """One finding of a rule, with the events that show it."""
    rule: Rule
    timestamp_ns: int
    episode: Episode
    cgroup_id: int
    cgroup_path: str
    process: Process | None
    message: str              # says why, with the evidence
    risk_score: float
    evidence: list = field(default_factory=list)   # NetworkEvent, PayloadSeen, StdioSocket or PipedShell: each has endpoints
    containment: dict | None = None     # episode_contained: what was done, for which alert, how long after


Event = NetworkEvent | ProcessEvent | Metric | Alert

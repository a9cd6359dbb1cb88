"""Flows by socket cookie: turns network records into lifecycle events.

A connect is reported as connection_attempted once its outcome is known: the
handshake completed, the connect syscall failed, or the flow closed before it
was established. An attempt still unresolved after ATTEMPT_GRACE_NS (a slow
handshake, or an io_uring connect with no syscall result) goes out with
outcome "unknown", so no attempt waits long.
"""
from __future__ import annotations

import errno
import os
import socket
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from ..decoding import (FLOW_ACCEPTED, FLOW_DENIED, FLOW_FAILED, FLOW_INITIATED, PROTOCOLS, SOCKET_TYPES, BurstRecord,
                        IcmpRecord, NetRecord, PayloadRecord, RecordType, SocketRecord, is_loopback)
from ..events import Burst, Endpoint, Episode, IcmpEchoes, NetworkEvent, PayloadSeen, Process
from ..policy import DENIED_RAW_SOCKET
from ..protocols import Sighting, identify

ATTEMPT_GRACE_NS = 1_000_000_000
MAX_FLOWS = 262144
EINPROGRESS = errno.EINPROGRESS

FAMILIES = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}
SOCKET_FAMILY_IO_URING = 0xFFFF    # records.h: a socket asked for through io_uring, its family unknown
SOCKET_FAMILIES = {f.value: f.name for f in socket.AddressFamily} | {SOCKET_FAMILY_IO_URING: "unknown (io_uring)"}


@dataclass
class Flow:
    cookie: int
    start_ns: int
    episode: Episode
    cgroup_id: int
    cgroup_path: str
    process: Process
    transport: str
    network_type: str | None
    remote: Endpoint | None = None
    local: Endpoint | None = None
    attempt: NetRecord | None = None          # connect record awaiting its outcome
    failed_error: str | None = None
    failed_at_ns: int | None = None           # closed before established; awaiting the errno
    established: bool = False
    initiated: bool = True                    # False for an inbound connection to a sandbox listener
    latest: NetRecord | None = None           # the last FLOW_UPDATE: counters and activity
    sightings: list[tuple[bool, Sighting]] = field(default_factory=list)   # (egress, what)
    reported_ns: int = 0                      # when flow_updated last went out (monotonic)

    @property
    def protocol(self) -> Sighting | None:
        return self.sightings[0][1] if self.sightings else None

    @property
    def is_local(self) -> bool:
        """To this machine: loopback, or the sandbox's own address (a relay's local leg)."""
        remote = self.remote
        return remote is not None and (is_loopback(remote.ip) or
                                       (self.local is not None and bool(remote.ip) and remote.ip == self.local.ip))

    def saw(self, protocol: str, **details) -> bool:
        return any(s.protocol == protocol and all(s.details.get(k) == v for k, v in details.items())
                   for _, s in self.sightings)


def transport_name(protocol: int, socktype: int) -> str:
    if socktype == 3 and protocol not in (1, 58):   # SOCK_RAW
        return "raw"
    return PROTOCOLS.get(protocol, str(protocol))


MAX_SIGHTINGS = 8
MAX_TRACKED_PIDS = 65536


@dataclass
class FlowTable:
    """Holds open flows and emits NetworkEvents through `emit`; first bytes go to
    `observe` (detectors) as PayloadSeen, never as documents."""
    emit: Callable[[NetworkEvent], None]
    resolve: Callable[[NetRecord | SocketRecord | PayloadRecord | BurstRecord],
                      tuple[Episode, int, str, Process] | None]
    wall_ns: Callable[[int], int]
    observe: Callable[[PayloadSeen | Burst], None] = lambda seen: None
    update_interval_ns: int = 10_000_000_000
    lineage: Callable[[Process | None], list[int]] = lambda p: [p.pid] if p else []   # pid, then ancestors
    evicted: Callable[[Flow], None] = lambda flow: None     # a flow dropped unended, to bound memory
    # (episode cgroup id, policy entry index) -> which policy entry refused a connect, send or socket
    denial: Callable[[int, int], str] = lambda cgid, entry: f"policy entry {entry}"
    flows: dict[int, Flow] = field(default_factory=dict)
    # For the local-relay signal: when each process (or a descendant) connected over loopback,
    # and which outbound flows to the outside each process holds open.
    local_starts: dict[int, deque] = field(default_factory=dict)
    outbound_by_pid: dict[int, set[int]] = field(default_factory=dict)
    relay_index_evicted: int = 0              # pids dropped from the two indexes above, to bound memory

    def local_flows_since(self, pid: int, since_ns: int) -> int:
        return sum(1 for ts in self.local_starts.get(pid, ()) if ts >= since_ns)

    def open_outbound_of(self, pids: list[int]) -> list[Flow]:
        return [self.flows[c] for pid in pids for c in self.outbound_by_pid.get(pid, ()) if c in self.flows]

    def _track(self, flow: Flow, ts_ns: int) -> None:
        """Index a newly established flow for the relay signal."""
        if flow.remote is None or not flow.remote.ip or flow.process is None:
            return
        if is_loopback(flow.remote.ip):
            if not self.outbound_by_pid:
                return          # no flow to the outside is open: nothing this could relay
            if len(self.local_starts) >= MAX_TRACKED_PIDS:
                self.local_starts.pop(next(iter(self.local_starts)))
                self.relay_index_evicted += 1
            for pid in self.lineage(flow.process):
                if pid in self.outbound_by_pid:
                    self.local_starts.setdefault(pid, deque(maxlen=64)).append(ts_ns)
        elif flow.initiated:
            if len(self.outbound_by_pid) >= MAX_TRACKED_PIDS:
                self.outbound_by_pid.pop(next(iter(self.outbound_by_pid)))
                self.relay_index_evicted += 1
            self.outbound_by_pid.setdefault(flow.process.pid, set()).add(flow.cookie)

    def _untrack(self, flow: Flow) -> None:
        if flow.process is not None:
            cookies = self.outbound_by_pid.get(flow.process.pid)
            if cookies is not None:
                cookies.discard(flow.cookie)
                if not cookies:
                    del self.outbound_by_pid[flow.process.pid]

    def _event(self, action: str, rec, flow: Flow | None, ctx, **fields) -> NetworkEvent:
        episode, cgroup_id, cgroup_path, process = ctx
        return NetworkEvent(action=action, timestamp_ns=self.wall_ns(rec.header.ts_ns), episode=episode,
                            cgroup_id=cgroup_id, cgroup_path=cgroup_path, process=process,
                            cookie=rec.header.cookie, **fields)

    def handle(self, rec: NetRecord | SocketRecord) -> None:
        ctx = self.resolve(rec)
        if ctx is None:
            return          # an episode that was removed while its records were in flight
        if isinstance(rec, SocketRecord):
            self._socket_created(rec, ctx)
            return
        if isinstance(rec, PayloadRecord):
            self._payload(rec, ctx)
            return
        if isinstance(rec, BurstRecord):
            self._burst(rec, ctx)
            return
        if isinstance(rec, IcmpRecord):
            self._icmp(rec, ctx)
            return
        kind = rec.header.type
        if kind == RecordType.FLOW_UPDATE:
            flow = self.flows.get(rec.header.cookie)
            if flow is not None:
                flow.latest = rec
            return
        if kind == RecordType.CONNECT:
            self._connect(rec, ctx)
        elif kind == RecordType.CONNECT_RESULT:
            self._connect_result(rec)
        elif kind == RecordType.ESTABLISHED:
            self._established(rec, ctx)
        elif kind == RecordType.ACCEPTED:
            self._accepted(rec, ctx)
        elif kind == RecordType.LISTENING:
            self.emit(self._event("listening", rec, None, ctx, network_type=FAMILIES.get(rec.family),
                                  transport=transport_name(rec.protocol, rec.socktype), direction="ingress",
                                  destination=Endpoint(rec.local_ip or _any(rec.family), rec.local_port)))
        elif kind == RecordType.UDP_SENT:
            self._udp_sent(rec, ctx)
        elif kind == RecordType.FLOW_ENDED:
            self._ended(rec, ctx)

    # -- outbound ----------------------------------------------------------------
    def _connect(self, rec: NetRecord, ctx) -> None:
        episode, cgroup_id, cgroup_path, process = ctx
        old = self.flows.get(rec.header.cookie)
        if old is not None and old.attempt is not None:
            self._resolve_attempt(old, "unknown")     # a second connect() on the same socket
        self._make_room()
        flow = Flow(cookie=rec.header.cookie, start_ns=rec.header.ts_ns, episode=episode, cgroup_id=cgroup_id,
                    cgroup_path=cgroup_path, process=process, transport=transport_name(rec.protocol, rec.socktype),
                    network_type=FAMILIES.get(rec.family),
                    remote=Endpoint(rec.remote_ip or _any(rec.family), rec.remote_port), attempt=rec)
        self.flows[rec.header.cookie] = flow

    def _connect_result(self, rec: NetRecord) -> None:
        flow = self.flows.get(rec.header.cookie)
        if flow is None or flow.attempt is None:
            return
        if rec.ret == 0:
            if flow.transport != "tcp":
                self._resolve_attempt(flow, "success")
            # TCP: the established record already resolved it, or will.
        elif rec.ret != -EINPROGRESS:
            flow.failed_error = _errno_text(-rec.ret)
            self._resolve_attempt(flow, "failure")
            self.flows.pop(flow.cookie, None)     # a failed connect leaves no flow

    def _established(self, rec: NetRecord, ctx) -> None:
        flow = self.flows.get(rec.header.cookie)
        if flow is None:       # a connect this tracer did not see (episode added later)
            flow = self._flow_from(rec, ctx)
        flow.local = Endpoint(rec.local_ip, rec.local_port)
        flow.remote = Endpoint(rec.remote_ip, rec.remote_port)
        flow.established = True
        self._track(flow, rec.header.ts_ns)
        if flow.attempt is not None:
            self._resolve_attempt(flow, "success")
        self.emit(self._event("connection_established", rec, flow, ctx, network_type=flow.network_type,
                              transport="tcp", direction="egress", outcome="success",
                              source=flow.local, destination=flow.remote))

    def _resolve_attempt(self, flow: Flow, outcome: str) -> None:
        rec = flow.attempt
        flow.attempt = None
        ctx = (flow.episode, flow.cgroup_id, flow.cgroup_path, flow.process)
        fields = dict(network_type=flow.network_type, transport=flow.transport, direction="egress",
                      destination=flow.remote, outcome=outcome)
        if flow.local and flow.local.ip:
            fields["source"] = flow.local
        if outcome == "failure":
            fields["error_message"] = flow.failed_error or "connection failed"
        if rec.flags & FLOW_DENIED:
            fields["denied_by"] = self.denial(flow.episode.cgroup_id, rec.ret)
        self.emit(self._event("connection_attempted", rec, flow, ctx, **fields))

    def _udp_sent(self, rec: NetRecord, ctx) -> None:
        remote = Endpoint(rec.remote_ip or _any(rec.family), rec.remote_port)
        flow = self.flows.get(rec.header.cookie)
        if flow is None:
            flow = self._flow_from(rec, ctx)
            flow.remote = remote
        elif flow.remote != remote:
            flow.remote = None       # several destinations: flow_ended names none of them
        denied = rec.flags & FLOW_DENIED
        self.emit(self._event("udp_sent", rec, flow, ctx, network_type=flow.network_type, transport=flow.transport,
                              direction="egress", destination=remote,
                              outcome="failure" if denied else None,
                              error_message="EPERM" if denied else None,
                              denied_by=self.denial(ctx[0].cgroup_id, rec.ret) if denied else None))

    # -- inbound -----------------------------------------------------------------
    def _accepted(self, rec: NetRecord, ctx) -> None:
        if rec.flags & FLOW_DENIED:
            # the listener's policy dropped the SYN: no connection, no flow (the cookie is the listener's)
            self.emit(self._event("connection_accepted", rec, None, ctx, network_type=FAMILIES.get(rec.family),
                                  transport="tcp", direction="ingress", outcome="failure", error_message="EPERM",
                                  source=Endpoint(rec.remote_ip, rec.remote_port),
                                  destination=Endpoint(rec.local_ip, rec.local_port),
                                  denied_by=self.denial(ctx[0].cgroup_id, rec.ret)))
            return
        flow = self._flow_from(rec, ctx)
        flow.established = True
        flow.initiated = False
        self._track(flow, rec.header.ts_ns)
        self.emit(self._event("connection_accepted", rec, flow, ctx, network_type=flow.network_type,
                              transport="tcp", direction="ingress", outcome="success",
                              source=flow.remote, destination=flow.local))

    def _make_room(self) -> None:
        """At MAX_FLOWS, the oldest flow goes (its flow_ended will have no context)."""
        if len(self.flows) >= MAX_FLOWS:
            old = self.flows.pop(next(iter(self.flows)))
            self._untrack(old)
            self.evicted(old)

    def _flow_from(self, rec: NetRecord, ctx) -> Flow:
        self._make_room()
        episode, cgroup_id, cgroup_path, process = ctx
        flow = Flow(cookie=rec.header.cookie, start_ns=rec.start_ns or rec.header.ts_ns, episode=episode,
                    cgroup_id=cgroup_id, cgroup_path=cgroup_path, process=process, transport=transport_name(rec.protocol, rec.socktype),
                    network_type=FAMILIES.get(rec.family), remote=Endpoint(rec.remote_ip, rec.remote_port),
                    local=Endpoint(rec.local_ip, rec.local_port))
        self.flows[rec.header.cookie] = flow
        return flow

    # -- end -----------------------------------------------------------------------
    def _ended(self, rec: NetRecord, ctx) -> None:
        flow = self.flows.pop(rec.header.cookie, None)
        if flow is not None:
            self._untrack(flow)
        if rec.flags & FLOW_FAILED:
            # The handshake never completed: the attempt carries the failure; no flow existed.
            if flow is not None and flow.attempt is not None:
                flow.failed_error = "connection refused, reset or timed out before it was established"
                flow.failed_at_ns = rec.header.ts_ns
                self.flows[rec.header.cookie] = flow   # the syscall result may still name the error
            return
        inbound = bool(rec.flags & FLOW_ACCEPTED)
        # An unconnected UDP socket knows only its local port, and its peer from udp_sent.
        local = Endpoint(rec.local_ip, rec.local_port) if rec.local_ip or rec.local_port else (flow and flow.local)
        remote = Endpoint(rec.remote_ip, rec.remote_port) if rec.remote_ip else (flow and flow.remote)
        if flow is not None and flow.attempt is not None:
            self._resolve_attempt(flow, "success" if rec.flags & FLOW_INITIATED else "unknown")
        start = rec.start_ns or (flow.start_ns if flow else rec.header.ts_ns)
        if inbound:
            src, dst = remote, local
            sb, db, sp, dp = rec.bytes_in, rec.bytes_out, rec.packets_in, rec.packets_out
        else:
            src, dst = local, remote
            sb, db, sp, dp = rec.bytes_out, rec.bytes_in, rec.packets_out, rec.packets_in
        sighting = flow.protocol if flow else None
        self.emit(self._event("flow_ended", rec, flow, ctx, network_type=FAMILIES.get(rec.family),
                              protocol=sighting.protocol if sighting else None,
                              protocol_details=sighting.details if sighting else None,
                              transport=transport_name(rec.protocol, rec.socktype),
                              direction="ingress" if inbound else "egress", outcome="success",
                              source=src or None, destination=dst or None,
                              duration_ns=max(0, rec.header.ts_ns - start),
                              source_bytes=sb, destination_bytes=db, source_packets=sp, destination_packets=dp))

    def _payload(self, rec: PayloadRecord, ctx) -> None:
        episode, cgroup_id, cgroup_path, process = ctx
        transport = transport_name(rec.protocol, 1 if rec.protocol == 6 else 2)
        local = Endpoint(rec.local_ip, rec.local_port) if rec.local_ip or rec.local_port else None
        remote = Endpoint(rec.remote_ip, rec.remote_port) if rec.remote_ip or rec.remote_port else None
        flow = self.flows.get(rec.header.cookie)
        if flow is not None:   # it knows the peer of an unconnected UDP socket, from udp_sent
            transport, local, remote = flow.transport, flow.local or local, flow.remote or remote
        sighting = identify(rec.data, remote.port if remote else None, transport)
        if flow is not None and sighting is not None and len(flow.sightings) < MAX_SIGHTINGS:
            flow.sightings.append((rec.egress, sighting))
        src, dst = (local, remote) if rec.egress else (remote, local)
        self.observe(PayloadSeen(self.wall_ns(rec.header.ts_ns), episode, cgroup_id, cgroup_path, process,
                                 rec.header.cookie, transport, rec.egress, src, dst, rec.data,
                                 sighting.protocol if sighting else None, sighting.details if sighting else {}))

    def _burst(self, rec: BurstRecord, ctx) -> None:
        flow = self.flows.get(rec.header.cookie)
        if flow is None or flow.remote is None:
            return          # a flow this table does not know (or a UDP socket with several peers)
        episode, cgroup_id, cgroup_path, process = ctx
        src, dst = (flow.local, flow.remote) if rec.egress else (flow.remote, flow.local)
        self.observe(Burst(self.wall_ns(rec.header.ts_ns), episode, cgroup_id, cgroup_path, process or flow.process,
                           flow.cookie, flow.transport, rec.egress, rec.bytes, src, dst))

    def _icmp(self, rec: IcmpRecord, ctx) -> None:
        episode, cgroup_id, cgroup_path, process = ctx
        self.observe(IcmpEchoes(self.wall_ns(rec.header.ts_ns), episode, cgroup_id, cgroup_path, process,
                                rec.header.cookie, PROTOCOLS.get(rec.protocol, str(rec.protocol)),
                                SOCKET_TYPES.get(rec.socktype, str(rec.socktype)),
                                Endpoint(rec.local_ip, 0) if rec.local_ip else None, Endpoint(rec.remote_ip, 0),
                                self.wall_ns(rec.first_ns), rec.echoes, rec.data_echoes, rec.data_bytes,
                                rec.largest))

    def _socket_created(self, rec: SocketRecord, ctx) -> None:
        failed = rec.ret < 0
        self.emit(self._event("socket_created", rec, None, ctx, network_type=FAMILIES.get(rec.family),
                              transport=_socket_transport(rec), direction=None,
                              outcome="failure" if failed else "success",
                              error_message=_errno_text(-rec.ret) if failed else None,
                              denied_by=self.denial(ctx[0].cgroup_id, DENIED_RAW_SOCKET) if failed and rec.ret == -errno.EPERM
                              and rec.family in (socket.AF_INET, socket.AF_INET6, socket.AF_PACKET,
                                                 SOCKET_FAMILY_IO_URING) else None,
                              socket_family=SOCKET_FAMILIES.get(rec.family, str(rec.family)),
                              socket_type=SOCKET_TYPES.get(rec.type, str(rec.type)), socket_protocol=rec.protocol))

    # -- sweeps --------------------------------------------------------------------
    def sweep(self, now_mono_ns: int, final: bool = False, episode_cgroup_id: int | None = None) -> None:
        """Resolve attempts whose outcome did not come in time, and report long flows.
        episode_cgroup_id: only that episode's flows (final: that episode is over)."""
        for flow in list(self.flows.values()):
            if episode_cgroup_id is not None and flow.episode.cgroup_id != episode_cgroup_id:
                continue
            if flow.established and not final:
                self._report_if_due(flow, now_mono_ns)
            if flow.attempt is None:
                continue
            failed_at = flow.failed_at_ns
            waited = now_mono_ns - (failed_at if failed_at else flow.attempt.header.ts_ns)
            grace = ATTEMPT_GRACE_NS // 5 if failed_at else ATTEMPT_GRACE_NS
            if final or waited >= grace:
                self._resolve_attempt(flow, "failure" if failed_at else "unknown")
                if failed_at:
                    self.flows.pop(flow.cookie, None)

    def _report_if_due(self, flow: Flow, now_mono_ns: int) -> None:
        """flow_updated for a flow open longer than the interval, once per interval."""
        since = max(flow.start_ns, flow.reported_ns)
        if now_mono_ns - since < self.update_interval_ns:
            return
        flow.reported_ns = now_mono_ns
        latest = flow.latest
        inbound = not flow.initiated
        # The running totals of the last counter record; before the first one they are unknown (None,
        # left out of the document), never 0: bytes may well have flowed already.
        out_b, in_b, out_p, in_p = ((latest.bytes_out, latest.bytes_in, latest.packets_out, latest.packets_in)
                                    if latest else (None, None, None, None))
        sighting = flow.protocol
        fields = dict(network_type=flow.network_type, transport=flow.transport,
                      direction="ingress" if inbound else "egress", outcome="success",
                      source=flow.remote if inbound else flow.local, destination=flow.local if inbound else flow.remote,
                      duration_ns=now_mono_ns - flow.start_ns,
                      source_bytes=in_b if inbound else out_b, destination_bytes=out_b if inbound else in_b,
                      source_packets=in_p if inbound else out_p, destination_packets=out_p if inbound else in_p,
                      protocol=sighting.protocol if sighting else None,
                      protocol_details=sighting.details if sighting else None)
        self.emit(NetworkEvent(action="flow_updated", timestamp_ns=self.wall_ns(now_mono_ns), episode=flow.episode,
                               cgroup_id=flow.cgroup_id, cgroup_path=flow.cgroup_path, process=flow.process,
                               cookie=flow.cookie, **fields))

    def open_flows(self) -> list[Flow]:
        return [f for f in self.flows.values() if f.established]


def _any(family: int) -> str:
    return "::" if family == socket.AF_INET6 else "0.0.0.0"


def _errno_text(err: int) -> str:
    name = errno.errorcode.get(err, f"errno {err}")
    return f"{name}: {os.strerror(err)}"


def _socket_transport(rec: SocketRecord) -> str:
    if rec.family == socket.AF_PACKET:
        return "packet"
    return transport_name(rec.protocol, rec.type)

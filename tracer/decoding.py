"""Ring-buffer records -> typed records. The one Python place that knows the
binary layout of probes/records.h; tests/kernel/test_record_layouts.py checks, for
every record type in LAYOUTS, that the struct sizes and field offsets clang gives
(through bcc's generated types) are the ones the formats below read."""
from __future__ import annotations

import ipaddress
import re
import socket
import struct
from dataclasses import dataclass
from enum import IntEnum


class RecordType(IntEnum):
    SOCKET_CREATED = 1
    CONNECT = 2
    CONNECT_RESULT = 3
    UDP_SENT = 4
    LISTENING = 5
    ESTABLISHED = 6
    ACCEPTED = 7
    FLOW_ENDED = 8
    PROCESS_FORKED = 9
    PROCESS_ARGS = 10
    PROCESS_EXEC = 11
    PROCESS_EXITED = 12
    PAYLOAD = 13
    FLOW_UPDATE = 14
    STDIO_DUP = 15
    BURST = 16
    ICMP_ECHO = 17


# Flow flags (FLOW_* in records.h).
FLOW_INITIATED = 1
FLOW_ESTABLISHED = 2
FLOW_ACCEPTED = 4
FLOW_FAILED = 8
FLOW_DENIED = 16       # the episode's policy refused it; NetRecord.ret: the deciding entry

# ProcessRecord.child_pid of ARGS (ARGV_*) and EXEC (EXEC_HELD) records, as in records.h.
ARGV_FAILED = 1
ARGV_CUT = 2
EXEC_HELD = 1

# struct record_header: type, size, ts_ns, cookie, owner{cgroup_id, episode_cgroup_id, tgid, pid, comm[16]}
HEADER_START = struct.Struct("<IIQQ")       # type, size, ts_ns, cookie
OWNER = struct.Struct("<QQII16s")            # owner: decode reads it apart, once per thread (see _owner)
HEADER = struct.Struct(HEADER_START.format + OWNER.format[1:])
# struct endpoints + counters + activity + start_ns, flags, ret
NET_BODY = struct.Struct("<16s16sHHHBB QQQQ QII8H QIi")
GAP_BUCKETS = 8
# struct endpoints + len, total, egress, index, pad[6], data[PAYLOAD_LEN]
PAYLOAD_LEN = 256
PAYLOAD_BODY = struct.Struct("<16s16sHHHBB IIBB6x")
# struct burst_record: idle_ns, bytes, egress, protocol, pad[2]
BURST_BODY = struct.Struct("<QIBB2x")
BURST_IDLE_NS = 200_000_000
# struct endpoints + first_ns, data_bytes, echoes, data_echoes, largest, payload
ICMP_BODY = struct.Struct("<16s16sHHHBB QQIIII")
SOCKET_BODY = struct.Struct("<IIIi")
PROCESS_BODY = struct.Struct("<IIiI")
ARGS_BUF = 1024 + 256   # ARGS_LEN + ARG_CHUNK

NET_RECORD_SIZE = HEADER.size + NET_BODY.size
PAYLOAD_RECORD_SIZE = HEADER.size + PAYLOAD_BODY.size + PAYLOAD_LEN
BURST_RECORD_SIZE = HEADER.size + BURST_BODY.size
ICMP_RECORD_SIZE = HEADER.size + ICMP_BODY.size
SOCKET_RECORD_SIZE = HEADER.size + SOCKET_BODY.size
PROCESS_RECORD_SIZE = HEADER.size + PROCESS_BODY.size + ARGS_BUF


@dataclass(frozen=True)
class Layout:
    """A record struct as the decoder reads it: its C name, its size, and where each field is."""
    struct: str                  # in probes/records.h
    size: int
    offsets: dict[str, int]      # C field path ("h.owner.tgid", "ep.dport", "data") -> byte offset


def _offsets(fmt: struct.Struct, names: list[str], start: int = 0) -> dict[str, int]:
    """The offset of each item of a packed ('<') format, named in order; an array ('8H') is one name."""
    offsets, offset = {}, start
    items = iter(names)
    for count, code in re.findall(r"(\d*)([a-zA-Z?])", fmt.format.lstrip("<=")):
        size = struct.calcsize("<" + code) * (int(count) if count and code != "s" else 1)
        size = int(count) if code == "s" and count else size
        if code != "x":
            offsets[next(items)] = offset
        offset += size
    assert offset - start == fmt.size and next(items, None) is None, fmt.format
    return offsets


_HEADER_FIELDS = ["h.type", "h.size", "h.ts_ns", "h.cookie", "h.owner.cgroup_id", "h.owner.episode_cgroup_id",
                  "h.owner.tgid", "h.owner.pid", "h.owner.comm"]
_ENDPOINT_FIELDS = ["ep.saddr", "ep.daddr", "ep.sport", "ep.dport", "ep.family", "ep.protocol", "ep.socktype"]
_HEADER_OFFSETS = _offsets(HEADER, _HEADER_FIELDS)

NET_LAYOUT = Layout("net_record", NET_RECORD_SIZE, {**_HEADER_OFFSETS, **_offsets(NET_BODY, _ENDPOINT_FIELDS + [
    "c.bytes_out", "c.bytes_in", "c.packets_out", "c.packets_in", "a.last_ns", "a.exchanges_out", "a.exchanges_in",
    "a.gaps", "start_ns", "flags", "ret"], HEADER.size)})
PAYLOAD_LAYOUT = Layout("payload_record", PAYLOAD_RECORD_SIZE, {**_HEADER_OFFSETS, **_offsets(
    PAYLOAD_BODY, _ENDPOINT_FIELDS + ["len", "total", "egress", "index"], HEADER.size),
    "data": HEADER.size + PAYLOAD_BODY.size})
SOCKET_LAYOUT = Layout("socket_record", SOCKET_RECORD_SIZE, {**_HEADER_OFFSETS, **_offsets(
    SOCKET_BODY, ["family", "type", "protocol", "ret"], HEADER.size)})
BURST_LAYOUT = Layout("burst_record", BURST_RECORD_SIZE, {**_HEADER_OFFSETS, **_offsets(
    BURST_BODY, ["idle_ns", "bytes", "egress", "protocol"], HEADER.size)})
ICMP_LAYOUT = Layout("icmp_record", ICMP_RECORD_SIZE, {**_HEADER_OFFSETS, **_offsets(
    ICMP_BODY, _ENDPOINT_FIELDS + ["first_ns", "data_bytes", "echoes", "data_echoes", "largest", "payload"],
    HEADER.size)})
PROCESS_LAYOUT = Layout("process_record", PROCESS_RECORD_SIZE, {**_HEADER_OFFSETS, **_offsets(
    PROCESS_BODY, ["parent_tgid", "child_pid", "exit_code", "data_len"], HEADER.size),
    "data": HEADER.size + PROCESS_BODY.size})

PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp", 132: "sctp", 136: "udplite", 255: "raw"}
SOCKET_TYPES = {1: "SOCK_STREAM", 2: "SOCK_DGRAM", 3: "SOCK_RAW", 4: "SOCK_RDM", 5: "SOCK_SEQPACKET",
                10: "SOCK_PACKET"}


class DecodeError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Owner:
    cgroup_id: int
    episode_cgroup_id: int
    tgid: int
    pid: int
    comm: str


@dataclass(slots=True)
class Header:
    type: RecordType
    ts_ns: int            # CLOCK_MONOTONIC
    cookie: int
    owner: Owner


@dataclass(slots=True)
class NetRecord:
    header: Header
    family: int
    protocol: int
    socktype: int
    local_ip: str | None
    local_port: int
    remote_ip: str | None
    remote_port: int
    bytes_out: int
    bytes_in: int
    packets_out: int
    packets_in: int
    last_activity_ns: int  # CLOCK_MONOTONIC of the last data packet, 0 if none
    exchanges_out: int     # bursts after >= 1 s of silence started by the sandbox
    exchanges_in: int      # ... started by the peer
    gaps: tuple[int, ...]  # those silences by length: [1,2) [2,4) ... >=128 s
    start_ns: int
    flags: int
    ret: int


@dataclass(slots=True)
class PayloadRecord:
    header: Header
    family: int
    protocol: int
    local_ip: str | None
    local_port: int
    remote_ip: str | None
    remote_port: int
    egress: bool
    index: int             # 0: the first data packet this way
    total: int             # payload bytes of the packet
    data: bytes            # its first PAYLOAD_LEN bytes at most


@dataclass(slots=True)
class BurstRecord:
    """Data one way after >= BURST_IDLE_NS of silence that way, or after the other side spoke (a turn):
    header.ts_ns is its first packet."""
    header: Header
    idle_ns: int          # the silence before it this way, to a clock tick (0 at a turn within one, or the first data)
    bytes: int            # payload bytes of its first packet
    egress: bool
    protocol: int


@dataclass(slots=True)
class IcmpRecord:
    """Echo requests of an episode to one destination that carried data (struct icmp_record)."""
    header: Header
    family: int
    protocol: int          # IPPROTO_ICMP or IPPROTO_ICMPV6
    socktype: int          # SOCK_DGRAM (ping socket) or SOCK_RAW
    local_ip: str | None
    remote_ip: str | None
    first_ns: int          # CLOCK_MONOTONIC of the first echo to this destination
    data_bytes: int        # payload bytes of the echoes that carried data
    echoes: int            # echo requests in all
    data_echoes: int       # ... that carried data
    largest: int           # the largest payload
    payload: int           # this echo's payload


@dataclass(slots=True)
class SocketRecord:
    header: Header
    family: int
    type: int
    protocol: int
    ret: int


@dataclass(slots=True)
class ProcessRecord:
    header: Header
    parent_tgid: int      # FORKED: parent; EXEC: old pid; STDIO_DUP: the old fd
    child_pid: int        # FORKED: the child; STDIO_DUP: the new fd (0, 1 or 2); ARGS: ARGV_*; EXEC: EXEC_HELD
    exit_code: int
    data: bytes           # ARGS: NUL-separated argv; EXEC: filename

    @property
    def args(self) -> list[str]:
        return [a.decode(errors="replace") for a in self.data.split(b"\0") if a] if self.data else []

    @property
    def text(self) -> str:
        return self.data.split(b"\0", 1)[0].decode(errors="replace")


Record = NetRecord | SocketRecord | ProcessRecord | PayloadRecord | BurstRecord | IcmpRecord

_NET_TYPES = {RecordType.CONNECT, RecordType.CONNECT_RESULT, RecordType.UDP_SENT, RecordType.LISTENING,
              RecordType.ESTABLISHED, RecordType.ACCEPTED, RecordType.FLOW_ENDED, RecordType.FLOW_UPDATE}
_PROCESS_TYPES = {RecordType.PROCESS_FORKED, RecordType.PROCESS_ARGS, RecordType.PROCESS_EXEC,
                  RecordType.PROCESS_EXITED, RecordType.STDIO_DUP}


# Every record type and the layout its records have: decode() refuses a record of another size.
LAYOUTS: dict[RecordType, Layout] = {
    **{t: NET_LAYOUT for t in _NET_TYPES}, **{t: PROCESS_LAYOUT for t in _PROCESS_TYPES},
    RecordType.PAYLOAD: PAYLOAD_LAYOUT, RecordType.SOCKET_CREATED: SOCKET_LAYOUT, RecordType.BURST: BURST_LAYOUT,
    RecordType.ICMP_ECHO: ICMP_LAYOUT,
}
_ip_texts: dict[tuple[bytes, int], str | None] = {}
_comms: dict[bytes, str] = {}


def is_loopback(ip: str | None) -> bool:
    """127.0.0.0/8 or ::1, on address text as ip_text writes it (IPv4-mapped shows as IPv4)."""
    return bool(ip) and (ip.startswith("127.") or ip == "::1")


def ip_text(raw: bytes, family: int) -> str | None:
    """Address text, cached: the same few addresses come again and again."""
    key = (raw, family)
    text = _ip_texts.get(key, False)
    if text is False:
        if len(_ip_texts) >= 4096:
            _ip_texts.clear()
        text = _ip_texts[key] = _ip_text(raw, family)
    return text


def _comm_text(raw: bytes) -> str:
    text = _comms.get(raw)
    if text is None:
        if len(_comms) >= 4096:
            _comms.clear()
        text = _comms[raw] = raw.split(b"\0", 1)[0].decode(errors="replace")
    return text


def _ip_text(raw: bytes, family: int) -> str | None:
    """Address text; IPv4-mapped IPv6 shows as IPv4, as on the wire. None when unset."""
    if family == socket.AF_INET:
        raw = raw[:4]
        return None if raw == b"\0\0\0\0" else socket.inet_ntop(socket.AF_INET, raw)
    if family == socket.AF_INET6:
        if raw == bytes(16):
            return None
        addr = ipaddress.IPv6Address(raw)
        return str(addr.ipv4_mapped) if addr.ipv4_mapped else str(addr)
    return None


def owner_of(raw: bytes) -> tuple[int, int]:
    """(episode cgroup id, tgid) of a raw record, without decoding it (the daemon's per-episode captures)."""
    if len(raw) < HEADER.size:
        return 0, 0
    fields = HEADER.unpack_from(raw)
    return fields[5], fields[6]


def _net(raw: bytes, header: Header) -> NetRecord:
    body = NET_BODY.unpack_from(raw, HEADER.size)
    saddr, daddr, sport, dport, family, proto, stype, b_out, b_in, p_out, p_in, last, ex_out, ex_in = body[:14]
    start, flags, ret = body[14 + GAP_BUCKETS:]
    return NetRecord(header, family, proto, stype, ip_text(saddr, family), sport, ip_text(daddr, family), dport,
                     b_out, b_in, p_out, p_in, last, ex_out, ex_in, body[14:14 + GAP_BUCKETS], start, flags, ret)


def _payload(raw: bytes, header: Header) -> PayloadRecord:
    (saddr, daddr, sport, dport, family, proto, _stype,
     length, total, egress, index) = PAYLOAD_BODY.unpack_from(raw, HEADER.size)
    off = HEADER.size + PAYLOAD_BODY.size
    return PayloadRecord(header, family, proto, ip_text(saddr, family), sport, ip_text(daddr, family), dport,
                         bool(egress), index, total, raw[off:off + min(length, PAYLOAD_LEN)])


def _burst(raw: bytes, header: Header) -> BurstRecord:
    idle, nbytes, egress, proto = BURST_BODY.unpack_from(raw, HEADER.size)
    return BurstRecord(header, idle, nbytes, bool(egress), proto)


def _icmp(raw: bytes, header: Header) -> IcmpRecord:
    (saddr, daddr, _sport, _dport, family, proto, stype,
     first, data_bytes, echoes, data_echoes, largest, payload) = ICMP_BODY.unpack_from(raw, HEADER.size)
    return IcmpRecord(header, family, proto, stype, ip_text(saddr, family), ip_text(daddr, family),
                      first, data_bytes, echoes, data_echoes, largest, payload)


def _socket(raw: bytes, header: Header) -> SocketRecord:
    family, stype, proto, ret = SOCKET_BODY.unpack_from(raw, HEADER.size)
    return SocketRecord(header, family, stype, proto, ret)


def _process(raw: bytes, header: Header) -> ProcessRecord:
    parent, child, exit_code, data_len = PROCESS_BODY.unpack_from(raw, HEADER.size)
    off = HEADER.size + PROCESS_BODY.size
    return ProcessRecord(header, parent, child, exit_code, raw[off:off + min(data_len, ARGS_BUF)])


_BODIES = {NET_LAYOUT.struct: _net, PAYLOAD_LAYOUT.struct: _payload, BURST_LAYOUT.struct: _burst,
           ICMP_LAYOUT.struct: _icmp, SOCKET_LAYOUT.struct: _socket, PROCESS_LAYOUT.struct: _process}
# type number -> (type, size, body decoder): one dict lookup per record instead of a chain of tests
_DECODERS = {t.value: (t, layout.size, _BODIES[layout.struct]) for t, layout in LAYOUTS.items()}
_OWNER_AT = HEADER.size - OWNER.size
_owners: dict[bytes, Owner] = {}


def _owner(raw: bytes) -> Owner:
    """The record's owner, shared by the records of the same thread (Owner is frozen): the same few
    threads come again and again, and building one is a good part of decoding a record."""
    key = raw[_OWNER_AT:HEADER.size]
    owner = _owners.get(key)
    if owner is None:
        if len(_owners) >= 4096:
            _owners.clear()
        cgid, epid, tgid, pid, comm = OWNER.unpack_from(raw, _OWNER_AT)
        owner = _owners[key] = Owner(cgid, epid, tgid, pid, _comm_text(comm))
    return owner


def decode(raw: bytes) -> Record:
    if len(raw) < HEADER.size:
        raise DecodeError(f"record of {len(raw)} bytes is shorter than its header")
    rtype, size, ts, cookie = HEADER_START.unpack_from(raw)
    decoder = _DECODERS.get(rtype)
    if decoder is None:
        raise DecodeError(f"unknown record type {rtype}")
    kind, expected, body = decoder
    if size != len(raw) or len(raw) != expected:
        raise DecodeError(f"record type {kind.name} says {size} bytes and has {len(raw)}, "
                          f"but its struct has {expected}")
    return body(raw, Header(kind, ts, cookie, _owner(raw)))

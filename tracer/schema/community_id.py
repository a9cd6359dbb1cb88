"""Community ID v1 flow hashing (https://github.com/corelight/community-id-spec).

The same flow seen from either end gets the same id, so SIEMs can join our
documents with Zeek, Suricata or Packetbeat records of the same connection.
"""
from __future__ import annotations

import base64
import hashlib
import socket
import struct

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
PROTO_SCTP = 132

# Protocols whose tuple carries ports. ICMP carries type/code in the port slots.
_PORT_PROTOCOLS = frozenset({PROTO_TCP, PROTO_UDP, PROTO_SCTP})

# ICMP message types that have a counterpart: request and reply then hash alike.
# Types without one are "one-way" and keep the order they were given in.
_ICMP_COUNTERPART = {8: 0, 0: 8, 13: 14, 14: 13, 15: 16, 16: 15, 10: 9, 9: 10, 17: 18, 18: 17}
_ICMPV6_COUNTERPART = {
    128: 129, 129: 128, 130: 131, 131: 130, 133: 134, 134: 133,
    135: 136, 136: 135, 139: 140, 140: 139, 144: 145, 145: 144,
}


def _packed(ip: str) -> bytes:
    try:
        return socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
    except (OSError, TypeError):
        raise ValueError(f"not an IP address: {ip!r}") from None


def community_id(src_ip: str, src_port: int | None, dst_ip: str, dst_port: int | None,
                 proto: int, seed: int = 0) -> str:
    """Return the Community ID v1 string ("1:" + base64 of a SHA-1) of a flow tuple.

    For ICMP (1) and ICMPv6 (58), src_port is the message type and dst_port the code.
    Ports are ignored for protocols that have none, and when either is None.
    """
    saddr, daddr = _packed(src_ip), _packed(dst_ip)
    if len(saddr) != len(daddr):
        raise ValueError(f"address families differ: {src_ip} and {dst_ip}")
    if not 0 <= proto <= 255:
        raise ValueError(f"protocol number out of range: {proto}")
    if not 0 <= seed <= 0xFFFF:
        raise ValueError(f"seed out of range (0-65535): {seed}")

    has_ports = src_port is not None and dst_port is not None and (
        proto in _PORT_PROTOCOLS or proto in (PROTO_ICMP, PROTO_ICMPV6))
    sport = dport = 0
    one_way = False
    if has_ports:
        sport, dport = int(src_port), int(dst_port)  # type: ignore[arg-type]
        if proto in (PROTO_ICMP, PROTO_ICMPV6):
            table = _ICMP_COUNTERPART if proto == PROTO_ICMP else _ICMPV6_COUNTERPART
            if sport in table:
                dport = table[sport]
            else:
                one_way = True
        for port in (sport, dport):
            if not 0 <= port <= 0xFFFF:
                raise ValueError(f"port out of range: {port}")

    # Order the endpoints so that both directions of a flow hash alike.
    if not (one_way or saddr < daddr or (saddr == daddr and sport < dport)):
        saddr, daddr, sport, dport = daddr, saddr, dport, sport

    data = struct.pack("!H", seed) + saddr + daddr + struct.pack("!BB", proto, 0)
    if has_ports:
        data += struct.pack("!HH", sport, dport)
    return "1:" + base64.b64encode(hashlib.sha1(data).digest()).decode("ascii")

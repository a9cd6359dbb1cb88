"""Naming a flow's protocol from its first bytes: SSH, TLS (with SNI), HTTP,
Stratum/JSON-RPC mining and DNS. Pure functions of bytes; nothing here trusts
lengths inside the data beyond what was captured."""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

_HTTP_METHODS = (b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ")
_STRATUM_METHOD = re.compile(rb'"method"\s*:\s*"([A-Za-z0-9_.\-]{1,64})"')


@dataclass
class Sighting:
    protocol: str                    # ssh, tls, http, stratum, jsonrpc, dns
    details: dict = field(default_factory=dict)


def identify(data: bytes, dport: int | None = None, transport: str = "tcp") -> Sighting | None:
    if not data:
        return None
    if transport == "udp":
        return dns_query(data) if dport == 53 else None
    if data.startswith(b"SSH-"):
        return Sighting("ssh", {"banner": data.split(b"\r\n", 1)[0].split(b"\n", 1)[0][:80].decode("ascii", "replace")})
    if data[0] == 0x16 and len(data) >= 6 and data[1] == 0x03 and data[5] == 0x01:
        return Sighting("tls", {"sni": tls_sni(data)} if tls_sni(data) else {})
    if data.startswith(_HTTP_METHODS):
        line = data.split(b"\r\n", 1)[0].decode("latin-1")
        method, _, rest = line.partition(" ")
        host = re.search(rb"\r\nhost:\s*([^\r\n]+)", data, re.I)
        details = {"method": method, "path": rest.rsplit(" ", 1)[0][:200]}
        if host:
            details["host"] = host.group(1).decode("latin-1")[:200]
        return Sighting("http", details)
    if data.startswith(b"HTTP/1."):
        try:
            status = int(data[9:12])
        except ValueError:
            status = 0
        return Sighting("http", {"status": status})
    if data.lstrip()[:1] == b"{":
        method = _STRATUM_METHOD.search(data)
        if method:
            name = method.group(1).decode()
            mining = name.startswith("mining.") or (name == "login" and b'"agent"' in data)
            return Sighting("stratum" if mining else "jsonrpc", {"method": name})
    return None


def tls_sni(data: bytes) -> str | None:
    """server_name from a ClientHello record, when the captured bytes reach it."""
    try:
        pos = 5 + 4 + 2 + 32                       # record header, handshake header, version, random
        pos += 1 + data[pos]                       # session id
        pos += 2 + struct.unpack_from("!H", data, pos)[0]   # cipher suites
        pos += 1 + data[pos]                       # compression methods
        end = pos + 2 + struct.unpack_from("!H", data, pos)[0]
        pos += 2
        while pos + 4 <= min(end, len(data)):
            ext_type, ext_len = struct.unpack_from("!HH", data, pos)
            pos += 4
            if ext_type == 0:                      # server_name: list len, type, name len, name
                name_len = struct.unpack_from("!H", data, pos + 3)[0]
                name = data[pos + 5:pos + 5 + name_len]
                return name.decode("ascii") if len(name) == name_len else None
            pos += ext_len
    except (IndexError, struct.error, UnicodeDecodeError):
        return None
    return None


def dns_query(data: bytes) -> Sighting | None:
    """The question of a DNS query: name and type."""
    if len(data) < 17 or data[2] & 0x80:           # too short, or a response
        return None
    labels, pos = [], 12
    while pos < len(data):
        n = data[pos]
        if n == 0:
            qtype = struct.unpack_from("!H", data, pos + 1)[0] if pos + 3 <= len(data) else None
            name = ".".join(labels)
            return Sighting("dns", {"qname": name, "qtype": qtype}) if name else None
        if n > 63:
            return None
        labels.append(data[pos + 1:pos + 1 + n].decode("ascii", "replace"))
        pos += 1 + n
    # the name ran past the captured bytes: still report what we have, marked
    return Sighting("dns", {"qname": ".".join(labels), "qtype": None, "truncated": True}) if labels else None


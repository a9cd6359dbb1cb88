"""Reading /proc for what the probes cannot see: which socket a process holds
on a descriptor. Racy by nature (the process may be gone): None then."""
from __future__ import annotations

import os
import signal
import socket
import struct

from .events import Endpoint, Process

_TCP_STATES = {"01": "established", "02": "syn_sent", "0A": "listen"}


def socket_on_fd(pid: int, fd: int) -> tuple[str, Endpoint, Endpoint, str] | None:
    """(transport, local, remote, state) of the socket on a process's fd, or None if it is no inet socket."""
    try:
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None
    if not target.startswith("socket:["):
        return None
    inode = target[8:-1]
    for transport, table, family in (("tcp", "tcp", socket.AF_INET), ("tcp", "tcp6", socket.AF_INET6),
                                     ("udp", "udp", socket.AF_INET), ("udp", "udp6", socket.AF_INET6)):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:    # the process's own network namespace
                next(f)
                for line in f:
                    fields = line.split()
                    if len(fields) > 9 and fields[9] == inode:
                        return (transport, _endpoint(fields[1], family), _endpoint(fields[2], family),
                                _TCP_STATES.get(fields[3], fields[3]))
        except OSError:
            continue
    return None


def _endpoint(text: str, family: int) -> Endpoint:
    addr, port = text.split(":")
    raw = bytes.fromhex(addr)
    # /proc prints each 32-bit word of the address in host (little-endian) order
    raw = b"".join(struct.pack("<I", struct.unpack(">I", raw[i:i + 4])[0]) for i in range(0, len(raw), 4))
    return Endpoint(socket.inet_ntop(family, raw), int(port, 16))


def process_info(pid: int) -> Process | None:
    """A running process as /proc shows it: name, executable, argv, parent."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            exe = ""
        return Process(pid=pid, name=status.get("Name", "").strip(), executable=exe, args=args,
                       parent_pid=int(status.get("PPid", "0").strip() or 0) or None)
    except (OSError, ValueError):
        return None


def resume(pid: int) -> None:
    """SIGCONT a process that the exec probe stopped until its argv was read (records.h EXEC_HELD)."""
    try:
        os.kill(pid, signal.SIGCONT)
    except OSError:
        pass        # gone already

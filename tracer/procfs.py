"""Reading /proc for what the probes cannot see: which socket a process holds
on a descriptor, which pipes and FIFOs it holds, and which processes an
episode's cgroup holds. Racy by nature (the process may be gone): None then."""
from __future__ import annotations

import os
import socket
import stat
import struct

from .events import Endpoint, Process
from .kernel import cgroups

MAX_FDS = 256            # descriptors looked at per process: a shell pipeline holds a handful
MAX_EPISODE_PIDS = 1024  # processes of one episode looked at for pipe ends
_TTY_MAJORS = {4, 5, *range(136, 144)}    # /dev/tty*, /dev/tty + console + ptmx, /dev/pts/*

# (fd, kind, ident, mode): kind pipe / fifo / socket / tty / other; ident is the pipe's or socket's
# inode, or "dev:ino" of a FIFO, the same in every process that holds it; mode r, w or rw.
OpenFile = tuple[int, str, str, str]

_TCP_STATES = {"01": "established", "02": "syn_sent", "0A": "listen"}


def socket_on_fd(pid: int, fd: int) -> tuple[str, Endpoint, Endpoint, str] | None:
    """(transport, local, remote, state) of the socket on a process's fd, or None if it is no inet socket."""
    try:
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None
    if not target.startswith("socket:["):
        return None
    return inet_sockets(pid, {target[8:-1]}).get(target[8:-1])


def inet_sockets(pid: int, inodes: set[str]) -> dict[str, tuple[str, Endpoint, Endpoint, str]]:
    """(transport, local, remote, state) of those of the socket inodes that are TCP or UDP sockets,
    from the tables of the process's own network namespace."""
    found: dict[str, tuple[str, Endpoint, Endpoint, str]] = {}
    for transport, table, family in (("tcp", "tcp", socket.AF_INET), ("tcp", "tcp6", socket.AF_INET6),
                                     ("udp", "udp", socket.AF_INET), ("udp", "udp6", socket.AF_INET6)):
        if len(found) == len(inodes):
            break
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if len(fields) > 9 and fields[9] in inodes:
                        found[fields[9]] = (transport, _endpoint(fields[1], family), _endpoint(fields[2], family),
                                            _TCP_STATES.get(fields[3], fields[3]))
        except (OSError, StopIteration):
            continue
    return found


def open_files(pid: int) -> list[OpenFile] | None:
    """The pipes, FIFOs, sockets and terminals a process holds (its first MAX_FDS descriptors).

    A FIFO is stat()ed through the /proc magic link, never opened: an open could block."""
    base = f"/proc/{pid}/fd"
    try:
        fds = sorted(int(name) for name in os.listdir(base))[:MAX_FDS]
    except (OSError, ValueError):
        return None
    found: list[OpenFile] = []
    for fd in fds:
        try:
            target = os.readlink(f"{base}/{fd}")
            if target.startswith("pipe:["):
                kind, ident = "pipe", target[6:-1]
            elif target.startswith("socket:["):
                kind, ident = "socket", target[8:-1]
            else:
                st = os.stat(f"{base}/{fd}")
                if stat.S_ISFIFO(st.st_mode):
                    kind, ident = "fifo", f"{st.st_dev}:{st.st_ino}"
                elif stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) in _TTY_MAJORS:
                    kind, ident = "tty", ""
                else:
                    kind, ident = "other", ""
            found.append((fd, kind, ident, _access_mode(pid, fd) if kind in ("pipe", "fifo") else "rw"))
        except OSError:
            continue     # closed meanwhile
    return found


def _access_mode(pid: int, fd: int) -> str:
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("flags:"):
                    return ("r", "w", "rw", "rw")[int(line.split()[1], 8) & 3]
    except (OSError, ValueError, IndexError):
        pass
    return "rw"


def episode_pids(cgroup_path: str) -> list[int]:
    """The processes in an episode's cgroup tree (cgroup_path as events carry it: "/a/b")."""
    try:
        return cgroups.pids(cgroups.cgroup2_mount() / cgroup_path.lstrip("/"))[:MAX_EPISODE_PIDS]
    except (OSError, cgroups.CgroupError):
        return []


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

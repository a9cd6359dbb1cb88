"""Reading /proc for what the probes cannot see: which socket a process holds
on a descriptor, which pipes and FIFOs it holds, and which processes an
episode's cgroup holds. Racy by nature (the process may be gone): None then."""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import stat
import struct
import time

from .events import Endpoint, Process
from .kernel import cgroups

MAX_FDS = 256            # descriptors looked at per process: a shell pipeline holds a handful
MAX_EPISODE_PIDS = 1024  # processes of one episode looked at for pipe ends
_TTY_MAJORS = {4, 5}                      # /dev/tty*, /dev/tty + console (ptmx: 5:2)
_PTS_MAJORS = range(136, 144)              # /dev/pts/N

# (fd, kind, ident, mode): kind pipe / fifo / socket / pty / tty / other; ident is the pipe's or socket's
# inode, "dev:ino" of a FIFO, or the pty's index (the same for its master, /dev/ptmx, and its /dev/pts/N):
# the same in every process that holds it; mode r, w or rw.
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


def wall_ns() -> int:
    """When /proc was read: a finding read from it is dated then, not at the record that led to the read."""
    return time.time_ns()


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
                elif stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) in _PTS_MAJORS:
                    kind, ident = "pty", str((os.major(st.st_rdev) - 136) * 256 + os.minor(st.st_rdev))
                elif stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (5, 2):
                    index = _fdinfo(pid, fd, "tty-index:")
                    kind, ident = ("pty", index) if index else ("tty", "")
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
        return ("r", "w", "rw", "rw")[int(_fdinfo(pid, fd, "flags:") or "2", 8) & 3]
    except ValueError:
        return "rw"


def _fdinfo(pid: int, fd: int, field: str) -> str | None:
    """A field of /proc/<pid>/fdinfo/<fd>: flags (octal), tty-index (a pty master's /dev/pts number)."""
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith(field):
                    return line.split()[1]
    except (OSError, IndexError):
        pass
    return None


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


# Files inside a sandbox, as the sandbox sees them: opened under /proc/<pid>/root with openat2's
# RESOLVE_IN_ROOT, so that an absolute symlink (/tmp/cfg -> /etc/shadow) resolves inside the sandbox's
# root and not the tracer's, and no magic link (/proc/self/fd/..) leads out.
_SYS_OPENAT2 = 437                 # the same number on every architecture (since Linux 5.6)
_RESOLVE_NO_MAGICLINKS, _RESOLVE_IN_ROOT = 0x02, 0x10


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)


def open_in_root(pid: int, path: str, flags: int = os.O_RDONLY) -> int:
    """A descriptor for path as process pid sees it (relative paths from its cwd). Never blocks on a FIFO
    (O_NONBLOCK). Raises OSError."""
    if not path.startswith("/"):
        path = os.path.join(_cwd_in_root(pid), path)
    root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        how = _OpenHow(flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, 0,
                       _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
        fd = _libc.syscall(_SYS_OPENAT2, root, path.encode(), ctypes.byref(how), ctypes.sizeof(how))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
        return fd
    finally:
        os.close(root)


def _cwd_in_root(pid: int) -> str:
    """The process's cwd as the process names it. /proc shows both links from the tracer's root: a cwd
    under a chroot comes as /srv/root/work and is /work inside (in another mount namespace, root shows /)."""
    cwd, root = os.readlink(f"/proc/{pid}/cwd"), os.readlink(f"/proc/{pid}/root")
    if root != "/" and (cwd == root or cwd.startswith(root + "/")):
        cwd = cwd[len(root):] or "/"
    return cwd


def read_in_root(pid: int, path: str, limit: int) -> tuple[bytes, int]:
    """The first `limit` bytes of a regular file, as process pid sees it, and its ctime (ns). OSError for
    anything else: a FIFO, a device, a socket, a directory, a missing file."""
    fd = open_in_root(pid, path)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) \
                else "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise OSError(0, kind, path)
        return os.read(fd, limit), st.st_ctime_ns
    finally:
        os.close(fd)


def list_in_root(pid: int, path: str) -> list[str]:
    """The names in a directory, as process pid sees it."""
    fd = open_in_root(pid, path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)


def user_of(pid: int) -> tuple[int, str] | None:
    """(real uid, home directory from the sandbox's /etc/passwd) of a process."""
    try:
        with open(f"/proc/{pid}/status") as f:
            uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
        for line in read_in_root(pid, "/etc/passwd", 1 << 20)[0].decode(errors="replace").splitlines():
            fields = line.split(":")
            if len(fields) >= 7 and fields[2] == str(uid):
                return uid, fields[5]
        return uid, ""
    except (OSError, StopIteration, ValueError):
        return None


def ssh_forwarding(pid: int, args: list[str], started_ns: int | None = None) -> str | None:
    """What an ssh client's config makes it forward (tracer.sshconfig): one place for every lookup."""
    from .sshconfig import ssh_forwarding as resolve
    return resolve(pid, args, started_ns)


def resume(pid: int) -> None:
    """SIGCONT a process that the exec probe stopped until its argv was read (records.h EXEC_HELD)."""
    try:
        os.kill(pid, signal.SIGCONT)
    except OSError:
        pass        # gone already

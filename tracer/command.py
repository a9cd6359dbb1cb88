"""CMD's process, for run in-process (tracer/session.py) and through the daemon (tracer/client.py): who it
runs as (User) and how it starts (command_setup: into its episode cgroup, its packet-socket filter, its
user; spawn: the same, born in the cgroup). Light to import: a run client through the daemon loads this,
never the tracer."""
from __future__ import annotations

import errno
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from . import logs

log = logs.getLogger(__name__)


@dataclass(frozen=True)
class User:
    """Who CMD runs as (run --user): set after it joins its cgroup, before exec."""
    uid: int
    gid: int
    groups: tuple[int, ...]
    name: str | None = None
    home: str | None = None


def packet_socket_filter(policy):
    """A tracer.kernel.seccomp.Installer for a tracer.policy.Policy with raw_sockets = false (the command's
    socket(AF_PACKET, ...) fails with EPERM; the probes' kill stays the backstop, and the only way for
    registered episodes), else None."""
    if policy is None or policy.raw_sockets:
        return None
    from .kernel import seccomp
    program = seccomp.packet_socket_filter()
    if program is None:
        log.warning("no seccomp filter for %s: AF_PACKET sockets are refused by a kill", os.uname().machine)
        return None
    return seccomp.Installer(program)


def command_setup(cgroup: Path, user: User | None, outputs, policy=None):
    """(preexec_fn, env, stdout) for CMD: it joins the episode cgroup before exec (so that its exec is
    traced), installs the packet-socket filter of its policy (a tracer.policy.Policy), then becomes user;
    its stdout goes to stderr when stdout carries the event stream."""
    become, env, child_stdout = _setup(user, outputs, policy)
    return _joining(cgroup, become), env, child_stdout


def _joining(cgroup: Path, become):
    procs_file = str(cgroup / "cgroup.procs")

    def enter_cgroup() -> None:     # runs in the child before exec
        with open(procs_file, "w") as f:
            f.write(str(os.getpid()))
        become()
    return enter_cgroup


def _setup(user: User | None, outputs, policy):
    """(become, env, stdout): become() runs in the child once it is in its cgroup, before exec."""
    packet_filter = packet_socket_filter(policy)

    def become() -> None:
        if packet_filter is not None:   # while still root: no no_new_privs needed
            packet_filter.install()
        if user is not None:        # after joining: an unprivileged process cannot move itself
            os.setgroups(user.groups)
            os.setgid(user.gid)
            os.setuid(user.uid)

    env = None
    if user is not None and user.name:
        env = {**os.environ, "USER": user.name, "LOGNAME": user.name, "HOME": user.home or "/"}
    child_stdout = sys.stderr if any(o.name == "stdout" for o in outputs.outputs) else None
    return become, env, child_stdout


# clone3(2) with CLONE_INTO_CGROUP (Linux 5.7): CMD is born in its cgroup. A cgroup.procs write migrates a live
# process under cgroup_threadgroup_rwsem taken for writing, which waits for an RCU grace period; a fork into a
# cgroup does not migrate anything. Measured here: fork, join and exec of `true` 16 ms (median) the one way,
# 2.6 ms the other.
SYS_CLONE3 = 435                    # the same number on every architecture of the generic syscall table
CLONE_VFORK = 0x4000                # the parent goes on once the child has exec'd or exited
CLONE_INTO_CGROUP = 0x200000000
CLONE_ARGS = "<11Q"                 # struct clone_args, flags .. cgroup (its 5.7 size, 88 bytes)
RESTORED_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)   # Python ignores them; CMD gets the defaults, as from Popen


class Child:
    """CMD started by spawn() without subprocess: what run uses of a subprocess.Popen."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def wait(self) -> int:
        if self.returncode is None:
            try:
                self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
            except ChildProcessError:       # SIGCHLD ignored: reaped by the kernel, status lost (as Popen says)
                self.returncode = 0
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:         # not reaped: the pid is still CMD's
            os.kill(self.pid, signum)


def spawn(argv: list[str], cgroup: Path, user: User | None, outputs, policy=None):
    """CMD started as subprocess.Popen(argv, preexec_fn=<command_setup's>) starts it, stdout and env included, but
    born in its cgroup (clone3 CLONE_INTO_CGROUP): a Child, or a Popen when this process has other threads (the
    child runs Python until it execs, and must find no lock held by a thread it does not have) or the kernel
    refuses the clone. Raises OSError (FileNotFoundError: no such command) or SubprocessError, as Popen does."""
    become, env, child_stdout = _setup(user, outputs, policy)
    if _single_threaded():
        pid = _clone_into(cgroup, argv, env, child_stdout, become)
        if pid is not None:
            return Child(pid)
    import subprocess
    return subprocess.Popen(argv, preexec_fn=_joining(cgroup, become), stdout=child_stdout, env=env)


def _single_threaded() -> bool:
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"Threads:"):
                return int(line.split()[1]) == 1
    return False


def _clone_into(cgroup: Path, argv: list[str], env, child_stdout, become) -> int | None:
    """CMD's pid, or None when clone3 failed (nothing was started)."""
    import ctypes
    import struct
    libc = ctypes.PyDLL(None, use_errno=True)      # PyDLL: the GIL stays held, so the child has it
    libc.syscall.restype = ctypes.c_long
    libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
    executable = os.fsencode(argv[0])
    candidates = [executable] if os.path.dirname(executable) else \
        [os.path.join(os.fsencode(d), executable) for d in os.get_exec_path(env)]
    stdout_fd = child_stdout.fileno() if child_stdout is not None else None
    max_fd = os.sysconf("SC_OPEN_MAX")
    try:
        cgroup_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None                     # Popen's preexec_fn says what is wrong with it
    error_r, error_w = os.pipe2(os.O_CLOEXEC)
    try:
        packed = struct.pack(CLONE_ARGS, CLONE_VFORK | CLONE_INTO_CGROUP, 0, 0, 0, signal.SIGCHLD, 0, 0, 0, 0, 0,
                             cgroup_fd)
        args = ctypes.create_string_buffer(packed, len(packed))
        pid = -1
        try:
            pid = libc.syscall(ctypes.c_long(SYS_CLONE3), args, ctypes.c_size_t(len(packed)))
            if pid == 0:
                _exec(libc, argv, candidates, env, stdout_fd, error_w, max_fd, become)
        finally:
            if pid == 0:                # the child never returns into the parent's code, whatever happened
                os._exit(255)
        if pid < 0:
            log.debug("clone3 into %s: %s; CMD joins its cgroup after fork", cgroup, os.strerror(ctypes.get_errno()))
            return None
        os.close(error_w)
        error_w = -1
        report = b""
        while chunk := os.read(error_r, 64):
            report += chunk
    finally:
        for fd in (cgroup_fd, error_r, error_w):
            if fd >= 0:
                os.close(fd)
    if not report:
        return pid
    os.waitpid(pid, 0)
    code = int(report)
    if code:
        raise OSError(code, os.strerror(code))
    import subprocess
    raise subprocess.SubprocessError("Exception occurred in preexec_fn.")


def _exec(libc, argv, candidates, env, stdout_fd, error_w, max_fd, become) -> None:
    """In the child, already in its cgroup: what Popen's child does (stdout, close_fds, restore_signals), then
    become(), then exec; a failure's errno goes to error_w (0: not an OSError) and the child exits."""
    code = 0
    try:
        for signum in RESTORED_SIGNALS:
            libc.signal(signum, None)           # SIG_DFL
        if stdout_fd is not None:
            os.dup2(stdout_fd, 1)
        os.closerange(3, error_w)
        os.closerange(error_w + 1, max_fd)
        become()
        first, code = None, errno.ENOENT
        for path in candidates:
            try:
                os.execve(path, argv, os.environ if env is None else env)
            except OSError as e:
                code = e.errno
                if first is None and e.errno not in (errno.ENOENT, errno.ENOTDIR):
                    first = e.errno
        code = first or code
    except OSError as e:
        code = e.errno or 0
    except BaseException:
        code = 0
    os.write(error_w, b"%d" % code)

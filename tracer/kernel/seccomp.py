"""`eptrace run`'s seccomp filter: with raw_sockets = false, socket(AF_PACKET, ...) fails with EPERM in the
command and its descendants, instead of the kill that is all the probes can do (no cgroup hook sees packet
sockets: probes/processes.c). Classic BPF, installed in the child before exec by root (CAP_SYS_ADMIN: no
PR_SET_NO_NEW_PRIVS, so the sandbox's setuid programs still work); a run that is not root (a socket-group
member's, through the daemon) must set PR_SET_NO_NEW_PRIVS first, so there setuid programs run without
their privileges. Raw inet sockets are left to the cgroup
sock_create hook, which refuses them with EPERM and records them; the probes see a socket() that seccomp
refused only at its exit (sys_exit_socket), and report it as a refused AF_PACKET socket."""
from __future__ import annotations

import ctypes
import os
import platform
import struct

# (AUDIT_ARCH_*, __NR_socket) of the ABIs this filter knows; another ABI (32-bit compat calls) passes.
ARCHES = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}
AF_PACKET = 17
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
PR_SET_NO_NEW_PRIVS = 38
RET_ALLOW, RET_ERRNO = 0x7FFF0000, 0x00050000
LD_W_ABS, JEQ_K, RET_K = 0x20, 0x15, 0x06          # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
ARCH_AT, NR_AT, ARG0_AT = 4, 0, 16                  # struct seccomp_data offsets (args[0]'s low word: LE)


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def packet_socket_filter(machine: str | None = None) -> bytes | None:
    """The filter's instructions (struct sock_filter, 8 bytes each), or None on an unknown machine."""
    arch = ARCHES.get(machine or platform.machine())
    if arch is None:
        return None
    audit_arch, nr_socket = arch
    program = [
        (LD_W_ABS, 0, 0, ARCH_AT),
        (JEQ_K, 0, 4, audit_arch),          # another ABI: allow
        (LD_W_ABS, 0, 0, NR_AT),
        (JEQ_K, 0, 2, nr_socket),           # not socket(): allow
        (LD_W_ABS, 0, 0, ARG0_AT),
        (JEQ_K, 1, 0, AF_PACKET),
        (RET_K, 0, 0, RET_ALLOW),
        (RET_K, 0, 0, RET_ERRNO | 1),       # EPERM
    ]
    return b"".join(struct.pack("<HBBI", *insn) for insn in program)


class Installer:
    """Prepared in the parent, installed in the child (preexec_fn: nothing is allocated there)."""

    def __init__(self, program: bytes) -> None:
        self._buffer = ctypes.create_string_buffer(program, len(program))
        self._program = _Program(len(program) // 8, ctypes.addressof(self._buffer))
        self._prctl = ctypes.CDLL(None, use_errno=True).prctl

    def install(self, no_new_privs: bool = False) -> None:
        """no_new_privs: needed without CAP_SYS_ADMIN (and then setuid programs lose their privileges)."""
        if no_new_privs and self._prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot set no_new_privs for the packet-socket seccomp filter: {os.strerror(err)}")
        if self._prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(self._program), 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot install the packet-socket seccomp filter: {os.strerror(err)}")

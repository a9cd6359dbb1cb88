"""Compile probes/ with bcc, attach them to episode cgroups, and read the ring buffer.

Cgroup programs are attached through BPF links: the kernel detaches them when
this process's link fds close, so a crashed tracer leaves nothing attached.
"""
from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import Callable

from ..config import Limits
from . import cgroups

log = logging.getLogger(__name__)

PROBES_DIR = Path(__file__).resolve().parents[2] / "probes"
PROBE_FILES = ("sockets.c", "tcp.c", "packets.c", "processes.c")
# enum loss_reason in records.h, in its order
LOSS_REASONS = ("ringbuf_full", "no_socket_storage", "budget", "argv_unread", "connects_map_full",
                "exit_codes_map_full", "sockets_map_full", "argv_map_full")
SET_UPDATE_INTERVAL, SET_BUDGET_RATE, SET_BUDGET_BURST = 0, 1, 2     # enum setting in common.h
RINGBUF_PAGES = Limits().ringbuf_pages     # the default size


class ProbeError(Exception):
    """The probes could not be compiled, loaded or attached."""


def probe_source() -> str:
    """One translation unit: bcc rewrites map calls only in the main file, so
    common.h is inlined here instead of being #included by each probe file."""
    common = (PROBES_DIR / "common.h").read_text()
    parts = [common]
    for name in PROBE_FILES:
        parts.append(f"/* ---- {name} ---- */\n")
        parts.append((PROBES_DIR / name).read_text().replace('#include "common.h"', ""))
    return "\n".join(parts)


def _libbpf() -> ctypes.CDLL:
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    lib.bpf_link_create.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.bpf_link_create.restype = ctypes.c_int
    return lib


def _release_compiler_memory() -> None:
    """Hand back to the OS what clang/LLVM freed after compiling (tens of MB)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Probes:
    """The loaded probes. Tracepoints are live from construction; cgroup
    programs run only for the cgroups passed to attach()."""

    def __init__(self, ringbuf_pages: int = RINGBUF_PAGES):
        from bcc import BPF, BPFAttachType, BPFProgType  # Debian's python3-bpfcc

        self._BPF = BPF
        try:
            self.bpf = BPF(text=probe_source().encode(),
                           cflags=[f"-I{PROBES_DIR}", f"-DRINGBUF_PAGES={ringbuf_pages}",
                                   "-Wno-macro-redefined", "-Wno-unused-function"])
        except Exception as e:  # bcc raises bare Exceptions
            raise ProbeError(f"cannot compile or load the probes: {e} "
                             "(run 'eptrace doctor' to see which kernel feature is missing)") from e
        _release_compiler_memory()
        A, P = BPFAttachType, BPFProgType
        programs = [
            ("on_sock_create", P.CGROUP_SOCK, A.CGROUP_INET_SOCK_CREATE),
            ("on_sock_release", P.CGROUP_SOCK, A.CGROUP_INET_SOCK_RELEASE),
            ("on_connect4", P.CGROUP_SOCK_ADDR, A.CGROUP_INET4_CONNECT),
            ("on_connect6", P.CGROUP_SOCK_ADDR, A.CGROUP_INET6_CONNECT),
            ("on_sendmsg4", P.CGROUP_SOCK_ADDR, A.CGROUP_UDP4_SENDMSG),
            ("on_sendmsg6", P.CGROUP_SOCK_ADDR, A.CGROUP_UDP6_SENDMSG),
            ("on_bind4", P.CGROUP_SOCK_ADDR, A.CGROUP_INET4_BIND),
            ("on_bind6", P.CGROUP_SOCK_ADDR, A.CGROUP_INET6_BIND),
            ("on_sock_ops", P.SOCK_OPS, A.CGROUP_SOCK_OPS),
            ("on_egress", P.CGROUP_SKB, A.CGROUP_INET_EGRESS),
            ("on_ingress", P.CGROUP_SKB, A.CGROUP_INET_INGRESS),
        ]
        try:
            self._cgroup_programs = [(self.bpf.load_func(name.encode(), prog_type, attach_type=attach_type), attach_type)
                                     for name, prog_type, attach_type in programs]
        except Exception as e:
            raise ProbeError(f"cannot load a cgroup program: {e}") from e
        self._lib = _libbpf()
        self._links: dict[int, list[int]] = {}          # cgroup id -> link fds
        self._levels: dict[int, int] = {}               # episode cgroup id -> level
        self._budget_burst = 0                          # tokens a new episode starts with

    # -- episodes -------------------------------------------------------------
    def attach(self, cgroup_path: Path) -> int:
        """Trace a cgroup and its descendants as one episode; returns its cgroup id."""
        cgid = cgroups.cgroup_id(cgroup_path)
        if cgid in self._links:
            return cgid
        fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
        links: list[int] = []
        try:
            for fn, attach_type in self._cgroup_programs:
                link = self._lib.bpf_link_create(fn.fd, fd, attach_type, None)
                if link < 0:
                    err = ctypes.get_errno() or -link
                    raise ProbeError(f"cannot attach {fn.name.decode()} to {cgroup_path}: {os.strerror(err)}")
                links.append(link)
        except ProbeError:
            for link in links:
                os.close(link)
            raise
        finally:
            os.close(fd)
        self._links[cgid] = links
        # Its account first (losses, budget), so that nothing it loses goes uncounted.
        accounts = self.bpf[b"accounts"]
        account = accounts.Leaf()
        account.tokens = self._budget_burst
        accounts[ctypes.c_uint64(cgid)] = account
        # Register only once every hook is in place, so no event is half-seen.
        self.bpf[b"episodes"][ctypes.c_uint64(cgid)] = ctypes.c_uint32(1)
        self._levels[cgid] = cgroups.level(cgroup_path)
        self._write_levels()
        return cgid

    def detach(self, cgid: int) -> dict[str, int]:
        """Stop tracing an episode; returns its final losses by reason."""
        try:
            del self.bpf[b"episodes"][ctypes.c_uint64(cgid)]
        except KeyError:
            pass
        for link in self._links.pop(cgid, []):
            os.close(link)
        self._levels.pop(cgid, None)
        self._write_levels()
        final = self.episode_lost(cgid)
        try:
            del self.bpf[b"accounts"][ctypes.c_uint64(cgid)]
        except KeyError:
            pass
        return final

    def _write_levels(self) -> None:
        levels = self.bpf[b"episode_levels"]
        lo, hi = (min(self._levels.values()), max(self._levels.values())) if self._levels else (1, 0)
        levels[ctypes.c_int(0)] = ctypes.c_uint32(lo)
        levels[ctypes.c_int(1)] = ctypes.c_uint32(hi)

    def set_flow_update_interval(self, ns: int) -> None:
        """How often an active flow reports its counters (REC_FLOW_UPDATE)."""
        self.bpf[b"settings"][ctypes.c_int(SET_UPDATE_INTERVAL)] = ctypes.c_uint64(ns)

    def set_budget(self, per_second: int, burst: int) -> None:
        """Low-value records each episode may send: per_second on average, burst at once (0: no budget)."""
        self._budget_burst = burst
        settings = self.bpf[b"settings"]
        settings[ctypes.c_int(SET_BUDGET_BURST)] = ctypes.c_uint64(burst)
        settings[ctypes.c_int(SET_BUDGET_RATE)] = ctypes.c_uint64(per_second)

    # -- records ----------------------------------------------------------------
    def open_records(self, handle: Callable[[bytes], None]) -> None:
        """Call handle(raw_record) for every ring-buffer record from poll()."""
        def callback(_ctx, data, size):
            handle(ctypes.string_at(data, size))
            return 0
        self._callback = callback   # keep a reference: bcc holds only a C pointer
        self.bpf[b"events"].open_ring_buffer(callback)

    def poll(self, timeout_ms: int) -> None:
        """Wait up to timeout_ms, then hand over every record there. The probes
        wake us only when the buffer fills up, so the timeout paces reading."""
        self.bpf.ring_buffer_poll(timeout_ms)
        self.bpf.ring_buffer_consume()

    def lost(self) -> dict[str, int]:
        """Records the kernel could not send, by reason, summed over CPUs."""
        table = self.bpf[b"lost"]
        return {reason: int(sum(table[ctypes.c_int(i)])) for i, reason in enumerate(LOSS_REASONS)}

    def episode_lost(self, cgid: int) -> dict[str, int]:
        """What one episode lost so far, by reason (zeros when it has no account)."""
        try:
            account = self.bpf[b"accounts"][ctypes.c_uint64(cgid)]
        except KeyError:
            return dict.fromkeys(LOSS_REASONS, 0)
        return {reason: int(account.lost[i]) for i, reason in enumerate(LOSS_REASONS)}

    def close(self) -> None:
        for cgid in list(self._links):
            self.detach(cgid)
        self.bpf.cleanup()

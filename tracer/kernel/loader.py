"""Compile probes/ with bcc, attach them to episode cgroups, and read the ring buffer.

Every program is attached through a BPF link, and with a pin directory the links
and maps are pinned there (tracer/kernel/pins.py): a tracer that dies leaves its
probes attached and recording, and the fail-closed check refuses the episodes'
connects once no tracer refreshes the liveness map. A later Probes on the same
pin directory re-opens the maps (bcc opens a pinned map instead of creating it)
and moves the links to its own programs.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from ..config import Limits
from ..policy import LISTEN, Policy, compile_rules, name_hash
from . import cgroups, pins

log = logging.getLogger(__name__)

PROBES_DIR = Path(__file__).resolve().parents[2] / "probes"
PROBE_FILES = ("sockets.c", "tcp.c", "packets.c", "processes.c")
# enum loss_reason in records.h, in its order
LOSS_REASONS = ("ringbuf_full", "no_socket_storage", "budget", "argv_unread", "connects_map_full",
                "exit_codes_map_full", "sockets_map_full", "argv_map_full", "burst_budget", "ring_share")
BPF_PERF_EVENT = 41                                    # enum bpf_attach_type: a tracepoint's perf event
PERF_TYPE_TRACEPOINT, PERF_SAMPLE_RAW, PERF_ATTR_SIZE = 2, 1 << 10, 128
SYS_PERF_EVENT_OPEN = 298                              # x86_64
LIVENESS_REFRESH_NS = 200_000_000                      # refreshed this often; the timeout is seconds
RINGBUF_PAGES = Limits().ringbuf_pages     # the default size
# enum setting in common.h
SET_UPDATE_INTERVAL, SET_ICMP_LARGE, SET_BUDGET_RATE, SET_BUDGET_BURST = 0, 1, 2, 3
SET_SHARE_WATERMARK, SET_SHARE_RATE, SET_SHARE_BURST = 4, 5, 6


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
    lib.bpf_link_update.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.bpf_link_update.restype = ctypes.c_int
    lib.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
    lib.bpf_obj_pin.restype = ctypes.c_int
    lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
    lib.bpf_obj_get.restype = ctypes.c_int
    return lib


@contextlib.contextmanager
def _libbcc_messages(lines: list[str]):
    """libbcc prints its errors (a refused map, the verifier's log) straight to fd 2: collect them into
    lines, so that a failure is one line on stderr that names the kernel's reason, and success stays quiet."""
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines.extend(line for line in captured.read().decode(errors="replace").splitlines() if line.strip())
            for line in lines:
                log.debug("libbcc: %s", line)


def _probe_error(what: str, error: Exception, messages: list[str]) -> ProbeError:
    kernel_says = next((m for m in messages if "error" in m.lower() or "permission" in m.lower()), None)
    reason = f"{kernel_says} ({error})" if kernel_says else str(error)
    return ProbeError(f"{what}: {reason} (run 'eptrace doctor' to see which kernel feature is missing)")


def _tracepoint_event(category: str, name: str) -> int:
    """A perf event fd for a tracepoint, for a BPF_PERF_EVENT link (which bcc 0.26 cannot make)."""
    from bcc import TRACEFS
    tp_id = int(Path(TRACEFS, "events", category, name, "id").read_text())
    attr = (ctypes.c_ubyte * PERF_ATTR_SIZE)()
    ctypes.c_uint32.from_buffer(attr, 0).value = PERF_TYPE_TRACEPOINT
    ctypes.c_uint32.from_buffer(attr, 4).value = PERF_ATTR_SIZE
    ctypes.c_uint64.from_buffer(attr, 8).value = tp_id
    ctypes.c_uint64.from_buffer(attr, 16).value = 1               # sample_period
    ctypes.c_uint64.from_buffer(attr, 24).value = PERF_SAMPLE_RAW
    ctypes.c_uint32.from_buffer(attr, 48).value = 1               # wakeup_events
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(SYS_PERF_EVENT_OPEN, attr, -1, 0, -1, 8)     # pid -1, cpu 0, PERF_FLAG_FD_CLOEXEC
    if fd < 0:
        raise ProbeError(f"cannot open tracepoint {category}:{name}: {os.strerror(ctypes.get_errno())}")
    return fd


def _release_compiler_memory() -> None:
    """Hand back to the OS what clang/LLVM freed after compiling (tens of MB)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Probes:
    """The loaded probes. Tracepoints are live from construction; cgroup
    programs run only for the cgroups passed to attach()."""

    def __init__(self, ringbuf_pages: int = RINGBUF_PAGES, pin_dir: Path | None = None):
        """pin_dir: pin maps and links there (re-opening what a dead tracer left); None: nothing outlives us."""
        from bcc import BPF, BPFAttachType, BPFProgType  # Debian's python3-bpfcc

        self._BPF = BPF
        self._lib = _libbpf()
        self.pin_dir = pin_dir
        self.ringbuf_bytes = ringbuf_pages * mmap.PAGESIZE
        self._lock_fd: int | None = None
        source = probe_source()
        cflags = [f"-I{PROBES_DIR}", f"-DRINGBUF_PAGES={ringbuf_pages}", "-Wno-macro-redefined",
                  "-Wno-unused-function"]
        self.resumed = False
        old_maps: list[Path] = []
        if pin_dir is not None:
            try:
                pins.ensure_bpffs(pin_dir)
                self._lock_fd = pins.lock(pin_dir)
            except (pins.PinError, OSError) as e:
                raise ProbeError(str(e)) from None
            maps = pin_dir / pins.maps_dir_name(source, cflags)
            # Maps of other probes (another eptrace version) are never re-opened: their layout may differ.
            old_maps = [d for d in pin_dir.glob(pins.MAPS_PREFIX + "*") if d != maps]
            maps.mkdir(exist_ok=True)
            (pin_dir / "links").mkdir(exist_ok=True)
            cflags.append(f'-DPIN_DIR="{maps}"')
            # A restart: the maps are there, and the probes a dead tracer left may still be attached.
            self.resumed = (maps / "events").exists()
        messages: list[str] = []
        try:
            with _libbcc_messages(messages):
                self.bpf = BPF(text=source.encode(), cflags=cflags)
        except Exception as e:  # bcc raises bare Exceptions
            if self._lock_fd is not None:
                os.close(self._lock_fd)
            raise _probe_error("cannot compile or load the probes", e, messages) from e
        _release_compiler_memory()
        for stale in old_maps:
            log.warning("pinned maps of other probes in %s (another eptrace version): their records are "
                        "dropped, their links are taken over", stale)
            pins.remove(stale)
        self.previous_liveness = self._liveness() if self.resumed else None
        self._timeout_ns = self._stall_ns = 0
        self._progress_ns = time.monotonic_ns()
        self._liveness_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._tracepoint_links: list[int] = []
        self._relink_tracepoints()
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
        messages.clear()
        try:
            with _libbcc_messages(messages):
                self._cgroup_programs = [(self.bpf.load_func(name.encode(), prog_type, attach_type=attach_type),
                                          attach_type) for name, prog_type, attach_type in programs]
        except Exception as e:
            raise _probe_error("cannot load a cgroup program", e, messages) from e
        self._links: dict[int, list[int]] = {}          # cgroup id -> link fds
        self._levels: dict[int, int] = {}               # episode cgroup id -> level
        self._budget_burst = self._share_burst = 0      # tokens a new episode starts with
        self._share_watermark = 0                       # bytes; in force only while two episodes share the ring

    # -- links ------------------------------------------------------------------
    def _link_pin(self, name: str) -> Path | None:
        return self.pin_dir / "links" / name if self.pin_dir is not None else None

    def _pin(self, fd: int, name: str) -> None:
        """Pin a new link as name, replacing (and so detaching) what a dead tracer pinned there."""
        path = self._link_pin(name)
        if path is None:
            return
        path.unlink(missing_ok=True)
        if self._lib.bpf_obj_pin(fd, str(path).encode()) < 0:
            raise ProbeError(f"cannot pin {path}: {os.strerror(ctypes.get_errno())}")

    def _relink_tracepoints(self) -> None:
        """Replace bcc's tracepoint attachments (perf event fds, which cannot be pinned) by
        BPF links. bcc's goes first (the kernel attaches a program once per tracepoint);
        this is before any episode is attached, and a dead tracer's pinned link runs meanwhile."""
        for tp in list(self.bpf.tracepoint_fds):
            category, name = tp.decode().split(":")
            fn = self.bpf.load_func(b"tracepoint__" + tp.replace(b":", b"__"), self._BPF.TRACEPOINT)
            self.bpf.detach_tracepoint(tp)
            event = _tracepoint_event(category, name)
            try:
                link = self._lib.bpf_link_create(fn.fd, event, BPF_PERF_EVENT, None)
                if link < 0:
                    raise ProbeError(f"cannot link {tp.decode()}: {os.strerror(ctypes.get_errno())}")
            finally:
                os.close(event)         # the link holds the event
            self._pin(link, f"tp-{category}-{name}")
            self._tracepoint_links.append(link)

    # -- episodes -------------------------------------------------------------
    def attach(self, cgroup_path: Path, policy: Policy | None = None) -> int:
        """Trace a cgroup and its descendants as one episode, under policy; returns its cgroup id."""
        cgid = cgroups.cgroup_id(cgroup_path)
        if cgid in self._links:
            return cgid
        self.set_policy(cgid, policy)       # before any hook runs: its first connect is checked
        fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
        links: list[int] = []
        try:
            for fn, attach_type in self._cgroup_programs:
                links.append(self._cgroup_link(fn, attach_type, fd, cgid, cgroup_path))
        except ProbeError:
            for link in links:
                os.close(link)
            raise
        finally:
            os.close(fd)
        self._links[cgid] = links
        # Its account first (losses, budget), so that nothing it loses goes uncounted.
        accounts = self.bpf[b"accounts"]
        try:
            accounts[ctypes.c_uint64(cgid)]          # a dead tracer's account (pinned): its losses are kept
        except KeyError:
            account = accounts.Leaf()
            account.budget.tokens = self._budget_burst
            account.share.tokens = self._share_burst
            accounts[ctypes.c_uint64(cgid)] = account
        # Register only once every hook is in place, so no event is half-seen.
        self.bpf[b"episodes"][ctypes.c_uint64(cgid)] = ctypes.c_uint32(1)
        self._levels[cgid] = cgroups.level(cgroup_path)
        self._write_levels()
        self._write_share_watermark()
        return cgid

    def _cgroup_link(self, fn, attach_type: int, cgroup_fd: int, cgid: int, cgroup_path: Path) -> int:
        """A link of fn on the cgroup. A link a dead tracer pinned there is taken over and
        switched to fn atomically (no gap, no double records); else a new one is made and pinned."""
        name = f"cg-{cgid}-{fn.name.decode()}"
        pinned = self._link_pin(name)
        if pinned is not None and pinned.exists():
            link = self._lib.bpf_obj_get(str(pinned).encode())
            if link >= 0:
                if self._lib.bpf_link_update(link, fn.fd, None) == 0:
                    return link
                os.close(link)      # defunct (its cgroup was replaced): make a new one
        link = self._lib.bpf_link_create(fn.fd, cgroup_fd, attach_type, None)
        if link < 0:
            err = ctypes.get_errno() or -link
            raise ProbeError(f"cannot attach {fn.name.decode()} to {cgroup_path}: {os.strerror(err)}")
        try:
            self._pin(link, name)
        except ProbeError:
            os.close(link)
            raise
        return link

    def detach(self, cgid: int) -> dict[str, int]:
        """Stop tracing an episode; returns its final losses by reason."""
        try:
            del self.bpf[b"episodes"][ctypes.c_uint64(cgid)]
        except KeyError:
            pass
        for link in self._links.pop(cgid, []):
            os.close(link)
        self.unpin_cgroup(cgid)
        self._levels.pop(cgid, None)
        self._write_levels()
        self._write_share_watermark()
        final = self.episode_lost(cgid)
        for name in (b"accounts", b"policies", b"denied"):
            try:
                del self.bpf[name][ctypes.c_uint64(cgid)]
            except KeyError:
                pass
        self._clear_policy(cgid)
        return final

    def _write_levels(self) -> None:
        levels = self.bpf[b"episode_levels"]
        lo, hi = (min(self._levels.values()), max(self._levels.values())) if self._levels else (1, 0)
        levels[ctypes.c_int(0)] = ctypes.c_uint32(lo)
        levels[ctypes.c_int(1)] = ctypes.c_uint32(hi)

    def unpin_cgroup(self, cgid: int) -> None:
        """Detach what is pinned for a cgroup id (once no fd of ours holds it)."""
        if self.pin_dir is not None:
            for pin in (self.pin_dir / "links").glob(f"cg-{cgid}-*"):
                pin.unlink(missing_ok=True)

    def forget_others(self) -> list[int]:
        """After a restart, stop tracing the cgroups a dead tracer traced and we do not:
        their pinned links and their entries in the pinned maps. Returns their ids."""
        if self.pin_dir is None:
            return []
        table = self.bpf[b"episodes"]
        stale = {int(p.name.split("-")[1]) for p in (self.pin_dir / "links").glob("cg-*")}
        stale |= {key.value for key in table.keys()}
        stale -= set(self._links)
        for cgid in stale:
            self.unpin_cgroup(cgid)
            try:
                del table[ctypes.c_uint64(cgid)]
            except KeyError:
                pass
        return sorted(stale)

    def set_flow_update_interval(self, ns: int) -> None:
        """How often an active flow reports its counters (REC_FLOW_UPDATE)."""
        self.bpf[b"settings"][ctypes.c_int(SET_UPDATE_INTERVAL)] = ctypes.c_uint64(ns)

    def set_icmp_large_payload(self, nbytes: int) -> None:
        """A first echo request to a destination with a payload this long carries data (packets.c)."""
        self.bpf[b"settings"][ctypes.c_int(SET_ICMP_LARGE)] = ctypes.c_uint64(nbytes)

    def set_budget(self, per_second: int, burst: int) -> None:
        """Low-value records each episode may send: per_second on average, burst at once (0: no budget)."""
        self._budget_burst = burst
        settings = self.bpf[b"settings"]
        settings[ctypes.c_int(SET_BUDGET_BURST)] = ctypes.c_uint64(burst)
        settings[ctypes.c_int(SET_BUDGET_RATE)] = ctypes.c_uint64(per_second)

    def set_ring_share(self, watermark_percent: int, per_second: int, burst: int) -> None:
        """Above watermark_percent of the ring buffer unread, each episode's records are paid from its share:
        per_second on average, burst at once; beyond, they are refused and counted (ring_share)."""
        self._share_burst = burst
        settings = self.bpf[b"settings"]
        settings[ctypes.c_int(SET_SHARE_BURST)] = ctypes.c_uint64(burst)
        settings[ctypes.c_int(SET_SHARE_RATE)] = ctypes.c_uint64(per_second)
        self._share_watermark = self.ringbuf_bytes * watermark_percent // 100
        self._write_share_watermark()

    def _write_share_watermark(self) -> None:
        """The share protects episodes from each other: an episode alone (every run) has the whole ring."""
        watermark = self._share_watermark if len(self._links) > 1 else 0
        self.bpf[b"settings"][ctypes.c_int(SET_SHARE_WATERMARK)] = ctypes.c_uint64(watermark)

    # -- containment ------------------------------------------------------------
    def set_policy(self, cgid: int, policy: Policy | None) -> None:
        """Write an episode's policy into the kernel's maps (replacing what it had); None: no policy."""
        self._clear_policy(cgid)
        if policy is None or not policy.restricts:
            return
        for prefix, rules in compile_rules(policy).items():
            table = self.bpf[b"policy4" if prefix.version == 4 else b"policy6"]
            key = table.Key()
            key.prefixlen = 64 + prefix.prefixlen
            key.episode_hi, key.episode_lo = cgid >> 32, cgid & 0xFFFFFFFF
            packed = prefix.network_address.packed
            for i, byte in enumerate(packed):
                key.addr[i] = byte
            leaf = table.Leaf()
            leaf.n = len(rules)
            for i, rule in enumerate(rules):
                leaf.r[i].port_lo, leaf.r[i].port_hi = rule.port_lo, rule.port_hi
                leaf.r[i].protocol, leaf.r[i].deny, leaf.r[i].entry = rule.protocol, rule.deny, rule.entry
            table[key] = leaf
        names = self.bpf[b"dns_names"]
        for index, entry in policy.names:
            key = names.Key(cgid, name_hash(entry.name), entry.wildcard)
            names[key] = names.Leaf(entry.port_lo, entry.port_hi, entry.protocol, 0, index, 0)
        self._write_episode_policy(cgid, policy, contained=self.contained(cgid))

    def _write_episode_policy(self, cgid: int, policy: Policy | None, contained: bool) -> None:
        table = self.bpf[b"policies"]
        leaf = table.Leaf()
        policy = policy or Policy()
        leaf.default_deny, leaf.raw_sockets = policy.default_deny, policy.raw_sockets
        leaf.listen, leaf.contained = LISTEN.index(policy.listen), contained
        leaf.names = bool(policy.names)
        table[ctypes.c_uint64(cgid)] = leaf

    def _clear_policy(self, cgid: int) -> None:
        for name in (b"policy4", b"policy6"):
            table = self.bpf[name]
            for key in [k for k in table.keys() if (k.episode_hi << 32 | k.episode_lo) == cgid]:
                del table[key]
        names = self.bpf[b"dns_names"]
        for key in [k for k in names.keys() if k.episode == cgid]:
            del names[key]
        if not self.contained(cgid):
            try:
                del self.bpf[b"policies"][ctypes.c_uint64(cgid)]
            except KeyError:
                pass

    def contain(self, cgid: int, policy: Policy | None) -> None:
        """deny_network: refuse every connect, send and packet of the episode from now on (pinned: this
        holds with no tracer running, until the episode is detached)."""
        self._write_episode_policy(cgid, policy, contained=True)

    def contained(self, cgid: int) -> bool:
        try:
            return bool(self.bpf[b"policies"][ctypes.c_uint64(cgid)].contained)
        except KeyError:
            return False

    def denied(self) -> dict[int, int]:
        """Episode cgroup id -> connects, sends, sockets and packets its policy refused."""
        return {k.value: v.value for k, v in self.bpf[b"denied"].items()}

    # -- records ----------------------------------------------------------------
    def open_records(self, handle: Callable[[bytes], None]) -> None:
        """Call handle(raw_record) for every ring-buffer record from poll()."""
        def callback(_ctx, data, size):
            self._progress_ns = time.monotonic_ns()
            handle(ctypes.string_at(data, size))
            return 0
        self._callback = callback   # keep a reference: bcc holds only a C pointer
        self.bpf[b"events"].open_ring_buffer(callback)

    def poll(self, timeout_ms: int) -> None:
        """Wait up to timeout_ms, then hand over every record there. The probes
        wake us only when the buffer fills up, so the timeout paces reading."""
        self.bpf.ring_buffer_poll(timeout_ms)
        self.bpf.ring_buffer_consume()
        self._beat()

    def lost(self) -> dict[str, int]:
        """Records the kernel could not send, by reason, summed over CPUs."""
        table = self.bpf[b"lost"]
        return {reason: int(sum(table[ctypes.c_int(i)])) for i, reason in enumerate(LOSS_REASONS)}

    # -- fail-closed ----------------------------------------------------------------
    def _liveness(self) -> tuple[int, int, int]:
        """(refreshed_ns, timeout_ns, lost_reported) as the map holds them."""
        value = self.bpf[b"liveness"][ctypes.c_int(0)]
        return value.refreshed_ns, value.timeout_ns, value.lost_reported

    def set_fail_closed(self, timeout_ns: int, stall_ns: int = 0) -> None:
        """Refuse episode connects and sends once no tracer refreshed liveness for timeout_ns (0: never).

        A thread refreshes it: the main loop may spend seconds in one poll under a flood, and that
        must not refuse the sandbox's connects. But the thread refreshes only while the main loop
        makes progress (poll() returns, or a record is handed over) at least every stall_ns (0: always):
        a main loop hung for good (an output blocked) is no live tracer, though this process lives."""
        self._timeout_ns, self._stall_ns = timeout_ns, stall_ns
        self._beat()
        self._refresh_liveness()
        if self._liveness_thread is None:
            self._liveness_thread = threading.Thread(target=self._keep_alive, name="eptrace-liveness", daemon=True)
            self._liveness_thread.start()

    def _beat(self) -> None:
        """The main loop made progress."""
        self._progress_ns = time.monotonic_ns()

    def _keep_alive(self) -> None:
        stalled = False
        while not self._stopping.wait(LIVENESS_REFRESH_NS / 1e9):
            if self._stall_ns and time.monotonic_ns() - self._progress_ns > self._stall_ns:
                if not stalled:
                    log.warning("the main loop has made no progress for %.1f s: liveness no longer refreshed, "
                                "the episodes fail closed until it moves again", self._stall_ns / 1e9)
                stalled = True
                continue
            stalled = False
            self._refresh_liveness()

    def _refresh_liveness(self) -> None:
        table = self.bpf[b"liveness"]
        table[ctypes.c_int(0)] = table.Leaf(time.monotonic_ns(), self._timeout_ns, sum(self.lost().values()),
                                            os.getpid(), 0)

    def refused(self) -> dict[int, int]:
        """Episode cgroup id -> connects and sends refused while no tracer was alive."""
        return {k.value: v.value for k, v in self.bpf[b"refused"].items()}

    def episode_lost(self, cgid: int) -> dict[str, int]:
        """What one episode lost so far, by reason (zeros when it has no account)."""
        try:
            account = self.bpf[b"accounts"][ctypes.c_uint64(cgid)]
        except KeyError:
            return dict.fromkeys(LOSS_REASONS, 0)
        return {reason: int(account.lost[i]) for i, reason in enumerate(LOSS_REASONS)}

    def close(self, keep_pins: bool = False) -> None:
        """Detach. keep_pins (a tracer that did not finish cleanly): leave the pinned state to the next one."""
        self._stopping.set()
        if self._liveness_thread is not None:
            self._liveness_thread.join()
        if keep_pins:
            for links in self._links.values():
                for link in links:
                    os.close(link)
            self._links.clear()
        else:
            for cgid in list(self._links):
                self.detach(cgid)
            if self.pin_dir is not None:
                pins.remove(self.pin_dir)
        for link in self._tracepoint_links:
            os.close(link)
        self._tracepoint_links = []
        self.bpf.cleanup()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

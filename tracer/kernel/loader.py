"""The probes, compiled by a short-lived child, then attached per episode and read with libbpf alone.

The tracer never maps the compiler: tracer/kernel/compile.py (a child process) compiles probes/ with
bcc, pins every map, every tracepoint's BPF link and every cgroup program, and exits; this process
re-opens them by their pins (tracer/kernel/bpf.py, the system libbpf through ctypes). Every program is
attached through a BPF link, and with a pin directory the links and maps stay pinned there
(tracer/kernel/pins.py): a tracer that dies leaves its probes attached and recording, and the
fail-closed check refuses the episodes' connects once no tracer refreshes the liveness map. A later
Probes on the same pin directory re-opens the maps (bcc opens a pinned map instead of creating it)
and moves the links to its own programs. Without a pin directory, the child hands over through a
private one that this process removes once it holds every fd: nothing outlives it.
"""
from __future__ import annotations

import ctypes
import ipaddress
import itertools
import json
import logging
import mmap
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from ..config import Limits
from ..policy import DENIED_CUT, LISTEN, POLICY_RULES, Policy, compile_rules, name_hash
from . import bpf, cgroups, pins, probecache

log = logging.getLogger(__name__)

PROBES_DIR = Path(__file__).resolve().parents[2] / "probes"
PROBE_FILES = ("sockets.c", "tcp.c", "packets.c", "processes.c")
# enum loss_reason in records.h, in its order
LOSS_REASONS = ("ringbuf_full", "no_socket_storage", "budget", "argv_unread", "connects_map_full",
                "exit_codes_map_full", "sockets_map_full", "argv_map_full", "burst_budget", "ring_share")
LIVENESS_REFRESH_NS = 200_000_000                      # refreshed this often; the timeout is seconds
RINGBUF_PAGES = Limits().ringbuf_pages     # the default size
# enum setting in common.h
SET_UPDATE_INTERVAL, SET_ICMP_LARGE, SET_BUDGET_RATE, SET_BUDGET_BURST = 0, 1, 2, 3
SET_SHARE_WATERMARK, SET_SHARE_RATE, SET_SHARE_BURST, SET_POLICY_GENERATION = 4, 5, 6, 7
EPISODE_TRACED, EPISODE_FAIL_CLOSED = 1, 2      # the episodes map's flags, as common.h defines them
PRIVATE_PREFIX = "private-"                # the hand-over pin directory of a Probes without one
_private_dirs = itertools.count()


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


def probe_build(ringbuf_pages: int) -> tuple[str, list[str]]:
    """The source and clang flags the probes are compiled with (the pin directory of the maps aside)."""
    return probe_source(), [f"-I{PROBES_DIR}", f"-DRINGBUF_PAGES={ringbuf_pages}", "-Wno-macro-redefined",
                            "-Wno-unused-function"]


def _compile(maps: Path, links: Path, programs: Path, ringbuf_pages: int) -> dict:
    """Run the compiling child (tracer/kernel/compile.py); its description of what it pinned."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PROBES_DIR.parent),
                                                                      os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "tracer.kernel.compile", str(maps), str(links), str(programs),
                           str(ringbuf_pages), str(PROBES_DIR)], capture_output=True, text=True, env=env)
    lines = done.stderr.strip().splitlines()
    for line in lines[:-1] if done.returncode != 0 else lines:
        log.debug("compiling child: %s", line)
    if done.returncode != 0:
        raise ProbeError(lines[-1] if lines else f"the compiling child exited with status {done.returncode}")
    return json.loads(done.stdout)


def _close_side_by_side(fds: list[int]) -> None:
    """Close fds at once: the last close of a link waits for an RCU grace period (tens of ms each)."""
    threads = [threading.Thread(target=os.close, args=(fd,)) for fd in fds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


class Probes:
    """The loaded probes. Tracepoints are live from construction; cgroup
    programs run only for the cgroups passed to attach()."""

    def __init__(self, ringbuf_pages: int = RINGBUF_PAGES, pin_dir: Path | None = None):
        """pin_dir: pin maps and links there (re-opening what a dead tracer left); None: nothing outlives us."""
        self.pin_dir = pin_dir
        self.ringbuf_bytes = ringbuf_pages * mmap.PAGESIZE
        self._lock_fd: int | None = None
        source, cflags = probe_build(ringbuf_pages)
        handoff = pin_dir if pin_dir is not None else \
            pins.root() / f"{PRIVATE_PREFIX}{os.getpid()}-{next(_private_dirs)}"
        try:
            pins.ensure_bpffs(handoff)
            self._lock_fd = pins.lock(handoff)
        except (pins.PinError, OSError) as e:
            raise ProbeError(str(e)) from None
        maps = handoff / pins.maps_dir_name(source, [*cflags, *probecache.probe_files(PROBES_DIR)])
        # Maps of other probes (another eptrace version) are never re-opened: their layout may differ.
        old_maps = [d for d in handoff.glob(pins.MAPS_PREFIX + "*") if d != maps]
        for d in (maps, handoff / "links", handoff / pins.PROGRAMS_DIR):
            d.mkdir(exist_ok=True)
        # A restart: the maps are there, and the probes a dead tracer left may still be attached.
        self.resumed = pin_dir is not None and (maps / "events").exists()
        self.maps: dict[str, bpf.Map] = {}
        self._ring: bpf.RingBuffer | None = None
        self._programs: dict[str, tuple[int, int]] = {}     # cgroup program name -> (fd, attach type)
        self._tracepoint_links: list[int] = []
        try:
            started = time.monotonic()
            compiled = _compile(maps, handoff / "links", handoff / pins.PROGRAMS_DIR, ringbuf_pages)
            for warning in compiled["warnings"]:
                log.warning("%s", warning)
            self.cache: str = compiled["cache"]           # hit: loaded from the probe cache, without bcc
            self.load_seconds: dict[str, float] = compiled["seconds"]
            log.debug("compiling child: %.2f s in all; %s", time.monotonic() - started,
                      ", ".join(f"{step} {s:.2f} s" for step, s in compiled["seconds"].items()))
            for name, d in compiled["maps"].items():
                self.maps[name] = bpf.Map(name, bpf.obj_get(maps / name), d["type"], d["max_entries"],
                                          d["key"] and bpf.build_type(d["key"]),
                                          d["value"] and bpf.build_type(d["value"]))
            for name, attach_type in compiled["programs"].items():
                self._programs[name] = (bpf.obj_get(handoff / pins.PROGRAMS_DIR / name), attach_type)
            for name in compiled["tracepoints"]:
                self._tracepoint_links.append(bpf.obj_get(handoff / "links" / name))
            self.tracepoint_names = list(compiled["tracepoints"])     # in the order of _tracepoint_links
            for stale in (handoff / "links").glob("tp-*"):
                if stale.name not in compiled["tracepoints"]:
                    stale.unlink()              # a tracepoint older probes traced
        except BaseException as e:
            self._release()
            if pin_dir is None:
                pins.remove(handoff)
            if isinstance(e, (OSError, ValueError, KeyError)):
                raise ProbeError(f"cannot open what the compiling child pinned: {e}") from e
            raise
        pins.remove(handoff / pins.PROGRAMS_DIR)        # held by our fds; the links pin what runs
        if pin_dir is None:
            pins.remove(handoff)
            os.close(self._lock_fd)
            self._lock_fd = None
        for stale in old_maps:
            log.warning("pinned maps of other probes in %s (another eptrace version): their records are "
                        "dropped, their links are taken over", stale)
            pins.remove(stale)
        self.previous_liveness = self._liveness() if self.resumed else None
        self._timeout_ns = self._stall_ns = self._episode_timeout_ns = 0
        self._progress_ns = time.monotonic_ns()
        self._liveness_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._generation_lock = threading.Lock()        # two writers must not both write the same next value
        self._links: dict[int, list[int]] = {}          # cgroup id -> link fds
        self._levels: dict[int, int] = {}               # episode cgroup id -> level
        self._budget_burst = self._share_burst = 0      # tokens a new episode starts with
        self._share_watermark = 0                       # bytes; in force only while two episodes share the ring

    def program_fd(self, name: str) -> int:
        """The fd of a cgroup program (bpftool and the benchmarks find it by its id)."""
        return self._programs[name][0]

    def program_fds(self) -> dict[str, int]:
        """Every program's fd by name: the cgroup programs' own, and a tracepoint link's program (opened by
        its id: the caller closes those). For the benchmarks' run-time statistics."""
        fds = {name: fd for name, (fd, _) in self._programs.items()}
        for name, link in zip(self.tracepoint_names, self._tracepoint_links):
            fds[name] = bpf.prog_fd_of_link(link)
        return fds

    # -- links ------------------------------------------------------------------
    def _link_pin(self, name: str) -> Path | None:
        return self.pin_dir / "links" / name if self.pin_dir is not None else None

    def _pin(self, fd: int, name: str) -> None:
        """Pin a new link as name, replacing (and so detaching) what a dead tracer pinned there."""
        path = self._link_pin(name)
        if path is None:
            return
        path.unlink(missing_ok=True)
        try:
            bpf.obj_pin(fd, path)
        except OSError as e:
            raise ProbeError(str(e)) from None

    # -- episodes -------------------------------------------------------------
    def attach(self, cgroup_path: Path, policy: Policy | None = None, fail_closed: bool = False) -> int:
        """Trace a cgroup and its descendants as one episode, under policy; returns its cgroup id.
        fail_closed: this episode is refused while no tracer is alive even when the tracer-wide choice is
        fail-open (set_fail_closed's episode_timeout_ns): run's episodes through the daemon."""
        cgid = cgroups.cgroup_id(cgroup_path)
        if cgid in self._links:
            return cgid
        self.set_policy(cgid, policy)       # before any hook runs: its first connect is checked
        fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
        links: list[int] = []
        try:
            for name, (program, attach_type) in self._programs.items():
                links.append(self._cgroup_link(name, program, attach_type, fd, cgid, cgroup_path))
        except ProbeError:
            _close_side_by_side(links)
            raise
        finally:
            os.close(fd)
        self._links[cgid] = links
        # Its account first (losses, budget), so that nothing it loses goes uncounted.
        accounts = self.maps["accounts"]
        try:
            accounts[ctypes.c_uint64(cgid)]          # a dead tracer's account (pinned): its losses are kept
        except KeyError:
            account = accounts.Leaf()
            account.budget.tokens = self._budget_burst
            account.share.tokens = self._share_burst
            accounts[ctypes.c_uint64(cgid)] = account
        # Register only once every hook is in place, so no event is half-seen.
        self.maps["episodes"][ctypes.c_uint64(cgid)] = ctypes.c_uint32(
            EPISODE_TRACED | (EPISODE_FAIL_CLOSED if fail_closed else 0))
        self._levels[cgid] = cgroups.level(cgroup_path)
        self._write_levels()
        self._write_share_watermark()
        return cgid

    def _cgroup_link(self, program_name: str, program: int, attach_type: int, cgroup_fd: int, cgid: int,
                     cgroup_path: Path) -> int:
        """A link of the program on the cgroup. A link a dead tracer pinned there is taken over and
        switched to the program atomically (no gap, no double records); else a new one is made and pinned."""
        name = f"cg-{cgid}-{program_name}"
        pinned = self._link_pin(name)
        if pinned is not None and pinned.exists():
            try:
                link = bpf.obj_get(pinned)
            except OSError:
                pass
            else:
                if bpf.link_update(link, program):
                    return link
                os.close(link)      # defunct (its cgroup was replaced): make a new one
        try:
            link = bpf.link_create(program, cgroup_fd, attach_type)
        except OSError as e:
            raise ProbeError(f"cannot attach {program_name} to {cgroup_path}: {os.strerror(e.errno)}") from None
        try:
            self._pin(link, name)
        except ProbeError:
            os.close(link)
            raise
        return link

    def detach(self, cgid: int) -> dict[str, int]:
        """Stop tracing an episode; returns its final losses by reason."""
        try:
            del self.maps["episodes"][ctypes.c_uint64(cgid)]
        except KeyError:
            pass
        self.unpin_cgroup(cgid)
        _close_side_by_side(self._links.pop(cgid, []))
        self._levels.pop(cgid, None)
        self._write_levels()
        self._write_share_watermark()
        final = self.episode_lost(cgid)
        for name in ("accounts", "policies", "denied"):
            try:
                del self.maps[name][ctypes.c_uint64(cgid)]
            except KeyError:
                pass
        self._clear_policy(cgid)
        self._policies_written()
        flows = self.maps["cut_flows"]
        for key in [k for k, v in flows.items() if v.value == cgid]:
            del flows[key]
        return final

    def _write_levels(self) -> None:
        levels = self.maps["episode_levels"]
        lo, hi = (min(self._levels.values()), max(self._levels.values())) if self._levels else (1, 0)
        levels[ctypes.c_int(0)] = ctypes.c_uint32(lo)
        levels[ctypes.c_int(1)] = ctypes.c_uint32(hi)

    def unpin_cgroup(self, cgid: int, names: list[str] | None = None) -> None:
        """Detach what is pinned for a cgroup id (once no fd of ours holds it): the links of our programs,
        or the pins named. By name, not by listing: the directory holds 11 links per episode."""
        if self.pin_dir is not None:
            for name in names if names is not None else [f"cg-{cgid}-{program}" for program in self._programs]:
                (self.pin_dir / "links" / name).unlink(missing_ok=True)

    def forget_others(self) -> list[int]:
        """After a restart, stop tracing the cgroups a dead tracer traced and we do not:
        their pinned links and their entries in the pinned maps. Returns their ids."""
        if self.pin_dir is None:
            return []
        table = self.maps["episodes"]
        pinned: dict[int, list[str]] = {}           # a dead tracer's links, whatever its programs were named
        for pin in (self.pin_dir / "links").iterdir():
            if pin.name.startswith("cg-"):
                pinned.setdefault(int(pin.name.split("-")[1]), []).append(pin.name)
        stale = set(pinned) | {key.value for key in table.keys()}
        stale -= set(self._links)
        for cgid in stale:
            self.unpin_cgroup(cgid, pinned.get(cgid, []))
            try:
                del table[ctypes.c_uint64(cgid)]
            except KeyError:
                pass
        return sorted(stale)

    def set_flow_update_interval(self, ns: int) -> None:
        """How often an active flow reports its counters (REC_FLOW_UPDATE)."""
        self.maps["settings"][ctypes.c_int(SET_UPDATE_INTERVAL)] = ctypes.c_uint64(ns)

    def set_icmp_large_payload(self, nbytes: int) -> None:
        """A first echo request to a destination with a payload this long carries data (packets.c)."""
        self.maps["settings"][ctypes.c_int(SET_ICMP_LARGE)] = ctypes.c_uint64(nbytes)

    def set_budget(self, per_second: int, burst: int) -> None:
        """Low-value records each episode may send: per_second on average, burst at once (0: no budget)."""
        self._budget_burst = burst
        settings = self.maps["settings"]
        settings[ctypes.c_int(SET_BUDGET_BURST)] = ctypes.c_uint64(burst)
        settings[ctypes.c_int(SET_BUDGET_RATE)] = ctypes.c_uint64(per_second)

    def set_ring_share(self, watermark_percent: int, per_second: int, burst: int) -> None:
        """Above watermark_percent of the ring buffer unread, each episode's records are paid from its share:
        per_second on average, burst at once; beyond, they are refused and counted (ring_share)."""
        self._share_burst = burst
        settings = self.maps["settings"]
        settings[ctypes.c_int(SET_SHARE_BURST)] = ctypes.c_uint64(burst)
        settings[ctypes.c_int(SET_SHARE_RATE)] = ctypes.c_uint64(per_second)
        self._share_watermark = self.ringbuf_bytes * watermark_percent // 100
        self._write_share_watermark()

    def _write_share_watermark(self) -> None:
        """The share protects episodes from each other: an episode alone (every run) has the whole ring."""
        watermark = self._share_watermark if len(self._links) > 1 else 0
        self.maps["settings"][ctypes.c_int(SET_SHARE_WATERMARK)] = ctypes.c_uint64(watermark)

    # -- containment ------------------------------------------------------------
    def set_policy(self, cgid: int, policy: Policy | None) -> None:
        """Write an episode's policy into the kernel's maps (replacing what it had, but for what a cut
        denied); None: no policy."""
        cut = self._clear_policy(cgid)
        if (policy is None or not policy.restricts) and not cut:
            return
        policy = policy or Policy()
        for prefix, rules in compile_rules(policy).items():
            table = self.maps["policy4" if prefix.version == 4 else "policy6"]
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
        names = self.maps["dns_names"]
        for index, entry in policy.names:
            key = names.Key(cgid, name_hash(entry.name), entry.wildcard)
            names[key] = names.Leaf(entry.port_lo, entry.port_hi, entry.protocol, 0, index, 0)
        for address, port, protocol in cut:
            self._deny_destination(cgid, address, port, protocol)
        self._write_episode_policy(cgid, policy, contained=self.contained(cgid), cut=self.cut_set(cgid))

    def _write_episode_policy(self, cgid: int, policy: Policy | None, contained: bool, cut: bool = False) -> None:
        table = self.maps["policies"]
        leaf = table.Leaf()
        policy = policy or Policy()
        leaf.default_deny, leaf.raw_sockets = policy.default_deny, policy.raw_sockets
        leaf.listen, leaf.contained, leaf.cut = LISTEN.index(policy.listen), contained, cut
        leaf.names = bool(policy.names)
        table[ctypes.c_uint64(cgid)] = leaf
        self._policies_written()

    def _policies_written(self) -> None:
        """After every write to the policies map: the sockets' copies of it (packets.c: packet_policy)
        are stale from now on. Read-modify-write: the map is pinned, a restarted tracer goes on counting."""
        settings = self.maps["settings"]
        key = ctypes.c_int(SET_POLICY_GENERATION)
        with self._generation_lock:
            settings[key] = ctypes.c_uint64(settings[key].value + 1)

    def _clear_policy(self, cgid: int) -> list[tuple[str, int, int]]:
        """Remove an episode's rules; returns the destinations a cut denied (they outlive a new policy)."""
        cut = []
        for name in ("policy4", "policy6"):
            table = self.maps[name]
            for key, leaf in [(k, v) for k, v in table.items() if (k.episode_hi << 32 | k.episode_lo) == cgid]:
                if key.prefixlen == 64 + (32 if name == "policy4" else 128):
                    address = str(ipaddress.ip_address(bytes(key.addr)))
                    cut += [(address, r.port_lo, r.protocol) for r in leaf.r[:leaf.n] if r.entry == DENIED_CUT]
                del table[key]
        names = self.maps["dns_names"]
        for key in [k for k in names.keys() if k.episode == cgid]:
            del names[key]
        if not self.contained(cgid) and not self.cut_set(cgid):
            try:
                del self.maps["policies"][ctypes.c_uint64(cgid)]
            except KeyError:
                pass
            else:
                self._policies_written()
        return cut

    def contain(self, cgid: int, policy: Policy | None) -> None:
        """deny_network: refuse every connect, send and packet of the episode from now on (pinned: this
        holds with no tracer running, until the episode is detached)."""
        self._write_episode_policy(cgid, policy, contained=True, cut=self.cut_set(cgid))

    def contained(self, cgid: int) -> bool:
        try:
            return bool(self.maps["policies"][ctypes.c_uint64(cgid)].contained)
        except KeyError:
            return False

    def cut_set(self, cgid: int) -> bool:
        """Has on_alert = "cut" cut flows of this episode?"""
        try:
            return bool(self.maps["policies"][ctypes.c_uint64(cgid)].cut)
        except KeyError:
            return False

    def cut(self, cgid: int, policy: Policy | None, cookies: list[int],
            destinations: list[tuple[str, int, int]]) -> None:
        """cut: drop every packet of these sockets both ways, and refuse connects and sends to these
        (address, port, protocol) destinations (port or protocol 0: any), from now on. Pinned, like contain."""
        flows = self.maps["cut_flows"]
        for cookie in cookies:
            flows[ctypes.c_uint64(cookie)] = ctypes.c_uint64(cgid)
        for address, port, protocol in destinations:
            self._deny_destination(cgid, address, port, protocol)
        self._write_episode_policy(cgid, policy, contained=self.contained(cgid), cut=True)

    def _deny_destination(self, cgid: int, address: str, port: int, protocol: int) -> None:
        """A deny rule (entry DENIED_CUT) first on the address's own prefix, before the rules that applied to it
        (those of its longest covering prefix: an LPM lookup finds them, host-name answers included)."""
        ip = ipaddress.ip_address(address)
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped                     # the kernel checks these as IPv4 (policy_refuses)
        table = self.maps["policy4" if ip.version == 4 else "policy6"]
        key = table.Key()
        key.prefixlen = 64 + ip.max_prefixlen
        key.episode_hi, key.episode_lo = cgid >> 32, cgid & 0xFFFFFFFF
        for i, byte in enumerate(ip.packed):
            key.addr[i] = byte
        try:
            now = table[key]                          # longest prefix match
            rules = [now.r[i] for i in range(min(now.n, POLICY_RULES))]
        except KeyError:
            rules = []
        rules = [r for r in rules if not (r.entry == DENIED_CUT and r.port_lo == port and r.protocol == protocol)]
        leaf = table.Leaf()
        leaf.r[0].port_lo = leaf.r[0].port_hi = port
        leaf.r[0].protocol, leaf.r[0].deny, leaf.r[0].entry = protocol, 1, DENIED_CUT
        for i, rule in enumerate(rules[:POLICY_RULES - 1], start=1):
            leaf.r[i] = rule
        leaf.n = 1 + min(len(rules), POLICY_RULES - 1)
        table[key] = leaf

    def denied(self) -> dict[int, int]:
        """Episode cgroup id -> connects, sends, sockets and packets its policy refused."""
        return {k.value: v.value for k, v in self.maps["denied"].items()}

    # -- records ----------------------------------------------------------------
    def open_records(self, handle: Callable[[bytes], None]) -> None:
        """Call handle(raw_record) for every ring-buffer record from poll()."""
        def handed(raw: bytes) -> None:
            self._progress_ns = time.monotonic_ns()     # the main loop moves (liveness: not hung)
            handle(raw)
        events = self.maps["events"]
        self._ring = bpf.RingBuffer(events.fd, events.max_entries, handed)

    def poll(self, timeout_ms: int) -> None:
        """Wait up to timeout_ms, then hand over every record there. The probes wake us only for records
        userspace must act on at once (an exec whose argv is read from /proc): the timeout paces reading."""
        self._ring.poll(timeout_ms)
        self._ring.consume()
        self._beat()

    def wakeup_fd(self) -> int:
        """Polls readable when a record asked to be read at once: for a loop that waits on other fds too."""
        return self._ring.fileno()

    def ring_unread_max(self) -> int:
        """The most bytes the reader has found unread in the ring buffer at once (its worst lag)."""
        return self._ring.unread_max if self._ring is not None else 0

    def lost(self) -> dict[str, int]:
        """Records the kernel could not send, by reason, summed over CPUs."""
        table = self.maps["lost"]
        return {reason: int(sum(table[ctypes.c_int(i)])) for i, reason in enumerate(LOSS_REASONS)}

    # -- fail-closed ----------------------------------------------------------------
    def _liveness(self) -> tuple[int, int, int]:
        """(refreshed_ns, timeout_ns, lost_reported) as the map holds them."""
        value = self.maps["liveness"][ctypes.c_int(0)]
        return value.refreshed_ns, value.timeout_ns, value.lost_reported

    def set_fail_closed(self, timeout_ns: int, stall_ns: int = 0, episode_timeout_ns: int = 0) -> None:
        """Refuse episode connects and sends once no tracer refreshed liveness for timeout_ns (0: never);
        those of episodes attached with fail_closed=True after episode_timeout_ns (0: never) in any case.

        A thread refreshes it: the main loop may spend seconds in one poll under a flood, and that
        must not refuse the sandbox's connects. But the thread refreshes only while the main loop
        makes progress (poll() returns, or a record is handed over) at least every stall_ns (0: always):
        a main loop hung for good (an output blocked) is no live tracer, though this process lives."""
        self._timeout_ns, self._stall_ns, self._episode_timeout_ns = timeout_ns, stall_ns, episode_timeout_ns
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
        table = self.maps["liveness"]
        leaf = table.Leaf()
        leaf.refreshed_ns, leaf.timeout_ns = time.monotonic_ns(), self._timeout_ns
        leaf.episode_timeout_ns = self._episode_timeout_ns
        leaf.lost_reported, leaf.tracer_tgid, leaf.tracer_exited = sum(self.lost().values()), os.getpid(), 0
        table[ctypes.c_int(0)] = leaf

    def refused(self) -> dict[int, int]:
        """Episode cgroup id -> connects and sends refused while no tracer was alive."""
        return {k.value: v.value for k, v in self.maps["refused"].items()}

    def episodes_lost(self) -> dict[int, dict[str, int]]:
        """Episode cgroup id -> what it lost so far, by reason (nonzero only), for every account at once."""
        lost = {}
        for key, account in self.maps["accounts"].items():
            if any(account.lost):
                lost[key.value] = {reason: int(account.lost[i]) for i, reason in enumerate(LOSS_REASONS)
                                   if account.lost[i]}
        return lost

    def episode_lost(self, cgid: int) -> dict[str, int]:
        """What one episode lost so far, by reason (zeros when it has no account)."""
        try:
            account = self.maps["accounts"][ctypes.c_uint64(cgid)]
        except KeyError:
            return dict.fromkeys(LOSS_REASONS, 0)
        return {reason: int(account.lost[i]) for i, reason in enumerate(LOSS_REASONS)}

    def close(self, keep_pins: bool = False) -> None:
        """Detach. keep_pins (a tracer that did not finish cleanly): leave the pinned state to the next one."""
        self._stopping.set()
        if self._liveness_thread is not None:
            self._liveness_thread.join()
        if keep_pins:
            _close_side_by_side([link for links in self._links.values() for link in links])
            self._links.clear()
        else:
            for cgid in list(self._links):
                self.detach(cgid)
            if self.pin_dir is not None:
                pins.remove(self.pin_dir)
        self._release()

    def _release(self) -> None:
        """Close every fd (what is still pinned stays)."""
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        _close_side_by_side(self._tracepoint_links)
        self._tracepoint_links = []
        for program, _ in self._programs.values():
            os.close(program)
        self._programs.clear()
        for table in self.maps.values():
            table.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

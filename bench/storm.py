"""A loopback TCP connect/accept/close storm: a forked acceptor and a connector.

Usage:
  storm.py SECONDS                      -> "connections=N seconds=S"
  storm.py SECONDS --untraced CGROUP    -> one JSON line of phases, see below
  storm.py SECONDS --untraced CGROUP --bulk
                                        -> the same, each phase 64 MiB at full speed on one of two
                                           long-lived connections, the traced side's or the other's
  storm.py SECONDS --gated --untraced CGROUP
                                        -> phases "peer" and "alone" in CGROUP, and beside each "alone"
                                           one a "traced" phase in this (traced) cgroup; before each
                                           peer or alone phase it prints {"next": SIDE} and waits for a
                                           line on stdin (the caller starts or stops a peer tracer
                                           there, untimed)

Both processes are pinned to CPU 0, so that the figures show what eptrace costs
the sandbox's own CPU (the probes run there, in its syscalls and softirqs) and
do not swing with where the scheduler puts the storm.

With --untraced, the storm is started inside a traced episode cgroup and
alternates, in short phases, between that cgroup and CGROUP, which eptrace does
not trace. Each phase uses a listener made in its own cgroup (an accepted
socket belongs to its listener's cgroup). Both sides then run under the same
machine load, a fraction of a second apart: on these shared, noisy VMs two
separate runs seconds apart differ by up to 10% with nothing traced at all.
Moving between cgroups is not timed.
"""
from __future__ import annotations

import json
import os
import selectors
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PHASE_SECONDS = 0.25
GATED_PHASE_SECONDS = 0.5   # fewer, longer phases: the peer's start between them takes seconds
BATCH = 50
BULK_CHUNK = 256 * 1024
BULK_PHASE_BYTES = 256 * BULK_CHUNK     # 64 MiB: 20-30 ms at loopback speed here
BULK_BUFFERS = 4 * 2**20                # each socket's send and receive buffer (the kernel doubles it)
BULK_WARMUP_PHASES = 4                  # each connection's window grows before phases are kept


def listener(buffers: int | None = None) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if buffers:
        fixed_buffers(s, buffers)
    s.bind(("127.0.0.1", 0))
    s.listen(4096)
    return s


def accept_forever(listeners: list[socket.socket]) -> None:
    sel = selectors.DefaultSelector()
    for s in listeners:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            try:
                while True:
                    conn, _ = key.fileobj.accept()
                    conn.close()
            except BlockingIOError:
                pass


def connect_for(addr, seconds: float) -> tuple[int, float]:
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(BATCH):
            s = socket.socket()
            s.connect(addr)
            s.close()
        count += BATCH
        if time.perf_counter() >= deadline:
            return count, time.perf_counter() - start


def fixed_buffers(s: socket.socket, size: int) -> None:
    """Fixed buffers, no autotuning: two connections left to tune themselves settle apart and differ in
    speed by up to 9% for their whole life, with nothing traced (measured here)."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def serve_bulk_forever(listeners: list[socket.socket]) -> None:
    """Reads every connection's bytes and answers a byte each time one has delivered another BULK_PHASE_BYTES
    (the sender's phase ends when the bytes are delivered, not merely buffered)."""
    sel = selectors.DefaultSelector()
    for s in listeners:
        sel.register(s, selectors.EVENT_READ)
    received: dict[socket.socket, int] = {}
    buf = bytearray(BULK_CHUNK)
    while True:
        for key, _ in sel.select():
            s = key.fileobj
            if s in listeners:
                conn, _ = s.accept()
                received[conn] = 0
                sel.register(conn, selectors.EVENT_READ)
                continue
            n = s.recv_into(buf)
            if not n:
                sel.unregister(s)
                s.close()
                continue
            before, received[s] = received[s], received[s] + n
            if received[s] // BULK_PHASE_BYTES > before // BULK_PHASE_BYTES:
                s.sendall(b"k")


def send_phase(conn: socket.socket) -> tuple[int, float]:
    """BULK_PHASE_BYTES at full speed on a connection already open: (bytes, seconds until delivered)."""
    chunk = bytes(BULK_CHUNK)
    start = time.perf_counter()
    for _ in range(BULK_PHASE_BYTES // BULK_CHUNK):
        conn.sendall(chunk)
    if conn.recv(1) != b"k":
        raise RuntimeError("bulk receiver went away")
    return BULK_PHASE_BYTES, time.perf_counter() - start


def on_cpu_ns(pids: list[int]) -> int:
    """Nanoseconds these tasks have run (the scheduler's clock: the hypervisor's steal is not in it)."""
    return sum(int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) for pid in pids)


def ksoftirqd(cpu: int) -> int:
    """The pid of the thread that takes over CPU `cpu`'s softirqs when they pile up."""
    return next(int(d.name) for d in Path("/proc").iterdir()
                if d.name.isdigit() and (d / "comm").read_text().strip() == f"ksoftirqd/{cpu}")


def move(pids: list[int], cgroup: Path) -> None:
    for pid in pids:
        (cgroup / "cgroup.procs").write_text(str(pid))


def own_cgroup() -> Path:
    from tracer.kernel import cgroups
    rel = next(line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::"))
    return cgroups.cgroup2_mount() / rel.lstrip("/")


def simple(seconds: float) -> None:
    lst = listener()
    acceptor = os.fork()
    if acceptor == 0:
        accept_forever([lst])
    count, elapsed = connect_for(lst.getsockname(), seconds)
    os.kill(acceptor, 9)
    os.waitpid(acceptor, 0)
    print(f"connections={count} seconds={elapsed:.3f}", flush=True)


def orders(seconds: float, phase_seconds: float, first: str, second: str):
    """(pair, side) in ABBA order: each side goes first in half of the pairs."""
    for pair in range(int(seconds / (2 * phase_seconds))):
        for side in ((first, second) if pair % 2 == 0 else (second, first)):
            yield pair, side


def alternating(seconds: float, untraced: Path, bulk: bool) -> None:
    traced = own_cgroup()
    me = os.getpid()
    buffers = BULK_BUFFERS if bulk else None
    listeners = {"traced": listener(buffers)}
    move([me], untraced)
    listeners["untraced"] = listener(buffers)
    acceptor = os.fork()
    if acceptor == 0:
        (serve_bulk_forever if bulk else accept_forever)(list(listeners.values()))
    cgroup_of = {"traced": traced, "untraced": untraced}
    phases = []
    # CPU 0's time on the storm: both ends, and the softirqs it leaves to ksoftirqd/0 (loopback delivers
    # in softirq; this kernel has no IRQ time accounting, so the rest is charged to the sending task).
    on_cpu0 = [me, acceptor, ksoftirqd(0)]
    try:
        if bulk:
            unit, steps = "bytes", bulk_phases(seconds, listeners, cgroup_of, [me, acceptor])
        else:
            unit, steps = "connections", storm_phases(seconds, listeners, cgroup_of, [me, acceptor])
        for pair, side, work in steps:
            cpu_before = on_cpu_ns(on_cpu0)
            count, elapsed = work()
            phases.append({"pair": pair, "side": side, unit: count, "seconds": elapsed,
                           "cpu_seconds": (on_cpu_ns(on_cpu0) - cpu_before) / 1e9})
    finally:
        move([me, acceptor], traced)
        os.kill(acceptor, 9)
        os.waitpid(acceptor, 0)
    print(json.dumps({"phases": phases}), flush=True)


def storm_phases(seconds: float, listeners: dict, cgroup_of: dict, pids: list[int]):
    """(pair, side, work) of the connect storm: new connections from the side's cgroup for PHASE_SECONDS."""
    for pair, side in orders(seconds, PHASE_SECONDS, "traced", "untraced"):
        move(pids, cgroup_of[side])
        yield pair, side, lambda side=side: connect_for(listeners[side].getsockname(), PHASE_SECONDS)


def bulk_phases(seconds: float, listeners: dict, cgroup_of: dict, pids: list[int]):
    """(pair, side, work) of the bulk transfer: one long-lived connection per side, opened from its cgroup
    (a socket belongs to the cgroup it was made in, so its packets are traced or not for its whole life),
    each phase BULK_PHASE_BYTES on the side's connection. No connection set-up or slow start in a phase,
    and phases short enough for many pairs: the per-packet cost is a few percent, within the noise of
    fewer, longer phases here."""
    conns = {}
    for side in ("traced", "untraced"):
        move(pids, cgroup_of[side])
        conns[side] = socket.socket()
        fixed_buffers(conns[side], BULK_BUFFERS)
        conns[side].connect(listeners[side].getsockname())
        for _ in range(BULK_WARMUP_PHASES):
            send_phase(conns[side])
    deadline = time.monotonic() + seconds
    pair = 0
    while time.monotonic() < deadline:
        for side in (("traced", "untraced") if pair % 2 == 0 else ("untraced", "traced")):
            move(pids, cgroup_of[side])     # the syscalls' own hooks see the side too
            yield pair, side, lambda side=side: send_phase(conns[side])
        pair += 1
    for conn in conns.values():
        conn.close()


def gated(seconds: float, untraced: Path) -> None:
    """Phases "peer" and "alone" in `untraced`, gated by the caller, and beside each "alone" one (after or
    before it, in turn) a "traced" phase back in this process's cgroup, a traced episode: eptrace and the
    peer are measured against the same "alone" phases, seconds apart."""
    traced = own_cgroup()
    me = os.getpid()
    listeners = {"traced": listener()}
    move([me], untraced)
    listeners["alone"] = listeners["peer"] = listener()
    acceptor = os.fork()
    if acceptor == 0:
        accept_forever([listeners["traced"], listeners["alone"]])
    cgroup_of = {"traced": traced, "alone": untraced, "peer": untraced}
    phases = []

    def phase(pair: int, side: str) -> None:
        move([me, acceptor], cgroup_of[side])
        count, elapsed = connect_for(listeners[side].getsockname(), GATED_PHASE_SECONDS)
        phases.append({"pair": pair, "side": side, "connections": count, "seconds": elapsed})
    try:
        for pair, side in orders(seconds, GATED_PHASE_SECONDS, "peer", "alone"):
            print(json.dumps({"next": side}), flush=True)
            sys.stdin.readline()
            if side == "alone":
                for sub in (("traced", "alone") if pair % 2 == 0 else ("alone", "traced")):
                    phase(pair, sub)
            else:
                phase(pair, side)
    finally:
        move([me, acceptor], traced)
        os.kill(acceptor, 9)
        os.waitpid(acceptor, 0)
    print(json.dumps({"phases": phases}), flush=True)


def pair_rates(phases: list[dict], unit: str = "connections", sides=("traced", "untraced"),
               per: str = "seconds") -> list[tuple[float, float]]:
    """(traced, untraced) units per second of each pair of adjacent phases: per second of the wall clock, or
    with per="cpu_seconds" per second CPU 0 spent on the storm."""
    pairs: dict[int, dict[str, float]] = {}
    for p in phases:
        if p[unit] and p[per]:              # a phase that moved nothing (the VM stalled it) has no rate
            pairs.setdefault(p["pair"], {})[p["side"]] = p[unit] / p[per]
    return [(v[sides[0]], v[sides[1]]) for v in pairs.values() if sides[0] in v and sides[1] in v]


@dataclass(frozen=True)
class Figures:
    """One alternating run's figures: medians of its pairs of phases, with their quartiles."""
    pairs: int
    ratio: float                     # traced rate / untraced rate
    ratio_quartiles: tuple[float, float]
    cost: float                      # 1/traced - 1/untraced: microseconds per unit (connection, byte...)
    cost_quartiles: tuple[float, float]
    traced_rate: float
    untraced_rate: float

    @classmethod
    def of(cls, pairs: list[tuple[float, float]]) -> "Figures":
        ratios = [t / u for t, u in pairs]
        costs = [(1 / t - 1 / u) * 1e6 for t, u in pairs]
        rq, cq = statistics.quantiles(ratios, n=4), statistics.quantiles(costs, n=4)
        return cls(len(pairs), statistics.median(ratios), (rq[0], rq[2]), statistics.median(costs), (cq[0], cq[2]),
                   statistics.median(t for t, _ in pairs), statistics.median(u for _, u in pairs))


def main() -> None:
    seconds = float(sys.argv[1])
    os.sched_setaffinity(0, {0})
    if len(sys.argv) >= 4 and sys.argv[2] == "--untraced":
        alternating(seconds, Path(sys.argv[3]), bulk=sys.argv[4:] == ["--bulk"])
    elif len(sys.argv) == 5 and sys.argv[2:4] == ["--gated", "--untraced"]:
        gated(seconds, Path(sys.argv[4]))
    else:
        simple(seconds)


if __name__ == "__main__":
    main()

"""A loopback TCP connect/accept/close storm: a forked acceptor and a connector.

Usage:
  storm.py SECONDS                      -> "connections=N seconds=S"
  storm.py SECONDS --untraced CGROUP    -> one JSON line of phases, see below

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
import sys
import time
from pathlib import Path

PHASE_SECONDS = 0.25
BATCH = 50


def listener() -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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


def alternating(seconds: float, untraced: Path) -> None:
    traced = own_cgroup()
    me = os.getpid()
    listeners = {"traced": listener()}
    move([me], untraced)
    listeners["untraced"] = listener()
    acceptor = os.fork()
    if acceptor == 0:
        accept_forever(list(listeners.values()))
    cgroup_of = {"traced": traced, "untraced": untraced}
    phases = []
    try:
        for pair in range(int(seconds / (2 * PHASE_SECONDS))):
            order = ("traced", "untraced") if pair % 2 == 0 else ("untraced", "traced")
            for side in order:
                move([me, acceptor], cgroup_of[side])
                count, elapsed = connect_for(listeners[side].getsockname(), PHASE_SECONDS)
                phases.append({"pair": pair, "side": side, "connections": count, "seconds": elapsed})
    finally:
        move([me, acceptor], traced)
        os.kill(acceptor, 9)
        os.waitpid(acceptor, 0)
    print(json.dumps({"phases": phases}), flush=True)


def pair_rates(phases: list[dict]) -> list[tuple[float, float]]:
    """(traced, untraced) connections per second of each pair of adjacent phases."""
    pairs: dict[int, dict[str, float]] = {}
    for p in phases:
        pairs.setdefault(p["pair"], {})[p["side"]] = p["connections"] / p["seconds"]
    return [(v["traced"], v["untraced"]) for v in pairs.values() if len(v) == 2]


def main() -> None:
    seconds = float(sys.argv[1])
    os.sched_setaffinity(0, {0})
    if len(sys.argv) == 4 and sys.argv[2] == "--untraced":
        alternating(seconds, Path(sys.argv[3]))
    else:
        simple(seconds)


if __name__ == "__main__":
    main()

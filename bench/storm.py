"""A loopback TCP connect/accept/close storm: a forked acceptor and a connector.

Usage: storm.py SECONDS   -> prints "connections=N seconds=S" on stdout.

Both processes are pinned to CPU 0, traced or not, so that the ratio shows what
eptrace costs the sandbox's own CPU (the probes run there, in its syscalls and
softirqs) and does not swing with where the scheduler puts the storm; the
tracer's own CPU is reported on its own line.
"""
from __future__ import annotations

import os
import socket
import sys
import time


def main() -> None:
    seconds = float(sys.argv[1])
    os.sched_setaffinity(0, {0})
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    addr = listener.getsockname()
    acceptor = os.fork()
    if acceptor == 0:
        while True:
            conn, _ = listener.accept()
            conn.close()
    listener.close()
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(100):
            s = socket.socket()
            s.connect(addr)
            s.close()
        count += 100
        if time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - start
    os.kill(acceptor, 9)
    os.waitpid(acceptor, 0)
    print(f"connections={count} seconds={elapsed:.3f}", flush=True)


if __name__ == "__main__":
    main()

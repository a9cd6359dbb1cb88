"""The ring buffer between the probes and the tracer: every record arrives exactly once, in one piece,
with nothing lost, also when the records wrap around the end of the buffer."""
from __future__ import annotations

import subprocess
import time
from collections import Counter

import pytest

import harness
from harness import PYTHON
from tracer import decoding
from tracer.decoding import RecordType as T
from tracer.kernel.loader import Probes

CONNECTIONS = 2000

# Loopback connect/accept/close in one process, in batches of argv[1]; with argv[2] == "step" it waits for a
# line on stdin before each batch and prints "batch" after it.
WORKLOAD_OF = r'''
import socket, sys
batch, step = int(sys.argv[1]), sys.argv[2] == "step"
listener = socket.create_server(("127.0.0.1", 0), backlog=128)
for _ in range(%d // batch):
    if step and not sys.stdin.readline():
        break
    for _ in range(batch):
        c = socket.create_connection(listener.getsockname())
        s, _ = listener.accept()
        s.close()
        c.close()
    if step:
        print("batch", flush=True)
'''
WORKLOAD = WORKLOAD_OF % CONNECTIONS


@pytest.fixture
def probes():
    p = Probes()
    yield p
    p.close()


@pytest.fixture
def small_probes():
    p = Probes(ringbuf_pages=8)   # 32 KiB, about 190 network records
    yield p
    p.close()


class Collector:
    """The records handler: keeps every raw record and counts network records by (tgid, type)."""

    def __init__(self):
        self.raws: list[bytes] = []
        self.counts: Counter = Counter()

    def __call__(self, raw: bytes) -> None:
        assert type(raw) is bytes
        self.raws.append(raw)
        rec = decoding.decode(raw)   # raises on a torn or misaligned record
        if isinstance(rec, decoding.NetRecord):
            self.counts[rec.header.owner.tgid, rec.header.type] += 1

    def of(self, pid: int) -> Counter:
        return Counter({kind: n for (tgid, kind), n in self.counts.items() if tgid == pid})


def expected(connections: int) -> Counter:
    return Counter({T.LISTENING: 1, T.CONNECT: connections, T.ESTABLISHED: connections,
                    T.ACCEPTED: connections, T.FLOW_ENDED: 2 * connections})


def assert_nothing_lost(probes: Probes, cgid: int) -> None:
    """No record lost, tracer-wide or by the episode (argv_unread is no lost record: the workload's
    long `python -c` argument is cut by the kernel, and the tracer reads it from /proc)."""
    for counts in (probes.lost(), probes.episode_lost(cgid)):
        assert not {reason: n for reason, n in counts.items() if n and reason != "argv_unread"}, counts


def poll_until(probes: Probes, done, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        probes.poll(100)


def test_every_record_arrives_once_and_nothing_is_lost(probes, episode_cgroup):
    got = Collector()
    probes.open_records(got)
    cg = episode_cgroup("ringbuf")
    cgid = probes.attach(cg)
    proc = harness.spawn_in_cgroup(cg, [PYTHON, "-c", WORKLOAD, "100", "free"])
    try:
        poll_until(probes, lambda: proc.poll() is not None, timeout=120)
        assert proc.wait(timeout=1) == 0
        poll_until(probes, lambda: got.of(proc.pid) == expected(CONNECTIONS), timeout=5)
        probes.poll(0)   # a duplicate would show in the counts
    finally:
        proc.kill()
    assert got.of(proc.pid) == expected(CONNECTIONS)
    assert got.of(proc.pid)[T.ESTABLISHED] == got.of(proc.pid)[T.ACCEPTED] == CONNECTIONS
    assert_nothing_lost(probes, cgid)


def test_records_wrapping_around_the_buffer_arrive_whole(small_probes, episode_cgroup):
    """Lockstep batches of 10 connections (50 records, ~8 KiB) never fill the 32 KiB buffer, while the
    records cross its end again and again: a record split at the wrap would fail to decode or be miscounted."""
    got = Collector()
    small_probes.open_records(got)
    cg = episode_cgroup("ringbuf-wrap")
    cgid = small_probes.attach(cg)
    batch = 10
    proc = harness.spawn_in_cgroup(cg, [PYTHON, "-c", WORKLOAD, str(batch), "step"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        for n in range(1, CONNECTIONS // batch + 1):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == "batch\n"
            poll_until(small_probes, lambda: got.of(proc.pid)[T.FLOW_ENDED] >= 2 * batch * n, timeout=10)
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0
        poll_until(small_probes, lambda: got.of(proc.pid) == expected(CONNECTIONS), timeout=5)
        small_probes.poll(0)
    finally:
        proc.kill()
    assert got.of(proc.pid) == expected(CONNECTIONS)
    assert sum(map(len, got.raws)) > 40 * 32 * 1024   # the buffer wrapped dozens of times
    assert_nothing_lost(small_probes, cgid)


MANY = 30000


@pytest.fixture
def mid_probes():
    p = Probes(ringbuf_pages=4096)   # 16 MiB
    yield p
    p.close()


def test_the_reader_moving_on_never_shows_the_probes_a_full_ring(mid_probes, episode_cgroup):
    """The probes check the consumer position at every reservation while the reader advances it: written
    in two steps (zero, then the value, as struct.pack_into("<Q") does), it read as 0 in between, and once
    more than the ring's size had gone through, a reservation then failed as ringbuf_full. Here the workload
    runs freely, about 30 MB through a 16 MiB ring that the reader keeps close to empty (the workload would
    fill it in a second and a half at least): a ringbuf_full is a reservation that saw a full ring that was not."""
    got = Collector()
    mid_probes.open_records(got)
    cg = episode_cgroup("ringbuf-moving")
    cgid = mid_probes.attach(cg)
    proc = harness.spawn_in_cgroup(cg, [PYTHON, "-c", WORKLOAD_OF % MANY, "100", "free"])
    try:
        poll_until(mid_probes, lambda: proc.poll() is not None, timeout=300)
        assert proc.wait(timeout=1) == 0
        poll_until(mid_probes, lambda: got.of(proc.pid) == expected(MANY), timeout=10)
        mid_probes.poll(0)
    finally:
        proc.kill()
    assert_nothing_lost(mid_probes, cgid)
    assert got.of(proc.pid) == expected(MANY)
    assert sum(map(len, got.raws)) > 24 * 1024 * 1024   # well past the ring's size: a position read as 0
                                                        # is then "full"

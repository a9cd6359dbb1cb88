"""The delivery core with an in-process receiver that can be taken down: nothing lost, drops counted."""
import json
import threading
import time

import pytest
from support import fast_backoff, wait_for

from tracer.outputs.delivery import DeliveryOutput
from tracer.outputs.senders import SendError
from tracer.schema import Document


class Receiver:
    """A Sender whose receiver is up or down; it keeps what it got, by event.id."""

    def __init__(self, name="test://receiver"):
        self.name = name
        self.up = True
        self.got: list[str] = []
        self.lock = threading.Lock()

    def send(self, docs):
        if not self.up:
            raise SendError("receiver down")
        with self.lock:
            self.got += [json.loads(d.json)["event"]["id"] for d in docs]

    def close(self):
        pass

    def ids(self):
        with self.lock:
            return set(self.got)


def doc(i, kind="event", pad=0):
    return Document(json.dumps({"event": {"id": f"id-{i}", "kind": kind}, "pad": "x" * pad}), kind)


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch):
    fast_backoff(monkeypatch)


def test_everything_arrives_across_an_outage(tmp_path):
    rx = Receiver()
    out = DeliveryOutput(rx, spool_dir=tmp_path, queue_max=100)
    for i in range(300):
        out.write(doc(i))
    rx.up = False
    for i in range(300, 1300):          # the queue overflows to the spool meanwhile
        out.write(doc(i))
    time.sleep(0.2)
    rx.up = True
    wait_for(lambda: rx.ids() == {f"id-{i}" for i in range(1300)})
    out.close()
    assert out.dropped == {} and list(tmp_path.rglob("*.spool")) == []


def test_a_restart_delivers_what_was_spooled(tmp_path):
    rx = Receiver()
    rx.up = False
    first = DeliveryOutput(rx, spool_dir=tmp_path, queue_max=50)
    for i in range(500):
        first.write(doc(i))
    first.close(timeout_s=0.2)          # killed during the outage: the rest goes to disk
    assert list(tmp_path.rglob("*.spool")) and rx.ids() == set()
    rx.up = True
    second = DeliveryOutput(rx, spool_dir=tmp_path, queue_max=50)
    wait_for(lambda: rx.ids() == {f"id-{i}" for i in range(500)})
    second.close()
    assert second.dropped == {}


def test_a_full_spool_drops_events_first_and_counts_them(tmp_path):
    rx = Receiver()
    rx.up = False
    out = DeliveryOutput(rx, spool_dir=tmp_path, spool_mb=0.05, queue_max=20)   # ~50 KB of spool
    for i in range(400):
        out.write(doc(i, pad=400))
    for i in range(400, 440):
        out.write(doc(i, kind="alert", pad=400))
    out.close(timeout_s=0.2)
    dropped = out.dropped.get("spool_full", 0)
    assert dropped > 0
    rx.up = True
    again = DeliveryOutput(rx, spool_dir=tmp_path, spool_mb=0.05, queue_max=20)
    wait_for(lambda: not list(tmp_path.rglob("*.spool")))
    again.close()
    got = rx.ids()
    assert {f"id-{i}" for i in range(400, 440)} <= got, "every alert survives"
    assert len(got) + dropped == 440, "every document is either delivered or counted as dropped"


def test_writes_never_wait_for_a_dead_receiver(tmp_path):
    rx = Receiver()
    rx.up = False
    out = DeliveryOutput(rx, spool_dir=tmp_path, queue_max=1000)
    started = time.monotonic()
    for i in range(5000):
        out.write(doc(i))
    assert time.monotonic() - started < 5    # spilling to disk, never blocking on the network
    out.close(timeout_s=0.1)

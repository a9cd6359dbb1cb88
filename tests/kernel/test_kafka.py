"""The Kafka output against librdkafka's mock cluster, read back by an independent consumer (Debian's kcat).

No real Apache Kafka broker can be had on these machines: the mock cluster (`test.mock.num.brokers`)
speaks the Kafka protocol on 127.0.0.1 and runs in a process of its own (helpers/kafka_mock.py), which the
tests kill and start again. It always binds an ephemeral port, so helpers/fixed_port.c (LD_PRELOAD)
gives its listener a fixed one: the restarted broker is found where the producer looks for it. The
mock keeps its topics in memory (a restarted one starts empty) and enforces no message size limit.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import eptrace_helpers
from support import free_port, require

from tracer.outputs.delivery import DeliveryOutput
from tracer.outputs.kafka import KafkaSender, parse_kafka_spec
from tracer.schema import Document

HELPERS = Path(__file__).resolve().parent / "helpers"
KCAT = shutil.which("kcat")
HOSTNAME = "kafka-test-host"


def _missing() -> str | None:
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        return "confluent-kafka is not installed in the venv (make setup)"
    if KCAT is None:
        return "kcat is not installed (make setup)"
    if shutil.which("gcc") is None:
        return "gcc is needed to build helpers/fixed_port.c"
    return None


@pytest.fixture(scope="module", autouse=True)
def prerequisites():
    reason = _missing()
    require(reason is None, reason)


class MockBroker:
    """librdkafka's mock cluster (one broker) in a process of its own, always on the same port."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.shim = directory / "fixed_port.so"
        subprocess.run(["gcc", "-O2", "-Wall", "-shared", "-fPIC", "-o", str(self.shim),
                        str(HELPERS / "fixed_port.c"), "-ldl"], check=True, capture_output=True, timeout=60)
        self.port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(os.environ, FIXED_PORT=str(self.port), LD_PRELOAD=str(self.shim))
        deadline = time.monotonic() + 20
        while True:        # the old listener's port may take a moment to be free again
            proc = subprocess.Popen([sys.executable, str(HELPERS / "kafka_mock.py")], env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=open(self.dir / "mock.err", "a"),
                                    start_new_session=True)
            line = proc.stdout.readline().strip()
            if line == self.bootstrap:
                self.proc = proc
                return
            proc.kill()
            proc.wait(10)
            if time.monotonic() > deadline:
                pytest.fail(f"the mock cluster came up on {line!r}, not {self.bootstrap}: "
                            f"{(self.dir / 'mock.err').read_text()[-2000:]}", pytrace=False)
            time.sleep(0.5)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait(10)


@pytest.fixture
def broker():
    directory = Path(tempfile.mkdtemp(prefix="eptrace-kafka-"))
    b = MockBroker(directory)
    b.start()
    try:
        yield b
    finally:
        b.kill()
        shutil.rmtree(directory, ignore_errors=True)


def consume(bootstrap: str, topic: str) -> list[dict]:
    """Every message of the topic, from the beginning, by kcat (JSON envelope: partition, offset, key, payload)."""
    r = subprocess.run([KCAT, "-C", "-b", bootstrap, "-t", topic, "-o", "beginning", "-e", "-q", "-J",
                        "-X", "topic.metadata.refresh.interval.ms=1000"],
                       capture_output=True, text=True, timeout=60)
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def wait_consumed(bootstrap: str, topic: str, want_ids: set[str], timeout: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        messages = consume(bootstrap, topic)
        got = {json.loads(m["payload"])["event"]["id"] for m in messages}
        if want_ids <= got or time.monotonic() > deadline:
            assert want_ids <= got, f"{len(want_ids - got)} of {len(want_ids)} documents never reached {topic}"
            return messages


def interleaved_docs(n: int) -> list[Document]:
    """n documents of three episodes, interleaved, plus the metrics (no episode) that make_docs adds."""
    per = [eptrace_helpers.make_docs(n // 3 + 1, episode_id=f"ep-k{i}") for i in range(3)]
    return [per[i % 3][i // 3] for i in range(n)]


def expected_key(doc: dict) -> str:
    return doc.get("labels", {}).get("episode_id") or HOSTNAME


def check_keys_and_order(messages: list[dict], docs: list[Document], by_kind: bool = False) -> None:
    """Keys are the episode ids (the host name without one); each key sits in one partition, where its
    documents come in the order they were written (first copies: a retried batch may repeat some).
    by_kind: the order of each kind apart, since the delivery core sends spooled alerts before
    spooled events (event.sequence restores the full order)."""
    written = [d.fields() for d in docs]
    order = {d["event"]["id"]: i for i, d in enumerate(written)}
    partitions: dict[str, set[int]] = {}
    seen: dict[str, list[int]] = {}
    for m in sorted(messages, key=lambda m: (m["partition"], m["offset"])):
        doc = json.loads(m["payload"])
        assert m["key"] == expected_key(doc)
        partitions.setdefault(m["key"], set()).add(m["partition"])
        positions = seen.setdefault(m["key"] + (doc["event"]["kind"] if by_kind else ""), [])
        if order[doc["event"]["id"]] not in positions:
            positions.append(order[doc["event"]["id"]])
    assert all(len(p) == 1 for p in partitions.values()), partitions
    for key, positions in seen.items():
        assert positions == sorted(positions), f"documents of {key} out of order"
    assert {m["key"] for m in messages} >= {"ep-k0", "ep-k1", "ep-k2", HOSTNAME}
    assert messages and len(seen) >= 4


def test_every_document_arrives_keyed_by_episode_in_order(broker, tmp_path):
    docs = interleaved_docs(3000)
    sender = parse_kafka_spec(f"kafka://{broker.bootstrap}/eptrace-events?alerts_topic=eptrace-alerts")
    sender._default_key = HOSTNAME.encode()
    out = DeliveryOutput(sender, spool_dir=tmp_path)
    for doc in docs:
        out.write(doc)
    ids = {d.fields()["event"]["id"] for d in docs}
    messages = wait_consumed(broker.bootstrap, "eptrace-events", ids)
    out.close()
    assert len(messages) == len(docs)                      # nothing twice with the broker up all along
    by_id = {d.fields()["event"]["id"]: d.json for d in docs}
    assert all(by_id[json.loads(m["payload"])["event"]["id"]] == m["payload"] for m in messages)   # byte for byte
    check_keys_and_order(messages, docs)
    alert_ids = {d.fields()["event"]["id"] for d in docs if d.kind == "alert"}
    alerts = wait_consumed(broker.bootstrap, "eptrace-alerts", alert_ids)
    assert {json.loads(m["payload"])["event"]["id"] for m in alerts} == alert_ids and alert_ids
    assert out.dropped == {} and out.sent == len(docs)


def test_broker_killed_mid_stream_and_started_again_loses_nothing(broker, tmp_path):
    """The broker stops answering with documents in flight, is SIGKILLed and comes back (empty, as the
    mock keeps nothing) on the same port: every document written before, during and after reaches the
    topic, the failed batches went through the spool, and the spool is drained."""
    docs = interleaved_docs(3000)
    ids = [d.fields()["event"]["id"] for d in docs]
    sender = KafkaSender([broker.bootstrap], "eptrace-events", hostname=HOSTNAME, delivery_timeout_s=2.0)
    out = DeliveryOutput(sender, spool_dir=tmp_path)
    for doc in docs[:1000]:
        out.write(doc)
    wait_consumed(broker.bootstrap, "eptrace-events", set(ids[:1000]))     # read before the broker goes
    broker.signal(signal.SIGSTOP)             # no acknowledgement from now on: what follows is in flight
    for doc in docs[1000:2000]:
        out.write(doc)
        time.sleep(0.001)
    eptrace_helpers.wait_until(lambda: out.spool.size() > 0, 30, "the undelivered batches spooled")
    broker.kill()
    time.sleep(1.0)                           # the producer finds the broker gone
    broker.start()
    for doc in docs[2000:]:
        out.write(doc)
    messages = wait_consumed(broker.bootstrap, "eptrace-events", set(ids[1000:]), timeout=60)
    eptrace_helpers.wait_until(lambda: out.spool.size() == 0 and out.queued == 0, 30, "the spool drained")
    out.close()
    assert out.dropped == {}, out.dropped
    check_keys_and_order(messages, docs[1000:], by_kind=True)


def test_a_document_over_the_size_limit_is_dead_lettered(broker, tmp_path):
    """max_message_bytes is the broker's message.max.bytes: librdkafka refuses a larger message before
    sending it (the mock broker itself enforces no limit). The document is dead-lettered and counted;
    the others arrive."""
    docs = interleaved_docs(200)
    big = [d for d in docs if len(d.json) > 10_000]
    assert big
    sender = parse_kafka_spec(f"kafka://{broker.bootstrap}/eptrace-events?max_message_bytes=8000")
    out = DeliveryOutput(sender, spool_dir=tmp_path)
    for doc in docs:
        out.write(doc)
    small_ids = {d.fields()["event"]["id"] for d in docs if len(d.json) <= 10_000}
    messages = wait_consumed(broker.bootstrap, "eptrace-events", small_ids)
    eptrace_helpers.wait_until(lambda: out.dropped.get("rejected:msg_size_too_large") == len(big), 20,
                               lambda: f"the large documents dead-lettered (dropped: {out.dropped})")
    out.close()
    assert len(messages) == len(docs) - len(big)
    dead = (out.spool.dir / "dead-letter.ndjson").read_text().splitlines()
    assert dead == [d.json for d in big]


def test_eptrace_run_streams_to_kafka(broker, tmp_path):
    """`eptrace run --output kafka://...` next to a file output: every document of the file reaches the
    topic, keyed by the episode (metrics by the host name)."""
    events_file = tmp_path / "events.ndjson"
    workload = ("import socket\n"
                "for i in range(20):\n"
                "    l=socket.create_server(('127.0.0.1',0)); s=socket.create_connection(l.getsockname())\n"
                "    c,_=l.accept(); c.close(); s.close(); l.close()\n")
    r = eptrace_helpers.run_eptrace("run", "--episode", "ep-kafka", "--output", f"file:{events_file}",
                                    "--output", f"kafka://{broker.bootstrap}/eptrace-run?compression=lz4",
                                    "--", "/usr/bin/python3", "-c", workload, state_dir=tmp_path / "state")
    assert r.returncode == 0, r.stderr
    written = eptrace_helpers.read_docs(events_file)
    assert sum(1 for d in written if d["event"]["action"] == "connection_established") >= 20
    messages = wait_consumed(broker.bootstrap, "eptrace-run", {d["event"]["id"] for d in written})
    host = socket.gethostname()
    for m in messages:
        doc = json.loads(m["payload"])
        assert m["key"] == doc.get("labels", {}).get("episode_id", host)
    kafka_stats = eptrace_helpers.output_stats(eptrace_helpers.final_metric(written), "kafka://")
    assert kafka_stats["dropped"] == {}, kafka_stats

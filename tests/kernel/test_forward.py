"""The Fluent Forward sender against a real receiver: @fluent-org/logger's FluentServer (npm, pinned in
tests/kernel/helpers/package.json, installed by `make setup`), run by node on 127.0.0.1.

Each test starts helpers/fluent_server.js on a free port; it prints one JSON line per entry it
receives (tag, EventTime, event.id, record), after having answered the batch's ack.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import pytest

import eptrace_helpers
from support import Certs, fast_backoff, free_port, make_certs, require

from tracer.outputs import parse_output_spec
from tracer.outputs.delivery import DeliveryOutput
from tracer.outputs.forward import ForwardSender, parse_forward_spec
from tracer.outputs.senders import SendError
from tracer.schema import Document

HELPERS = Path(__file__).resolve().parent / "helpers"
SERVER_JS = HELPERS / "fluent_server.js"
NODE = shutil.which("node")

@pytest.fixture(autouse=True)
def _needs_fluent_server():
    require(NODE is not None and (HELPERS / "node_modules" / "@fluent-org" / "logger").is_dir(),
            "node or @fluent-org/logger is missing (make setup)")


# --- documents ---------------------------------------------------------------------------------

make_docs = partial(eptrace_helpers.make_docs, episode_id="ep-fwd")


def event_id(doc: Document) -> str:
    return doc.fields()["event"]["id"]


def send_in_batches(sender: ForwardSender, docs: list[Document], size: int = 97) -> None:
    for start in range(0, len(docs), size):
        assert sender.send(docs[start:start + size]) is None


# --- certificates --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certs():
    with tempfile.TemporaryDirectory(prefix="eptrace-forward-certs-") as tmp:
        yield make_certs(Path(tmp))


# --- the receiver --------------------------------------------------------------------------------

class FluentReceiver:
    """helpers/fluent_server.js under node; keeps every entry it reports. start() again after kill()
    listens on the same port and keeps what was received before."""

    def __init__(self, shared_key: str | None = None, certs: Certs | None = None, client_auth: bool = False,
                 ids_only: bool = False):
        self.port = free_port()
        self.argv = [NODE, str(SERVER_JS), "--port", str(self.port)]
        if shared_key is not None:
            self.argv += ["--shared-key", shared_key, "--server-hostname", "fluent-test-server"]
        if certs is not None:
            self.argv += ["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)]
            if client_auth:
                self.argv += ["--tls-client-ca", str(certs.ca)]
        if ids_only:
            self.argv.append("--ids-only")
        self.entries: list[dict] = []
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.stderr = b""

    def start(self) -> "FluentReceiver":
        assert self.proc is None
        proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        self.proc = proc
        listening = threading.Event()
        threading.Thread(target=self._read, args=(proc, listening), daemon=True).start()
        if not listening.wait(15):
            self.kill()
            pytest.fail(f"fluent_server.js did not listen within 15 s: {self.stderr.decode(errors='replace')}",
                        pytrace=False)
        return self

    def _read(self, proc: subprocess.Popen, listening: threading.Event) -> None:
        for line in proc.stdout:
            try:
                item = json.loads(line)
            except json.JSONDecodeError:     # the last line of a killed server, cut short: never acked
                continue
            if "listening" in item:
                listening.set()
                continue
            with self.lock:
                self.entries.append(item)
        self.stderr += proc.stderr.read()

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def ids(self) -> set[str]:
        with self.lock:
            return {e["id"] for e in self.entries}

    def wait_ids(self, want: set[str], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not want <= self.ids():
            if time.monotonic() > deadline:
                missing = want - self.ids()
                pytest.fail(f"{len(missing)} of {len(want)} documents never reached FluentServer "
                            f"(e.g. {sorted(missing)[:3]}); stderr: {self.stderr.decode(errors='replace')}",
                            pytrace=False)
            time.sleep(0.02)

    def check(self, docs: list[Document], tag: str = "eptrace") -> None:
        """Every document arrived (deduplicated by event.id), equal to what was sent, with its EventTime."""
        self.wait_ids({event_id(d) for d in docs})
        time.sleep(0.1)
        with self.lock:
            by_id = {e["id"]: e for e in self.entries}
        for doc in docs:
            entry = by_id[event_id(doc)]
            fields = doc.fields()
            assert entry["tag"] == tag
            assert entry["record"] == fields
            ts = fields["@timestamp"]
            assert entry["time"][1] == int(ts[20:26]) * 1000                      # nanoseconds
            assert time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(entry["time"][0])) == ts[:19]


@pytest.fixture
def fluent():
    """fluent(**options) -> a started FluentReceiver; all are killed after the test."""
    started: list[FluentReceiver] = []

    def start(**options) -> FluentReceiver:
        r = FluentReceiver(**options)
        started.append(r)
        return r.start()

    try:
        yield start
    finally:
        for r in started:
            r.kill()


@pytest.fixture(name="fast_backoff")
def _fast_backoff(monkeypatch):
    fast_backoff(monkeypatch)


# --- tests -----------------------------------------------------------------------------------------

def test_1000_documents_in_batches_are_acknowledged(fluent):
    r = fluent()
    docs = make_docs(1000)
    assert max(len(d.json.encode()) for d in docs) > 10_000 and any(d.kind == "alert" for d in docs)
    sender = parse_forward_spec(f"forward://127.0.0.1:{r.port}")
    try:
        send_in_batches(sender, docs)
    finally:
        sender.close()
    r.check(docs)
    assert sender.acks == 11 and sender.connects == 1
    assert len(r.entries) == 1000                    # acked once each: nothing was sent twice


def test_shared_key_handshake(fluent):
    r = fluent(shared_key="s3cret ✓")
    docs = make_docs(300)
    sender = parse_forward_spec(f"forward://127.0.0.1:{r.port}?shared_key=s3cret%20%E2%9C%93&tag=eptrace.sec")
    try:
        send_in_batches(sender, docs, size=50)
    finally:
        sender.close()
    r.check(docs, tag="eptrace.sec")
    assert sender.connects == 1 and sender.acks == 6


def test_gzip_compression(fluent):
    r = fluent()
    docs = make_docs(1000)
    sender = parse_forward_spec(f"forward://127.0.0.1:{r.port}?compress=gzip")
    try:
        send_in_batches(sender, docs, size=250)
    finally:
        sender.close()
    r.check(docs)
    assert sender.acks == 4


def test_tls_with_shared_key_gzip_and_a_client_certificate(fluent, certs):
    r = fluent(shared_key="k", certs=certs, client_auth=True)
    docs = make_docs(200)
    sender = parse_forward_spec(f"forward://127.0.0.1:{r.port}?tls=1&ca={certs.ca}&cert={certs.client_cert}"
                                f"&key={certs.client_key}&shared_key=k&compress=gzip")
    try:
        send_in_batches(sender, docs[:100], size=20)
        time.sleep(0.5)            # idle (TLS 1.3 session tickets waiting): still the same connection
        send_in_batches(sender, docs[100:], size=20)
    finally:
        sender.close()
    r.check(docs)
    assert sender.connects == 1


def test_tls_client_without_the_required_certificate_is_refused(fluent, certs):
    """The receiver requires a client certificate signed by its CA: a client that presents none is refused,
    and the refusal is an error, never a silent loss."""
    r = fluent(certs=certs, client_auth=True)
    sender = parse_forward_spec(f"forward://127.0.0.1:{r.port}?tls=1&ca={certs.ca}")
    try:
        with pytest.raises(SendError):
            sender.send(make_docs(5))
    finally:
        sender.close()
    time.sleep(0.2)
    assert r.ids() == set()


def test_tls_server_not_signed_by_the_ca_is_refused(fluent, certs):
    r = fluent(certs=certs)
    sender = parse_forward_spec(f"forward://127.0.0.1:{r.port}?tls=1&ca={certs.rogue_ca}")
    with pytest.raises(SendError, match="certificate verification failed"):
        sender.send(make_docs(3))
    sender.close()
    time.sleep(0.2)
    assert r.entries == []


def test_wrong_shared_key_is_a_clear_send_error(fluent):
    r = fluent(shared_key="s3cret")
    sender = ForwardSender("127.0.0.1", r.port, shared_key="guess")
    for _ in range(2):                                 # and again on the retry: a new connection each time
        with pytest.raises(SendError, match=r"refused the shared-key handshake: shared key mismatch \(is "
                                            r"shared_key the receiver's\?\)"):
            sender.send(make_docs(5))
    with pytest.raises(SendError, match="asks for the shared-key handshake .*give shared_key="):
        ForwardSender("127.0.0.1", r.port).send(make_docs(5))
    sender.close()
    time.sleep(0.2)
    assert r.entries == [] and sender.connects == 0


def test_receiver_killed_mid_stream_then_back(fluent):
    r = fluent()
    docs = make_docs(400)
    sender = ForwardSender("127.0.0.1", r.port)
    try:
        send_in_batches(sender, docs[:100], size=25)
        r.wait_ids({event_id(d) for d in docs[:100]})
        r.kill()                                            # SIGKILL: no goodbye
        with pytest.raises(SendError):
            sender.send(docs[100:150])
        with pytest.raises(SendError, match="refused"):
            sender.send(docs[100:150])                      # the caller retries: still down
        r.start()                                           # same port
        assert sender.send(docs[100:150]) is None           # the retried batch
        send_in_batches(sender, docs[150:], size=25)
    finally:
        sender.close()
    r.check(docs)
    assert sender.connects == 2


def test_a_receiver_that_does_not_ack_in_time_gets_the_batch_again(fluent):
    r = fluent()
    docs = make_docs(60)
    sender = ForwardSender("127.0.0.1", r.port, ack_timeout_s=0.5)
    try:
        sender.send(docs[:20])
        os.killpg(r.proc.pid, signal.SIGSTOP)              # frozen: the kernel accepts, nobody answers
        try:
            with pytest.raises(SendError, match=r"no ack from the receiver within 0.5 s"):
                sender.send(docs[20:40])
        finally:
            os.killpg(r.proc.pid, signal.SIGCONT)
        sender.send(docs[20:40])                            # at-least-once: sent again
        sender.send(docs[40:])
    finally:
        sender.close()
    r.check(docs)
    with r.lock:
        ids = [e["id"] for e in r.entries]
    assert len(ids) in (60, 80)                             # the unacked batch may have arrived twice
    assert sender.connects == 2


def test_delivery_output_across_a_receiver_outage(fluent, fast_backoff, tmp_path):
    """Through the delivery core: the receiver is killed mid-stream and restarted 1 s later;
    every document arrives (deduplicated by event.id) and nothing is counted as dropped."""
    r = fluent(shared_key="s3cret")
    docs = make_docs(1000)
    out = DeliveryOutput(parse_forward_spec(f"forward://127.0.0.1:{r.port}?shared_key=s3cret&compress=gzip"),
                         spool_dir=tmp_path / "spool", queue_max=300)
    try:
        for i, doc in enumerate(docs):
            out.write(doc)
            if i == 300:
                r.wait_ids({event_id(d) for d in docs[:100]})
                r.kill()
                killed = time.monotonic()
            if i % 50 == 0:
                time.sleep(0.01)
        time.sleep(max(0.0, 1.0 - (time.monotonic() - killed)))
        r.start()
        r.check(docs)
    finally:
        out.close()
    assert out.dropped == {}, out.dropped
    assert out.sender.connects >= 2
    assert not list((tmp_path / "spool").rglob("*.spool"))


def test_output_spec_builds_a_delivery_output(fluent, tmp_path, monkeypatch):
    r = fluent()
    monkeypatch.setenv("EPTRACE_STATE_DIR", str(tmp_path / "state"))
    out = parse_output_spec(f"forward://127.0.0.1:{r.port}?tag=eptrace.spec")
    try:
        assert isinstance(out, DeliveryOutput) and out.name == f"forward://127.0.0.1:{r.port}?tag=eptrace.spec"
        docs = make_docs(20)
        for doc in docs:
            out.write(doc)
        r.check(docs, tag="eptrace.spec")
    finally:
        out.close()
    assert out.dropped == {}

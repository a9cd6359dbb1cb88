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
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

import eptrace_helpers

from tracer.outputs import delivery, parse_output_spec
from tracer.outputs.delivery import DeliveryOutput
from tracer.outputs.forward import ForwardSender, parse_forward_spec
from tracer.outputs.senders import SendError
from tracer.schema import Document

HELPERS = Path(__file__).resolve().parent / "helpers"
SERVER_JS = HELPERS / "fluent_server.js"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(
    NODE is None or not (HELPERS / "node_modules" / "@fluent-org" / "logger").is_dir(),
    reason="node or @fluent-org/logger is missing (make setup)")


# --- documents ---------------------------------------------------------------------------------

make_docs = partial(eptrace_helpers.make_docs, episode_id="ep-fwd")


def event_id(doc: Document) -> str:
    return doc.fields()["event"]["id"]


def send_in_batches(sender: ForwardSender, docs: list[Document], size: int = 97) -> None:
    for start in range(0, len(docs), size):
        assert sender.send(docs[start:start + size]) is None


# --- certificates --------------------------------------------------------------------------------

@dataclass
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN=eptrace test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=d)


def _make_leaf(d: Path, name: str, cn: str, extensions: str) -> None:
    (d / f"{name}.ext").write_text(extensions + "\nbasicConstraints=CA:FALSE\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def certs():
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make test certificates", pytrace=False)
    with tempfile.TemporaryDirectory(prefix="eptrace-forward-certs-") as tmp:
        d = Path(tmp)
        _make_ca(d, "ca")
        _make_ca(d, "rogue")
        _make_leaf(d, "server", "127.0.0.1", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth")
        _make_leaf(d, "client", "eptrace-client", "extendedKeyUsage=clientAuth")
        yield Certs(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key",
                    d / "rogue.pem")


# --- the receiver --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
            item = json.loads(line)
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


@pytest.fixture
def fast_backoff(monkeypatch):
    monkeypatch.setattr(delivery, "BACKOFF_FIRST_S", 0.05)
    monkeypatch.setattr(delivery, "BACKOFF_MAX_S", 0.2)


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


def test_throughput(fluent, capsys):
    """Events per second through the sender to FluentServer (batches of 500, real documents), reported.

    Each batch waits for its ack, so this is the sender and the node receiver in lockstep (about
    half of the time is FluentServer's JavaScript msgpack decoding): a floor only, against a
    pathological slowdown; `make bench` holds the figures."""
    r = fluent(ids_only=True)
    docs = make_docs(2000)
    docs = [d for d in docs if len(d.json) < 5000]          # the usual size, not the 10 KB outliers
    batches = [docs[i:i + 500] for i in range(0, len(docs), 500)]
    sender = ForwardSender("127.0.0.1", r.port)
    try:
        sender.send(batches[0])                             # connected and warm
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < 2.0:
            for batch in batches:
                sender.send(batch)
                n += len(batch)
        elapsed = time.perf_counter() - started
    finally:
        sender.close()
    rate = n / elapsed
    with capsys.disabled():
        print(f"\nforward: {rate:,.0f} events/s ({n} in {elapsed:.2f} s, batches of 500, "
              f"{sum(len(d.json) for d in docs) // len(docs)} B a document)")
    assert rate > 5_000

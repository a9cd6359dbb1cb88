"""The syslog sender against a real rsyslogd (Debian's package) on loopback: TCP, TLS, UDP, restarts.

Each test starts its own rsyslogd (`-n -f CONFIG -i PIDFILE`, work directory in
tmp) on free 127.0.0.1 ports; the system service is never touched. rsyslog
writes every received message twice: %msg% (the JSON document) and %rawmsg%
(the whole RFC 5424 message, framing removed), one per line.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

import eptrace_helpers

from tracer.outputs.senders import SendError
from tracer.outputs.syslog import SyslogSender, parse_syslog_spec
from tracer.schema import Document, to_json

RSYSLOGD = "/usr/sbin/rsyslogd"
GTLS_DRIVER = "/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so"
RAW_RE = re.compile(r"^<(\d+)>1 (\S+) (\S+) eptrace (\d+) (event|metric|alert) - (.*)$")

pytestmark = pytest.mark.skipif(not os.path.exists(RSYSLOGD), reason="rsyslog is not installed (make setup)")


# --- documents ---------------------------------------------------------------------------------

make_docs = partial(eptrace_helpers.make_docs, episode_id="ep-sys")


def small_docs(n: int) -> list[Document]:
    return [Document(to_json({"@timestamp": "2026-11-27T23:00:45.123456Z",
                              "event": {"kind": "event", "id": f"udp-{i}"}, "message": f"dgram {i} ✓"}), "event")
            for i in range(n)]


def send_in_batches(sender: SyslogSender, docs: list[Document], size: int = 97) -> None:
    for start in range(0, len(docs), size):
        sender.send(docs[start:start + size])


# --- certificates --------------------------------------------------------------------------------

@dataclass
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path            # a CA that signed nothing the server presents
    other_name_cert: Path     # signed by ca, but for DNS:other.example only
    other_name_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN=eptrace test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=d)


def _make_leaf(d: Path, name: str, ca: str, cn: str, extensions: str) -> None:
    (d / f"{name}.ext").write_text(extensions + "\nbasicConstraints=CA:FALSE\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def certs():
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make test certificates", pytrace=False)
    with tempfile.TemporaryDirectory(prefix="eptrace-syslog-certs-") as tmp:
        yield _make_certs(Path(tmp))


def _make_certs(d: Path) -> Certs:
    _make_ca(d, "ca")
    _make_ca(d, "rogue")
    _make_leaf(d, "server", "ca", "127.0.0.1", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth")
    _make_leaf(d, "client", "ca", "eptrace-client", "extendedKeyUsage=clientAuth")
    _make_leaf(d, "other", "ca", "other.example", "subjectAltName=DNS:other.example\nextendedKeyUsage=serverAuth")
    for key in d.glob("*.key"):
        key.chmod(0o600)
    return Certs(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key",
                 d / "rogue.pem", d / "other.pem", d / "other.key")


# --- rsyslogd ----------------------------------------------------------------------------------------

def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free on 127.0.0.1 for both TCP and UDP (the kernel picks it; we check the other)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        try:
            with socket.socket(socket.AF_INET, other) as s:
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port on 127.0.0.1")


def _listening(port: int, proto: str) -> bool:
    """Is something bound on 127.0.0.1:port (TCP: in LISTEN state)? Read from /proc, no connection made."""
    want = f"0100007F:{port:04X}"
    with open(f"/proc/net/{proto}") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[1] == want and (proto == "udp" or fields[3] == "0A"):
                return True
    return False


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when pytest dies, so that no rsyslogd outlives a killed run."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)     # PR_SET_PDEATHSIG


class Rsyslog:
    """One rsyslogd of our own: `-n` (foreground), own config, pidfile and work directory."""

    def __init__(self, directory: Path, certs: Certs | None = None, client_auth: bool = True):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tls = certs is not None
        self.tcp_port = free_port()
        self.udp_port = None if self.tls else free_port(socket.SOCK_DGRAM)
        self.msg_file = self.dir / "msg.log"
        self.raw_file = self.dir / "raw.log"
        self.pidfile = self.dir / "rsyslogd.pid"
        self.config = self.dir / "rsyslog.conf"
        self.proc: subprocess.Popen | None = None
        tls_global = ""
        tcp_module = 'module(load="imtcp")'
        if certs is not None:
            tls_global = (f' DefaultNetstreamDriver="gtls" DefaultNetstreamDriverCAFile="{certs.ca}"'
                          f' DefaultNetstreamDriverCertFile="{certs.server_cert}"'
                          f' DefaultNetstreamDriverKeyFile="{certs.server_key}"')
            # x509/certvalid: the client must present a certificate signed by the CA.
            auth = "x509/certvalid" if client_auth else "anon"
            tcp_module = f'module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="{auth}")'
        udp = ""
        if self.udp_port is not None:
            udp = ('module(load="imudp")\n'
                   f'input(type="imudp" port="{self.udp_port}" address="127.0.0.1" ruleset="remote")\n')
        self.config.write_text(f"""\
global(workDirectory="{self.dir}" maxMessageSize="256k"{tls_global})
{tcp_module}
{udp}input(type="imtcp" port="{self.tcp_port}" address="127.0.0.1" ruleset="remote")
template(name="msgonly" type="string" string="%msg%\\n")
template(name="rawmsg" type="string" string="%rawmsg%\\n")
ruleset(name="remote") {{
    action(type="omfile" file="{self.msg_file}" template="msgonly")
    action(type="omfile" file="{self.raw_file}" template="rawmsg")
}}
# rsyslogd's own messages
*.* action(type="omfile" file="{self.dir}/internal.log")
""")

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        log = open(self.dir / "rsyslogd.out", "ab")
        try:
            self.proc = subprocess.Popen([RSYSLOGD, "-n", "-f", str(self.config), "-i", str(self.pidfile)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        finally:
            log.close()
        deadline = time.monotonic() + 15
        while not (_listening(self.tcp_port, "tcp")
                   and (self.udp_port is None or _listening(self.udp_port, "udp"))):
            if self.proc.poll() is not None:
                pytest.fail(f"rsyslogd exited with {self.proc.returncode}:\n{self.diagnostics()}", pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail(f"rsyslogd did not listen within 15 s:\n{self.diagnostics()}", pytrace=False)
            time.sleep(0.05)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def diagnostics(self) -> str:
        parts = []
        for name in ("rsyslogd.out", "internal.log"):
            path = self.dir / name
            if path.exists():
                parts.append(f"--- {name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts) or "(no output)"

    def lines(self, raw: bool = False) -> list[str]:
        path = self.raw_file if raw else self.msg_file
        if not path.exists():
            return []
        data = path.read_bytes().decode("utf-8")
        return data.splitlines() if data.endswith("\n") else data.splitlines()[:-1]

    def wait_lines(self, n: int, timeout: float = 20.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            lines = self.lines()
            if len(lines) >= n or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        time.sleep(0.2)          # anything beyond n would show up now
        lines = self.lines()
        assert len(lines) == n, f"rsyslog wrote {len(lines)} messages, expected {n}\n{self.diagnostics()}"
        return lines


@pytest.fixture
def rsyslog_factory():
    """rsyslog_factory(certs=None, client_auth=True) -> a started Rsyslog; all are stopped and their
    directories removed afterwards, whatever the test did."""
    started: list[Rsyslog] = []
    tmp = Path(tempfile.mkdtemp(prefix="eptrace-rsyslog-"))

    def start(certs: Certs | None = None, client_auth: bool = True) -> Rsyslog:
        if certs is not None and not os.path.exists(GTLS_DRIVER):
            pytest.fail("rsyslog's gtls driver is missing: apt-get install rsyslog-gnutls (make setup)",
                        pytrace=False)
        r = Rsyslog(tmp / f"rsyslog{len(started)}", certs, client_auth)
        started.append(r)
        r.start()
        return r

    try:
        yield start
    finally:
        for r in started:
            r.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def check_received(r: Rsyslog, docs: list[Document]) -> None:
    """Every document arrived once, whole, in order, and the RFC 5424 header is the one we sent."""
    lines = r.wait_lines(len(docs))
    for line, doc in zip(lines, docs):
        assert json.loads(line) == doc.fields()
        assert line == doc.json                      # byte for byte: no truncation, no escaping
    raw = r.lines(raw=True)
    assert len(raw) == len(docs)
    for line, doc in zip(raw, docs):
        m = RAW_RE.match(line)
        assert m, line[:200]
        pri, ts, _host, pid, msgid, msg = m.groups()
        assert int(pid) == os.getpid() and msgid == doc.kind and msg == doc.json
        assert ts == doc.fields()["@timestamp"]
        assert int(pri) // 8 == 13
        assert int(pri) % 8 == (6 if doc.kind != "alert" else 2)     # REVERSE_SHELL is critical


# --- tests -----------------------------------------------------------------------------------------

def test_tcp_1000_documents_arrive_whole(rsyslog_factory):
    r = rsyslog_factory()
    docs = make_docs(1000)
    assert max(len(d.json.encode()) for d in docs) > 10_000 and any(d.kind == "alert" for d in docs)
    sender = parse_syslog_spec(f"syslog+tcp://127.0.0.1:{r.tcp_port}")
    try:
        send_in_batches(sender, docs)
    finally:
        sender.close()
    check_received(r, docs)
    assert sender.connects == 1


def test_tls_200_documents_arrive_whole_with_a_client_certificate(rsyslog_factory, certs):
    r = rsyslog_factory(certs)
    docs = make_docs(200)
    sender = parse_syslog_spec(f"syslog+tls://127.0.0.1:{r.tcp_port}?ca={certs.ca}&cert={certs.client_cert}"
                               f"&key={certs.client_key}")
    try:
        send_in_batches(sender, docs[:100], size=10)
        time.sleep(0.5)             # an idle connection (TLS 1.3 session tickets are waiting): still the same one
        send_in_batches(sender, docs[100:], size=10)
    finally:
        sender.close()
    check_received(r, docs)
    assert sender.connects == 1


def test_tls_server_not_signed_by_the_ca_is_refused(rsyslog_factory, certs):
    r = rsyslog_factory(certs, client_auth=False)
    sender = SyslogSender("tls", "127.0.0.1", r.tcp_port, ca_file=str(certs.rogue_ca))
    with pytest.raises(SendError, match="certificate verification failed"):
        sender.send(make_docs(3))
    sender.close()
    time.sleep(0.3)
    assert r.lines() == []


def test_tls_client_certificate_refused_is_an_error_not_a_silent_loss(rsyslog_factory, certs):
    """TLS 1.3: the client's handshake ends before rsyslog checks the client certificate and hangs up."""
    r = rsyslog_factory(certs)               # x509/certvalid: a client certificate is required
    sender = SyslogSender("tls", "127.0.0.1", r.tcp_port, ca_file=str(certs.ca))
    for _ in range(3):
        with pytest.raises(SendError, match="closed the connection right after accepting it .*client certificate"):
            sender.send(make_docs(2))
    sender.close()
    time.sleep(0.3)
    assert r.lines() == [] and sender.connects == 0


def test_tls_server_name_is_checked(certs):
    """A certificate signed by the CA but for another name: refused (IP 127.0.0.1 is not in its SANs)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.other_name_cert, certs.other_name_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(5)
                try:
                    context.wrap_socket(conn, server_side=True).close()
                except (OSError, ssl.SSLError):
                    pass
        except OSError:
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        sender = SyslogSender("tls", "127.0.0.1", port, ca_file=str(certs.ca))
        with pytest.raises(SendError, match="IP address mismatch"):
            sender.send(make_docs(1))
        sender.close()
    finally:
        listener.close()
        thread.join(5)


def test_tls_unreadable_files_are_construction_errors(certs, tmp_path):
    with pytest.raises(ValueError, match="cannot read the client key"):
        SyslogSender("tls", "127.0.0.1", 1, ca_file=str(certs.ca), cert_file=str(certs.client_cert),
                     key_file=str(tmp_path / "missing.key"))
    with pytest.raises(ValueError, match="cannot load the client certificate"):
        SyslogSender("tls", "127.0.0.1", 1, ca_file=str(certs.ca), cert_file=str(certs.client_cert),
                     key_file=str(certs.server_key))        # a key that does not match the certificate


def test_udp_200_documents_arrive(rsyslog_factory):
    r = rsyslog_factory()
    docs = small_docs(200)
    sender = parse_syslog_spec(f"syslog+udp://127.0.0.1:{r.udp_port}")
    try:
        send_in_batches(sender, docs, size=20)
    finally:
        sender.close()
    lines = r.wait_lines(200)
    assert sorted(json.loads(line)["event"]["id"] for line in lines) == sorted(d.fields()["event"]["id"]
                                                                                 for d in docs)
    assert all(RAW_RE.match(line) for line in r.lines(raw=True))


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_receiver_stopped_mid_stream_then_back(rsyslog_factory, certs, transport):
    r = rsyslog_factory(certs if transport == "tls" else None)
    if transport == "tls":
        sender = SyslogSender("tls", "127.0.0.1", r.tcp_port, ca_file=str(certs.ca),
                              cert_file=str(certs.client_cert), key_file=str(certs.client_key))
    else:
        sender = SyslogSender("tcp", "127.0.0.1", r.tcp_port)
    docs = make_docs(300)
    try:
        send_in_batches(sender, docs[:100], size=25)
        r.wait_lines(100)
        r.stop()
        # The closed connection is noticed before anything is written to it; reconnecting is refused.
        with pytest.raises(SendError, match="refused"):
            sender.send(docs[100:150])
        with pytest.raises(SendError):
            sender.send(docs[100:150])              # the caller retries: still down
        r.start()                                   # same port, same files
        sender.send(docs[100:150])                  # the retried batch
        send_in_batches(sender, docs[150:], size=25)
    finally:
        sender.close()
    check_received(r, docs)
    assert sender.connects == 2


def test_spec_parsing():
    assert parse_syslog_spec("syslog+tcp://127.0.0.1:514").name == "syslog+tcp://127.0.0.1:514"
    assert parse_syslog_spec("syslog+udp://[::1]:514").host == "::1"
    for bad in ("syslog+tcp://127.0.0.1", "syslog://127.0.0.1:514", "syslog+tcp://::1:514",
                "syslog+tcp://127.0.0.1:514?ca=/etc/hosts"):
        with pytest.raises(ValueError, match="accepted forms"):
            parse_syslog_spec(bad)


def test_eptrace_run_delivers_every_document_to_syslog_across_an_outage(rsyslog_factory, tmp_path):
    """`eptrace run --output syslog+tcp://...` next to a file output: with the receiver down for part of the
    episode, every document of the file also reaches rsyslog (deduplicated by event.id), and no drop is counted."""
    import sys
    r = rsyslog_factory()
    r.stop()                                         # down when the episode starts
    events_file = tmp_path / "events.ndjson"
    workload = ("import socket,time\n"
                "for i in range(40):\n"
                "    s=socket.socket(); l=socket.create_server(('127.0.0.1',0)); s.connect(l.getsockname())\n"
                "    c,_=l.accept(); c.close(); s.close(); l.close(); time.sleep(0.05)\n")
    env = dict(os.environ, EPTRACE_STATE_DIR=str(tmp_path / "state"))
    run = subprocess.Popen([sys.executable, "-m", "tracer", "run", "--episode", "ep-syslog", "--stats-interval", "1",
                            "--output", f"file:{events_file}", "--output", f"syslog+tcp://127.0.0.1:{r.tcp_port}",
                            "--", "/usr/bin/python3", "-c", workload], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.0)
    r.start()                                        # back up mid-episode
    out, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    sent = [json.loads(line) for line in events_file.read_text().splitlines()]
    want = {d["event"]["id"] for d in sent}
    deadline = time.monotonic() + 20
    got: set[str] = set()
    while time.monotonic() < deadline and not want <= got:
        got = {json.loads(line)["event"]["id"] for line in r.lines() if line.strip()}
        time.sleep(0.1)
    assert want <= got, f"{len(want - got)} of {len(want)} documents never reached syslog"
    final = sent[-1]["eptrace"]["stats"]["outputs"]
    syslog_stats = next(v for v in final if v["output"].startswith("syslog+tcp"))
    assert syslog_stats["dropped"] == {}, syslog_stats


def test_tracer_killed_during_an_outage_delivers_its_spool_after_a_restart(rsyslog_factory, tmp_path):
    """SIGKILL during a receiver outage: what the tracer had spooled is delivered by the next tracer.
    While the receiver is down, queued documents reach the disk within SPILL_EVERY_S (0.5 s), so every
    document written more than 2 s before the kill must arrive."""
    import sys
    r = rsyslog_factory()
    r.stop()
    env = dict(os.environ, EPTRACE_STATE_DIR=str(tmp_path / "state"))
    events_file = tmp_path / "events.ndjson"
    sink = f"syslog+tcp://127.0.0.1:{r.tcp_port}"
    workload = ("import socket,time\n"
                "while True:\n"
                "    s=socket.socket(); l=socket.create_server(('127.0.0.1',0)); s.connect(l.getsockname())\n"
                "    c,_=l.accept(); c.close(); s.close(); l.close(); time.sleep(0.05)\n")
    first = subprocess.Popen([sys.executable, "-m", "tracer", "run", "--episode", "ep-killed", "--output",
                              f"file:{events_file}", "--output", sink, "--", "/usr/bin/python3", "-c", workload],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(6)
        killed_at = time.time()
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
    # the workload outlived its tracer: kill what is left in the run cgroups
    from tracer.kernel.cgroups import kill_and_remove
    for leftover in Path(cgroup2_mount(), "eptrace").glob("ep-killed@*"):
        kill_and_remove(leftover)
    sent = [json.loads(line) for line in events_file.read_text().splitlines() if line.strip()]
    old_enough = {d["event"]["id"] for d in sent
                  if _epoch(d["@timestamp"]) < killed_at - 2.0}
    assert len(old_enough) > 50, f"only {len(old_enough)} documents were written before the kill"
    r.start()
    second = subprocess.run([sys.executable, "-m", "tracer", "run", "--episode", "ep-after", "--output", sink,
                             "--", "true"], env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0, second.stderr
    deadline = time.monotonic() + 20
    got: set[str] = set()
    while time.monotonic() < deadline and not old_enough <= got:
        got = {json.loads(line)["event"]["id"] for line in r.lines() if line.strip()}
        time.sleep(0.2)
    assert old_enough <= got, f"{len(old_enough - got)} of {len(old_enough)} spooled documents were lost"


def _epoch(ts: str) -> float:
    import calendar
    return calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) + float("0." + ts[20:26])


def cgroup2_mount():
    from tracer.kernel.cgroups import cgroup2_mount as mount
    return mount()


def test_receiver_down_for_30_seconds_mid_stream_loses_nothing(rsyslog_factory, tmp_path):
    """The issue's fault test: a stream of documents, rsyslog down for 30 s in the middle, then back:
    every document arrives (deduplicated by event.id) and the drop counters stay at zero."""
    from tracer.outputs.delivery import DeliveryOutput
    r = rsyslog_factory()
    out = DeliveryOutput(parse_syslog_spec(f"syslog+tcp://127.0.0.1:{r.tcp_port}"), spool_dir=tmp_path)
    docs = make_docs(4000)
    start = time.monotonic()
    down = False
    for i, doc in enumerate(docs):                # ~100 documents a second for 40 s
        elapsed = time.monotonic() - start
        if not down and elapsed > 5:
            r.stop()
            down = True
        if down and elapsed > 35 and r.proc is None:
            r.start()
        out.write(doc)
        time.sleep(max(0.0, start + (i + 1) * 0.01 - time.monotonic()))
    if r.proc is None:
        r.start()
    want = {d.fields()["event"]["id"] for d in docs}
    deadline = time.monotonic() + 60
    got: set[str] = set()
    while time.monotonic() < deadline and not want <= got:
        got = {json.loads(line)["event"]["id"] for line in r.lines() if line.strip()}
        time.sleep(0.2)
    out.close()
    assert want <= got, f"{len(want - got)} of {len(want)} documents never arrived"
    assert out.dropped == {}, out.dropped

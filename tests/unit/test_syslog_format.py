"""Syslog sender without a network: RFC 5424 header, PRI, octet-counting framing, errors, spec parsing."""
import json
import os
import re
import socket
import threading
import time

import pytest
from support import make_certs

from tracer.events import Endpoint, Episode, Metric, NetworkEvent, Process
from tracer.outputs.senders import SendError
from tracer.outputs.syslog import (UDP_MAX_MESSAGE, SyslogSender, alert_severity, header_field,
                                   parse_syslog_spec)
from tracer.schema import Document, EcsEncoder, to_json

TS = 1_795_820_445_123_456_789  # 2026-11-27T23:00:45.123456Z
HEADER_RE = re.compile(rb"^<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) - ")


def ecs_docs() -> list[Document]:
    enc = EcsEncoder("host-1", "0.1")
    episode = Episode(id="ep-1", cgroup_path="/eptrace/ep-1", cgroup_id=7, labels={"team": "ünïcode ✓"})
    ev = NetworkEvent(action="connection_established", timestamp_ns=TS, episode=episode, cgroup_id=7,
                      cgroup_path="/eptrace/ep-1", process=Process(pid=5, name="curl"), cookie=9, transport="tcp",
                      network_type="ipv4", direction="egress", source=Endpoint("10.0.0.2", 40000),
                      destination=Endpoint("10.0.0.1", 443))
    return [enc.encode_document(ev), enc.encode_document(Metric(timestamp_ns=TS, stats={"events": 1}))]


def alert(severity=None) -> Document:
    event = {"kind": "alert"} if severity is None else {"kind": "alert", "severity": severity}
    return Document(to_json({"@timestamp": "2026-11-27T23:00:45.123456Z", "event": event}), "alert")


def split_frames(data: bytes) -> list[bytes]:
    """Octet-counted frames: 'LEN SP MSG' repeated, LEN in bytes."""
    frames = []
    while data:
        length, sep, rest = data.partition(b" ")
        assert sep and length.isdigit() and not length.startswith(b"0"), data[:40]
        frames.append(rest[:int(length)])
        assert len(frames[-1]) == int(length), "a frame is whole"
        data = rest[int(length):]
    return frames


def parse(message: bytes) -> tuple[int, str, str, str, str, str, dict]:
    m = HEADER_RE.match(message)
    assert m, message[:120]
    body = message[m.end():]
    assert not body.startswith(b"\xef\xbb\xbf"), "no BOM"
    pri, ts, host, app, procid, msgid = (g.decode() for g in m.groups())
    return int(pri), ts, host, app, procid, msgid, json.loads(body.decode("utf-8"))


def test_header_for_events_and_metrics():
    sender = SyslogSender("tcp", "127.0.0.1", 514, hostname="node-1")
    for doc in ecs_docs():
        msg = sender.message(doc)
        pri, ts, host, app, procid, msgid, fields = parse(msg)
        assert pri == 13 * 8 + 6                       # log audit, informational
        assert ts == fields["@timestamp"] == "2026-11-27T23:00:45.123456Z"
        assert (host, app, procid) == ("node-1", "eptrace", str(os.getpid()))
        assert msgid == doc.kind == fields["event"]["kind"]
        assert msg.endswith(doc.json.encode()) and fields == doc.fields()


@pytest.mark.parametrize("severity, syslog_severity", [(100, 2), (74, 2), (73, 3), (48, 3), (47, 4), (22, 4),
                                                        (21, 5), (0, 5), (None, 5), ("high", 5)])
def test_alert_severity_follows_event_severity(severity, syslog_severity):
    assert alert_severity(severity) == syslog_severity
    pri, *_, msgid, _ = parse(SyslogSender("udp", "h", 1, facility=16).message(alert(severity)))
    assert pri == 16 * 8 + syslog_severity and msgid == "alert"


def test_timestamp_when_not_first_or_missing():
    sender = SyslogSender("tcp", "h", 1)
    later = Document(to_json({"event": {"kind": "event"}, "@timestamp": "2026-01-02T03:04:05.000006Z"}), "event")
    assert parse(sender.message(later))[1] == "2026-01-02T03:04:05.000006Z"
    assert parse(sender.message(Document('{"event":{"kind":"event"}}', "event")))[1] == "-"


def test_header_fields_are_printable_ascii_and_bounded():
    assert header_field("my host ä", 255) == "my_host__"
    assert header_field("", 48) == header_field(None, 48) == "-"
    assert header_field("a" * 100, 48) == "a" * 48
    sender = SyslogSender("tcp", "h", 1, hostname="bad host", app_name="x" * 60)
    _, _, host, app, *_ = parse(sender.message(ecs_docs()[0]))
    assert host == "bad_host" and app == "x" * 48


def test_octet_counting_counts_utf8_bytes():
    sender = SyslogSender("tcp", "h", 1)
    docs = [Document(to_json({"@timestamp": "2026-11-27T23:00:45.123456Z", "m": "é✓😀" * i, "big": "x" * 10_000}),
                     "event") for i in range(5)]
    frames = split_frames(sender.frame(docs))
    assert len(frames) == 5
    for frame, doc in zip(frames, docs):
        assert frame == sender.message(doc) and parse(frame)[-1] == doc.fields()


class FakeConnect:
    """Stands in for SyslogSender._connect: hands out one end of a fresh socketpair each time."""

    def __init__(self, kind=socket.SOCK_STREAM):
        self.kind = kind
        self.peers: list[socket.socket] = []
        self.refuse = False
        self.hang_up = False          # the receiver closes each connection as soon as it is made

    def __call__(self):
        if self.refuse:
            raise ConnectionRefusedError(111, "Connection refused")
        ours, peer = socket.socketpair(socket.AF_UNIX, self.kind)
        peer.settimeout(5)
        self.peers.append(peer)
        if self.hang_up:
            threading.Timer(0.02, peer.close).start()
        return ours

    def read_all(self, peer: socket.socket) -> bytes:
        peer.setblocking(False)
        chunks = []
        try:
            while True:
                chunk = peer.recv(1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
        except BlockingIOError:
            pass
        return b"".join(chunks)


def test_send_writes_the_batch_as_frames_and_reconnects_after_the_peer_closes(monkeypatch):
    sender = SyslogSender("tcp", "h", 1, settle_s=0.05)
    fake = FakeConnect()
    monkeypatch.setattr(sender, "_connect", fake)
    docs = ecs_docs() * 50
    sender.send(docs)
    sender.send([])                         # nothing to send: no error, no connection change
    assert [parse(f)[-1] for f in split_frames(fake.read_all(fake.peers[0]))] == [d.fields() for d in docs]
    assert sender.connects == 1
    fake.peers[0].close()                   # the receiver goes away between batches
    sender.send(docs[:3])                   # noticed before writing: a new connection takes the batch
    assert sender.connects == 2
    assert len(split_frames(fake.read_all(fake.peers[1]))) == 3
    fake.peers[1].close()
    fake.refuse = True
    with pytest.raises(SendError, match="syslog\\+tcp://h:1: Connection refused"):
        sender.send(docs[:1])
    fake.refuse = False
    sender.send(docs[:1])
    assert sender.connects == 3 and len(split_frames(fake.read_all(fake.peers[2]))) == 1
    sender.close()
    sender.close()


def test_a_receiver_that_hangs_up_at_once_is_an_error(monkeypatch):
    sender = SyslogSender("tcp", "h", 1, settle_s=1.0)
    fake = FakeConnect()
    fake.hang_up = True
    monkeypatch.setattr(sender, "_connect", fake)
    started = time.monotonic()
    with pytest.raises(SendError, match="closed the connection right after accepting it"):
        sender.send(ecs_docs())
    assert time.monotonic() - started < 0.9 and sender.connects == 0 and sender._sock is None
    fake.hang_up = False
    started = time.monotonic()
    sender.send(ecs_docs())                 # a receiver that keeps the connection: settle_s once, then at once
    sender.send(ecs_docs())
    assert 1.0 <= time.monotonic() - started < 1.5 and sender.connects == 1


class BrokenSocket:
    closed = False

    def fileno(self):
        return -1

    def sendall(self, data):
        raise BrokenPipeError(32, "Broken pipe")

    def close(self):
        self.closed = True


def test_a_failed_write_raises_send_error_and_drops_the_connection(monkeypatch):
    sender = SyslogSender("tcp", "h", 1, settle_s=0)
    broken = BrokenSocket()
    monkeypatch.setattr(sender, "_connect", lambda: broken)
    monkeypatch.setattr("tracer.outputs.syslog._peer_closed", lambda sock: False)
    with pytest.raises(SendError, match="Broken pipe"):
        sender.send(ecs_docs())
    assert broken.closed and sender._sock is None     # the next send connects again


def test_udp_one_datagram_per_document_and_truncation(monkeypatch):
    sender = SyslogSender("udp", "h", 1)
    fake = FakeConnect(socket.SOCK_DGRAM)
    monkeypatch.setattr(sender, "_connect", fake)
    big = Document(to_json({"@timestamp": "2026-11-27T23:00:45.123456Z", "m": "y" * 70_000}), "event")
    docs = ecs_docs() + [big]
    sender.send(docs)
    peer = fake.peers[0]
    datagrams = [peer.recv(1 << 17) for _ in docs]
    for datagram, doc in zip(datagrams[:-1], docs):
        assert datagram == sender.message(doc) and not datagram[:1].isdigit()    # no framing
    assert datagrams[-1] == sender.message(big)[:UDP_MAX_MESSAGE]


def test_construction_errors(tmp_path):
    with pytest.raises(ValueError, match="transport"):
        SyslogSender("sctp", "h", 1)
    with pytest.raises(ValueError, match="port"):
        SyslogSender("tcp", "h", 0)
    with pytest.raises(ValueError, match="for syslog\\+tls only"):
        SyslogSender("tcp", "h", 1, ca_file="/etc/hosts")
    with pytest.raises(ValueError, match="cannot read the CA file '/nonexistent/ca.pem': no such file"):
        SyslogSender("tls", "h", 1, ca_file="/nonexistent/ca.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="CA file .*garbage.pem"):
        SyslogSender("tls", "h", 1, ca_file=str(garbage))
    with pytest.raises(ValueError, match="client certificate .*garbage.pem"):
        SyslogSender("tls", "h", 1, cert_file=str(garbage))
    with pytest.raises(ValueError, match="without a client certificate"):
        SyslogSender("tls", "h", 1, key_file=str(garbage))


@pytest.mark.parametrize("spec, transport, host, port, name", [
    ("syslog+tcp://127.0.0.1:514", "tcp", "127.0.0.1", 514, "syslog+tcp://127.0.0.1:514"),
    ("syslog+udp://[::1]:5514", "udp", "::1", 5514, "syslog+udp://[::1]:5514"),
    ("syslog+tls://siem.example.com:6514", "tls", "siem.example.com", 6514, "syslog+tls://siem.example.com:6514"),
    ("syslog+tcp://siem:514/", "tcp", "siem", 514, "syslog+tcp://siem:514"),
])
def test_spec_good_forms(spec, transport, host, port, name):
    sender = parse_syslog_spec(spec)
    assert (sender.transport, sender.host, sender.port, sender.name) == (transport, host, port, name)


def test_spec_tls_options(tmp_path):
    ca = make_certs(tmp_path).ca
    sender = parse_syslog_spec(f"syslog+tls://[::1]:6514?ca={ca}")
    assert sender.name == "syslog+tls://[::1]:6514" and sender._ssl_context is not None


@pytest.mark.parametrize("spec, why", [
    ("syslog://h:514", "unknown form"),
    ("syslog+sctp://h:514", "unknown form"),
    ("tcp://h:514", "unknown form"),
    ("syslog+tcp:/h:514", "unknown form"),
    ("syslog+tcp://h", "HOST:PORT is required"),
    ("syslog+tcp://:514", "HOST:PORT is required"),
    ("syslog+tcp://h:0", "HOST:PORT is required"),
    ("syslog+tcp://h:70000", "out of range"),
    ("syslog+tcp://h:http", "HOST:PORT is required"),
    ("syslog+tcp://::1:514", "IPv6 address goes in brackets"),
    ("syslog+tcp://[::1:514", "Invalid IPv6"),
    ("syslog+tcp://[siem]:514", ""),
    ("syslog+tcp://user@h:514", "no user"),
    ("syslog+tcp://h:514/x", "no path"),
    ("syslog+tcp://h:514?ca=/etc/hosts", "unknown option 'ca'"),
    ("syslog+tls://h:514?ca=/nonexistent", "cannot read the CA file"),
    ("syslog+tls://h:514?cafile=/x", "unknown option 'cafile'"),
    ("syslog+tls://h:514?ca=", "needs a file path"),
    ("syslog+tls://h:514?ca=/a&ca=/b", "given twice"),
])
def test_spec_bad_forms(spec, why):
    with pytest.raises(ValueError, match=re.escape(why)) as info:
        parse_syslog_spec(spec)
    message = str(info.value)
    assert "\n" not in message
    if "cannot read" not in why:
        assert "syslog+tcp://HOST:PORT" in message and "syslog+tls://HOST:PORT" in message

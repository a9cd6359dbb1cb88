"""The Fluent Forward sender's framing, acks and handshake, against a fake receiver in a thread (no node).

The fake receiver is a loopback listener speaking msgpack: it records every message it gets
and answers as the test tells it (right ack, wrong ack, no ack, hang up, HELO/PONG).
"""
import base64
import gzip
import hashlib
import json
import socket
import struct
import threading
import time

import msgpack
import pytest
from support import wait_for

from tracer.outputs import delivery
from tracer.outputs.delivery import DeliveryOutput
from tracer.outputs.forward import (ACCEPTED_FORMS, ForwardSender, event_time, forward_message, pack_entries,
                                    parse_forward_spec)
from tracer.outputs.senders import SendError
from tracer.schema import Document, to_json

TS = "2026-11-27T23:00:45.123456Z"
TS_SECONDS = 1795820445


def doc(i: int, ts: str = TS, **extra) -> Document:
    return Document(to_json({"@timestamp": ts, "event": {"kind": "event", "id": f"id-{i}"}, "n": i,
                             "text": "ünï ✓", **extra}), "event")


def digest(salt: bytes, hostname: str, nonce: bytes, key: str) -> str:
    return hashlib.sha512(salt + hostname.encode() + nonce + key.encode()).hexdigest()


def _entries(data: bytes) -> list:
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    return list(unpacker)


class FakeReceiver:
    """A Forward receiver on 127.0.0.1 in a thread. `ack` decides the answer to each transport message:
    'right', 'wrong', 'none' (say nothing), 'close' (hang up). With shared_key it starts with HELO."""

    def __init__(self, ack: str = "right", shared_key: str | None = None, pong: str = "right",
                 auth_salt: bytes = b"", server_hostname: str = "fake-server"):
        self.ack, self.shared_key, self.pong = ack, shared_key, pong
        self.auth_salt, self.server_hostname = auth_salt, server_hostname
        self.messages: list = []          # transport messages, decoded (entries left as bytes)
        self.raw: list[bytes] = []        # the bytes of each connection
        self.pings: list = []
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(0.1)
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            self.connections += 1
            with conn:
                try:
                    self._handle(conn)
                except OSError:
                    pass

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(0.05)                 # short: close() is seen at once
        raw = bytearray()
        self.raw.append(raw)
        unpacker = msgpack.Unpacker(raw=False)
        nonce = b"\x01\x02nonce-bytes\xff\x00"
        if self.shared_key is not None:
            conn.sendall(msgpack.packb(["HELO", {"nonce": nonce, "auth": self.auth_salt, "keepalive": True}],
                                       use_bin_type=True))
        authenticated = self.shared_key is None
        while not self._stop:
            try:
                data = conn.recv(65536)
            except socket.timeout:
                continue
            if not data:
                return
            raw += data
            unpacker.feed(data)
            for message in unpacker:
                if not authenticated:
                    if message[0] != "PING":
                        return                            # as Fluent does: data before the handshake
                    self.pings.append(message)
                    _, hostname, salt, client_digest, user, password = message
                    salt_b = salt.encode() if isinstance(salt, str) else salt
                    ok = client_digest == digest(salt_b, hostname, nonce, self.shared_key)
                    server_digest = digest(salt_b, self.server_hostname, nonce, self.shared_key)
                    if self.pong == "bad_digest":
                        server_digest = digest(salt_b, self.server_hostname, nonce, "another key")
                    reason = "" if ok else "shared key mismatch"
                    conn.sendall(msgpack.packb(["PONG", ok, reason, self.server_hostname,
                                                server_digest if ok else ""], use_bin_type=True))
                    if not ok:
                        return
                    authenticated = True
                    continue
                self.messages.append(message)
                chunk = message[2].get("chunk")
                if self.ack == "right":
                    conn.sendall(msgpack.packb({"ack": chunk}))
                elif self.ack == "wrong":
                    conn.sendall(msgpack.packb({"ack": "bm90IHRoaXMgb25l"}))
                elif self.ack == "close":
                    return

    def close(self) -> None:
        self._stop = True
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def receiver_factory():
    made = []

    def make(**kwargs) -> FakeReceiver:
        r = FakeReceiver(**kwargs)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


# --- pure formatting ---------------------------------------------------------------------------------

def test_event_time_is_ext_0_with_seconds_and_nanoseconds_big_endian():
    et = event_time(TS)
    assert et.code == 0 and et.data == struct.pack(">II", TS_SECONDS, 123_456_000)
    assert msgpack.packb(et)[:2] == b"\xd7\x00"                 # fixext 8, type 0
    assert struct.unpack(">II", event_time("2026-11-27T23:00:45Z").data) == (TS_SECONDS, 0)
    assert struct.unpack(">II", event_time("2026-11-27T23:00:45.123456789999Z").data) == (TS_SECONDS, 123456789)
    assert struct.unpack(">II", event_time("2026-11-28T00:00:45.5+01:00").data) == (TS_SECONDS, 500_000_000)
    for bad in (None, 12, "", "yesterday", "2026-13-27T23:00:45Z", "2026-11-27T23:00:45.12x4Z",
                "1969-12-31T23:59:59Z", "2026-11-27T23:00:45"):
        assert event_time(bad) is None, bad


def test_pack_entries_concatenates_time_record_pairs_and_rejects_non_maps():
    docs = [doc(0), doc(1, ts="not a time"), Document("[1, 2]", "event"), Document("{oops", "event"), doc(2)]
    before = time.time()
    entries, size, rejected = pack_entries(docs)
    assert size == 3
    assert [(d.json, reason) for d, reason in rejected] == [("[1, 2]", "not_a_map"), ("{oops", "bad_json")]
    decoded = _entries(entries)
    assert len(decoded) == 3
    for (et, record), d in zip(decoded, [docs[0], docs[1], docs[4]]):
        assert isinstance(et, msgpack.ExtType) and et.code == 0 and len(et.data) == 8
        assert record == json.loads(d.json)                     # a map, equal to the document
    assert struct.unpack(">II", decoded[0][0].data) == (TS_SECONDS, 123_456_000)
    assert abs(struct.unpack(">II", decoded[1][0].data)[0] - before) < 5     # no @timestamp: now


def test_an_integer_beyond_64_bits_is_rejected_not_fatal():
    huge = Document('{"@timestamp":"' + TS + '","n":123456789012345678901234567890}', "event")
    entries, size, rejected = pack_entries([huge, doc(1)])
    assert size == 1 and rejected == [(huge, "unencodable")]
    assert _entries(entries)[0][1]["n"] == 1


def test_a_lone_surrogate_is_replaced_not_fatal():
    bad = Document('{"@timestamp":"' + TS + '","process":{"name":"a\udcffb"}}', "event")
    entries, size, rejected = pack_entries([bad])
    assert size == 1 and not rejected
    assert _entries(entries)[0][1]["process"]["name"] == "a?b"


def test_packed_forward_layout_and_compressed_variant():
    entries, size, _ = pack_entries([doc(i) for i in range(3)])
    message = forward_message("eptrace", entries, size, "Y2h1bms=")
    assert message[0] == 0x93                                   # fixarray of 3
    tag, packed, option = msgpack.unpackb(message, raw=False)
    assert tag == "eptrace" and packed == entries and option == {"chunk": "Y2h1bms=", "size": 3}
    # the entries travel as bin (0xc4/0xc5/0xc6), not str: Fluent's decoders rely on it
    assert message[1 + len(msgpack.packb("eptrace"))] in (0xc4, 0xc5, 0xc6)
    tag, packed, option = msgpack.unpackb(forward_message("t", entries, size, "c", compress=True), raw=False)
    assert option == {"chunk": "c", "size": 3, "compressed": "gzip"} and gzip.decompress(packed) == entries


# --- over a socket -----------------------------------------------------------------------------------------

def test_one_packed_forward_message_per_batch_with_a_unique_chunk(receiver_factory):
    r = receiver_factory()
    sender = ForwardSender("127.0.0.1", r.port, tag="eptrace.test")
    docs = [doc(i) for i in range(10)]
    try:
        assert sender.send(docs[:4]) is None
        assert sender.send(docs[4:]) is None
        assert sender.send([]) is None
    finally:
        sender.close()
    assert len(r.messages) == 2 and r.connections == 1 and sender.connects == 1 and sender.acks == 2
    chunks = [m[2]["chunk"] for m in r.messages]
    assert len(set(chunks)) == 2 and all(len(base64.b64decode(c, validate=True)) == 16 for c in chunks)
    got = []
    for (tag, entries, option), n in zip(r.messages, (4, 6)):
        assert tag == "eptrace.test" and isinstance(entries, bytes) and option["size"] == n
        assert "compressed" not in option
        got += [record for _, record in _entries(entries)]
    assert got == [json.loads(d.json) for d in docs]


def test_compressed_packed_forward(receiver_factory):
    r = receiver_factory()
    sender = parse_forward_spec(f"forward://127.0.0.1:{r.port}?compress=gzip")
    docs = [doc(i) for i in range(50)]
    sender.send(docs)
    sender.close()
    (tag, packed, option), = r.messages
    assert tag == "eptrace" and option["compressed"] == "gzip" and option["size"] == 50
    assert [rec for _, rec in _entries(gzip.decompress(packed))] == [json.loads(d.json) for d in docs]


def test_rejected_documents_are_returned_and_the_rest_sent(receiver_factory):
    r = receiver_factory()
    sender = ForwardSender("127.0.0.1", r.port)
    bad = Document('"just a string"', "event")
    assert sender.send([doc(0), bad, doc(1)]) == [(bad, "not_a_map")]
    assert sender.send([bad]) == [(bad, "not_a_map")]           # nothing to send: no message at all
    sender.close()
    assert len(r.messages) == 1 and r.messages[0][2]["size"] == 2


def test_a_wrong_ack_is_a_send_error(receiver_factory):
    r = receiver_factory(ack="wrong")
    sender = ForwardSender("127.0.0.1", r.port)
    with pytest.raises(SendError, match="acknowledged chunk 'bm90IHRoaXMgb25l', not the one sent"):
        sender.send([doc(0)])
    sender.close()


def test_no_ack_in_time_is_a_send_error_and_the_next_send_reconnects(receiver_factory):
    r = receiver_factory(ack="none")
    sender = ForwardSender("127.0.0.1", r.port, ack_timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(SendError, match=r"no ack from the receiver within 0.3 s"):
        sender.send([doc(0)])
    assert 0.25 < time.monotonic() - started < 3
    r.ack = "right"
    sender.send([doc(0)])                                       # the retry, on a new connection
    sender.close()
    assert sender.connects == 2 and len(r.messages) == 2
    assert r.messages[0][2]["chunk"] != r.messages[1][2]["chunk"]


def test_a_receiver_that_hangs_up_before_the_ack(receiver_factory):
    r = receiver_factory(ack="close")
    sender = ForwardSender("127.0.0.1", r.port)
    with pytest.raises(SendError, match="closed the connection before the ack"):
        sender.send([doc(0)])
    sender.close()


def test_connection_refused_is_a_send_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sender = ForwardSender("127.0.0.1", port)
    with pytest.raises(SendError, match="refused"):
        sender.send([doc(0)])


def test_an_idle_connection_closed_by_the_receiver_is_replaced_before_sending(receiver_factory):
    r = receiver_factory()
    sender = ForwardSender("127.0.0.1", r.port)
    sender.send([doc(0)])
    r.close()                                      # closes its end of the connection too (thread exits)
    r2 = receiver_factory()
    sender.port = r2.port                          # "restarted" elsewhere: the old socket is at EOF
    time.sleep(0.2)
    sender.send([doc(1)])
    sender.close()
    assert sender.connects == 2 and len(r2.messages) == 1


# --- shared key handshake ------------------------------------------------------------------------------

def test_shared_key_handshake(receiver_factory):
    r = receiver_factory(shared_key="s3cret")
    sender = ForwardSender("127.0.0.1", r.port, shared_key="s3cret", hostname="eptrace-host")
    sender.send([doc(0)])
    sender.send([doc(1)])
    sender.close()
    assert len(r.messages) == 2 and sender.connects == 1
    (ping,) = r.pings
    assert ping[0] == "PING" and ping[1] == "eptrace-host" and ping[4:] == ["", ""]
    assert isinstance(ping[2], str) and len(ping[2]) == 32 and len(ping[3]) == 128     # hex salt, sha512 hex


def test_wrong_shared_key_is_a_clear_send_error(receiver_factory):
    r = receiver_factory(shared_key="s3cret")
    sender = ForwardSender("127.0.0.1", r.port, shared_key="guess")
    with pytest.raises(SendError, match="refused the shared-key handshake: shared key mismatch"):
        sender.send([doc(0)])
    sender.close()
    assert r.messages == []


def test_a_pong_digest_that_does_not_match_is_refused(receiver_factory):
    r = receiver_factory(shared_key="s3cret", pong="bad_digest")
    sender = ForwardSender("127.0.0.1", r.port, shared_key="s3cret")
    with pytest.raises(SendError, match="PONG digest does not match"):
        sender.send([doc(0)])
    sender.close()
    assert r.messages == []


def test_handshake_mismatches_are_explained(receiver_factory):
    secured = receiver_factory(shared_key="s3cret")
    with pytest.raises(SendError, match="asks for the shared-key handshake.*give shared_key="):
        ForwardSender("127.0.0.1", secured.port).send([doc(0)])
    open_ = receiver_factory()
    with pytest.raises(SendError, match="no HELO from the receiver within 0.3 s"):
        ForwardSender("127.0.0.1", open_.port, shared_key="s3cret", timeout_s=0.3).send([doc(0)])
    users = receiver_factory(shared_key="s3cret", auth_salt=b"salt")
    with pytest.raises(SendError, match="user name and password"):
        ForwardSender("127.0.0.1", users.port, shared_key="s3cret").send([doc(0)])
    same = receiver_factory(shared_key="s3cret", server_hostname="twin")
    with pytest.raises(SendError, match="has our hostname 'twin'"):
        ForwardSender("127.0.0.1", same.port, shared_key="s3cret", hostname="twin").send([doc(0)])


# --- through the delivery core ---------------------------------------------------------------------------

def test_delivery_retries_until_acked(receiver_factory, tmp_path, monkeypatch):
    monkeypatch.setattr(delivery, "BACKOFF_FIRST_S", 0.01)
    monkeypatch.setattr(delivery, "BACKOFF_MAX_S", 0.05)
    r = receiver_factory(ack="none")
    out = DeliveryOutput(ForwardSender("127.0.0.1", r.port, ack_timeout_s=0.2), spool_dir=tmp_path)
    for i in range(100):
        out.write(doc(i))
    wait_for(lambda: len(r.messages) >= 2)                    # sent, not acked, sent again
    r.ack = "right"
    wait_for(lambda: out.sent == 100)
    out.close()
    ids = {rec["event"]["id"] for m in r.messages for _, rec in _entries(m[1])}
    assert ids == {f"id-{i}" for i in range(100)} and out.dropped == {}


# --- spec --------------------------------------------------------------------------------------------------

def test_spec_parsing():
    s = parse_forward_spec("forward://127.0.0.1:24224")
    assert (s.name, s.host, s.port, s.tag, s.compress, s._ssl_context) == (
        "forward://127.0.0.1:24224", "127.0.0.1", 24224, "eptrace", False, None)
    s = parse_forward_spec("forward://[::1]:24224?tag=sec.net&shared_key=a%2Bb%26c&compress=gzip&tls=1")
    assert (s.name, s.host, s.tag, s._shared_key, s.compress) == (
        "forward://[::1]:24224?tag=sec.net", "::1", "sec.net", "a+b&c", True)
    assert s._ssl_context is not None


@pytest.mark.parametrize("spec, message", [
    ("forward://127.0.0.1", "HOST:PORT is required"),
    ("forward://127.0.0.1:0", "HOST:PORT is required"),
    ("forward://127.0.0.1:70000", "out of range"),
    ("forward://::1:24224", "IPv6 address goes in brackets"),
    ("forward://u:p@h:1", "no user or password"),
    ("forward://h:1/path", "no path"),
    ("fluent://h:1", "unknown form"),
    ("forward://h:1?tag=", "option tag needs a value"),
    ("forward://h:1?tag=a%20b", "printable ASCII"),
    ("forward://h:1?color=red", "unknown option 'color'"),
    ("forward://h:1?tag=a&tag=b", "given twice"),
    ("forward://h:1?compress=zstd", "compress must be gzip"),
    ("forward://h:1?tls=maybe", "tls must be 1 or 0"),
    ("forward://h:1?ca=/etc/hosts", "for TLS only"),
    ("forward://h:1?tls=1&ca=/nonexistent/ca.pem", "cannot read the CA file"),
    ("forward://h:1?tls=1&ca=/etc/hostname", "cannot load the CA file|holds no CA certificate"),
    ("forward://h:1?tls=1&key=/etc/hostname", "client key was given without a client certificate"),
])
def test_bad_specs_are_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_forward_spec(spec)
    assert "accepted forms" in str(info.value) or "forward output" in str(info.value)


def test_the_shared_key_is_never_in_an_error():
    for spec in ("forward://h?shared_key=TOPSECRET", "forward://h:1?shared_key=TOPSECRET&x=1",
                 "forward://h:1?shared_key=TOPSECRET&&"):
        with pytest.raises(ValueError) as info:
            parse_forward_spec(spec)
        assert "TOPSECRET" not in str(info.value) and "shared_key=***" in str(info.value)
    assert "forward://" in ACCEPTED_FORMS

"""RELP framing and the sender's protocol handling, against a scripted receiver on loopback."""
import socket
import threading

import pytest

from tracer.outputs.relp import FrameReader, RelpError, RelpSender, parse_relp_spec, relp_frame, rsp_status
from tracer.outputs.senders import SendError
from tracer.schema import Document


def test_frames():
    assert relp_frame(1, b"open", b"relp_version=0") == b"1 open 14 relp_version=0\n"
    assert relp_frame(7, b"close") == b"7 close 0\n"
    reader = FrameReader()
    stream = b"1 rsp 6 200 OK\n2 rsp 0\n3 rsp 10 500 no\nway\n0 serverclose 0\n"
    for i in range(0, len(stream), 3):                 # in pieces, as TCP may deliver them
        reader.feed(stream[i:i + 3])
    frames = []
    while (frame := reader.next()) is not None:
        frames.append(frame)
    assert frames == [(1, b"rsp", b"200 OK"), (2, b"rsp", b""), (3, b"rsp", b"500 no\nway"), (0, b"serverclose", b"")]
    assert rsp_status(b"200 OK\nrelp_version=0") == (200, "OK")
    for bad in (b"x rsp 1 a\n", b"1 rsp 3 abcd\n", b"1" * 40):
        reader = FrameReader()
        reader.feed(bad)
        with pytest.raises(RelpError):
            reader.next()


def scripted_receiver(replies):
    """A one-connection receiver: answers open, then calls replies(txnr, index) for each syslog frame."""
    listener = socket.create_server(("127.0.0.1", 0))
    received = []

    def serve():
        try:
            converse()
        except OSError:          # the sender gave up the session (a reset): what the test wanted
            pass

    def converse():
        conn, _ = listener.accept()
        reader = FrameReader()
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                reader.feed(data)
                while (frame := reader.next()) is not None:
                    txnr, command, payload = frame
                    if command == b"open":
                        conn.sendall(relp_frame(txnr, b"rsp", b"200 OK\nrelp_version=0\ncommands=syslog"))
                    elif command == b"syslog":
                        received.append(payload)
                        reply = replies(txnr, len(received) - 1)
                        if reply is None:
                            return                  # hang up
                        conn.sendall(reply)
                    elif command == b"close":
                        conn.sendall(relp_frame(txnr, b"rsp"))
                        return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, received, thread


def docs(n):
    return [Document('{"@timestamp":"2026-01-01T00:00:00.000000Z","event":{"kind":"event","id":"%d"}}' % i, "event")
            for i in range(n)]


def test_a_batch_larger_than_the_window_is_acknowledged_frame_by_frame():
    listener, received, thread = scripted_receiver(lambda txnr, i: relp_frame(txnr, b"rsp", b"200 OK"))
    sender = RelpSender("127.0.0.1", listener.getsockname()[1], window=16)
    sender.send(docs(100))
    sender.close()
    thread.join(5)
    listener.close()
    assert sender.acked == 100 and len(received) == 100
    assert received[5].startswith(b"<110>1 2026-01-01T00:00:00.000000Z ") and received[5].endswith(b'"id":"5"}}')


@pytest.mark.parametrize("reply, match", [
    (lambda txnr, i: None if i == 10 else relp_frame(txnr, b"rsp", b"200 OK"), "closed the connection"),
    (lambda txnr, i: relp_frame(txnr, b"rsp", b"500 full" if i == 3 else b"200 OK"), "refused frame 5: 500 full"),
    (lambda txnr, i: relp_frame(txnr + 1, b"rsp", b"200 OK"), "expected"),
    (lambda txnr, i: relp_frame(0, b"serverclose"), "serverclose"),
])
def test_an_unacknowledged_batch_is_a_send_error(reply, match):
    listener, _, thread = scripted_receiver(reply)
    sender = RelpSender("127.0.0.1", listener.getsockname()[1], timeout_s=3)
    with pytest.raises(SendError, match=match):
        sender.send(docs(50))
    sender.close()
    listener.close()


def test_spec_parsing():
    assert parse_relp_spec("syslog+relp://127.0.0.1:2514").name == "syslog+relp://127.0.0.1:2514"
    for bad in ("syslog+relp://127.0.0.1", "syslog+relp://h:1/x", "syslog+relp://h:1?ca=/etc/hosts",
                "syslog+relp://h:1?tls=maybe", "syslog+relp://h:1?foo=1"):
        with pytest.raises(ValueError, match="accepted forms|tls must be|TLS only"):
            parse_relp_spec(bad)

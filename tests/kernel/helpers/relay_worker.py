"""A custom reverse relay, as an agent would write one (the tests copy it under an innocuous name).

relay_worker.py MODE HOST PORT LOCAL_PORT [CA_FILE]
It connects out to HOST:PORT (MODE tcp, tls, ws: TCP, TLS, WebSocket inside an HTTP upgrade; udp: a
datagram socket), and for every message the remote sends, connects to 127.0.0.1:LOCAL_PORT, passes the
message on, and sends the local answer back.
"""
import base64
import os
import socket
import ssl
import struct
import sys

mode, host, port, local_port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
print("pid", os.getpid(), flush=True)


def ask_local(data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", local_port), timeout=10) as s:
        s.sendall(data)
        return s.recv(65536)


def ws_frame(payload: bytes) -> bytes:       # client to server: masked
    mask = os.urandom(4)
    head = bytes([0x82, 0x80 | len(payload)]) if len(payload) < 126 else \
        bytes([0x82, 0x80 | 126]) + struct.pack("!H", len(payload))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def ws_read(f) -> bytes | None:
    head = f.read(2)
    if len(head) < 2:
        return None
    n = head[1] & 0x7F
    if n == 126:
        n = struct.unpack("!H", f.read(2))[0]
    return f.read(n)


if mode == "udp":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((host, port))
    s.send(b"hello")
    while True:
        s.send(ask_local(s.recv(65536)))

conn = socket.create_connection((host, port))
if mode == "tls":
    conn = ssl.create_default_context(cafile=sys.argv[5]).wrap_socket(conn, server_hostname=host)
if mode == "ws":
    key = base64.b64encode(os.urandom(16)).decode()
    conn.sendall(f"GET /updates HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    f = conn.makefile("rb")
    assert b" 101 " in f.readline()
    while f.readline() not in (b"\r\n", b""):
        pass
    while (msg := ws_read(f)) is not None:
        conn.sendall(ws_frame(ask_local(msg)))
    sys.exit(0)
while msg := conn.recv(65536):
    conn.sendall(ask_local(msg))

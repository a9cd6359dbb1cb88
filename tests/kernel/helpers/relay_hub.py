"""The outside end of a reverse relay, on the test host: relay_hub.py MODE HOST PORT CLIENT_PORT [CERT KEY]

Waits for relay_worker.py to connect (or, for udp, to say hello) on HOST:PORT, prints "attached", then
serves outside clients on 127.0.0.1:CLIENT_PORT: each client's request goes to the worker, and the answer
back to the client.
"""
import base64
import hashlib
import socket
import ssl
import struct
import sys

mode, host, port, client_port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def ws_frame(payload: bytes) -> bytes:       # server to client: unmasked
    head = bytes([0x82, len(payload)]) if len(payload) < 126 else bytes([0x82, 126]) + struct.pack("!H", len(payload))
    return head + payload


def ws_read(f) -> bytes:
    head = f.read(2)
    n = head[1] & 0x7F
    if n == 126:
        n = struct.unpack("!H", f.read(2))[0]
    mask = f.read(4) if head[1] & 0x80 else b"\0\0\0\0"
    return bytes(b ^ mask[i % 4] for i, b in enumerate(f.read(n)))


clients = socket.create_server(("127.0.0.1", client_port))
if mode == "udp":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, port))
    print("listening", flush=True)
    _, worker = s.recvfrom(100)
    send, recv = (lambda data: s.sendto(data, worker)), (lambda: s.recvfrom(65536)[0])
else:
    server = socket.create_server((host, port))
    print("listening", flush=True)
    conn, _ = server.accept()
    if mode == "tls":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(sys.argv[5], sys.argv[6])
        conn = ctx.wrap_socket(conn, server_side=True)
    send, recv = conn.sendall, (lambda: conn.recv(65536))
    if mode == "ws":
        f = conn.makefile("rb")
        headers = list(iter(f.readline, b"\r\n"))     # the whole request, so frames start after it
        key = next(line.split(b":", 1)[1].strip() for line in headers if line.lower().startswith(b"sec-websocket-key"))
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()
        conn.sendall(f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Accept: {accept}\r\n\r\n".encode())
        send, recv = (lambda data: conn.sendall(ws_frame(data))), (lambda: ws_read(f))
print("attached", flush=True)
while True:
    client, _ = clients.accept()
    with client:
        send(client.recv(65536))
        client.sendall(recv())

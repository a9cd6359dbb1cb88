"""A forward HTTP proxy, as a sandbox might run one for its tools: forward_proxy.py PORT

Each client connection: read the request head (absolute URI), connect to its host, pass the request on
unchanged, and stream the answer back until the server closes. The local client speaks first.
"""
import socket
import sys
import threading
from urllib.parse import urlsplit


def serve(client: socket.socket) -> None:
    with client:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(65536)
            if not chunk:
                return
            head += chunk
        url = urlsplit(head.split(b" ", 2)[1].decode())
        with socket.create_connection((url.hostname, url.port or 80), timeout=10) as upstream:
            upstream.sendall(head)
            while data := upstream.recv(65536):
                client.sendall(data)


server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("proxying", flush=True)
while True:
    threading.Thread(target=serve, args=(server.accept()[0],), daemon=True).start()

"""A local service in the sandbox: answer_service.py PORT answers each request with b"answer:" + request."""
import socket
import sys
import threading


def serve(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(b"answer:" + data)


server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("serving", flush=True)
while True:
    threading.Thread(target=serve, args=(server.accept()[0],), daemon=True).start()

"""make demo: trace one episode against a throwaway test host, then remove everything.

The test host lives in a network namespace (tracer.testbed) at 198.51.100.1; the
episode runs in a sandbox namespace whose only link leads there, so the demo
sends nothing off this machine.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

from .schema import format_human
from .testbed import HOST_IP, PYTHON, TestNetwork

UDP_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(data, peer)
"""

# What the demo episode does: an HTTP download, a DNS-style UDP query, a local listener.
EPISODE = f"""
set -e
curl -s -o /dev/null http://{HOST_IP}:8080/
{PYTHON} - <<'PY'
import socket
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(2)
u.sendto(b"\\x12\\x34 example query", ("{HOST_IP}", 53))
u.recvfrom(2048)
listener = socket.create_server(("127.0.0.1", 0))
client = socket.create_connection(listener.getsockname())
conn, _ = listener.accept()
client.sendall(b"hello over a local listener")
conn.recv(100)
for s in (client, conn, listener, u):
    s.close()
PY
"""


def _wait_ready(proc: subprocess.Popen, what: str) -> None:
    line = proc.stdout.readline()
    if "ready" not in line and "Serving" not in line:
        raise SystemExit(f"demo: the test host's {what} did not start: {proc.stderr.read()}")


def main() -> int:
    if os.geteuid() != 0:
        print("demo: eptrace needs root: sudo make demo", file=sys.stderr)
        return 4
    episode = f"demo-{secrets.token_hex(3)}"
    with TestNetwork() as net, tempfile.TemporaryDirectory() as www:
        Path(www, "index.html").write_text("<h1>test host</h1>\n" * 500)
        http = net.run_in_host([PYTHON, "-u", "-m", "http.server", "--bind", HOST_IP, "--directory", www, "8080"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        udp = net.run_in_host([PYTHON, "-u", "-c", UDP_SERVER, HOST_IP], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
        _wait_ready(http, "HTTP server")
        _wait_ready(udp, "UDP server")
        print(f"demo: test host {HOST_IP} is up (HTTP :8080, UDP :53) in namespace {net.host_ns}")
        print(f"demo: running episode {episode} in the sandbox namespace {net.sandbox_ns}:\n")
        tracer = subprocess.Popen([sys.executable, "-m", "tracer", "run", "--episode", episode, "--grace", "5",
                                   "--", *net.sandbox_prefix(), "/bin/sh", "-c", EPISODE],
                                  stdout=subprocess.PIPE, text=True)
        for line in tracer.stdout:
            print("  " + format_human(json.loads(line)), flush=True)
        status = tracer.wait()
    print(f"\ndemo: episode {episode} finished with status {status}; the test network and the "
          "episode cgroup are removed.")
    print("demo: the raw stream is ECS JSON, one document per line: "
          f"sudo eptrace run --episode my-ep -- curl -s http://{HOST_IP}/ (with a host to reach)")
    return status


if __name__ == "__main__":
    sys.exit(main())

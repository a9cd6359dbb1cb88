"""make demo: trace one episode against a throwaway test host, then remove everything.

The test host lives in a network namespace (tracer.testbed) at 198.51.100.1; the
episode runs in a sandbox namespace whose only link leads there, so the demo
sends nothing off this machine. The episode ends with an ssh -R reverse tunnel,
which eptrace catches.
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
from .testbed import HOST_IP, PYTHON, TestNetwork, http_server, sshd, udp_echo_server


def episode_script(ssh_argv: list[str]) -> str:
    """What the demo episode does: an HTTP download, a DNS-style UDP query, a local
    listener, and then the escape: an ssh -R reverse tunnel to the test host."""
    return f"""
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
timeout 3 {" ".join(ssh_argv)} || true
"""


def main() -> int:
    if os.geteuid() != 0:
        print("demo: eptrace needs root: sudo make demo", file=sys.stderr)
        return 4
    episode = f"demo-{secrets.token_hex(3)}"
    with TestNetwork() as net, tempfile.TemporaryDirectory() as www:
        Path(www, "index.html").write_text("<h1>test host</h1>\n" * 500)
        with http_server(net, 8080, www), udp_echo_server(net, 53), sshd(net, 2222) as ssh_server:
            print(f"demo: test host {HOST_IP} is up (HTTP :8080, UDP :53, sshd :2222) in namespace {net.host_ns}")
            print(f"demo: running episode {episode} in the sandbox namespace {net.sandbox_ns}:\n")
            script = episode_script(ssh_server.ssh_argv("-N", "-R", "9000:127.0.0.1:8000"))
            tracer = subprocess.Popen([sys.executable, "-m", "tracer", "run", "--episode", episode, "--grace", "5",
                                       "--", *net.sandbox_prefix(), "/bin/sh", "-c", script],
                                      stdout=subprocess.PIPE, text=True)
            for line in tracer.stdout:
                doc = json.loads(line)
                mark = ">>" if doc["event"]["kind"] == "alert" else "  "
                print(f"{mark} {format_human(doc)}", flush=True)
            status = tracer.wait()
    print(f"\ndemo: episode {episode} finished with status {status} (the summary above, on stderr, is its "
          "verdict); the test network and the episode cgroup are removed.")
    return status


if __name__ == "__main__":
    sys.exit(main())

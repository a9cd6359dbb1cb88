"""The per-packet programs keep each socket's copy of its episode's policy (packets.c: packet_policy), re-read
when the loader has written the policies map since: a policy written while a flow is open holds for that
flow's very next packet."""
from __future__ import annotations

import subprocess

import pytest

import harness
from harness import PYTHON
from tracer.kernel.loader import Probes

# One open loopback connection; for each line on stdin, 100 bytes one way: "ok" once they arrive, "dropped"
# when they do not within a second.
EXCHANGE = r'''
import socket, sys
listener = socket.create_server(("127.0.0.1", 0))
client = socket.create_connection(listener.getsockname())
server, _ = listener.accept()
server.settimeout(1.0)
print("ready", flush=True)
for line in sys.stdin:
    client.sendall(b"x" * 100)
    try:
        print("ok" if server.recv(100) else "eof", flush=True)
    except socket.timeout:
        print("dropped", flush=True)
'''


@pytest.fixture
def probes():
    p = Probes()
    yield p
    p.close()


def exchange(proc: subprocess.Popen) -> str:
    proc.stdin.write("go\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def test_containment_stops_an_open_flow_at_its_next_packet(probes, episode_cgroup):
    cg = episode_cgroup("packet-policy")
    cgid = probes.attach(cg)                 # no policy: the sockets' copies say so
    proc = harness.spawn_in_cgroup(cg, [PYTHON, "-u", "-c", EXCHANGE], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        assert [exchange(proc) for _ in range(3)] == ["ok"] * 3
        denied_before = probes.denied().get(cgid, 0)
        probes.contain(cgid, None)
        assert exchange(proc) == "dropped"
        assert probes.denied().get(cgid, 0) > denied_before
    finally:
        proc.kill()
        proc.wait()

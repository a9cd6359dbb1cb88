"""Reverse tunnels caught by behaviour: relays whose local leg mirrors their outside leg (issue 8).

Custom relays with an innocuous name (worker.py) over plain TCP, TLS, a WebSocket upgrade and UDP, and an
SSH library's reverse forward (paramiko), each used twice from the test host, must give reverse_tunnel
under the default long_flow_seconds; look-alikes (a forward proxy, a server-push stream, a download beside
local HTTP tests) must give no alert at all. Times to alert are printed as TIME-TO-ALERT lines (pytest -s),
measured from the start of the act (the first outside use) and from the second relayed exchange.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

import harness
from eptrace_helpers import alerts, dump, get, select, wait_until
from harness import HOST_IP, PYTHON
from test_detection import EpisodeRun, assert_alert, assert_no_alerts, parse_timestamp, rule_counts
from tracer.testbed import _peer

HELPERS = Path(__file__).parent / "helpers"
HUB_PORT, CLIENT_PORT, SERVICE_PORT = 7443, 9100, 8000
# Set to a directory to keep each scenario's capture there (tests/fixtures/relay_*.capture were made so).
CAPTURES = os.environ.get("EPTRACE_RELAY_CAPTURES")


def capture_path(tmp_path: Path, name: str) -> Path:
    return Path(CAPTURES or tmp_path) / f"relay_{name}.capture"
USES = 2

# On the test host: an outside user of the tunnel. Connects to CLIENT_PORT on the host's loopback (where the
# hub or sshd listens), sends a request, prints the answer.
OUTSIDE_USER = r'''
import socket, sys
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10) as s:
    s.sendall(sys.argv[2].encode())
    print(s.recv(1000).decode(), flush=True)
'''


def use_from_outside(net, port: int, request: str) -> str:
    user = net.run_in_host([PYTHON, "-u", "-c", OUTSIDE_USER, port, request], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    out, err = user.communicate(timeout=20)
    assert user.returncode == 0, err
    return out.strip()


def make_test_ca(tmp: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 198.51.100.1, made by openssl for this test: (ca, cert, key)."""
    ca_key, ca, key, csr, cert, ext = (tmp / n for n in ("ca.key", "ca.pem", "srv.key", "srv.csr", "srv.pem", "ext"))
    ssl_ = ["openssl"]
    subprocess.run(ssl_ + ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                           "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=eptrace test CA"],
                   check=True, capture_output=True)
    subprocess.run(ssl_ + ["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                           "-keyout", key, "-out", csr, "-subj", f"/CN={HOST_IP}"], check=True, capture_output=True)
    ext.write_text(f"subjectAltName=IP:{HOST_IP}\n")
    subprocess.run(ssl_ + ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
                           "-out", cert, "-days", "2", "-extfile", ext], check=True, capture_output=True)
    return ca, cert, key


def act(net, run: EpisodeRun, port: int) -> tuple[float, float]:
    """Use the tunnel USES times from outside, 2 s apart: (wall time of the start, of the last answer)."""
    start = time.time()
    for i in range(USES):
        if i:
            time.sleep(2)
        answer = use_from_outside(net, port, f"from-host-request-{i}")
        assert answer == f"answer:from-host-request-{i}", (answer, run.err.text()[-2000:])
    return start, time.time()


def check_relay_alert(run: EpisodeRun, docs: list[dict], scenario: str, pid: int, start: float, last: float,
                      mentions: list[str]) -> None:
    tunnel = alerts(docs, "reverse_tunnel")
    assert len(tunnel) == 1, dump(alerts(docs))
    alert = tunnel[0]
    outside = select(docs, ("connection_established", "connection_attempted", "udp_sent"), pid=pid,
                     destination__ip=HOST_IP)
    assert outside, dump(docs)
    assert_alert(alert, "reverse_tunnel", run.episode, pid, mentions)
    assert "mirrored" in get(alert, "message"), get(alert, "message")
    # The evidence is both flows: the outside one first (source and destination), then the local one.
    assert (get(alert, "destination.ip"), get(alert, "destination.port")) == (HOST_IP, get(outside[0], "destination.port"))
    cids = get(alert, "network.community_id")
    cids = cids if isinstance(cids, list) else [cids]
    outside_cid = get(outside[0], "network.community_id")     # none for a UDP socket with no local address known
    assert cids and (outside_cid is None or outside_cid in cids), (alert, outside[0])
    print("\nMESSAGE", get(alert, "message"))
    at, seen = parse_timestamp(alert["@timestamp"]), run.first_seen[get(alert, "event.id")]
    print(f"\nTIME-TO-ALERT {scenario}: {at - start:.3f} s from the start of the act (first outside use), "
          f"{at - last:+.3f} s after the last answer of the {USES} uses; in the file {seen - start:.3f} s after the "
          f"start", flush=True)
    # The alert is about the second exchange: it comes before the act ends, give or take the answer's way out.
    assert at - last <= 2.0, f"alert {at - last:.3f} s after the second exchange: {get(alert, 'message')}"
    assert rule_counts(docs) == {"reverse_tunnel": 1}, dump(alerts(docs))


@pytest.mark.parametrize("mode", ["tcp", "tls", "ws", "udp"])
def test_custom_relay_used_twice_from_outside(net, tmp_path, mode):
    worker = tmp_path / "worker.py"
    shutil.copy(HELPERS / "relay_worker.py", worker)
    hub = [PYTHON, "-u", HELPERS / "relay_hub.py", mode, HOST_IP, HUB_PORT, CLIENT_PORT]
    extra = []
    if mode == "tls":
        ca, cert, key = make_test_ca(tmp_path)
        hub += [cert, key]
        extra = [ca]
    episode = f"ep-relay-{mode}"
    service = f"{PYTHON} -u {HELPERS / 'answer_service.py'} {SERVICE_PORT} &"
    script = f'{service} sleep 0.3; exec "$@"'
    with _peer(net, hub, f"relay hub ({mode})", lambda p: "listening\n" in p.stdout) as hub_peer:
        argv = net.sandbox_prefix() + ["/bin/sh", "-c", script, "sh", PYTHON, "-u", worker, mode, HOST_IP, HUB_PORT,
                                       SERVICE_PORT, *extra]
        with EpisodeRun(tmp_path, episode, argv, capture=capture_path(tmp_path, mode)) as run:
            pid = run.pid()
            wait_until(lambda: "attached\n" in hub_peer.stdout, 15, lambda: f"hub: {hub_peer.stderr}")
            time.sleep(0.5)
            start, last = act(net, run, CLIENT_PORT)
            run.wait_alert("reverse_tunnel", timeout=10)
            os.kill(pid, signal.SIGTERM)
            docs = run.finish(status=None)
    check_relay_alert(run, docs, f"reverse_tunnel custom relay over {mode}", pid, start, last,
                      [HOST_IP, str(HUB_PORT), f"127.0.0.1:{SERVICE_PORT}"])


# In the sandbox: an SSH library's reverse forward. Asks sshd to listen on its 127.0.0.1:PORT and relays each
# forwarded connection to the sandbox's 127.0.0.1:SERVICE, bytes both ways.
PARAMIKO_FORWARD = r'''
import os, select, socket, sys, threading
import paramiko
host, port, key, listen, service = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
print("pid", os.getpid(), flush=True)
client = paramiko.SSHClient()
client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
client.connect(host, port=port, username="root", key_filename=key, look_for_keys=False, allow_agent=False)
def pump(chan):
    with socket.create_connection(("127.0.0.1", service)) as local, chan:
        while True:
            ready, _, _ = select.select([local, chan], [], [], 30)
            if not ready:
                return
            src, dst = (local, chan) if local in ready else (chan, local)
            data = src.recv(65536)
            if not data:
                return
            dst.sendall(data)
def handler(chan, origin, server):
    threading.Thread(target=pump, args=(chan,), daemon=True).start()
transport = client.get_transport()
transport.request_port_forward("127.0.0.1", listen, handler)
print("forwarding", flush=True)
threading.Event().wait()
'''


def test_paramiko_reverse_forward_used_twice(net, tmp_path):
    script = tmp_path / "sync_agent.py"
    script.write_text(PARAMIKO_FORWARD)
    service = f"{PYTHON} -u {HELPERS / 'answer_service.py'} {SERVICE_PORT} &"
    with harness.sshd(net) as sshd:
        argv = net.sandbox_prefix() + ["/bin/sh", "-c", f'{service} sleep 0.3; exec "$@"', "sh", PYTHON, "-u",
                                       script, HOST_IP, sshd.port, sshd.client_key, CLIENT_PORT, SERVICE_PORT]
        with EpisodeRun(tmp_path, "ep-paramiko", argv, capture=capture_path(tmp_path, "paramiko")) as run:
            pid = run.pid()
            run.line("forwarding", timeout=30)
            time.sleep(0.5)
            start, last = act(net, run, CLIENT_PORT)
            run.wait_alert("reverse_tunnel", timeout=10)
            os.kill(pid, signal.SIGTERM)
            docs = run.finish(status=None)
    check_relay_alert(run, docs, "reverse_tunnel paramiko request_port_forward", pid, start, last,
                      [HOST_IP, str(sshd.port), f"127.0.0.1:{SERVICE_PORT}"])

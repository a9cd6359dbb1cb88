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


def use_twice_and_finish(net, run: EpisodeRun, ready) -> tuple[int, float, float, list[dict]]:
    """Once ready() returns, use the tunnel twice, wait for the alert, end the relay: (pid, act start, last
    answer, documents)."""
    pid = run.pid()
    ready()
    time.sleep(0.5)
    start, last = act(net, run, CLIENT_PORT)
    run.wait_alert("reverse_tunnel", timeout=10)
    os.kill(pid, signal.SIGTERM)
    return pid, start, last, run.finish(status=None)


def check_relay_alert(run: EpisodeRun, docs: list[dict], scenario: str, pid: int, start: float, last: float,
                      mentions: list[str], by: tuple[str, ...] = ("mirrored",)) -> None:
    """by: what the message must say the alert came from (one alert per process: the first reason wins)."""
    tunnel = alerts(docs, "reverse_tunnel")
    assert len(tunnel) == 1, dump(alerts(docs))
    alert = tunnel[0]
    outside = select(docs, ("connection_established", "connection_attempted", "udp_sent"), pid=pid,
                     destination__ip=HOST_IP)
    assert outside, dump(docs)
    assert_alert(alert, "reverse_tunnel", run.episode, pid, mentions)
    assert any(reason in get(alert, "message") for reason in by), get(alert, "message")
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
            pid, start, last, docs = use_twice_and_finish(net, run, lambda: wait_until(
                lambda: "attached\n" in hub_peer.stdout, 15, lambda: f"hub: {hub_peer.stderr}"))
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
            pid, start, last, docs = use_twice_and_finish(net, run, lambda: run.line("forwarding", timeout=30))
    check_relay_alert(run, docs, "reverse_tunnel paramiko request_port_forward", pid, start, last,
                      [HOST_IP, str(sshd.port), f"127.0.0.1:{SERVICE_PORT}"])


# ---- look-alikes: no alert of any rule -------------------------------------------------------------------

# On the test host: an HTTP server that takes the absolute URIs a proxy passes on unchanged (so that every
# byte the proxy relays keeps its size: the hardest case for telling a forward proxy from a relay).
ABSOLUTE_URI_SERVER = r'''
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
BODIES = {"small.txt": b"hello through the proxy\n", "big.bin": os.urandom(300_000)}
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = BODIES[self.path.rsplit("/", 1)[1]]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
server = ThreadingHTTPServer(("198.51.100.1", 8080), H)
print("listening", flush=True)
server.serve_forever()
'''


def test_forward_proxy_used_by_curl_is_no_tunnel(net, tmp_path):
    """The local client connects and speaks first, the proxy connects out after it: a forward proxy."""
    curl = "curl -sS -x http://127.0.0.1:3128 -o /dev/null -w '%{http_code}\\n'"
    urls = [f"http://{HOST_IP}:8080/{name}" for name in ("small.txt", "big.bin", "small.txt", "big.bin")]
    # back to back: each curl connects right after the previous answer
    script = (f"{PYTHON} -u {HELPERS / 'forward_proxy.py'} 3128 & sleep 0.5; "
              + "; ".join(f"{curl} {u}" for u in urls) + "; kill $!")
    with harness.python_server(net, ABSOLUTE_URI_SERVER, 8080, banner="listening\n"):
        with EpisodeRun(tmp_path, "ep-forward-proxy", net.sandbox_prefix() + ["/bin/sh", "-c", script],
                        capture=capture_path(tmp_path, "forward_proxy")) as run:
            docs = run.finish(status=None)
    assert [line.strip() for line in run.out.lines if line.strip().isdigit()] == ["200"] * len(urls), \
        run.out.text() + run.err.text()
    upstream = select(docs, "connection_established", destination__ip=HOST_IP, destination__port=8080)
    local = select(docs, "connection_established", destination__ip="127.0.0.1", destination__port=3128)
    assert len(upstream) == len(urls) and len(local) == len(urls), dump(docs)
    assert_no_alerts(docs)


# On the test host: pushes a numbered update every 1.2 s on each connection and reads the client's ack.
PUSH_SERVER = r'''
import socket, threading, time
def serve(conn):
    with conn:
        for i in range(8):
            conn.sendall(f"update {i} ".encode() + b"x" * 200 + b"\n")
            if not conn.recv(100):
                return
            time.sleep(1.2)
server = socket.create_server(("198.51.100.1", 8090))
print("listening", flush=True)
while True:
    threading.Thread(target=serve, args=(server.accept()[0],), daemon=True).start()
'''

# In the sandbox: subscribes and acknowledges every update.
PUSH_CLIENT = r'''
import socket
with socket.create_connection(("198.51.100.1", 8090), timeout=10) as s, s.makefile("rb") as f:
    for line in f:
        s.sendall(b"ack " + line.split()[1] + b"\n")
        print("got", line.split()[1].decode(), flush=True)
'''


def test_server_push_stream_with_acks_past_long_flow_seconds(net, tmp_path):
    config = "[flows]\nlong_flow_seconds = 3.0\nupdate_interval_seconds = 1.0\n"
    with harness.python_server(net, PUSH_SERVER, 8090, banner="listening\n"):
        with EpisodeRun(tmp_path, "ep-push", net.sandbox_prefix() + [PYTHON, "-u", "-c", PUSH_CLIENT],
                        config=config, capture=capture_path(tmp_path, "server_push")) as run:
            docs = run.finish()
    assert run.out.text().count("got ") == 8, run.out.text()
    ended = select(docs, "flow_ended", destination__ip=HOST_IP, destination__port=8090)
    assert ended and get(ended[0], "event.duration") > 3e9 * 2, dump(docs)
    assert select(docs, "flow_updated", destination__ip=HOST_IP, destination__port=8090), dump(docs)
    assert_no_alerts(docs)


# In the sandbox: one process downloads a file the test host serves slowly (a chunk every 0.3 s), while
# it runs local HTTP tests against its own server on 127.0.0.1: GETs and POSTs of 2 KB, every 0.15 s.
DOWNLOAD_AND_LOCAL_TESTS = r'''
import http.client, http.server, os, threading, time
class Local(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.reply(b"ok " + self.path.encode())
    def do_POST(self):
        self.reply(b"stored " + str(len(self.rfile.read(int(self.headers["Content-Length"])))).encode())
    def reply(self, body):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
local = http.server.ThreadingHTTPServer(("127.0.0.1", 8001), Local)
threading.Thread(target=local.serve_forever, daemon=True).start()
done = threading.Event()
def download():
    c = http.client.HTTPConnection("198.51.100.1", 8091, timeout=30)
    c.request("GET", "/model.bin")
    print("downloaded", len(c.getresponse().read()), flush=True)
    done.set()
threading.Thread(target=download).start()
tests = 0
while not done.is_set():
    c = http.client.HTTPConnection("127.0.0.1", 8001, timeout=5)
    if tests % 2:
        c.request("POST", "/results", body=os.urandom(2048))
    else:
        c.request("GET", f"/health/{tests}")
    assert c.getresponse().read()
    c.close()
    tests += 1
    time.sleep(0.15)
print("local tests", tests, flush=True)
'''

SLOW_SERVER = r'''
import socket, threading, time
def serve(conn):
    with conn:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1310720\r\nConnection: close\r\n\r\n")
        for _ in range(20):
            conn.sendall(b"m" * 65536)
            time.sleep(0.3)
server = socket.create_server(("198.51.100.1", 8091))
print("listening", flush=True)
while True:
    threading.Thread(target=serve, args=(server.accept()[0],), daemon=True).start()
'''


def test_long_download_beside_local_http_tests_in_the_same_process(net, tmp_path):
    with harness.python_server(net, SLOW_SERVER, 8091, banner="listening\n"):
        with EpisodeRun(tmp_path, "ep-download-local", net.sandbox_prefix() + [PYTHON, "-u", "-c",
                                                                               DOWNLOAD_AND_LOCAL_TESTS],
                        capture=capture_path(tmp_path, "download_local")) as run:
            docs = run.finish()
    assert "downloaded 1310720" in run.out.text(), run.out.text() + run.err.text()
    tests = int(run.line("local").split()[1])
    assert tests >= 20, run.out.text()
    local = select(docs, "connection_established", destination__ip="127.0.0.1", destination__port=8001)
    assert len(local) >= 20, dump(docs)
    assert_no_alerts(docs)


def test_long_git_clone_over_ssh(net, tmp_path):
    """A clone of a few MB over ssh from the test host's sshd: ssh talks to git through pipes."""
    work, bare, dest = tmp_path / "work", tmp_path / "repo.git", tmp_path / "clone"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "init.defaultBranch=main"]
    subprocess.run(git + ["init", "-q", str(work)], check=True)
    for i in range(3):
        for j in range(8):
            (work / f"blob{j}.bin").write_bytes(os.urandom(256 * 1024))
        subprocess.run(git + ["-C", str(work), "add", "."], check=True)
        subprocess.run(git + ["-C", str(work), "commit", "-q", "-m", f"step {i}"], check=True)
    subprocess.run(git + ["clone", "-q", "--bare", str(work), str(bare)], check=True)
    with harness.sshd(net) as sshd:
        ssh = " ".join(sshd.ssh_argv()[:-3])          # ssh and its options, without -p PORT user@host
        cmd = ["env", f"GIT_SSH_COMMAND={ssh}", "git", "clone", "-q",
               f"ssh://root@{HOST_IP}:{sshd.port}{bare}", str(dest)]
        with EpisodeRun(tmp_path, "ep-git-long", net.sandbox_prefix() + cmd,
                        capture=capture_path(tmp_path, "git_clone")) as run:
            docs = run.finish()
    assert (dest / "blob7.bin").stat().st_size == 256 * 1024
    assert select(docs, "connection_established", destination__ip=HOST_IP, destination__port=sshd.port), dump(docs)
    ended = select(docs, "flow_ended", destination__ip=HOST_IP, destination__port=sshd.port)
    assert ended and get(ended[0], "destination.bytes") > 6 * 1024 * 1024, dump(ended)
    assert_no_alerts(docs)


def test_openssh_remote_forward_from_a_config_file_is_caught(net, tmp_path):
    """ssh -F FILE with RemoteForward in FILE: nothing in argv names a tunnel; its use does."""
    with harness.sshd(net) as sshd:
        config = tmp_path / "cfg"
        config.write_text(f"Host box\n  HostName {HOST_IP}\n  Port {sshd.port}\n  User root\n"
                          f"  IdentityFile {sshd.client_key}\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n"
                          f"  UserKnownHostsFile /dev/null\n  BatchMode yes\n  LogLevel ERROR\n"
                          f"  RemoteForward 127.0.0.1:{CLIENT_PORT} 127.0.0.1:{SERVICE_PORT}\n")
        service = f"{PYTHON} -u {HELPERS / 'answer_service.py'} {SERVICE_PORT} &"
        argv = net.sandbox_prefix() + ["/bin/sh", "-c", f'{service} sleep 0.3; echo pid $$; exec "$@"', "sh",
                                       "ssh", "-F", config, "box", "echo ready; sleep 60"]
        with EpisodeRun(tmp_path, "ep-ssh-config", argv, capture=capture_path(tmp_path, "ssh_config")) as run:
            pid, start, last, docs = use_twice_and_finish(net, run, lambda: run.line("ready", timeout=30))
    # The config rule (tracer/sshconfig.py) reads the RemoteForward at the connect, before any use; the relay
    # correlation would catch the use (its replay fixture, recorded without the config rule, shows it).
    check_relay_alert(run, docs, "reverse_tunnel ssh -F with RemoteForward", pid, start, last,
                      [HOST_IP, str(sshd.port)], by=("mirrored", "tunnel set in its config"))


# In the sandbox: a fast UDP ping-pong with the test host for 2 s: every datagram is a turn, so a burst.
UDP_PING_PONG = r'''
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.connect(("198.51.100.1", 9999))
n, end = 0, time.time() + 2
while time.time() < end:
    s.send(b"ping")
    s.recv(100)
    n += 1
print("round trips", n, flush=True)
'''


def test_bursts_beyond_the_episode_budget_are_counted_as_lost(net, tmp_path):
    with harness.udp_echo_server(net, 9999):
        with EpisodeRun(tmp_path, "ep-burst-budget", net.sandbox_prefix() + [PYTHON, "-u", "-c", UDP_PING_PONG]) as run:
            docs = run.finish()
    trips = int(run.line("round").split()[1])
    assert trips > 1500, f"too few round trips to pass the budget of 1,000 bursts a second: {trips}"
    lost = get([d for d in docs if get(d, "event.kind") == "metric"][-1], "eptrace.stats.records_lost_by_reason")
    assert lost["burst_budget"] > 0 and lost["ringbuf_full"] == 0, lost
    assert_no_alerts(docs)

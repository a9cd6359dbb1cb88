"""Containment (README: Containing an episode): per-episode policies refused in the kernel, and actions on
alerts. Real probes, real episode cgroups, test hosts in network namespaces; timings are printed, never
asserted."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

import harness
from support import require
from eptrace_helpers import (Watcher, alerts, assert_one_line_error, dump, get, kill, read_docs, run_eptrace,
                             select, wait_for_docs, wait_until)
from harness import HOST_IP, HOST_IP6, METADATA_IP, PYTHON
from test_detection import EpisodeRun, ts
from tracer.testbed import dns_server
from test_fail_closed import pin_dir  # noqa: F401  (a fixture: a pin root of the test's own)

ALLOWED, OTHER, DENIED = 7531, 7533, 7532


def policy_args(tmp_path, text: str) -> list:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return ["--policy", path]


def contained(run: EpisodeRun, action: str, timeout: float = 15.0) -> dict:
    return wait_until(lambda: next((d for d in alerts(run.docs(), "episode_contained")
                                    if get(d, "eptrace.containment.action") == action), None), timeout,
                      lambda: f"an episode_contained {action}; documents:\n{dump(run.docs(), 200)}")


def report(case: str, doc: dict, effect_s: float | None = None) -> None:
    c = get(doc, "eptrace.containment")
    extra = f", effect observed {effect_s * 1000:.0f} ms after the evidence" if effect_s is not None else ""
    print(f"\nCONTAINMENT {case}: {c['action']} done {c['after_evidence_ms']} ms after the evidence "
          f"({c['after_alert_ms']} ms after the alert){extra}", flush=True)


# ---- policy: deny by default ------------------------------------------------------------------------------

DENY_POLICY = f'''[policy]
default = "deny"
allow = ["{HOST_IP}:{ALLOWED}/tcp", "198.51.100.0/24:{DENIED}"]
deny = ["{HOST_IP}:{DENIED}"]
raw_sockets = false
'''

WORKLOAD = f'''
import errno, os, socket
print("pid", os.getpid(), flush=True)
def attempt(name, fn):
    try:
        fn()
        print(name, "ok", flush=True)
    except OSError as e:
        print(name, errno.errorcode.get(e.errno, e.errno), flush=True)
def tcp(host, port, family=socket.AF_INET):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect((host, port))
        s.sendall(b"allowed")
    finally:
        s.close()
attempt("allowed", lambda: tcp("{HOST_IP}", {ALLOWED}))
attempt("other_port", lambda: tcp("{HOST_IP}", {OTHER}))
attempt("ipv6", lambda: tcp("{HOST_IP6}", {ALLOWED}, socket.AF_INET6))
attempt("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("{HOST_IP}", {ALLOWED})))
attempt("deny_wins", lambda: tcp("{HOST_IP}", {DENIED}))
attempt("raw", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
attempt("loopback", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", 9)))
'''
PACKET = ("import errno, socket\ntry:\n    socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))\n"
          "    print('packet ok', flush=True)\nexcept OSError as e:\n    print('packet', errno.errorcode[e.errno], flush=True)")


def test_deny_by_default(net, tmp_path, uring_helper):
    script = (f'{PYTHON} -u -c "$0"; {uring_helper} {HOST_IP} {OTHER} via-io-uring; '
              f'{PYTHON} -c "$1"; echo packet_status $?')
    verdict = tmp_path / "verdict.json"
    with harness.tcp_echo_server(net, ALLOWED) as server:
        with EpisodeRun(tmp_path, "ep-deny", net.sandbox_prefix() + ["/bin/sh", "-c", script, WORKLOAD, PACKET],
                        extra_args=[*policy_args(tmp_path, DENY_POLICY), "--verdict", verdict]) as run:
            pid = run.pid()
            docs = run.finish(status=0)
        assert server.wait_received(b"allowed")
    out = run.out.text()
    for case, result in [("allowed", "ok"), ("other_port", "EPERM"), ("ipv6", "EPERM"), ("udp", "EPERM"),
                         ("deny_wins", "EPERM"), ("raw", "EPERM"), ("loopback", "ok")]:
        assert f"{case} {result}" in out, (case, out, run.err.text()[-2000:])
    assert "connect=-1" in out, out                  # io_uring: EPERM from the same hook
    # AF_PACKET has no cgroup hook: run's seccomp filter makes it fail (the probes' kill is the backstop).
    assert "packet EPERM" in out and "packet_status 0" in out, out
    denied = alerts(docs, "egress_denied")
    by_target = {(get(a, "destination.ip"), get(a, "destination.port"), get(a, "network.transport")): a
                 for a in denied if get(a, "process.pid") == pid and get(a, "destination.ip")}
    for target in [(HOST_IP, OTHER, "tcp"), (HOST_IP6, ALLOWED, "tcp"), (HOST_IP, ALLOWED, "udp"),
                   (HOST_IP, DENIED, "tcp")]:
        assert target in by_target, (target, dump(denied))
    assert f"deny '{HOST_IP}:{DENIED}'" in get(by_target[(HOST_IP, DENIED, "tcp")], "message")
    assert "default deny" in get(by_target[(HOST_IP, OTHER, "tcp")], "message")
    uring = [a for a in denied if get(a, "process.name") == "uring_connect"]
    assert len(uring) == 1 and get(uring[0], "destination.port") == OTHER, dump(denied)
    messages = " ".join(get(a, "message") for a in denied)
    assert "raw_sockets = false" in messages and "AF_PACKET" in messages, messages
    # Once per destination and process, and nothing allowed was refused.
    assert len(by_target) == len(denied) - 3, dump(denied)         # + the io_uring one and the two raw sockets
    assert not select(docs, "connection_attempted", destination__port=ALLOWED, event__outcome="failure",
                      network__transport="tcp", destination__ip=HOST_IP)
    v = json.loads(verdict.read_text())
    assert v["denied"] >= 7, v


# ---- actions on alerts ------------------------------------------------------------------------------------

METADATA_THEN_WAIT = f'''
import os, socket, time
print("pid", os.getpid(), flush=True)
if os.fork() == 0:
    time.sleep(120)
    os._exit(0)
try:
    socket.create_connection(("{METADATA_IP}", 80), timeout=5).close()
except OSError:
    pass
print("touched", flush=True)
time.sleep(120)
'''


def test_kill_on_alert(net, tmp_path):
    with harness.http_server(net, 80, tmp_path, metadata=True):
        with EpisodeRun(tmp_path, "ep-kill", net.sandbox_prefix() + [PYTHON, "-u", "-c", METADATA_THEN_WAIT],
                        extra_args=["--on-alert", "kill"]) as run:
            pid = run.pid()
            doc = contained(run, "kill")
            wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 10, "the episode's processes to be gone")
            gone = time.time()
            docs = run.finish(status=None, timeout=60)
    alert = alerts(docs, "cloud_metadata_access")[0]
    assert get(doc, "eptrace.containment.rule") == "cloud_metadata_access", doc
    evidence = min(ts(d) for d in select(docs, "connection_established", destination__ip=METADATA_IP))
    report("kill on cloud_metadata_access", doc, gone - evidence)
    assert ts(alert) <= ts(doc)


TUNNEL_TARGET = r'''
import socket
server = socket.create_server(("127.0.0.1", 8000))
print("listening", flush=True)
while True:
    conn, _ = server.accept()
    with conn:
        data = conn.recv(100)
        if data:
            conn.sendall(b"sandbox-answer:" + data)
'''
# On the test host: one answer through sshd's forwarded port 127.0.0.1:9000 within TIMEOUT seconds, or none.
TUNNEL_USER = r'''
import socket, sys, time
deadline = time.monotonic() + float(sys.argv[1])
while time.monotonic() < deadline:
    try:
        with socket.create_connection(("127.0.0.1", 9000), timeout=max(0.1, deadline - time.monotonic())) as s:
            s.sendall(b"hello")
            if s.recv(100):
                print("answer", flush=True)
                sys.exit(0)
    except OSError:
        time.sleep(0.05)
print("no answer", flush=True)
'''


def tunnel_answers(net, seconds: float) -> bool:
    user = net.run_in_host([PYTHON, "-u", "-c", TUNNEL_USER, seconds], stdout=subprocess.PIPE, text=True)
    out, _ = user.communicate(timeout=seconds + 20)
    return "answer" in out.split("\n")[0] and "no answer" not in out


def test_deny_network_cuts_an_open_ssh_tunnel(net, tmp_path):
    """ssh -N -R relays; the sandbox then touches the metadata service, whose alert cuts the episode's
    network: the open tunnel carries nothing more, and ssh lives on."""
    policy = '[policy]\non_alert = { cloud_metadata_access = "deny_network" }\n'
    touch = f'{PYTHON} -c "import socket; socket.create_connection((\'{METADATA_IP}\', 80), timeout=3)"'
    with harness.sshd(net) as sshd, harness.http_server(net, 80, tmp_path, metadata=True):
        ssh = sshd.ssh_argv()
        ssh = ssh[:1] + ["-N", "-R", "9000:127.0.0.1:8000"] + ssh[1:]
        control = tmp_path / "go"
        script = (f'{PYTHON} -u -c "$0" & echo pid $$; '
                  f'(while [ ! -e {control} ]; do sleep 0.05; done; {touch}; echo touched) & exec "$@"')
        with EpisodeRun(tmp_path, "ep-cut", net.sandbox_prefix() + ["/bin/sh", "-c", script, TUNNEL_TARGET, *ssh],
                        extra_args=policy_args(tmp_path, policy)) as run:
            ssh_pid = run.pid()
            run.line("listening")
            assert tunnel_answers(net, 30), "the tunnel never relayed"
            control.touch()
            doc = contained(run, "deny_network")
            assert not tunnel_answers(net, 1.0), "the tunnel still answers after deny_network"
            os.kill(ssh_pid, 0)                              # ssh lives on
            assert open(f"/proc/{ssh_pid}/stat").read().split()[2] not in "ZX"
            evidence_ms = get(doc, "eptrace.containment.after_evidence_ms")
            os.kill(ssh_pid, signal.SIGTERM)
            docs = run.finish(status=None, timeout=60)
    report("deny_network on cloud_metadata_access (ssh -R open)", doc)
    assert evidence_ms is not None
    assert alerts(docs, "reverse_tunnel"), dump(alerts(docs))


# A second flow of the same episode, unrelated to the tunnel: an echo exchange on one open connection every
# 100 ms, then (once argv[1] exists) new connects to argv[2:] ports of the test host.
SECOND_FLOW = f'''
import errno, os, socket, sys, time
s = socket.create_connection(("{HOST_IP}", {ALLOWED}), timeout=5)
n = 0
while not os.path.exists(sys.argv[1]):
    n += 1
    try:
        s.sendall(b"second-%d" % n)
        ok = s.recv(100) == b"second-%d" % n
    except OSError:
        ok = False
    print("second", n, "ok" if ok else "failed", flush=True)
    time.sleep(0.1)
for port in map(int, sys.argv[2:]):
    c = socket.socket()
    c.settimeout(5)
    try:
        c.connect(("{HOST_IP}", port))
        print("new", port, "ok", flush=True)
    except OSError as e:
        print("new", port, errno.errorcode.get(e.errno, e.errno), flush=True)
    finally:
        c.close()
'''


def seconds_ok(run: EpisodeRun) -> int:
    return run.out.text().count(" ok\n") - run.out.text().count("new ")


def test_cut_cuts_the_tunnel_and_only_it(net, tmp_path):
    """on_alert = "cut" on reverse_tunnel: a real ssh -N -R relays connections from the test host until relay
    correlation names it (alert_score is out of reach here, so the alert waits for mirrored exchanges); then
    its flows are cut (packets dropped both ways, destination denied) while a second flow of the same episode
    keeps working, and ssh lives on."""
    policy = '[policy]\non_alert = { reverse_tunnel = "cut" }\n'
    config = tmp_path / "config.toml"
    config.write_text("[reverse_tunnel]\nalert_score = 10000\n")
    stop = tmp_path / "stop"
    with harness.sshd(net) as sshd, harness.tcp_echo_server(net, ALLOWED):
        # ssh under another name, its forward in a config file: no argv gives the tunnel away, so the alert
        # comes from the relayed exchanges themselves (after the tunnel carried traffic).
        tool, ssh_config = tmp_path / "syncd", tmp_path / "syncd.conf"
        tool.write_bytes(Path("/usr/bin/ssh").read_bytes())
        tool.chmod(0o755)
        ssh_config.write_text("Host *\n    RemoteForward 9000 127.0.0.1:8000\n")
        ssh = sshd.ssh_argv()
        assert ssh[1:3] == ["-F", "/dev/null"], ssh
        ssh = [tool, "-N", "-F", ssh_config] + ssh[3:]
        # ssh is no ancestor of the second flow, nor is its argv in one's: that flow is no tunnel of its argv
        tunnel = tmp_path / "tunnel.sh"
        tunnel.write_text("#!/bin/sh\nexec " + " ".join(map(str, ssh)) + "\n")
        tunnel.chmod(0o755)
        script = (f'{PYTHON} -u -c "$0" & {PYTHON} -u -c "$1" {stop} {ALLOWED} {sshd.port} & {tunnel} & '
                  'echo pid $!; wait $!')
        with EpisodeRun(tmp_path, "ep-cut-flows", net.sandbox_prefix() + ["/bin/sh", "-c", script, TUNNEL_TARGET,
                                                                         SECOND_FLOW],
                        extra_args=[*policy_args(tmp_path, policy), "--config", config]) as run:
            ssh_pid = run.pid()
            run.line("listening")
            wait_until(lambda: seconds_ok(run) >= 1, 30, "the second flow's first echo")
            answered = 0
            deadline = time.monotonic() + 60
            while not alerts(run.docs(), "episode_contained") and time.monotonic() < deadline:
                answered += tunnel_answers(net, 5.0)
            doc = contained(run, "cut")
            assert answered >= 1, ("the tunnel never relayed", [get(a, "message") for a in alerts(run.docs())])
            assert not tunnel_answers(net, 2.0), "the tunnel still answers after the cut"
            before = seconds_ok(run)
            wait_until(lambda: seconds_ok(run) >= before + 5, 10,
                       lambda: f"the second flow to keep working after the cut:\n{run.out.text()[-600:]}")
            os.kill(ssh_pid, 0)                              # ssh lives on
            assert open(f"/proc/{ssh_pid}/stat").read().split()[2] not in "ZX"
            stop.touch()
            run.line("new")
            wait_until(lambda: f"new {sshd.port} " in run.out.text(), 15, "the new connects")
            os.kill(ssh_pid, signal.SIGTERM)
            docs = run.finish(status=None, timeout=60)
    out = run.out.text()
    assert "failed" not in out, out
    assert f"new {ALLOWED} ok" in out, out                       # the episode may still connect elsewhere
    assert f"new {sshd.port} EPERM" in out, out                  # but not to the cut flow's destination
    c = get(doc, "eptrace.containment")
    assert c["done"] and c["rule"] == "reverse_tunnel" and c["flows_cut"] >= 1, c
    assert f"{HOST_IP}:{sshd.port}/tcp" in c["destinations_denied"], c
    denied = [a for a in alerts(docs, "egress_denied") if get(a, "destination.port") == sshd.port]
    assert denied and "cut (on_alert)" in get(denied[0], "message"), dump(alerts(docs))
    report("cut on reverse_tunnel (ssh -R relaying)", doc)


FROZEN = r'''
import os, time
print("pid", os.getpid(), flush=True)
n = 0
while True:
    n += 1
    print("tick", n, flush=True)
    time.sleep(0.1)
'''


def test_freeze_and_thaw(net, tmp_path):
    touch = f"import socket\ntry: socket.create_connection(('{METADATA_IP}', 80), timeout=3)\nexcept OSError: pass"
    script = f'{PYTHON} -u -c "$0" & echo pid $$; sleep 1; exec {PYTHON} -c "$1"'
    with harness.http_server(net, 80, tmp_path, metadata=True):
        with EpisodeRun(tmp_path, "ep-freeze", net.sandbox_prefix() + ["/bin/sh", "-c", script, FROZEN, touch],
                        extra_args=["--on-alert", "freeze"]) as run:
            run.pid()
            doc = contained(run, "freeze")
            time.sleep(0.5)
            ticks = run.out.text().count("tick")
            time.sleep(1.0)
            assert run.out.text().count("tick") == ticks, "the episode still runs while frozen"
            r = run_eptrace("episode", "thaw", "--id", "ep-freeze")
            assert r.returncode == 0, r.stderr
            wait_until(lambda: run.out.text().count("tick") > ticks, 10, "ticks after thaw")
            run.proc.send_signal(signal.SIGTERM)
            run.finish(status=None, timeout=60)
    report("freeze on cloud_metadata_access", doc)


# ---- bad policies -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("table", ['nonsense = 1', 'allow = ["198.51.100.300/24"]', 'allow = ["198.51.100.1:0"]',
                                   'on_alert = "explode"', 'listen = "sometimes"', 'default = "maybe"'])
def test_bad_policy_exits_2(tmp_path, table):
    path = tmp_path / "policy.toml"
    path.write_text(f"[policy]\n{table}\n")
    marker = tmp_path / "ran"
    r = run_eptrace("run", "--episode", "ep-bad", "--policy", path, "--", "touch", marker)
    assert_one_line_error(r, 2)
    assert not marker.exists()
    cfg = tmp_path / "config.toml"
    cfg.write_text(f"[policy]\n{table}\n")
    r = run_eptrace("run", "--episode", "ep-bad", "--config", cfg, "--", "touch", marker)
    assert_one_line_error(r, 2)
    assert not marker.exists()


# ---- listeners --------------------------------------------------------------------------------------------

LISTENER = r'''
import os, socket, sys
print("pid", os.getpid(), flush=True)
server = socket.create_server(("0.0.0.0", 7540))
server.settimeout(30)
print("listening", flush=True)
with socket.create_connection(("127.0.0.1", 7540), timeout=5) as c:
    peer, addr = server.accept()
    print("accepted", addr[0], flush=True)
    peer.close()
while not os.path.exists(sys.argv[1]):
    server.settimeout(0.1)
    try:
        peer, addr = server.accept()
        print("accepted", addr[0], flush=True)
        peer.close()
    except socket.timeout:
        pass
'''
HOST_CLIENT = r'''
import socket, sys
try:
    socket.create_connection((sys.argv[1], 7540), timeout=2).close()
    print("connected", flush=True)
except OSError as e:
    print("failed", type(e).__name__, flush=True)
'''


def test_listen_local_refuses_the_test_host(net, tmp_path):
    done = tmp_path / "done"
    verdict = tmp_path / "verdict.json"
    with EpisodeRun(tmp_path, "ep-listen", net.sandbox_prefix() + [PYTHON, "-u", "-c", LISTENER, done],
                    extra_args=[*policy_args(tmp_path, '[policy]\nlisten = "local"\n'), "--verdict", verdict]) as run:
        run.line("accepted")                                 # the loopback client got through
        client = net.run_in_host([PYTHON, "-u", "-c", HOST_CLIENT, harness.SANDBOX_IP], stdout=subprocess.PIPE,
                                 text=True)
        out, _ = client.communicate(timeout=30)
        again = net.run_in_host([PYTHON, "-u", "-c", HOST_CLIENT, harness.SANDBOX_IP], stdout=subprocess.PIPE,
                                text=True)
        out_again, _ = again.communicate(timeout=30)
        done.touch()
        pid = run.pid()
        docs = run.finish(status=0)
    assert out.startswith("failed") and out_again.startswith("failed"), (out, out_again)
    accepted = [line for line in run.out.text().split("\n") if line.startswith("accepted")]
    assert accepted == ["accepted 127.0.0.1"], run.out.text()
    # Each refusal is an alert: once per source and listener (two clients and their SYN retries: one alert).
    refused = alerts(docs, "ingress_denied")
    assert len(refused) == 1, dump(refused)
    alert = refused[0]
    assert (get(alert, "source.ip"), get(alert, "destination.port"), get(alert, "process.pid")) == \
        (HOST_IP, 7540, pid), alert
    assert "listen = 'local'" in get(alert, "message"), alert
    assert select(docs, "connection_accepted", event__outcome="failure", source__ip=HOST_IP), dump(docs)
    v = json.loads(verdict.read_text())
    assert v["denied"] >= 2 and [a["rule"] for a in v["alerts"]] == ["ingress_denied"], v


# ---- watch: a registered episode's policy, and containment that outlives the tracer ---------------------

TRY = f'''
import errno, socket, sys
for port in map(int, sys.argv[1:]):
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect(("{HOST_IP}", port))
        print(port, "ok", flush=True)
    except OSError as e:
        print(port, errno.errorcode.get(e.errno, e.errno), flush=True)
    finally:
        s.close()
'''


def tries(net, cg, *ports) -> str:
    p = harness.spawn_in_cgroup(cg, net.sandbox_prefix() + [PYTHON, "-c", TRY, *ports], stdout=subprocess.PIPE,
                                text=True)
    return p.communicate(timeout=30)[0]


@pytest.mark.usefixtures("pin_dir")
def test_watch_enforces_a_registered_policy_and_containment_outlives_it(net, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[policy]\ndefault = "deny"\nallow = ["{HOST_IP}:{ALLOWED}", "{HOST_IP}:{DENIED}"]\n'
                      f'on_alert = {{ egress_denied = "deny_network" }}\n')
    state, events = tmp_path / "state", tmp_path / "events.ndjson"
    with harness.episode_cgroup(f"contain-{secrets.token_hex(3)}") as cg, \
            harness.tcp_echo_server(net, ALLOWED), harness.tcp_echo_server(net, DENIED):
        r = run_eptrace("episode", "add", "--id", "ep-watched", "--cgroup", cg, "--policy", policy,
                        state_dir=state)
        assert r.returncode == 0, r.stderr
        with Watcher(events, state) as watcher:
            watcher.ready(episodes=1, timeout=90)
            assert tries(net, cg, ALLOWED) == f"{ALLOWED} ok\n"
            # A refused connect is an egress_denied alert, on which the policy cuts the episode's network.
            assert tries(net, cg, OTHER) == f"{OTHER} EPERM\n"
            wait_for_docs(events, lambda docs: alerts(docs, "episode_contained"), 15, "episode_contained")
            assert tries(net, cg, DENIED) == f"{DENIED} EPERM\n"       # allowed, but the episode is contained
            watcher.proc.kill()                                        # the tracer dies (watch fails open)
            watcher.proc.wait(timeout=10)
            assert tries(net, cg, ALLOWED, DENIED) == f"{ALLOWED} EPERM\n{DENIED} EPERM\n"
    doc = alerts(read_docs(events), "episode_contained")[0]
    report("deny_network on egress_denied (watch)", doc)


@pytest.mark.usefixtures("pin_dir")
def test_watch_on_alert_kills_a_registered_episode(net, tmp_path):
    """`watch --on-alert kill`: a registered episode (no policy of its own) touches the metadata service;
    every process of it is gone soon after (polled up to a bound: timings are printed, not asserted)."""
    touch = f"import socket\ntry: socket.create_connection(('{METADATA_IP}', 80), timeout=3)\nexcept OSError: pass\n" \
            "import time; time.sleep(300)"
    state, events = tmp_path / "state", tmp_path / "events.ndjson"
    with harness.episode_cgroup(f"onalert-{secrets.token_hex(3)}") as cg, \
            harness.http_server(net, 80, tmp_path, metadata=True):
        r = run_eptrace("episode", "add", "--id", "ep-watch-kill", "--cgroup", cg, state_dir=state)
        assert r.returncode == 0, r.stderr
        with Watcher(events, state, extra=("--on-alert", "kill")) as watcher:
            watcher.ready(episodes=1, timeout=90)
            sleeper = harness.spawn_in_cgroup(cg, ["sleep", "300"])
            toucher = harness.spawn_in_cgroup(cg, net.sandbox_prefix() + [PYTHON, "-c", touch])
            docs = wait_for_docs(events, lambda docs: alerts(docs, "episode_contained"), 15, "episode_contained")
            wait_until(lambda: not (cg / "cgroup.procs").read_text().strip(), 10, "the episode's processes gone")
            gone = time.time()
            assert sleeper.wait(timeout=10) == -signal.SIGKILL and toucher.wait(timeout=10) == -signal.SIGKILL
    doc = alerts(docs, "episode_contained")[0]
    assert get(doc, "eptrace.containment.action") == "kill" and get(doc, "eptrace.containment.done"), doc
    assert get(doc, "eptrace.containment.rule") == "cloud_metadata_access", doc
    evidence = min(ts(d) for d in select(read_docs(events), "connection_attempted", destination__ip=METADATA_IP))
    report("kill on cloud_metadata_access (watch --on-alert)", doc, gone - evidence)


@pytest.mark.usefixtures("pin_dir")
def test_a_registered_episode_is_killed_at_a_packet_socket(net, tmp_path):
    """No seccomp filter outside `run`: in a registered episode with raw_sockets = false, the process that asks
    for an AF_PACKET socket is killed before socket() returns to it, and that is an egress_denied alert."""
    policy = tmp_path / "policy.toml"
    policy.write_text("[policy]\nraw_sockets = false\n")
    state, events = tmp_path / "state", tmp_path / "events.ndjson"
    with harness.episode_cgroup(f"packet-{secrets.token_hex(3)}") as cg:
        r = run_eptrace("episode", "add", "--id", "ep-packet", "--cgroup", cg, "--policy", policy, state_dir=state)
        assert r.returncode == 0, r.stderr
        with Watcher(events, state) as watcher:
            watcher.ready(episodes=1, timeout=90)
            p = harness.spawn_in_cgroup(cg, net.sandbox_prefix() + [PYTHON, "-c", PACKET], stdout=subprocess.PIPE,
                                        text=True)
            out, _ = p.communicate(timeout=30)
            assert p.returncode == -signal.SIGKILL and "packet" not in out, (p.returncode, out)
            docs = wait_for_docs(events, lambda docs: alerts(docs, "egress_denied"), 15, "egress_denied")
    message = get(alerts(docs, "egress_denied")[0], "message")
    assert "AF_PACKET" in message and "raw_sockets = false" in message, message


@pytest.mark.usefixtures("pin_dir")
def test_a_packet_socket_asked_for_through_io_uring_is_refused_and_seen(net, tmp_path, uring_socket_helper):
    """IORING_OP_SOCKET passes no socket tracepoint and no cgroup hook sees a packet socket: with
    raw_sockets = false the process is killed at the submission (its family cannot be seen there), and
    without a policy the request is still reported, as a socket of unknown family."""
    policy = tmp_path / "policy.toml"
    policy.write_text("[policy]\nraw_sockets = false\n")
    state, events = tmp_path / "state", tmp_path / "events.ndjson"
    token = secrets.token_hex(3)
    with harness.episode_cgroup(f"uring-{token}") as refused, harness.episode_cgroup(f"uring-open-{token}") as seen:
        for eid, cg, extra in (("ep-uring", refused, ["--policy", policy]), ("ep-uring-open", seen, [])):
            r = run_eptrace("episode", "add", "--id", eid, "--cgroup", cg, *extra, state_dir=state)
            assert r.returncode == 0, r.stderr
        with Watcher(events, state) as watcher:
            watcher.ready(episodes=2, timeout=90)
            pids = {}
            # sqpoll: the ring's kernel thread (iou-sqp) submits the request, in the same process and cgroup.
            for mode in ("plain", "sqpoll"):
                p = harness.spawn_in_cgroup(refused, net.sandbox_prefix() + [uring_socket_helper, mode],
                                            stdout=subprocess.PIPE, text=True)
                out, _ = p.communicate(timeout=30)
                assert p.returncode == -signal.SIGKILL and "socket=" not in out, (mode, p.returncode, out)
                p = harness.spawn_in_cgroup(seen, net.sandbox_prefix() + [uring_socket_helper, mode],
                                            stdout=subprocess.PIPE, text=True)
                out, _ = p.communicate(timeout=30)
                assert p.returncode == 0 and out.startswith("socket="), (mode, p.returncode, out)
                pids[p.pid] = mode
            wait_for_docs(events, lambda docs: len(alerts(docs, "egress_denied")) >= 2 and len(select(
                docs, "socket_created", episode="ep-uring-open")) >= 2, 15, "egress_denied and the open episode's sockets")
    docs = read_docs(events)
    denied = alerts(docs, "egress_denied")
    assert [get(a, "labels.episode_id") for a in denied] == ["ep-uring"] * 2, dump(denied)
    assert all("raw_sockets = false" in get(a, "message") for a in denied), dump(denied)
    created = select(docs, "socket_created", episode="ep-uring-open")
    assert [get(d, "eptrace.socket.family") for d in created] == ["unknown (io_uring)"] * 2, dump(created)
    assert sorted(pids[get(d, "process.pid")] for d in created) == ["plain", "sqpoll"], dump(created)
    assert {get(d, "process.name") for d in created} == {"uring_socket"}, dump(created)


# Connects to argv[1] on each port that follows; prints "PORT ok" or "PORT ERRNO".
TRY_AT = TRY.replace(f'("{HOST_IP}", port)', '(sys.argv[1], port)').replace("sys.argv[1:]", "sys.argv[2:]")
HOLD = f'''
import socket, sys, time
s = socket.create_connection(("{METADATA_IP}", 80), timeout=5)
print("holding", flush=True)
time.sleep(300)
'''


@pytest.mark.usefixtures("pin_dir")
def test_cut_holds_without_a_tracer_and_through_a_new_watch(net, tmp_path):
    """cut on a registered episode: the metadata flow of the alert is cut and its destination denied; that holds
    once the tracer is gone (pinned maps), and a new watch, which writes the episode's policy again, keeps it;
    other destinations stay allowed."""
    policy = tmp_path / "policy.toml"
    policy.write_text('[policy]\non_alert = { cloud_metadata_access = "cut" }\n')
    state, events = tmp_path / "state", tmp_path / "events.ndjson"

    def attempts(cg, host, *ports) -> str:
        p = harness.spawn_in_cgroup(cg, net.sandbox_prefix() + [PYTHON, "-c", TRY_AT, host, *ports],
                                    stdout=subprocess.PIPE, text=True)
        return p.communicate(timeout=30)[0]

    with harness.episode_cgroup(f"cut-{secrets.token_hex(3)}") as cg, harness.tcp_echo_server(net, ALLOWED), \
            harness.http_server(net, 80, tmp_path, metadata=True):
        r = run_eptrace("episode", "add", "--id", "ep-cut-pinned", "--cgroup", cg, "--policy", policy,
                        state_dir=state)
        assert r.returncode == 0, r.stderr
        with Watcher(events, state) as watcher:
            watcher.ready(episodes=1, timeout=90)
            holder = harness.spawn_in_cgroup(cg, net.sandbox_prefix() + [PYTHON, "-u", "-c", HOLD],
                                             stdout=subprocess.PIPE, text=True)
            try:
                docs = wait_for_docs(events, lambda docs: alerts(docs, "episode_contained"), 15, "episode_contained")
                assert attempts(cg, METADATA_IP, 80) == "80 EPERM\n"
                assert attempts(cg, HOST_IP, ALLOWED) == f"{ALLOWED} ok\n"
                watcher.proc.kill()                                  # the tracer dies (watch fails open)
                watcher.proc.wait(timeout=10)
                assert attempts(cg, METADATA_IP, 80) == "80 EPERM\n"
                assert attempts(cg, HOST_IP, ALLOWED) == f"{ALLOWED} ok\n"
            finally:
                kill(holder)
        with Watcher(tmp_path / "events2.ndjson", state) as again:
            again.ready(episodes=1, timeout=90)
            assert attempts(cg, METADATA_IP, 80) == "80 EPERM\n"
            assert attempts(cg, HOST_IP, ALLOWED) == f"{ALLOWED} ok\n"
    c = get(alerts(docs, "episode_contained")[0], "eptrace.containment")
    assert c["action"] == "cut" and c["done"] and c["flows_cut"] == 1, c
    assert c["destinations_denied"] == [f"{METADATA_IP}:80/tcp"], c


# ---- host names -------------------------------------------------------------------------------------------

# The test host's DNS server answers every A query with HOST_IP. Each connect comes right after its answer.
NAMES = f'''
import errno, socket, struct
def resolve(name):
    query = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + b"".join(
        bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\\0" + struct.pack("!HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.sendto(query, ("{HOST_IP}", 53))
    answer = s.recv(512)
    s.close()
    return socket.inet_ntoa(answer[-4:])
def connect(ip, port):
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect((ip, port))
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, e.errno)
    finally:
        s.close()
print("unresolved", connect("{HOST_IP}", 8080), flush=True)
print("other.test", connect(resolve("other.test"), 8080), flush=True)
print("wild.test", connect(resolve("wild.test"), 8081), flush=True)          # not a strict subdomain
print("a.wild.test", connect(resolve("a.wild.test"), 8081), flush=True)
print("Allowed.Test", connect(resolve("Allowed.Test"), 8080), flush=True)    # names are case-insensitive
print("allowed.test:8081", connect("{HOST_IP}", 8082), flush=True)           # the entry's port only
'''


def test_host_names_allow_what_the_episodes_dns_answers(net, tmp_path):
    policy = '[policy]\ndefault = "deny"\nallow = ["allowed.test:8080", "*.wild.test:8081/tcp", "53/udp"]\n'
    with dns_server(net), harness.tcp_echo_server(net, 8080), harness.tcp_echo_server(net, 8081):
        with EpisodeRun(tmp_path, "ep-names", net.sandbox_prefix() + [PYTHON, "-u", "-c", NAMES],
                        extra_args=policy_args(tmp_path, policy)) as run:
            docs = run.finish(status=0)
    out = run.out.text().split("\n")
    assert out[:6] == ["unresolved EPERM", "other.test EPERM", "wild.test EPERM", "a.wild.test ok",
                       "Allowed.Test ok", "allowed.test:8081 EPERM"], (out, run.err.text()[-2000:])
    denied = alerts(docs, "egress_denied")
    assert {get(a, "destination.port") for a in denied} == {8080, 8081, 8082}, dump(denied)


OTHER_HOST_IP = "198.51.100.3"      # a second test-host address, added by the test below


def test_curl_reaches_an_allowed_name_on_its_first_try(net, tmp_path):
    """The issue's words: with the test host's DNS server as the sandbox's resolver (a resolv.conf bind-mounted
    in a mount namespace of the sandbox command's own), `curl http://allowed.test:8080/` works on its first
    try and `curl http://other.test:8080/`, which resolves to another test-host address where a server
    listens, is refused."""
    from pyroute2 import NetNS
    curl = shutil.which("curl")
    require(curl, "curl is not installed (make setup installs it)")
    with NetNS(net.host_ns) as ns:
        ns.addr("add", index=ns.link_lookup(ifname=net.host_if)[0], address=OTHER_HOST_IP, prefixlen=32)
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver {HOST_IP}\noptions attempts:1 timeout:3\n")
    script = (f'mount --bind {resolv} /etc/resolv.conf || exit 3; for name in allowed.test other.test; do '
              f'{curl} -sS -m 10 -o /dev/null -w "$name http %{{http_code}}\\n" http://$name:8080/; '
              'echo "$name exit $?"; done')
    policy = '[policy]\ndefault = "deny"\nallow = ["allowed.test:8080", "53/udp"]\n'
    with dns_server(net, names={"other.test": OTHER_HOST_IP}) as dns, harness.http_server(net, 8080, tmp_path), \
            harness.tcp_echo_server(net, 8080, host=OTHER_HOST_IP):
        with EpisodeRun(tmp_path, "ep-curl-names",
                        net.sandbox_prefix() + ["unshare", "-m", "/bin/sh", "-c", script],
                        extra_args=policy_args(tmp_path, policy)) as run:
            docs = run.finish(status=0)
        queries = "".join(dns.stdout)
    out = run.out.text()
    assert "allowed.test http 200" in out and "allowed.test exit 0" in out, (out, run.err.text()[-2000:])
    assert "other.test exit 7" in out, out                     # curl: could not connect (EPERM)
    assert "query allowed.test" in queries and "query other.test" in queries, queries
    # one try each: curl connected once to allowed.test, and was refused once at other.test
    attempts = select(docs, "connection_attempted", network__transport="tcp", destination__port=8080)
    assert [(get(a, "destination.ip"), get(a, "event.outcome")) for a in attempts] == \
        [(HOST_IP, "success"), (OTHER_HOST_IP, "failure")], dump(attempts)
    denied = alerts(docs, "egress_denied")
    assert [(get(a, "destination.ip"), get(a, "destination.port")) for a in denied] == [(OTHER_HOST_IP, 8080)], \
        dump(denied)


# The episode answers itself: a fake "DNS server" on its own address (not loopback) says allowed.test is
# 198.51.100.9. The kernel does not learn from answers that come from this host.
SELF_ANSWER = f'''
import errno, socket, struct
server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
server.bind(("{harness.SANDBOX_IP}", 53))
client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
client.settimeout(5)
name = b"\\x07allowed\\x04test\\x00"
client.sendto(struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + name + b"\\x00\\x01\\x00\\x01",
              ("{harness.SANDBOX_IP}", 53))
query, addr = server.recvfrom(512)
server.sendto(struct.pack("!HHHHHH", 7, 0x8180, 1, 1, 0, 0) + name + b"\\x00\\x01\\x00\\x01" +
              b"\\xc0\\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton("198.51.100.9"), addr)
client.recv(512)
s = socket.socket()
s.settimeout(2)
try:
    s.connect(("198.51.100.9", 8080))
    print("self-answered ok", flush=True)
except OSError as e:
    print("self-answered", errno.errorcode.get(e.errno, e.errno), flush=True)
'''


def test_an_answer_from_the_episode_itself_allows_nothing(net, tmp_path):
    policy = f'[policy]\ndefault = "deny"\nallow = ["allowed.test:8080", "{harness.SANDBOX_IP}/32"]\n'
    with EpisodeRun(tmp_path, "ep-self-dns", net.sandbox_prefix() + [PYTHON, "-u", "-c", SELF_ANSWER],
                    extra_args=policy_args(tmp_path, policy)) as run:
        run.finish(status=0)
    assert "self-answered EPERM" in run.out.text(), (run.out.text(), run.err.text()[-2000:])


def test_python_api_policy(net, tmp_path):
    from tracer.api import run_episode
    argv = net.sandbox_prefix() + [PYTHON, "-c", TRY, str(OTHER)]
    out = tmp_path / "out.txt"
    verdict = run_episode("ep-api", ["/bin/sh", "-c", f'"$@" > {out}', "sh", *argv], grace_s=3,
                          outputs=[f"file:{tmp_path / 'events.ndjson'}"],
                          policy={"default": "deny", "on_alert": {"egress_denied": "kill"}})
    assert out.read_text() == f"{OTHER} EPERM\n"
    assert verdict.denied == 1 and [a["rule"] for a in verdict.alerts] == ["egress_denied"], verdict
    assert [c["action"] for c in verdict.containment] == ["kill"], verdict


def test_episode_rm_kills_a_frozen_episode(tmp_path):
    state = tmp_path / "state"
    with harness.episode_cgroup(f"frozen-{secrets.token_hex(3)}") as cg:
        sleeper = harness.spawn_in_cgroup(cg, ["sleep", "300"])
        wait_until(lambda: (cg / "cgroup.procs").read_text().strip(), 10, "the sleeper in its cgroup")
        assert run_eptrace("episode", "add", "--id", "ep-frozen", "--cgroup", cg, state_dir=state).returncode == 0
        (cg / "cgroup.freeze").write_text("1")
        r = run_eptrace("episode", "rm", "--id", "ep-frozen", state_dir=state)
        assert r.returncode == 0, r.stderr
        assert sleeper.wait(timeout=10) == -signal.SIGKILL

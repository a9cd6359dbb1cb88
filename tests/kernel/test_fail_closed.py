"""Fail-closed tracing (issue 9 A), each attack for real: the episode kills or stops its tracer, a watch dies
and is restarted on its pinned state, a dead tracer's run cgroup is left behind, the command runs as another
user. Every test pins under its own directory and removes it, even when it fails."""
from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import harness
from eptrace_helpers import (Watcher, cgroup2_mount, dump, get, kill, read_docs, run_eptrace, select,
                             start_eptrace, stop, wait_for_docs, wait_until)
from harness import HOST_IP, PYTHON
from tracer.kernel import cgroups

# Logs every accepted connection as "accept IP PORT" (a connect that is refused never gets here).
ACCEPT_LOGGER = r'''
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])), backlog=64)
print("listening", flush=True)
while True:
    conn, addr = server.accept()
    print("accept", addr[0], addr[1], flush=True)
    conn.close()
'''

# Tries to connect every 0.1 s for argv[3] seconds; prints each outcome.
CONNECT_LOOP = r'''
import socket, sys, time
host, port, until = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
while time.monotonic() < until:
    try:
        socket.create_connection((host, port), timeout=2).close()
        print("connected", flush=True)
    except OSError as e:
        print("refused", e.errno, flush=True)
    time.sleep(0.1)
'''

# An episode's long-lived TCP flow (argv[2] is the test host's echo port), its ping socket and a raw socket:
# each is tried once when started, and again each time a line comes on stdin; prints one line per round:
# "ROUND echo|stalled pong|noping raw|raw-refused ERRNO". Round "again" waits up to 20 s for the echo
# (TCP retransmits after its backoff).
FLOW_PING_RAW = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
flow = socket.create_connection((host, port), timeout=5)
def echo(wait):
    flow.settimeout(wait)
    try:
        flow.sendall(b"x")
        return "echo" if flow.recv(1) == b"x" else "closed"
    except OSError:
        return "stalled"
def ping():
    p = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
    p.settimeout(1)
    try:
        p.sendto(b"\x08\x00\x00\x00\x00\x00\x00\x01eptrace", (host, 0))
        return "pong" if p.recv(1024)[:1] == b"\x00" else "other"
    except OSError:
        return "noping"
    finally:
        p.close()
def raw():
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()
        return "raw"
    except OSError as e:
        return "raw-refused %d" % e.errno
print("alive", echo(5), ping(), raw(), flush=True)
for line in sys.stdin:
    round = line.strip()
    wait = 20 if round == "again" else 1
    print(round, echo(wait), ping(), raw(), flush=True)
"""
# Ping sockets need the caller's group in this per-namespace range: opened in the sandbox namespace only.
OPEN_PING_SOCKETS = "echo '0 2147483647' > /proc/sys/net/ipv4/ping_group_range"


@pytest.fixture
def pin_dir(monkeypatch):
    """A pin root of the test's own (eptrace reads EPTRACE_PIN_DIR), removed at the end."""
    path = Path(f"/sys/fs/bpf/eptrace-test-{secrets.token_hex(3)}")
    monkeypatch.setenv("EPTRACE_PIN_DIR", str(path))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def accepts(peer) -> list[str]:
    """Connections from the sandbox (the readiness probe comes from the test host's own address)."""
    return [line for line in peer.stdout if line.startswith("accept") and line.split()[1] != HOST_IP]


def test_tracer_killed_from_inside_the_episode_kills_it(net, tmp_path, pin_dir):
    """The issue's attack: `kill -9 $PPID`, then connect out. The watchdog kills the episode first."""
    port = 7901
    script = (f'kill -9 $PPID; '
              f'exec {PYTHON} -u -c \'{CONNECT_LOOP}\' {HOST_IP} {port} 5')
    with harness.python_server(net, ACCEPT_LOGGER, port, args=(HOST_IP, port), banner="listening\n") as peer:
        started = set(p.name for p in (cgroup2_mount() / "eptrace").iterdir()) \
            if (cgroup2_mount() / "eptrace").is_dir() else set()
        r = run_eptrace("run", "--episode", "ep-killer", "--output", f"file:{tmp_path / 'ev.ndjson'}", "--",
                        *net.sandbox_prefix(), "sh", "-c", script, timeout=60)
        assert r.returncode == -9, f"eptrace was not killed: {r.returncode} {r.stderr}"
        assert "killed the episode" in r.stderr, r.stderr
        # what the probes recorded after the tracer's last read (at least the killed processes' exits) is
        # counted before the pins go
        lost = re.search(r"died with (\d+) record\(s\) \((\d+) bytes\) it had not read yet", r.stderr)
        assert lost and int(lost.group(1)) >= 1, r.stderr
        # the whole episode is gone: its cgroup is removed, and nothing reached the test host
        mine = lambda: [n for n in ((cgroup2_mount() / "eptrace").iterdir() if  # noqa: E731
                                    (cgroup2_mount() / "eptrace").is_dir() else [])
                        if n.name.startswith("ep-killer@") and n.name not in started]
        wait_until(lambda: not mine(), 10, lambda: f"run cgroup still there: {mine()}")
        time.sleep(1.0)
        assert not accepts(peer), f"the killed episode reached the test host: {peer.stdout}"
        assert "connected" not in r.stdout + r.stderr
    assert not list(pin_dir.glob("run-*")), "the dead run's pins were not removed"


def test_tracer_stopped_connects_refused_and_counted(net, tmp_path, pin_dir):
    """SIGSTOP instead of kill: no watchdog fires, but the probes see no live tracer and refuse (EPERM);
    the tracer, once continued, puts the count in the verdict and the metrics."""
    port = 7902
    config = tmp_path / "c.toml"
    config.write_text("[tracing]\nliveness_timeout_seconds = 0.5\n")
    connect_once = (f"import socket\ntry:\n    socket.create_connection(('{HOST_IP}', {port}), timeout=2)"
                    f"\n    print('connected')\nexcept OSError as e:\n    print('refused', e.errno)")
    script = f"kill -STOP $PPID; sleep 2; {PYTHON} -c \"{connect_once}\"; kill -CONT $PPID"
    events, verdict = tmp_path / "ev.ndjson", tmp_path / "verdict.json"
    with harness.python_server(net, ACCEPT_LOGGER, port, args=(HOST_IP, port), banner="listening\n") as peer:
        r = run_eptrace("run", "--episode", "ep-stopper", "--config", config, "--output", f"file:{events}",
                        "--verdict", verdict, "--", *net.sandbox_prefix(), "sh", "-c", script, timeout=60)
        assert r.returncode == 0, r.stderr
        time.sleep(0.5)
        assert not accepts(peer), f"a connect went through while the tracer was stopped: {peer.stdout}"
    assert "refused 1" in r.stdout, f"the connect was not refused with EPERM: {r.stdout!r} {r.stderr}"
    assert json.loads(verdict.read_text())["connects_refused"] >= 1
    assert "refused while the tracer was not alive" in r.stderr
    docs = read_docs(events)
    assert get([d for d in docs if get(d, "event.kind") == "metric"][-1], "eptrace.stats.connects_refused") >= 1
    attempts = select(docs, "connection_attempted", port=port, episode="ep-stopper")
    assert attempts and get(attempts[0], "event.outcome") == "failure", dump(docs)


def test_user_cannot_signal_the_tracer(tmp_path, pin_dir):
    script = 'id -u; kill -9 $PPID; echo "kill status $?"'
    r = run_eptrace("run", "--episode", "ep-user", "--user", "nobody", "--output", f"file:{tmp_path / 'e'}",
                    "--", "sh", "-c", script, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    assert lines[0] == "65534", r.stdout
    assert "kill status 1" in r.stdout and "Operation not permitted" in r.stderr, (r.stdout, r.stderr)
    assert "episode ep-user: exit 0" in r.stderr


def test_watch_restart_delivers_what_was_recorded_while_it_was_dead(net, tmp_path, episode_cgroup, pin_dir):
    port = 7903
    token = secrets.token_hex(3)
    eid, state = f"ep-pin-{token}", tmp_path / "state"
    cg = episode_cgroup(f"pin-{token}")
    ev1, ev2 = tmp_path / "first.ndjson", tmp_path / "second.ndjson"
    assert run_eptrace("episode", "add", "--id", eid, "--cgroup", cg, state_dir=state).returncode == 0
    with harness.tcp_echo_server(net, port) as server:
        with Watcher(ev1, state) as first:
            first.ready(episodes=1)
            kill(first.proc)                                      # SIGKILL: no clean end
        assert (pin_dir / "watch" / "links").is_dir(), "watch pinned nothing"
        client = harness.spawn_in_cgroup(cg, net.sandbox_prefix() + [
            PYTHON, "-c", f"import socket\nfor i in range(3):\n    s = socket.create_connection(('{HOST_IP}', "
                          f"{port}), timeout=5); s.sendall(b'while-away'); s.recv(10); s.close()"])
        try:
            assert client.wait(timeout=30) == 0
        finally:
            kill(client)
        server.wait_received(b"while-away")
        time.sleep(1.0)
        assert not ev2.exists()
        with Watcher(ev2, state) as second:
            wait_for_docs(ev2, lambda docs: len(select(docs, "connection_attempted", port=port, episode=eid)) >= 3,
                          60, "the connections made while watch was dead")
            resumed = wait_for_docs(ev2, lambda docs: [d for d in docs if get(d, "eptrace.stats.tracer_resumed")],
                                    10, "the resumption metric")[0]
            away = get(resumed, "eptrace.stats.away_seconds")
            assert away >= 1.0, resumed
            assert get(resumed, "eptrace.stats.records_lost_while_away") == 0, resumed
            assert get(resumed, "eptrace.stats.records_delivered_from_pins") >= 3, resumed
            for d in select(read_docs(ev2), port=port):
                assert get(d, "labels.episode_id") == eid, d
            assert second.stop() == 0, second.stderr.text()
    # A clean stop leaves a registered episode's probes attached for the next watch (--detach-on-stop: not).
    assert list((pin_dir / "watch" / "links").glob("cg-*")), "a clean stop detached a registered episode"


def test_fail_closed_watch_refuses_while_dead_and_reports_the_count(net, tmp_path, episode_cgroup, pin_dir):
    port = 7904
    token = secrets.token_hex(3)
    eid, state = f"ep-fc-{token}", tmp_path / "state"
    cg = episode_cgroup(f"fc-{token}")
    config = tmp_path / "c.toml"
    config.write_text("[tracing]\nfail_closed = true\nliveness_timeout_seconds = 0.5\n")
    ev1, ev2 = tmp_path / "first.ndjson", tmp_path / "second.ndjson"
    assert run_eptrace("episode", "add", "--id", eid, "--cgroup", cg, state_dir=state).returncode == 0
    args = ("watch", "--config", config, "--stats-interval", 0.25, "--output")
    ready = lambda docs: [d for d in docs if get(d, "eptrace.stats.episodes") == 1]  # noqa: E731
    with harness.python_server(net, ACCEPT_LOGGER, port, args=(HOST_IP, port), banner="listening\n") as peer:
        first = start_eptrace(*args, f"file:{ev1}", state_dir=state, stderr=subprocess.PIPE)
        try:
            wait_for_docs(ev1, ready, 60, "the first watch")
        finally:
            kill(first)
        time.sleep(1.5)                       # three times the timeout
        client = harness.spawn_in_cgroup(cg, net.sandbox_prefix() + [
            PYTHON, "-u", "-c", CONNECT_LOOP, HOST_IP, port, 1], stdout=subprocess.PIPE, text=True)
        try:
            out, _ = client.communicate(timeout=30)
        finally:
            kill(client)
        assert out and set(out.split("\n")[:-1]) == {"refused 1"}, out
        assert not accepts(peer), peer.stdout
        second = start_eptrace(*args, f"file:{ev2}", "--detach-on-stop", state_dir=state, stderr=subprocess.PIPE)
        try:
            resumed = wait_for_docs(ev2, lambda docs: [d for d in docs if get(d, "eptrace.stats.tracer_resumed")],
                                    60, "the resumption metric")[0]
            refused = next(item["count"] for item in get(resumed, "eptrace.stats.episode_connects_refused")
                           if item["episode_id"] == eid)
            assert refused == len(out.split("\n")[:-1]), (resumed, out)
            attempts = wait_for_docs(ev2, lambda docs: select(docs, "connection_attempted", port=port, episode=eid),
                                     10, "the refused attempts, delivered")
            assert all(get(d, "event.outcome") == "failure" for d in attempts), dump(attempts)
            # the new watch is alive: the episode may connect again
            again = harness.spawn_in_cgroup(cg, net.sandbox_prefix() + [
                PYTHON, "-u", "-c", CONNECT_LOOP, HOST_IP, port, 0.05], stdout=subprocess.PIPE, text=True)
            try:
                assert again.communicate(timeout=30)[0].startswith("connected"), "still refused after the restart"
            finally:
                kill(again)
            assert stop(second) == 0
        finally:
            kill(second)
    assert not (pin_dir / "watch").exists()


def test_leftover_run_cgroup_is_killed_reported_and_removed(tmp_path, pin_dir):
    dead = subprocess.Popen(["true"])
    dead.wait()
    parent = cgroup2_mount() / "eptrace"
    parent.mkdir(exist_ok=True)
    leftover = parent / f"ep-left-{secrets.token_hex(3)}@{dead.pid}"
    leftover.mkdir()
    sleeper = None
    try:
        sleeper = harness.spawn_in_cgroup(leftover, ["sleep", "300"])
        wait_until(lambda: cgroups.pids(leftover), 10, "the sleeper in the leftover cgroup")
        events = tmp_path / "ev.ndjson"
        r = run_eptrace("run", "--episode", "ep-next", "--output", f"file:{events}", "--", "true", timeout=60)
        assert r.returncode == 0, r.stderr
        assert sleeper.wait(timeout=10) == -9
        assert not leftover.exists()
        reports = [d for d in read_docs(events) if get(d, "eptrace.stats.leftover_run_cgroup")
                   == cgroups.relative(leftover)]
        assert len(reports) == 1, dump(read_docs(events))
        assert get(reports[0], "eptrace.stats.leftover_processes_killed") == 1
        assert "killed 1 process(es) left by a dead eptrace" in r.stderr
    finally:
        if sleeper is not None:
            kill(sleeper)
        cgroups.kill_and_remove(leftover)


def test_doctor_lists_pinned_state_and_unpin_clears_a_dead_one(tmp_path, pin_dir):
    state = tmp_path / "state"
    with Watcher(tmp_path / "ev.ndjson", state) as watcher:
        watcher.ready()
        r = run_eptrace("unpin", state_dir=state)
        assert r.returncode == 0 and "a live eptrace uses it" in r.stderr, r.stderr
        assert list((pin_dir / "watch").glob("maps-*/events")), "watch pinned no ring buffer"
        kill(watcher.proc)
    r = run_eptrace("doctor", state_dir=state)
    line = [x for x in r.stdout.splitlines() if "pinned state" in x]
    assert line and f"{pin_dir}/watch" in line[0] and "NO live eptrace" in line[0], r.stdout
    assert "eptrace unpin" in r.stdout
    r = run_eptrace("unpin", state_dir=state)
    assert r.returncode == 0 and f"removed {pin_dir}/watch" in r.stderr, r.stderr
    assert not (pin_dir / "watch").exists()
    r = run_eptrace("doctor", state_dir=state)
    assert f"pinned state: none under {pin_dir}" in r.stdout, r.stdout


def test_fail_closed_stalls_established_flows_ping_and_raw_sockets(net, tmp_path, episode_cgroup, pin_dir):
    """What a connect check misses: a flow opened while the tracer lived (an ssh -R tunnel), ping sockets
    (no connect, no UDP send) and raw sockets. With no tracer alive, the episode's packets to other hosts are
    dropped and raw sockets refused, each counted; once a tracer is back, the same flow talks again."""
    port = 7905
    token = secrets.token_hex(3)
    eid, state = f"ep-stall-{token}", tmp_path / "state"
    cg = episode_cgroup(f"stall-{token}")
    config = tmp_path / "c.toml"
    config.write_text("[tracing]\nfail_closed = true\nliveness_timeout_seconds = 0.5\n")
    ev1, ev2 = tmp_path / "first.ndjson", tmp_path / "second.ndjson"
    assert run_eptrace("episode", "add", "--id", eid, "--cgroup", cg, state_dir=state).returncode == 0
    args = ("watch", "--config", config, "--stats-interval", 0.25, "--output")
    ready = lambda docs: [d for d in docs if get(d, "eptrace.stats.episodes") == 1]  # noqa: E731
    with harness.tcp_echo_server(net, port):
        first = start_eptrace(*args, f"file:{ev1}", state_dir=state, stderr=subprocess.PIPE)
        client = None
        try:
            wait_for_docs(ev1, ready, 60, "the first watch")
            client = harness.spawn_in_cgroup(cg, net.sandbox_prefix() + [
                "/bin/sh", "-c", f'{OPEN_PING_SOCKETS} && exec "$@"', "sh", PYTHON, "-u", "-c", FLOW_PING_RAW,
                HOST_IP, port], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert client.stdout.readline().split() == ["alive", "echo", "pong", "raw"], client.stderr.read()
            kill(first)
            time.sleep(1.5)                       # three times the timeout
            client.stdin.write("dead\n")
            client.stdin.flush()
            assert client.stdout.readline().split() == ["dead", "stalled", "noping", "raw-refused", "1"]
            second = start_eptrace(*args, f"file:{ev2}", "--detach-on-stop", state_dir=state, stderr=subprocess.PIPE)
            try:
                resumed = wait_for_docs(ev2, lambda docs: [d for d in docs if get(d, "eptrace.stats.tracer_resumed")],
                                        60, "the resumption metric")[0]
                refused = next(item["count"] for item in get(resumed, "eptrace.stats.episode_connects_refused")
                               if item["episode_id"] == eid)
                assert refused >= 3, resumed      # the raw socket, the ping, the flow's byte (and retransmits)
                client.stdin.write("again\n")
                client.stdin.flush()
                assert client.stdout.readline().split() == ["again", "echo", "pong", "raw"]
                assert stop(second) == 0
            finally:
                kill(second)
        finally:
            kill(first)
            if client is not None:
                kill(client)


def test_a_hung_main_loop_lets_the_liveness_lapse(net, tmp_path, episode_cgroup, pin_dir):
    """The liveness thread outlives a main loop hung for good: here its stdout output, a pipe nobody reads,
    is full, so the loop blocks in a write. The thread then stops refreshing (stall_timeout_seconds), and
    the episode's connects are refused while the tracer's process still lives and runs."""
    port = 7906
    token = secrets.token_hex(3)
    eid, state = f"ep-hang-{token}", tmp_path / "state"
    cg = episode_cgroup(f"hang-{token}")
    config = tmp_path / "c.toml"
    config.write_text("[tracing]\nfail_closed = true\nliveness_timeout_seconds = 0.5\nstall_timeout_seconds = 1\n")
    assert run_eptrace("episode", "add", "--id", eid, "--cgroup", cg, state_dir=state).returncode == 0
    stderr = tmp_path / "stderr"
    with harness.python_server(net, ACCEPT_LOGGER, port, args=(HOST_IP, port), banner="listening\n") as peer, \
            open(stderr, "w") as err:
        # stdout: a pipe this test never reads (64 KiB, then eptrace's own 64 KiB buffer)
        watch = start_eptrace("watch", "--config", config, "--stats-interval", 0.25, state_dir=state,
                              stdout=subprocess.PIPE, stderr=err)
        client = None
        try:
            wait_until(lambda: list((pin_dir / "watch" / "links").glob("cg-*")), 60,
                       lambda: f"watch attached nothing: {stderr.read_text()}")
            client = harness.spawn_in_cgroup(cg, net.sandbox_prefix() + [
                PYTHON, "-u", "-c", CONNECT_LOOP, HOST_IP, port, 60], stdout=subprocess.PIPE, text=True)
            outcomes: list[str] = []
            for line in client.stdout:
                outcomes.append(line.split()[0])
                if outcomes[-3:] == ["refused"] * 3:
                    break
            assert outcomes[0] == "connected" and outcomes[-3:] == ["refused"] * 3, outcomes
            assert watch.poll() is None, "the tracer died: it should be alive and hung"
            assert "the main loop has made no progress" in stderr.read_text(), stderr.read_text()
            before = len(accepts(peer))
            time.sleep(1.0)
            assert len(accepts(peer)) == before, "connections went through while the tracer was hung"
        finally:
            if client is not None:
                kill(client)
            kill(watch)


def test_a_dead_runs_unread_records_are_counted_by_the_next_run(tmp_path, pin_dir, episode_cgroup):
    """A run whose watchdog died too leaves its pinned ring buffer behind with records nobody read; the next
    run's clean-up counts them in a metric document before it unpins them."""
    from tracer.kernel import loader
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = pin_dir / f"run-{dead.pid}"
    cg = episode_cgroup(f"dead-run-{secrets.token_hex(3)}")
    probes = loader.Probes(pin_dir=left)
    try:
        probes.attach(cg)
        for _ in range(5):
            harness.spawn_in_cgroup(cg, ["/bin/true"]).wait(timeout=10)
    finally:
        probes.close(keep_pins=True)              # as a tracer killed with its watchdog would leave it
    assert list(left.glob("maps-*/events")), "nothing pinned"
    events = tmp_path / "ev.ndjson"
    r = run_eptrace("run", "--episode", "ep-after", "--output", f"file:{events}", "--", "true", timeout=60)
    assert r.returncode == 0, r.stderr
    assert not left.exists(), "the dead run's pins were not removed"
    reports = [d for d in read_docs(events) if get(d, "eptrace.stats.leftover_pin_dir") == str(left)]
    assert len(reports) == 1, dump(read_docs(events))
    # each /bin/true: fork, argv, exec, exit (the exit and fork records come out of the budget: it is large)
    assert get(reports[0], "eptrace.stats.records_undelivered") >= 5 * 3, reports[0]
    assert get(reports[0], "eptrace.stats.bytes_undelivered") > 0, reports[0]

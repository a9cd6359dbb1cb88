"""Episodes: many at once under one `eptrace watch`, registration of a cgroup that is already busy, a daemon
restart, `episode ls/rm`, and what `eptrace run` leaves behind (its exit status, no cgroup)."""
from __future__ import annotations

import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest

import harness
from eptrace_helpers import (CONNECTION_ACTIONS, LineReader, Watcher, assert_contract, cgroup2_mount, dump,
                             final_metric, get, kill, parse_timestamp, read_docs, run_cgroups, run_eptrace, select,
                             start_eptrace, wait_for_docs, wait_until)
from harness import HOST_IP, PYTHON
from tracer.kernel import cgroups

N_EPISODES = 50

# Says it is ready (a file), waits for the go-file, connects, sends its tag, prints its local port.
BARRIER_CLIENT = r'''
import os, socket, sys, time
host, port, ready, go, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
open(ready, "w").close()
deadline = time.monotonic() + 60
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.01)
with socket.create_connection((host, port), timeout=20) as s:
    s.sendall(tag.encode())
    assert s.recv(100) == tag.encode()
    print("local", s.getsockname()[1], flush=True)
'''


def test_fifty_concurrent_episodes_each_tagged_nothing_crossed(net, tmp_path, episode_cgroup):
    port = 7700
    token = secrets.token_hex(3)
    state, events, sync = tmp_path / "state", tmp_path / "events.ndjson", tmp_path / "sync"
    sync.mkdir()
    ids = [f"ep-{i:02d}" for i in range(N_EPISODES)]
    cgs = {eid: episode_cgroup(f"many-{token}-{eid}") for eid in ids}

    # Fifty registrations at once: each must succeed.
    adds = {eid: start_eptrace("episode", "add", "--id", eid, "--cgroup", cgs[eid], state_dir=state,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE) for eid in ids}
    for eid, p in adds.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, f"episode add {eid}: {err}"

    with harness.tcp_echo_server(net, port), Watcher(events, state) as watcher:
        watcher.ready(episodes=N_EPISODES, timeout=90)
        clients: dict[str, subprocess.Popen] = {}
        try:
            for eid in ids:
                clients[eid] = harness.spawn_in_cgroup(
                    cgs[eid], net.sandbox_prefix() + [PYTHON, "-c", BARRIER_CLIENT, HOST_IP, port,
                                                      sync / f"ready-{eid}", sync / "go", eid],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            wait_until(lambda: all((sync / f"ready-{eid}").exists() for eid in ids), 60, "clients ready")
            (sync / "go").touch()
            outputs = {eid: p.communicate(timeout=60) for eid, p in clients.items()}
        finally:
            for p in clients.values():
                kill(p)
        for eid, p in clients.items():
            assert p.returncode == 0, f"client {eid}: {outputs[eid][1]}"
        pids = {eid: p.pid for eid, p in clients.items()}     # sh -> exec nsenter -> exec python3: one pid
        local_ports = {eid: int(outputs[eid][0].split()[1]) for eid in ids}
        # Each client got its tag echoed (it asserts that), so each connection reached the test host. (The
        # server's log is not checked per client: its threads' lines can interleave under this load.)

        wait_for_docs(events, lambda docs: all(select(docs, "flow_ended", pid=pids[eid], port=port) for eid in ids),
                      60, "a flow_ended for each of the 50 clients")
        assert watcher.stop() == 0, watcher.stderr.text()

    docs = read_docs(events)
    assert_contract(docs)
    by_pid = {pid: eid for eid, pid in pids.items()}
    problems = []
    for eid in ids:
        mine = select(docs, pid=pids[eid])
        for action in CONNECTION_ACTIONS:
            found = select(mine, action, port=port)
            if len(found) != 1:
                problems.append(f"{eid} (pid {pids[eid]}): {len(found)} {action}")
        for d in mine:
            if get(d, "labels.episode_id") != eid:
                problems.append(f"pid {pids[eid]} of {eid} tagged {get(d, 'labels.episode_id')}: "
                                f"{get(d, 'event.action')}")
            if get(d, "eptrace.cgroup.path") != cgroups.relative(cgs[eid]):
                problems.append(f"pid {pids[eid]} of {eid} has cgroup {get(d, 'eptrace.cgroup.path')}")
        # Independent of pids: the flow with the client's own source port carries the client's episode.
        for d in select(docs, ("connection_established", "flow_ended"), source__port=local_ports[eid]):
            if get(d, "labels.episode_id") != eid:
                problems.append(f"flow from port {local_ports[eid]} of {eid} tagged {get(d, 'labels.episode_id')}")
    # Nothing of an episode is attributed to another episode's client.
    for d in docs:
        owner = by_pid.get(get(d, "process.pid"))
        if owner is not None and get(d, "labels.episode_id") != owner:
            problems.append(f"crossed: {get(d, 'event.action')} of pid {get(d, 'process.pid')} ({owner}) "
                            f"tagged {get(d, 'labels.episode_id')}")
    assert not problems, "\n".join(sorted(set(problems))[:80])

    final = final_metric(docs)
    assert parse_timestamp(final["@timestamp"]) >= watcher.stopped_at - 0.05, "no metric written at exit"
    stats = get(final, "eptrace.stats")
    assert stats["records_lost"] == 0, stats


# Loops: connect, print "pid N" and the local port, sleep 0.3 s.
LOOPER = r'''
import os, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
for i in range(2000):
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"loop")
        s.recv(100)
        print("pid", os.getpid(), s.getsockname()[1], flush=True)
    time.sleep(0.3)
'''


def _episode_docs(path: Path, pid: int, episode: str) -> list[dict]:
    return select(read_docs(path), "connection_established", pid=pid, episode=episode)


def test_episode_add_on_busy_cgroup_restart_ls_rm(net, tmp_path, episode_cgroup):
    port = 7800
    token = secrets.token_hex(3)
    eid = f"ep-late-{token}"
    state = tmp_path / "state"
    cg = episode_cgroup(f"late-{token}")
    ev1, ev2 = tmp_path / "first.ndjson", tmp_path / "second.ndjson"

    with harness.tcp_echo_server(net, port), Watcher(ev1, state) as first:
        first.ready()
        # The workload is running before its cgroup is registered.
        looper = harness.spawn_in_cgroup(cg, net.sandbox_prefix() + [PYTHON, "-u", "-c", LOOPER, HOST_IP, port],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out = LineReader(looper.stdout)
            out.wait_for(lambda lines: len(lines) >= 3, 30, "looper")
            pid = looper.pid
            assert not select(read_docs(ev1), pid=pid), "traced before registration:\n" + dump(read_docs(ev1))

            r = run_eptrace("episode", "add", "--id", eid, "--cgroup", cg, state_dir=state)
            assert r.returncode == 0, r.stderr
            added = time.monotonic()
            wait_for_docs(ev1, lambda docs: select(docs, "connection_established", pid=pid, episode=eid), 3.0,
                          f"a tagged connection within 3 s of episode add (pid {pid})")
            assert time.monotonic() - added < 3.0
            for d in select(read_docs(ev1), pid=pid):
                assert get(d, "labels.episode_id") == eid, d
                assert get(d, "eptrace.cgroup.path") == cgroups.relative(cg), d

            # Restart: the registration survives, the running process is tagged again.
            assert first.stop() == 0, first.stderr.text()
            with Watcher(ev2, state) as second:
                second.ready(episodes=1)
                wait_for_docs(ev2, lambda docs: select(docs, "connection_established", pid=pid, episode=eid), 10,
                              "a tagged connection after the restart")
                for d in select(read_docs(ev2), pid=pid):
                    assert get(d, "labels.episode_id") == eid, d

                r = run_eptrace("episode", "ls", state_dir=state)
                assert r.returncode == 0, r.stderr
                assert r.stdout.splitlines() == [f"{eid}\t{cg}"], r.stdout

                r = run_eptrace("episode", "rm", "--id", eid, state_dir=state)
                assert r.returncode == 0, r.stderr
                time.sleep(1.5)            # "takes effect within a second", plus records in flight
                before = len(select(read_docs(ev2), pid=pid))
                seen = len(out.lines)
                out.wait_for(lambda lines: len(lines) >= seen + 5, 30, "looper keeps connecting")
                second.ready(episodes=0, timeout=5)           # the daemon itself says it traces none
                after = select(read_docs(ev2), pid=pid)
                assert len(after) == before, "events after episode rm:\n" + dump(after[before:])
                assert run_eptrace("episode", "ls", state_dir=state).stdout == ""
                assert second.stop() == 0, second.stderr.text()
            assert looper.poll() is None, "the looper died: the test proved nothing"
        finally:
            kill(looper)
    for path in (ev1, ev2):
        docs = read_docs(path)
        assert_contract(docs)
        assert get(final_metric(docs), "eptrace.stats.records_lost") == 0


# ---- eptrace run: exit status and clean-up ---------------------------------------------------------------

@pytest.mark.parametrize("script, status", [("exit 7", 7), ("exit 0", 0), ("kill -TERM $$", 128 + 15)])
def test_run_passes_exit_status_and_removes_its_cgroup(tmp_path, script, status):
    events = tmp_path / "events.ndjson"
    before = run_cgroups()
    proc = start_eptrace("run", "--episode", "ep-status", "--output", f"file:{events}", "--", "/bin/sh", "-c", script,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        kill(proc)
    assert proc.returncode == status, err
    docs = read_docs(events)
    assert_contract(docs)
    (started,) = select(docs, "process_started", episode="ep-status")
    path = get(started, "eptrace.cgroup.path")
    assert path == f"/eptrace/ep-status@{proc.pid}", path       # <id>@<pid of eptrace run>
    assert not (cgroup2_mount() / path.lstrip("/")).exists(), f"cgroup {path} left behind"
    assert not {n for n in run_cgroups() - before if n.startswith(f"ep-status@{proc.pid}")}


def test_run_kills_leftover_children_and_removes_its_cgroup(tmp_path):
    events = tmp_path / "events.ndjson"
    r = run_eptrace("run", "--episode", "ep-orphan", "--grace", "1", "--output", f"file:{events}", "--",
                    "/bin/sh", "-c", "sleep 300 & echo child $!; exit 3")
    assert r.returncode == 3, r.stderr
    child = int(r.stdout.split()[1])
    docs = read_docs(events)
    (started,) = select(docs, "process_started", pid=child)
    # ECS: args[0] is the absolute executable (sh found sleep on PATH); argv as given is the title
    assert os.path.basename(get(started, "process.executable")) == "sleep", started
    assert get(started, "process.args") == [get(started, "process.executable"), "300"], started
    assert get(started, "process.title") == "sleep 300", started
    path = get(started, "eptrace.cgroup.path")
    assert not (cgroup2_mount() / path.lstrip("/")).exists(), f"cgroup {path} left behind"
    # The orphan is gone (a zombie reaped by init may linger an instant).
    wait_until(lambda: not os.path.exists(f"/proc/{child}") or
               open(f"/proc/{child}/stat").read().split(") ")[1].startswith("Z"), 5, f"pid {child} killed")

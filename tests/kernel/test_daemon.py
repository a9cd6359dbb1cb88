"""eptrace daemon and its clients (issue 11), for real: a daemon started by the test (its own socket, state
directory and pin directory) traces the episodes of `eptrace run` clients and of registrations; it is killed
and restarted under a running client; the socket refuses other users."""
from __future__ import annotations

import errno
import grp
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import harness
from eptrace_helpers import (REPO_ROOT, LineReader, alerts, assert_contract, assert_one_line_error, dump, get, kill,
                             read_docs, run_eptrace, select, start_eptrace, stop, wait_for_docs, wait_until)
from harness import HOST_IP, METADATA_IP, PYTHON
from support import HEAVY_FOR_A_CLIENT, free_port

from tracer import control
from tracer.capture import entries as capture_entries
from tracer.daemon import MEMBER_EPISODES
from tracer.decoding import owner_of

CONNECT = "import socket, sys; socket.socket().connect_ex(('127.0.0.1', int(sys.argv[1])))"
# Connects to 127.0.0.1:BASE+i every 0.2 s, N times, printing each i.
CONNECT_LOOP = r'''
import socket, sys, time
base, n = int(sys.argv[1]), int(sys.argv[2])
for i in range(n):
    print(i, socket.socket().connect_ex(("127.0.0.1", base + i)), flush=True)
    time.sleep(0.2)
'''
CONNECT_TWICE = r'''
import socket, sys
for host in (sys.argv[1], sys.argv[2]):
    with socket.create_connection((host, int(sys.argv[3])), timeout=5) as s:
        s.sendall(b"hello")
        s.recv(100)
print("done", flush=True)
'''
# As CONNECT_TWICE, with the second reply optional: a cut drops that flow's packets (the peer stalls, no reset),
# and it may land before the echo or after it.
CONNECT_TWICE_CUT_OR_NOT = CONNECT_TWICE.replace("        s.recv(100)", """        try:
            s.recv(100)
        except TimeoutError:
            print("stalled", flush=True)""")
# eptrace's command line in this process, reporting at exit (a client's os._exit too) whether bcc or the loader
# were imported, every module it imported, and VmHWM.
CLIENT_PROBE = r'''
import atexit, json, os, sys
path = sys.argv[1]
def report():
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    with open(path, "w") as f:
        json.dump({"bcc": "bcc" in sys.modules, "loader": "tracer.kernel.loader" in sys.modules,
                   "modules": sorted(sys.modules), "vmhwm_kb": hwm}, f)
atexit.register(report)
exit_now = os._exit
def report_and_exit(status):
    report()
    exit_now(status)
os._exit = report_and_exit
sys.argv = ["eptrace"] + sys.argv[2:]
from tracer.cli import main
main()
'''


class Daemon:
    """`eptrace daemon` with a socket, state directory and pin directory of this test's own."""

    def __init__(self, tmp_path: Path, config: str | None = None):
        self.tmp = tmp_path
        self.socket = Path(f"/tmp/eptrace-test-sock-{secrets.token_hex(4)}") / "eptrace.sock"
        self.state = tmp_path / "state"
        self.pins = Path(f"/sys/fs/bpf/eptrace-test-daemon-{secrets.token_hex(3)}")
        self.events = tmp_path / "daemon.ndjson"
        self.config = tmp_path / "daemon.toml"
        self.config.write_text(config or "")
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def env(self) -> None:
        os.environ["EPTRACE_SOCKET"] = str(self.socket)
        os.environ["EPTRACE_PIN_DIR"] = str(self.pins)

    def start(self, *options) -> Daemon:
        self.env()
        self.starts += 1
        self.proc = start_eptrace("-v", "daemon", "--output", f"file:{self.events}", "--stats-interval", 0.5,
                                  "--config", self.config, *options, state_dir=self.state, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)
        self.stderr = LineReader(self.proc.stderr)
        wait_until(self._answers, 90, lambda: f"the daemon never answered; stderr:\n{self.stderr.text()}")
        return self

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the daemon exited with {self.proc.returncode}: {self.stderr.text()}")
        try:
            return self.request("health")["type"] == "health"
        except control.DaemonError:
            return False

    def request(self, op: str, **fields) -> dict:
        conn = control.Connection(self.socket, timeout=10)
        try:
            return conn.request(op, **fields)
        finally:
            conn.close()

    def cleanup(self) -> None:
        if self.proc is not None:
            stop(self.proc)
        shutil.rmtree(self.pins, ignore_errors=True)
        shutil.rmtree(self.socket.parent, ignore_errors=True)


@pytest.fixture
def daemon(tmp_path, monkeypatch):
    monkeypatch.setenv("EPTRACE_DAEMON", "never")      # restored after the test; clients ask explicitly
    monkeypatch.setenv("EPTRACE_SOCKET", os.environ["EPTRACE_SOCKET"])
    monkeypatch.setenv("EPTRACE_PIN_DIR", os.environ["EPTRACE_PIN_DIR"])
    d = Daemon(tmp_path)
    try:
        yield d.start()
    finally:
        d.cleanup()


def client(d: Daemon, episode: str, *command, options=(), timeout: float = 120.0) -> subprocess.CompletedProcess:
    """`eptrace run --daemon require` with its own output and verdict file."""
    return run_eptrace("run", "--daemon", "require", "--episode", episode, "--grace", 2,
                       "--output", f"file:{d.tmp / episode}.ndjson", "--verdict", f"{d.tmp / episode}.json",
                       *options, "--", *command, state_dir=d.state, timeout=timeout)


def verdict_of(d: Daemon, episode: str) -> dict:
    return json.loads((d.tmp / f"{episode}.json").read_text())


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its new parent to reap it is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def ports_attempted(docs: list[dict]) -> list[int]:
    return [doc["destination"]["port"] for doc in select(docs, "connection_attempted")]


def assert_own_stream(docs: list[dict], daemon_run_id: str | None = None) -> str:
    """A client's output is a run of its own, as in-process: one eptrace.run.id that is not the daemon's,
    event.sequence 1..N without a gap (nothing was lost); the daemon's numbering is kept in eptrace.daemon.*"""
    assert [get(d, "event.sequence") for d in docs] == list(range(1, len(docs) + 1)), dump(docs)
    run_ids = {get(d, "eptrace.run.id") for d in docs}
    daemon_runs = {get(d, "eptrace.daemon.run_id") for d in docs}
    assert len(run_ids) == 1 and len(daemon_runs) == 1 and not run_ids & daemon_runs, (run_ids, daemon_runs)
    assert daemon_run_id is None or daemon_runs == {daemon_run_id}, (daemon_runs, daemon_run_id)
    return run_ids.pop()


def daemon_run_id(d: Daemon) -> str:
    return get(wait_for_docs(d.events, lambda docs: docs)[0], "eptrace.run.id")


def key_fields(docs: list[dict]) -> list[tuple]:
    """What a replay must give again: each event and alert, its time, process, peer and rule."""
    return [(get(d, "@timestamp"), get(d, "event.action"), get(d, "event.outcome"), get(d, "process.pid"),
             get(d, "process.executable"), get(d, "destination.ip"), get(d, "destination.port"),
             get(d, "destination.bytes"), get(d, "rule.name"), get(d, "message"))
            for d in docs if get(d, "event.kind") != "metric"]


# ---- the daemon traces its clients ----------------------------------------------------------------------

def test_a_run_client_gets_its_own_documents_and_verdict_without_loading_the_probes(daemon, tmp_path):
    port = free_port()
    report = tmp_path / "client.json"
    r = subprocess.run([sys.executable, "-c", CLIENT_PROBE, str(report), "run", "--daemon", "require", "--episode",
                        "ep-d1", "--grace", "2", "--output", f"file:{tmp_path}/ep-d1.ndjson", "--verdict",
                        f"{tmp_path}/ep-d1.json", "--label", "team=rl", "--", PYTHON, "-c",
                        CONNECT + "; raise SystemExit(7)", str(port)], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "EPTRACE_STATE_DIR": str(daemon.state)})
    assert r.returncode == 7, r.stderr                  # the command's own status
    docs = read_docs(tmp_path / "ep-d1.ndjson")
    assert_contract(docs)
    events = [doc for doc in docs if doc["event"]["kind"] != "metric"]
    assert {doc["labels"]["episode_id"] for doc in events} == {"ep-d1"}, dump(docs)
    assert {doc["labels"]["team"] for doc in events} == {"rl"}, dump(docs)
    assert ports_attempted(docs) == [port], dump(docs)
    assert select(docs, "process_started"), dump(docs)
    metrics = [doc for doc in docs if doc["event"]["kind"] == "metric"]      # its own counters, last
    assert metrics == [docs[-1]] and metrics[0]["eptrace"]["stats"]["episode_id"] == "ep-d1", dump(docs)
    verdict = verdict_of(daemon, "ep-d1")
    assert verdict["exit_code"] == 7 and verdict["connections"] == 1, verdict
    assert verdict["destinations"] == [f"127.0.0.1:{port}/tcp"] and verdict["complete"], verdict
    # the daemon's own output has them too; the client never loaded bcc or the probes
    wait_for_docs(daemon.events, lambda all_docs: port in ports_attempted(all_docs))
    probe = json.loads(report.read_text())
    assert probe["bcc"] is False and probe["loader"] is False, probe
    heavy = [m for m in probe["modules"] if any(m == h or m.startswith(h + ".") for h in HEAVY_FOR_A_CLIENT)]
    assert heavy == [], heavy           # a light client (tests/unit/test_light_imports.py): its run time is issue 11's
    assert probe["vmhwm_kb"] < 80 * 1024, probe         # the 40 MB target is bench's; this catches a probe load
    listed = daemon.request("list")["episodes"]
    assert not [e for e in listed if e["id"] == "ep-d1"], listed       # ended: untraced, cgroup gone
    assert not list((daemon.state / "runs").glob("ep-d1@*")), "the run record was left behind"


def test_fifty_concurrent_clients_each_get_only_their_own_documents(daemon):
    ports = {f"ep-c{i}": free_port() for i in range(50)}
    results: dict[str, subprocess.CompletedProcess] = {}

    captured = [f"ep-c{i}" for i in range(0, 50, 10)]      # a few capture theirs, among the others

    def one(episode: str) -> None:
        capture = ("--capture", daemon.tmp / f"{episode}.capture") if episode in captured else ()
        results[episode] = client(daemon, episode, PYTHON, "-c", CONNECT, str(ports[episode]), options=capture,
                                  timeout=600)
    threads = [threading.Thread(target=one, args=(e,)) for e in ports]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    daemon_run, run_ids = daemon_run_id(daemon), set()
    for episode, port in ports.items():
        r = results[episode]
        assert r.returncode == 0, (episode, r.stderr)
        docs = read_docs(daemon.tmp / f"{episode}.ndjson")
        assert {doc.get("labels", {}).get("episode_id") or doc["eptrace"]["stats"]["episode_id"]
                for doc in docs} == {episode}, (episode, dump(docs))
        assert ports_attempted(docs) == [port], (episode, dump(docs))
        run_ids.add(assert_own_stream(docs, daemon_run))         # while 49 other episodes were traced
        verdict = verdict_of(daemon, episode)
        assert verdict["destinations"] == [f"127.0.0.1:{port}/tcp"], (episode, verdict)
    assert len(run_ids) == len(ports), "two clients share a run id"
    for episode in captured:        # a capture holds its own episode's records only, and replays on its own
        capture = daemon.tmp / f"{episode}.capture"
        entries = list(capture_entries(capture))
        episode_entries = [e for e in entries if e[0] == "episode"]
        assert [e[1] for e in episode_entries] == [episode], episode_entries
        owners = {owner_of(e[1])[0] for e in entries if e[0] == "rec"}
        assert owners == {episode_entries[0][3]}, (episode, owners)
        replayed = run_eptrace("replay", capture, "--all", "--output", f"file:{capture}.ndjson")
        assert replayed.returncode == 0, replayed.stderr
        assert key_fields(read_docs(f"{capture}.ndjson")) == key_fields(read_docs(daemon.tmp / f"{episode}.ndjson"))


@pytest.fixture
def echo_on_host_and_metadata(net):
    with harness.tcp_echo_server(net, 8080) as host, harness.tcp_echo_server(net, 8080, host=METADATA_IP) as md:
        yield host, md


def test_exit_statuses_and_fail_on_alert_are_the_same_as_in_process(daemon, net, echo_on_host_and_metadata):
    argv = net.sandbox_prefix() + [PYTHON, "-c", CONNECT_TWICE + "raise SystemExit(9)", HOST_IP, METADATA_IP, 8080]
    through, same = {}, {}
    for options in ((), ("--fail-on-alert",)):
        for mode in ("require", "never"):
            episode = f"ep-{mode}-{len(options)}"
            capture = daemon.tmp / f"{episode}.capture"
            r = run_eptrace("run", "--daemon", mode, "--episode", episode, "--grace", 2, "--output",
                            f"file:{daemon.tmp / episode}.ndjson", "--verdict", f"{daemon.tmp / episode}.json",
                            "--capture", capture, *options, "--", *argv, state_dir=daemon.state, timeout=180)
            assert r.returncode in (3, 9), r.stderr
            docs = read_docs(daemon.tmp / f"{episode}.ndjson")
            assert alerts(docs, "cloud_metadata_access"), dump(docs)
            # the capture (through the daemon: the client wrote it) replays to the run's own documents
            replayed = run_eptrace("replay", capture, "--all", "--output", f"file:{capture}.ndjson")
            assert replayed.returncode == 0, replayed.stderr
            assert key_fields(read_docs(f"{capture}.ndjson")) == key_fields(docs), (mode, dump(docs))
            if mode == "require":
                assert_own_stream(docs)
            v = verdict_of(daemon, episode)
            through[(mode, options)] = (r.returncode, v["connections"], v["bytes_out"], v["bytes_in"],
                                        [a["rule"] for a in v["alerts"]], v["exit_code"])
            same[mode] = sorted(k[1:3] + k[5:9] for k in key_fields(docs))      # without times and pids
    assert through[("require", ())] == through[("never", ())] == (9, 2, 10, 10, ["cloud_metadata_access"], 9), through
    assert through[("require", ("--fail-on-alert",))] == through[("never", ("--fail-on-alert",))], through
    assert through[("require", ("--fail-on-alert",))][0] == 3, through
    assert same["require"] == same["never"], same          # the same documents as in-process
    # a command that cannot start: 127, as in-process
    assert client(daemon, "ep-nocmd", "/nonexistent/command").returncode == 127
    # --on-alert: every action goes through the daemon and is taken as in-process ("cut" was once refused)
    taken = {}
    argv = net.sandbox_prefix() + [PYTHON, "-c", CONNECT_TWICE_CUT_OR_NOT + "raise SystemExit(9)", HOST_IP, METADATA_IP,
                                   8080]
    for mode in ("require", "never"):
        episode = f"ep-cut-{mode}"
        r = run_eptrace("run", "--daemon", mode, "--episode", episode, "--grace", 2, "--on-alert", "cut", "--output",
                        f"file:{daemon.tmp / episode}.ndjson", "--verdict", f"{daemon.tmp / episode}.json", "--",
                        *argv, state_dir=daemon.state, timeout=180)
        assert r.returncode == 9, r.stderr
        v = verdict_of(daemon, episode)
        taken[mode] = [(c.get("action"), c.get("rule")) for c in v["containment"]]
    assert taken["require"] == taken["never"] and taken["never"][0][0] == "cut", taken


# ---- registered episodes ------------------------------------------------------------------------------------

def test_episode_add_takes_effect_at_once_and_its_verdict_is_there_at_any_time(daemon, episode_cgroup, tmp_path):
    cgroup = episode_cgroup(f"daemon-live-{os.getpid()}")
    add = run_eptrace("episode", "add", "--id", "ep-live", "--cgroup", cgroup, "--label", "run=7",
                      state_dir=daemon.state)
    assert add.returncode == 0 and "the daemon traces it" in add.stderr, add.stderr
    # no poll: the daemon lists it as soon as `episode add` returned
    listed = {e["id"]: e for e in daemon.request("list")["episodes"]}
    assert listed["ep-live"]["kind"] == "registered", listed
    port = free_port()
    proc = harness.spawn_in_cgroup(cgroup, [PYTHON, "-c", CONNECT, str(port)])
    assert proc.wait(30) == 0
    docs = wait_for_docs(daemon.events, lambda d: [x for x in select(d, "connection_attempted", port=port)])
    assert docs[0]["labels"] == {"episode_id": "ep-live", "run": "7"}, docs[0]

    def current() -> dict:
        r = run_eptrace("episode", "verdict", "--id", "ep-live", "--json", state_dir=daemon.state)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)
    v = wait_until(lambda: (lambda v: v if v["connections"] == 1 else None)(current()), 15, "the verdict so far")
    assert v["destinations"] == [f"127.0.0.1:{port}/tcp"] and v["exit_code"] is None, v
    human = run_eptrace("episode", "verdict", "--id", "ep-live", state_dir=daemon.state)
    assert human.stdout.startswith("episode ep-live: exit None, 1 connection(s)"), human.stdout
    ls = run_eptrace("episode", "ls", "--json", state_dir=daemon.state)
    assert json.loads(ls.stdout.splitlines()[0])["traced"] is True, ls.stdout
    final = tmp_path / "final.json"
    rm = run_eptrace("episode", "rm", "--id", "ep-live", "--verdict", final, state_dir=daemon.state)
    assert rm.returncode == 0, rm.stderr
    assert json.loads(final.read_text())["connections"] == 1
    assert not [e for e in daemon.request("list")["episodes"] if e["id"] == "ep-live"]
    after = run_eptrace("episode", "verdict", "--id", "ep-live", "--json", state_dir=daemon.state)
    assert json.loads(after.stdout)["connections"] == 1, after       # the final one, kept after rm


def test_a_registered_episodes_verdict_survives_restarts(daemon, episode_cgroup, tmp_path):
    """Carried over a clean stop (complete: the probes stayed attached and recorded meanwhile), a kill -9
    (incomplete: tracer_restart) and a --detach-on-stop stop (incomplete: untraced_while_stopped), then
    given by rm."""
    cgroup = episode_cgroup(f"daemon-carry-{os.getpid()}")
    assert run_eptrace("episode", "add", "--id", "ep-carry", "--cgroup", cgroup, state_dir=daemon.state).returncode == 0
    ports = [free_port() for _ in range(5)]
    raw_socket = "import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close(); "
    saved = daemon.state / "verdicts" / "ep-carry.json"

    def connect(code: str, port: int) -> None:
        assert harness.spawn_in_cgroup(cgroup, [PYTHON, "-c", code + CONNECT, port]).wait(30) == 0

    def verdict(connections: int) -> dict:
        wait_until(lambda: json.loads(saved.read_text())["verdict"]["connections"] == connections, 30,
                   "the verdict saved")
        return daemon.request("verdict", id="ep-carry")["verdict"]

    connect(raw_socket, ports[0])
    before = verdict(1)
    assert [a["rule"] for a in before["alerts"]] == ["raw_socket"] and before["complete"], before
    assert stop(daemon.proc) == 0                   # clean: nothing was left unhandled, the probes stay
    connect("", ports[1])                           # while no daemon runs: recorded in the pinned ring
    daemon.start()
    after_clean = verdict(2)
    assert [a["rule"] for a in after_clean["alerts"]] == ["raw_socket"], after_clean
    assert after_clean["complete"] and after_clean["destination_count"] == 2, after_clean
    kill(daemon.proc)                               # kill -9: what it had not saved may be missing
    daemon.start("--detach-on-stop")
    connect("", ports[2])
    after_kill = verdict(3)
    assert after_kill["destinations"] == [f"127.0.0.1:{p}/tcp" for p in ports[:3]], after_kill
    assert len(after_kill["alerts"]) == 1, after_kill
    assert not after_kill["complete"] and after_kill["incomplete_reasons"] == ["tracer_restart"], after_kill
    assert stop(daemon.proc) == 0                   # clean, but detaching: the next connect goes unseen
    connect("", ports[3])
    daemon.start()
    connect("", ports[4])
    after_detach = verdict(4)
    assert after_detach["destinations"] == [f"127.0.0.1:{p}/tcp" for p in ports[:3] + ports[4:]], after_detach
    assert after_detach["incomplete_reasons"] == ["tracer_restart", "untraced_while_stopped"], after_detach
    human = run_eptrace("episode", "verdict", "--id", "ep-carry", state_dir=daemon.state)
    assert "INCOMPLETE" in human.stdout and "tracer_restart 1" in human.stdout, human.stdout
    final = tmp_path / "final.json"
    rm = run_eptrace("episode", "rm", "--id", "ep-carry", "--verdict", final, state_dir=daemon.state)
    assert rm.returncode == 0, rm.stderr
    v = json.loads(final.read_text())
    assert v["connections"] == 4 and not v["clean"], v
    assert v["losses"] == {"tracer_restart": 1, "untraced_while_stopped": 1}, v
    assert not saved.exists(), "the saved verdict of a removed episode was left behind"


# ---- restart ------------------------------------------------------------------------------------------------

def test_a_killed_daemon_is_restarted_and_its_client_loses_nothing(daemon):
    base, count = free_port(), 40
    episode = "ep-restart"
    capture = daemon.tmp / f"{episode}.capture"
    proc = start_eptrace("run", "--daemon", "require", "--episode", episode, "--grace", 2, "--output",
                         f"file:{daemon.tmp / episode}.ndjson", "--verdict", f"{daemon.tmp / episode}.json",
                         "--capture", capture, "--", PYTHON, "-c", CONNECT_LOOP, base, count, state_dir=daemon.state,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = LineReader(proc.stdout), LineReader(proc.stderr)
    try:
        events = daemon.tmp / f"{episode}.ndjson"
        wait_for_docs(events, lambda d: len(ports_attempted(d)) >= 3, timeout=60)
        kill(daemon.proc)                                       # SIGKILL: no goodbye, pins stay
        before = len(out.lines)
        daemon.start()
        assert proc.wait(timeout=180) == 0, err.text()
    finally:
        kill(proc)
    err.join()
    assert "the eptrace daemon went away" in err.text() and "resumed by the restarted" in err.text(), err.text()
    assert_contract(read_docs(events))          # event.sequence went on increasing across the restart
    assert len({get(doc, "eptrace.run.id") for doc in read_docs(events)}) == 1
    docs = [doc for doc in read_docs(events) if doc["event"]["kind"] != "metric"]
    assert {doc["labels"]["episode_id"] for doc in docs} == {episode}, dump(docs)
    # A run's episode fails closed while its daemon is away (as run does in-process): those connects got
    # EPERM, and were recorded (failed attempts) and counted like every other: nothing lost.
    results = dict(line.split() for line in out.lines)
    refused = sorted(base + int(i) for i, result in results.items() if result == str(errno.EPERM))
    assert len(results) == count and refused, (results, err.text())
    assert sorted(ports_attempted(docs)) == [base + i for i in range(count)], dump(docs)   # nothing lost
    eperm = sorted(get(d, "destination.port") for d in select(docs, "connection_attempted")
                   if "EPERM" in (get(d, "error.message") or ""))
    assert eperm == refused, (eperm, refused)
    assert before < count, "the daemon was killed after the command had finished"
    verdict = verdict_of(daemon, episode)
    assert verdict["connections"] == count and verdict["exit_code"] == 0, verdict        # carried over
    assert verdict["connects_refused"] == len(refused), verdict
    assert "tracer_resumed" in json.dumps(read_docs(daemon.events)), "no resumption metric"
    # the capture goes on across the restart: the new daemon kept its entries until the client resumed, so it
    # replays to every attempt the client's output has, the refused ones included
    assert "the capture of episode ep-restart lacks" not in err.text(), err.text()
    replayed = run_eptrace("replay", capture, "--all", "--output", f"file:{capture}.ndjson")
    assert replayed.returncode == 0, replayed.stderr
    replayed_docs = read_docs(f"{capture}.ndjson")
    assert sorted(ports_attempted(replayed_docs)) == sorted(ports_attempted(docs)), ports_attempted(replayed_docs)
    assert sorted(get(d, "destination.port") for d in select(replayed_docs, "connection_attempted")
                  if "EPERM" in (get(d, "error.message") or "")) == refused


# ---- --config and --metrics-listen ---------------------------------------------------------------------------

CONNECT_TEST_NET = "import socket; print(socket.socket().connect_ex(('198.51.100.7', 9)))"


def test_a_config_goes_through_the_daemon_when_its_tracer_settings_are_the_daemons(daemon, tmp_path):
    own_side = tmp_path / "own.toml"        # outputs and a policy are the client's side: through the daemon
    own_side.write_text('[output]\nspool_mb = 64\n[policy]\ndeny = ["198.51.100.0/24"]\n')
    r = client(daemon, "ep-cfg", PYTHON, "-c", CONNECT_TEST_NET, options=("--config", own_side))
    assert r.returncode == 0 and r.stdout.strip() == str(errno.EPERM), (r.stdout, r.stderr)
    docs = read_docs(daemon.tmp / "ep-cfg.ndjson")
    assert get(docs[0], "eptrace.daemon.run_id"), dump(docs)            # the daemon traced it
    assert alerts(docs, "egress_denied") and verdict_of(daemon, "ep-cfg")["denied"] == 1, dump(docs)
    tracer_side = tmp_path / "tracer.toml"
    tracer_side.write_text("[dns]\nlong_query_chars = 99\n[limits]\nrecord_budget_burst = 1000\n")
    r = client(daemon, "ep-cfg2", "true", options=("--config", tracer_side))
    line = assert_one_line_error(r, 2)
    assert "dns.long_query_chars, limits.record_budget_burst" in line and "--daemon never" in line, line
    r = run_eptrace("run", "--daemon", "auto", "--episode", "ep-cfg3", "--config", tracer_side, "--output",
                    f"file:{tmp_path}/ep-cfg3.ndjson", "--", "true", state_dir=daemon.state, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not [d for d in read_docs(tmp_path / "ep-cfg3.ndjson") if get(d, "eptrace.daemon")], "not in-process"
    r = client(daemon, "ep-metrics", "true", options=("--metrics-listen", f"127.0.0.1:{free_port()}"))
    line = assert_one_line_error(r, 2)
    assert "--metrics-listen needs a tracer of the run's own" in line, line


# ---- without a daemon, and the socket's users ------------------------------------------------------------

def test_daemon_require_without_a_daemon_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("EPTRACE_SOCKET", str(tmp_path / "none.sock"))
    r = run_eptrace("run", "--daemon", "require", "--episode", "ep-nod", "--", "true")
    line = assert_one_line_error(r, 2)
    assert "no eptrace daemon" in line, line
    r = run_eptrace("episode", "verdict", "--id", "ep-nod")
    assert_one_line_error(r, 2)


def test_the_socket_is_0600_and_refuses_other_users_with_exit_4(daemon):
    mode = daemon.socket.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600, oct(mode)
    as_nobody = ["runuser", "-u", "nobody", "--"]
    r = run_eptrace("episode", "verdict", "--id", "ep-x", prefix=as_nobody)
    assert_one_line_error(r, 4)                 # the file's mode: connect() is refused
    os.chmod(daemon.socket, 0o666)               # past the mode, the daemon itself refuses (SO_PEERCRED)
    r = run_eptrace("episode", "verdict", "--id", "ep-x", prefix=as_nobody)
    line = assert_one_line_error(r, 4)
    assert "refuses uid" in line, line
    assert daemon.request("health")["counters"]["refused_peers"] == 1
    r = run_eptrace("run", "--daemon", "require", "--episode", "ep-x", "--", "true", prefix=as_nobody)
    assert_one_line_error(r, 4)


def test_the_api_traces_through_the_daemon(daemon, tmp_path, episode_cgroup):
    port = free_port()
    code = r'''
import json, subprocess, sys
from tracer.api import run_episode, trace_cgroup
events, cgroup, port = sys.argv[1], sys.argv[2], sys.argv[3]
connect = "import socket, sys; socket.socket().connect_ex(('127.0.0.1', int(sys.argv[1])))"
v = run_episode("ep-api-d", [sys.executable, "-c", connect, port], outputs=["file:" + events], daemon="require")
with trace_cgroup("ep-api-dcg", cgroup, outputs=["file:" + events + ".cg"], daemon="require") as t:
    subprocess.run(["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', cgroup + "/cgroup.procs",
                    sys.executable, "-c", connect, port], check=True)
import dataclasses
from tracer.config import Config, Dns
v2 = run_episode("ep-api-cfg", [sys.executable, "-c", connect, port], outputs=["file:" + events + ".cfg"],
                 config=Config(), daemon="require")       # the daemon's settings: through it
try:
    run_episode("ep-api-cfg2", ["true"], config=dataclasses.replace(Config(), dns=Dns(long_query_chars=99)),
                daemon="require")
    differs = None
except ValueError as e:
    differs = str(e)
print(json.dumps({"run": v.destinations, "cg": t.verdict.destinations, "bcc": "bcc" in sys.modules,
                  "cfg": v2.destinations, "differs": differs}))
'''
    cgroup = episode_cgroup(f"daemon-api-{os.getpid()}")
    r = subprocess.run([sys.executable, "-c", code, f"{tmp_path}/api.ndjson", str(cgroup), str(port)],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.splitlines()[-1])
    assert "dns.long_query_chars" in result.pop("differs"), result
    assert result == {"run": [f"127.0.0.1:{port}/tcp"], "cg": [f"127.0.0.1:{port}/tcp"], "bcc": False,
                      "cfg": [f"127.0.0.1:{port}/tcp"]}, result
    assert get(read_docs(tmp_path / "api.ndjson.cfg")[0], "eptrace.daemon.run_id")      # through the daemon
    assert ports_attempted(read_docs(tmp_path / "api.ndjson")) == [port]


def test_a_client_that_dies_takes_its_episode_with_it(daemon):
    proc = start_eptrace("run", "--daemon", "require", "--episode", "ep-orphan", "--output",
                         f"file:{daemon.tmp}/ep-orphan.ndjson", "--", "sleep", "300", state_dir=daemon.state,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        listed = wait_until(lambda: [e for e in daemon.request("list")["episodes"] if e["id"] == "ep-orphan"], 60,
                            "the client's episode")
        cgroup = Path(listed[0]["cgroup"])
        sleeper = int(wait_until(lambda: (cgroup / "cgroup.procs").read_text().strip(), 30, "sleep in its cgroup"))
        os.kill(proc.pid, signal.SIGKILL)           # the client alone: its command lives on, in the episode
        proc.wait(30)
    finally:
        kill(proc)
    wait_until(lambda: not cgroup.exists(), 30, "the orphaned episode's cgroup to go")
    assert not alive(sleeper), "the orphaned episode's command still runs"
    assert not [e for e in daemon.request("list")["episodes"] if e["id"] == "ep-orphan"]


MEMBER_WORKLOAD = CONNECT + r"""
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
cgroup2 = next(line for line in open("/proc/self/cgroup") if line.startswith("0::")).strip()
print(status["Seccomp"].strip(), status["NoNewPrivs"].strip(), cgroup2, flush=True)
raise SystemExit(7)
"""
# As the group member: what it may not do to another client's episode, and an admit of a process not its own.
MEMBER_PROBE = r"""
import json, sys
from tracer import control
other, out = int(sys.argv[1]), {}
c = control.Connection()
asks = {"end": ("end", {"cgroup_id": other}), "admit": ("admit", {"cgroup_id": other, "pid": 1}),
        "subscribe": ("subscribe", {"id": "ep-root"}), "subscribe_all": ("subscribe", {"id": None})}
mine = c.request("start", id="ep-mine")["cgroup_id"]
asks["admit_init"] = ("admit", {"cgroup_id": mine, "pid": 1})
for name, (op, fields) in asks.items():
    try:
        c.request(op, **fields)
        out[name] = "allowed"
    except control.DaemonError as e:
        out[name] = e.status
# a member's episodes at once are limited (its uid's, over every connection): the next start is refused
more = control.Connection()
for i in range(int(sys.argv[2]) - 1):
    (c if i % 2 else more).request("start", id=f"ep-more{i}")
try:
    more.request("start", id="ep-too-many")
    out["beyond_limit"] = "allowed"
except control.DaemonError as e:
    out["beyond_limit"] = e.status
print(json.dumps(out))
"""


@pytest.fixture
def throwaway_member():
    """A user of its own, in a group of its own (removed afterwards), and a directory it owns."""
    name, group = f"ept{os.getpid()}", f"eptg{os.getpid()}"
    home = Path(f"/tmp/eptrace-test-{name}")
    subprocess.run(["groupadd", group], check=True)
    try:
        subprocess.run(["useradd", "--no-create-home", "--no-user-group", "--shell", "/usr/sbin/nologin", "-G", group,
                        name], check=True)
        home.mkdir(mode=0o700)
        shutil.chown(home, name)
        yield name, group, home
    finally:
        subprocess.run(["userdel", name], capture_output=True)
        subprocess.run(["groupdel", group], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def test_a_socket_group_member_runs_through_the_daemon_but_touches_only_its_own(tmp_path, monkeypatch,
                                                                                throwaway_member):
    """--socket-group: the socket is 0660 for the group; a member's `run` gets its documents and verdict (the
    daemon moves its command into the episode cgroup); it cannot end, admit into or watch another's episode."""
    user, group, home = throwaway_member
    monkeypatch.setenv("EPTRACE_SOCKET", os.environ["EPTRACE_SOCKET"])
    monkeypatch.setenv("EPTRACE_PIN_DIR", os.environ["EPTRACE_PIN_DIR"])
    monkeypatch.setenv("EPTRACE_DAEMON", "never")
    d = Daemon(tmp_path)
    other = None
    try:
        d.socket.parent.mkdir(mode=0o700)          # as systemd's RuntimeDirectory makes it
        d.start("--socket-group", group)
        for path, mode in ((d.socket, 0o660), (d.socket.parent, 0o750)):
            st = path.stat()
            assert stat.S_IMODE(st.st_mode) == mode and st.st_gid == grp.getgrnam(group).gr_gid, (path, st)
        as_member = ["runuser", "-u", user, "--"]
        r = run_eptrace("episode", "verdict", "--id", "ep-none", prefix=as_member)
        assert "no registered episode" in assert_one_line_error(r, 2)      # let in: read access
        policy = home / "policy.toml"
        policy.write_text("[policy]\nraw_sockets = false\n")
        port = free_port()
        r = run_eptrace("run", "--daemon", "require", "--episode", "ep-member", "--grace", 2, "--policy", policy,
                        "--output", f"file:{home}/ep-member.ndjson", "--verdict", f"{home}/ep-member.json", "--",
                        PYTHON, "-c", MEMBER_WORKLOAD, port, prefix=as_member, timeout=120)
        assert r.returncode == 7, r.stderr                             # the command's own status
        seccomp, no_new_privs, cgroup = r.stdout.split()
        assert (seccomp, no_new_privs) == ("2", "1"), r.stdout          # the packet-socket filter, with no_new_privs
        assert cgroup.startswith("0::/eptrace/ep-member@"), r.stdout     # moved by the daemon before its exec
        docs = read_docs(home / "ep-member.ndjson")
        assert ports_attempted(docs) == [port], dump(docs)
        assert {doc["labels"]["episode_id"] for doc in docs if doc["event"]["kind"] != "metric"} == {"ep-member"}
        v = json.loads((home / "ep-member.json").read_text())
        assert v["exit_code"] == 7 and v["connections"] == 1 and v["complete"], json.dumps(v)
        api = ("import sys; from tracer.api import run_episode; v = run_episode('ep-member-api', [sys.executable, "
               "'-c', sys.argv[1], sys.argv[2]], outputs=['file:' + sys.argv[3]], daemon='require', grace_s=1); "
               "print(v.destinations)")
        r = subprocess.run(as_member + [sys.executable, "-c", api, CONNECT, str(port), f"{home}/api.ndjson"],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.strip() == f"['127.0.0.1:{port}/tcp']", r.stderr
        r = run_eptrace("run", "--daemon", "auto", "--episode", "ep-member-auto", "--output",
                        f"file:{home}/auto.ndjson", "--", "true", prefix=as_member)
        assert r.returncode == 0, r.stderr                              # auto: the daemon answers, so through it
        # what needs root in the client: one line, exit 4
        for options in (("--user", "root"), ("--daemon", "never")):
            r = run_eptrace("run", "--episode", "ep-m2", *options, "--", "true", prefix=as_member)
            assert_one_line_error(r, 4)
        # another client's episode (root's) is not the member's to end, fill or watch
        other = start_eptrace("run", "--daemon", "require", "--episode", "ep-root", "--output",
                              f"file:{tmp_path}/ep-root.ndjson", "--", "sleep", "300", state_dir=d.state,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        listed = wait_until(lambda: [e for e in d.request("list")["episodes"] if e["id"] == "ep-root"], 60, "ep-root")
        r = subprocess.run(as_member + [sys.executable, "-c", MEMBER_PROBE, str(listed[0]["cgroup_id"]),
                                        str(MEMBER_EPISODES)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {"end": 4, "admit": 4, "subscribe": 2, "subscribe_all": 4, "admit_init": 4,
                                        "beyond_limit": 4}, r.stdout
        assert [e for e in d.request("list")["episodes"] if e["id"] == "ep-root" and not e["ending"]], "ended"
        # out of the group: refused, exit 4
        subprocess.run(["gpasswd", "-d", user, group], check=True, capture_output=True)
        r = run_eptrace("run", "--daemon", "require", "--episode", "ep-m3", "--", "true", prefix=as_member)
        assert_one_line_error(r, 4)
    finally:
        if other is not None:
            kill(other)
        d.cleanup()

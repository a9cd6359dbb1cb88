"""README promises that no other test runs: exit statuses, the verdict file, the Python API, capture and
replay, CLI options, IPv6, UDP and the rarer event actions. Each runs the real command path (`eptrace run`,
or the API) on the real kernel and checks exact values.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

import harness
from eptrace_helpers import (REPO_ROOT, alerts, assert_contract, assert_one_line_error, dump, get, kill,
                             one, read_docs, run_eptrace, select, start_eptrace, wait_until)
from harness import HOST_IP, HOST_IP6, METADATA_IP, PYTHON, SANDBOX_IP, SANDBOX_IP6
from support import community_id_v1, free_port, require

# Connects to (HOST, PORT) and to the metadata address: one benign flow and one alert.
CONNECT_TWICE = r'''
import socket, sys
for host in (sys.argv[1], sys.argv[2]):
    with socket.create_connection((host, int(sys.argv[3])), timeout=5) as s:
        s.sendall(b"hello")
        s.recv(100)
print("done", flush=True)
'''


def run(tmp_path: Path, episode: str, argv: list, *options, timeout: float = 120.0):
    """`eptrace run --episode E --grace 2 --output file:... [options] -- argv` -> (completed, docs)."""
    events = tmp_path / f"{episode}.ndjson"
    r = run_eptrace("run", "--episode", episode, "--grace", 2, "--output", f"file:{events}", *options, "--",
                    *argv, timeout=timeout)
    return r, read_docs(events)


@pytest.fixture
def echo_on_host_and_metadata(net):
    with harness.tcp_echo_server(net, 8080) as host, harness.tcp_echo_server(net, 8080, host=METADATA_IP) as md:
        yield host, md


# ---- exit statuses ----------------------------------------------------------------------------------------

def test_fail_on_alert_exits_3_and_the_verdict_file_holds_the_episode(net, tmp_path, echo_on_host_and_metadata):
    verdict_path = tmp_path / "verdict.json"
    argv = net.sandbox_prefix() + [PYTHON, "-c", CONNECT_TWICE, HOST_IP, METADATA_IP, 8080]
    r, docs = run(tmp_path, "ep-exit3", argv, "--fail-on-alert", "--verdict", verdict_path)
    assert r.returncode == 3, r.stderr
    assert "done" in r.stderr or "done" in r.stdout, r       # the command ran to its end
    assert_contract(docs)
    verdict = json.loads(verdict_path.read_text())
    assert verdict["episode_id"] == "ep-exit3"
    assert verdict["exit_code"] == 0                          # the command's own status, kept in the verdict
    assert verdict["connections"] == 2 and verdict["connections_failed"] == 0, verdict
    assert sorted(verdict["destinations"]) == sorted([f"{HOST_IP}:8080/tcp", f"{METADATA_IP}:8080/tcp"]), verdict
    assert verdict["destination_count"] == 2, verdict
    assert verdict["bytes_out"] == 10 and verdict["bytes_in"] == 10, verdict   # "hello" echoed, twice
    assert [a["rule"] for a in verdict["alerts"]] == ["cloud_metadata_access"], verdict
    assert verdict["alerted"] is True and verdict["records_lost"] == 0, verdict


def test_without_fail_on_alert_the_commands_status_is_kept(net, tmp_path, echo_on_host_and_metadata):
    argv = net.sandbox_prefix() + [PYTHON, "-c", CONNECT_TWICE + "raise SystemExit(9)", HOST_IP, METADATA_IP, 8080]
    r, docs = run(tmp_path, "ep-exit9", argv)
    assert r.returncode == 9, r.stderr
    assert alerts(docs, "cloud_metadata_access"), dump(docs)


def test_kernel_refusing_bpf_exits_5_with_one_line(tmp_path):
    """The kernel's refusal is reproduced at the bpf() syscall: strace makes every bpf() return EPERM, as a
    locked-down kernel (lockdown, a seccomp filter, missing CAP_BPF) answers. Nothing runs, nothing is left."""
    strace = shutil.which("strace")
    require(strace, "strace is not installed (make setup)")
    marker = tmp_path / "ran"
    prefix = [strace, "-f", "-qq", "-o", "/dev/null", "-e", "trace=bpf", "-e", "inject=bpf:error=EPERM"]
    r = run_eptrace("run", "--episode", "ep-exit5", "--output", f"file:{tmp_path}/ev.ndjson", "--",
                    "touch", marker, prefix=prefix, timeout=120)
    line = assert_one_line_error(r, 5)
    assert "doctor" in line, line
    assert not marker.exists(), "the command ran although the probes were refused"


# ---- the Python API ---------------------------------------------------------------------------------------

API_RUN = r'''
import json, sys
from tracer.api import run_episode
v = run_episode("ep-api-run", sys.argv[2:], outputs=["file:" + sys.argv[1]], labels={"team": "rl"}, grace_s=2)
print(json.dumps({"exit_code": v.exit_code, "connections": v.connections, "destinations": v.destinations,
                  "alerts": [a["rule"] for a in v.alerts], "alerted": v.alerted}))
'''

API_TRACE = r'''
import json, subprocess, sys
from tracer.api import trace_cgroup
events, cgroup, *argv = sys.argv[1:]
with trace_cgroup("ep-api-cg", cgroup, outputs=["file:" + events]) as trace:
    join = 'echo $$ > "$0" && exec "$@"'
    subprocess.run(["/bin/sh", "-c", join, cgroup + "/cgroup.procs", *argv], check=True)
v = trace.verdict
print(json.dumps({"connections": v.connections, "destinations": v.destinations,
                  "alerts": [a["rule"] for a in v.alerts]}))
'''


def api(code: str, *args) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_api_run_episode(net, tmp_path, echo_on_host_and_metadata):
    events = tmp_path / "api.ndjson"
    v = api(API_RUN, events, *net.sandbox_prefix(), PYTHON, "-c", CONNECT_TWICE, HOST_IP, METADATA_IP, 8080)
    assert v == {"exit_code": 0, "connections": 2, "alerts": ["cloud_metadata_access"], "alerted": True,
                 "destinations": [f"{HOST_IP}:8080/tcp", f"{METADATA_IP}:8080/tcp"]}, v     # in connect order
    docs = read_docs(events)
    assert_contract(docs)
    assert select(docs, "connection_established", episode="ep-api-run", labels__team="rl"), dump(docs)


def test_api_trace_cgroup(net, tmp_path, episode_cgroup, echo_on_host_and_metadata):
    cgroup = episode_cgroup("api-trace")
    events = tmp_path / "api-cg.ndjson"
    v = api(API_TRACE, events, cgroup, *net.sandbox_prefix(), PYTHON, "-c", CONNECT_TWICE, HOST_IP,
            METADATA_IP, 8080)
    assert v["connections"] == 2 and v["alerts"] == ["cloud_metadata_access"], v
    assert sorted(v["destinations"]) == sorted([f"{HOST_IP}:8080/tcp", f"{METADATA_IP}:8080/tcp"]), v
    docs = read_docs(events)
    assert_contract(docs)
    assert select(docs, "connection_established", episode="ep-api-cg", port=8080), dump(docs)


# ---- capture and replay -----------------------------------------------------------------------------------

def alert_summary(docs: list[dict]) -> list[tuple]:
    return sorted((get(a, "rule.name"), get(a, "process.pid"), get(a, "message")) for a in alerts(docs))


def test_replay_of_a_capture_gives_the_live_runs_alerts(net, tmp_path, echo_on_host_and_metadata):
    capture = tmp_path / "episode.capture"
    argv = net.sandbox_prefix() + [PYTHON, "-c", CONNECT_TWICE, HOST_IP, METADATA_IP, 8080]
    r, live = run(tmp_path, "ep-capture", argv, "--capture", capture)
    assert r.returncode == 0, r.stderr
    assert alerts(live), dump(live)
    replayed = subprocess.run([sys.executable, "-m", "tracer", "replay", str(capture)], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=120)
    assert replayed.returncode == 0, replayed.stderr
    docs = [json.loads(line) for line in replayed.stdout.splitlines() if line.strip()]
    assert alert_summary(docs) == alert_summary(live), (alert_summary(docs), alert_summary(live))


# ---- options through the CLI ------------------------------------------------------------------------------

def test_schema_ocsf_label_and_metrics_listen(net, tmp_path):
    """--schema ocsf documents, --label on them, and /metrics scraped while the episode runs."""
    port = free_port()
    go = tmp_path / "go"
    workload = textwrap.dedent(f'''
        import os, socket, time
        with socket.create_connection(("{HOST_IP}", 8080), timeout=5) as s:
            s.sendall(b"hi"); s.recv(10)
        print("connected", flush=True)
        deadline = time.monotonic() + 60
        while not os.path.exists("{go}") and time.monotonic() < deadline:
            time.sleep(0.05)
    ''')
    events = tmp_path / "ocsf.ndjson"
    with harness.tcp_echo_server(net, 8080):
        proc = start_eptrace("run", "--episode", "ep-ocsf", "--grace", 2, "--schema", "ocsf", "--label", "team=rl",
                             "--metrics-listen", f"127.0.0.1:{port}", "--output", f"file:{events}", "--",
                             *net.sandbox_prefix(), PYTHON, "-c", workload,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            def scrape():
                try:
                    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
                except OSError:
                    return None
                received = [line for line in body.splitlines() if line.startswith("eptrace_records_received_total ")]
                return body if received and int(float(received[0].split()[1])) > 0 else None
            body = wait_until(scrape, 60, "a scrape of /metrics with records received")
            assert "# TYPE eptrace_records_received_total counter" in body, body
            go.touch()
            proc.wait(timeout=60)
        finally:
            kill(proc)
    assert proc.returncode == 0, proc.stderr.read()
    docs = read_docs(events)
    network = [d for d in docs if d.get("class_uid") == 4001]
    opened = [d for d in network if get(d, "dst_endpoint.port") == 8080 and d.get("activity_id") == 1]
    assert opened, json.dumps(docs[:10], indent=1)
    d = opened[0]
    assert d["type_uid"] == 4001 * 100 + d["activity_id"], d
    assert get(d, "dst_endpoint.ip") == HOST_IP and get(d, "src_endpoint.ip") == SANDBOX_IP, d
    assert get(d, "unmapped.labels") == {"episode_id": "ep-ocsf", "team": "rl"}, d


def test_episode_ls_json_and_labels(tmp_path, episode_cgroup):
    cgroup = episode_cgroup("ls-json")
    state = tmp_path / "state"
    r = run_eptrace("episode", "add", "--id", "ep-ls", "--cgroup", cgroup, "--label", "run=ppo-7",
                    "--label", "team=rl", state_dir=state)
    assert r.returncode == 0, r.stderr
    r = run_eptrace("episode", "ls", "--json", state_dir=state)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 1, rows
    assert rows[0]["id"] == "ep-ls" and rows[0]["labels"] == {"run": "ppo-7", "team": "rl"}, rows
    assert Path(rows[0]["cgroup"]) == Path(cgroup), rows


@pytest.mark.parametrize("config, words", [
    ("[flows]\nlong_flow_seconds = -3\n", "long_flow_seconds"),
    ("[nonsense]\nx = 1\n", "nonsense"),
    ("[flows\n", "TOML"),
], ids=["bad-value", "unknown-table", "not-toml"])
def test_bad_config_is_one_line_exit_2(tmp_path, config, words):
    path = tmp_path / "bad.toml"
    path.write_text(config)
    marker = tmp_path / "ran"
    r = run_eptrace("run", "--episode", "ep-cfg", "--config", path, "--", "touch", marker, timeout=60)
    line = assert_one_line_error(r, 2)
    assert words.lower() in line.lower(), line
    assert not marker.exists()


# ---- IPv6 and UDP -----------------------------------------------------------------------------------------

# TCP: 300 bytes each way. Connected UDP: connect(), 100 bytes each way. Then an unconnected UDP socket bound
# to a port, sending two datagrams of 40 bytes and reading their echoes.
FLOWS_CLIENT = r'''
import socket, sys
host, tcp_port, udp_port, bound = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
with socket.socket(family, socket.SOCK_STREAM) as s:
    s.settimeout(5)
    s.connect((host, tcp_port))
    s.sendall(b"x" * 300)
    got = b""
    while len(got) < 300:
        got += s.recv(1000)
    print("local", s.getsockname()[1], flush=True)
with socket.socket(family, socket.SOCK_DGRAM) as s:
    s.settimeout(5)
    s.connect((host, udp_port))
    s.send(b"q" * 100)
    assert s.recv(1000) == b"q" * 100
    print("connected", s.getsockname()[1], flush=True)
with socket.socket(family, socket.SOCK_DGRAM) as s:
    s.settimeout(5)
    s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", bound))
    for _ in range(2):
        s.sendto(b"u" * 40, (host, udp_port))
        assert s.recvfrom(1000)[0] == b"u" * 40
'''


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_tcp_and_udp_flows_with_bytes_packets_and_listening(net, tmp_path, family):
    host, sandbox = (HOST_IP, SANDBOX_IP) if family == "ipv4" else (HOST_IP6, SANDBOX_IP6)
    tcp_port, udp_port, bound = 7410, 7411, 7412
    with harness.tcp_echo_server(net, tcp_port, host=host), harness.udp_echo_server(net, udp_port, host=host):
        r, docs = run(tmp_path, f"ep-{family}", net.sandbox_prefix() + [PYTHON, "-c", FLOWS_CLIENT, host, tcp_port,
                                                                         udp_port, bound])
    assert r.returncode == 0, r.stderr
    assert_contract(docs)
    local = int(next(line.split()[1] for line in r.stdout.splitlines() if line.startswith("local")))
    udp_local = int(next(line.split()[1] for line in r.stdout.splitlines() if line.startswith("connected")))

    # TCP
    ended = one(select(docs, "flow_ended", port=tcp_port), "tcp flow_ended", docs)
    assert (get(ended, "network.type"), get(ended, "network.transport")) == (family, "tcp"), ended
    assert (get(ended, "source.ip"), get(ended, "source.port")) == (sandbox, local), ended
    assert (get(ended, "source.bytes"), get(ended, "destination.bytes")) == (300, 300), ended
    assert get(ended, "source.packets") >= 1 and get(ended, "destination.packets") >= 1, ended
    assert get(ended, "network.community_id") == community_id_v1(sandbox, local, host, tcp_port, 6), ended

    # connected UDP: an attempt that succeeds, and a flow with its bytes
    attempted = one(select(docs, "connection_attempted", port=udp_port, network__transport="udp"),
                    "udp connection_attempted", docs)
    assert get(attempted, "event.outcome") == "success", attempted
    assert (get(attempted, "destination.ip"), get(attempted, "destination.port")) == (host, udp_port), attempted
    udp_flows = select(docs, "flow_ended", network__transport="udp")
    connected = one([d for d in udp_flows if get(d, "source.port") == udp_local], "connected udp flow_ended", docs)
    assert (get(connected, "source.bytes"), get(connected, "destination.bytes")) == (100, 100), connected
    assert (get(connected, "source.packets"), get(connected, "destination.packets")) == (1, 1), connected
    assert get(connected, "network.type") == family, connected

    # the bound, unconnected socket: listening, udp_sent once, and a flow with both datagrams' bytes
    listening = select(docs, "listening", network__transport="udp")
    assert any(get(d, "destination.port") == bound for d in listening), dump(listening)
    assert len(select(docs, "udp_sent", port=udp_port)) == 1, dump(docs)
    unconnected = one([d for d in udp_flows if get(d, "source.port") == bound], "unconnected udp flow_ended", docs)
    assert (get(unconnected, "source.bytes"), get(unconnected, "destination.bytes")) == (80, 80), unconnected
    assert (get(unconnected, "source.packets"), get(unconnected, "destination.packets")) == (2, 2), unconnected


# ---- process_ended, flow_updated, the unknown outcome -----------------------------------------------------

# Holds a TCP flow open for 3.5 s (flow_updated every second), then makes a non-blocking connect to an
# address on the link that nobody answers (no result within a second: outcome unknown), then exits 5.
LINGER = r'''
import socket, sys, time
host, port, silent = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with socket.create_connection((host, port), timeout=5) as s:
    for _ in range(7):
        s.sendall(b"tick"); s.recv(100); time.sleep(0.5)
t = socket.socket()
t.setblocking(False)
t.connect_ex((silent, 7999))
time.sleep(2.0)
t.close()
sys.exit(5)
'''


def test_flow_updated_unknown_outcome_and_process_ended(net, tmp_path):
    config = tmp_path / "updates.toml"
    config.write_text("[flows]\nupdate_interval_seconds = 1\n")
    silent = "198.51.100.77"          # on the test link, but no host answers ARP for it
    with harness.tcp_echo_server(net, 7420):
        r, docs = run(tmp_path, "ep-linger", net.sandbox_prefix() + [PYTHON, "-c", LINGER, HOST_IP, 7420, silent],
                      "--config", config)
    assert r.returncode == 5, r.stderr
    assert_contract(docs)
    updates = select(docs, "flow_updated", port=7420)
    assert len(updates) >= 2, dump(docs)
    for d in updates:
        assert get(d, "event.kind") == "event" and get(d, "labels.episode_id") == "ep-linger", d
        assert get(d, "source.bytes") > 0 and get(d, "destination.bytes") > 0, d
    assert get(updates[-1], "source.bytes") >= get(updates[0], "source.bytes"), dump(updates)
    ended = one(select(docs, "flow_ended", port=7420), "flow_ended", docs)
    assert get(ended, "source.bytes") == 7 * 4 and get(ended, "destination.bytes") == 7 * 4, ended

    unknown = one(select(docs, "connection_attempted", port=7999), "attempt to the silent address", docs)
    assert get(unknown, "event.outcome") == "unknown", unknown
    assert get(unknown, "destination.ip") == silent, unknown

    python = {get(d, "process.pid") for d in select(docs, "process_started") if get(d, "process.name") == "python3"}
    assert len(python) == 1, dump(docs)
    ended_proc = one(select(docs, "process_ended", pid=python.pop()), "process_ended", docs)
    assert get(ended_proc, "process.exit_code") == 5, ended_proc


# ---- metadata by name, and the ECS task-credentials address ------------------------------------------------

DNS_QUERY = r'''
import socket, struct, sys
host = sys.argv[1]
name = b"".join(bytes([len(p)]) + p for p in b"metadata.google.internal".split(b".")) + b"\0"
query = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", 1, 1)
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.settimeout(3)
    s.sendto(query, (host, 53))
    s.recvfrom(512)
with socket.socket() as t:             # the ECS task-credentials endpoint: refused, but asked for
    t.settimeout(3)
    print("ecs", t.connect_ex(("169.254.170.2", 80)), flush=True)
'''


def test_metadata_hostname_lookup_and_ecs_credentials_address(net, tmp_path):
    with harness.udp_echo_server(net, 53):
        r, docs = run(tmp_path, "ep-md", net.sandbox_prefix() + [PYTHON, "-c", DNS_QUERY, HOST_IP])
    assert r.returncode == 0, r.stderr
    found = alerts(docs, "cloud_metadata_access")
    messages = " | ".join(get(a, "message") for a in found)
    assert len(found) == 2, dump(docs)
    assert "metadata.google.internal" in messages and "169.254.170.2" in messages, messages

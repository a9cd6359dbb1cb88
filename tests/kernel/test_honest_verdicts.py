"""Honest verdicts (issue 9 B): an episode that hides its argv or floods the tracer gets a record that says
so, and cannot make another episode's record incomplete.

- Hidden argv: argv strings on file-backed pages the process never touched make the kernel-side read fail;
  the exec is held, its argv read from /proc, the event marked args_complete false, and it is counted.
- Flood: one episode floods records while another makes 100 connections under the same `eptrace watch`,
  the other's 100 arrive, and the flood's losses reach the metric documents per episode. Two floods: DNS
  queries (one low-value payload record each: the budget refuses them) and evidence (ping sockets, datagrams
  and connects to ever new test-host destinations: records no budget refuses, so the ring share does once
  the ring buffer is above its watermark). `run --fail-on-incomplete` exits 6 for a flooding episode.

The flood tests set a tiny budget and share in a config file ([limits]), so that the flood is refused
quickly whatever the machine's speed.
"""
from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path

import pytest

import harness
from eptrace_helpers import (Watcher, alerts, dump, final_metric, get, kill, read_docs, run_eptrace, select,
                             wait_for_docs)
from harness import HOST_IP, PYTHON
from tracer.verdict import NOT_GAPS

EXIT_INCOMPLETE = 6

# A tiny budget and share in a ring of 1 MiB (the default is 32 MiB). The budget: an episode may put at
# most 100 + 200/s low-value records in the ring. The share: once half the ring is unread, every record of
# an episode is paid from its share, 300 + 400/s; the half above holds about 2,700 records of 192 bytes, so
# the two episodes' shares fit it while the tracer does not read for 3 s. The victim's own records (about
# 6 per connection, 33 connections a second) stay well within both. Without the share (watermark 100%) the
# evidence flood fills the ring within a poll, and the victim loses records too.
TINY_BUDGET = """
[limits]
record_budget_per_second = 200
record_budget_burst = 100
ring_share_watermark_percent = 50
ring_share_per_second = 400
ring_share_burst = 1000
ringbuf_kb = 1024
"""
BUDGET_RATE, BUDGET_BURST = 200, 100

# Sends the same DNS query to argv[1]:53 as fast as it can until the file argv[2] exists (at most
# argv[3] seconds, or argv[3] queries with "count"); prints "flooding" after the first 5000.
DNS_FLOOD = r'''
import os, socket, sys, time
host, stop, limit = sys.argv[1], sys.argv[2], sys.argv[3]
query = bytes.fromhex("123401000001000000000000") + b"\x05flood\x07example\x03com\x00\x00\x01\x00\x01"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent, said = 0, False
start = time.monotonic()
deadline = time.monotonic() + (60 if limit == "count" else float(limit))
count = int(sys.argv[4]) if limit == "count" else None
while time.monotonic() < deadline and not os.path.exists(stop):
    for _ in range(500):
        s.sendto(query, (host, 53))
    sent += 500
    if sent >= 5000 and not said:
        print("flooding", flush=True)
        said = True
    if count is not None and sent >= count:
        break
print("sent", sent, "seconds", time.monotonic() - start, flush=True)
'''

# Records that carry evidence, none of them routine, as fast as it can until the file argv[2] exists (at most
# argv[3] seconds, or argv[3] rounds with "count"): each round opens and closes a ping socket (an unusual
# socket), sends a datagram to a destination it never sent to (the test host's next port; other addresses
# would wait for ARP), and every tenth round starts a TCP connect to a new one. Same output as DNS_FLOOD.
EVIDENCE_FLOOD = r"""
import os, socket, sys, time
host, stop, limit = sys.argv[1], sys.argv[2], sys.argv[3]
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent, said = 0, False
start = time.monotonic()
deadline = time.monotonic() + (60 if limit == "count" else float(limit))
count = int(sys.argv[4]) if limit == "count" else None
while time.monotonic() < deadline and not os.path.exists(stop):
    for _ in range(500):
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP).close()
        port = 1024 + sent % 64000
        udp.sendto(b"x", (host, port))
        if sent % 10 == 0:
            tcp = socket.socket()
            tcp.setblocking(False)
            tcp.connect_ex((host, port))
            tcp.close()
        sent += 1
    if sent >= 5000 and not said:
        print("flooding", flush=True)
        said = True
    if count is not None and sent >= count:
        break
print("sent", sent, "seconds", time.monotonic() - start, flush=True)
"""
FLOODS = {"dns": DNS_FLOOD, "evidence": EVIDENCE_FLOOD}
# Ping sockets need the caller's group in this per-namespace range: opened in the sandbox namespace only.
OPEN_PING_SOCKETS = "echo '0 2147483647' > /proc/sys/net/ipv4/ping_group_range"


def flood_argv(net, kind: str, scripts: Path, *args) -> list:
    """The flood in the sandbox namespace. Its script is a file, so that every argv in the flood episode is
    short enough for the kernel to read whole: a cut argv of the short-lived nsenter or sh would be read from
    /proc after they exec'd on, and counted argv_missing, a loss the flood did not cause."""
    script = scripts / f"flood_{kind}.py"
    script.write_text(FLOODS[kind])
    return net.sandbox_prefix() + ["/bin/sh", "-c", f'{OPEN_PING_SOCKETS} && exec "$@"', "sh", PYTHON,
                                   script, HOST_IP, *args]


# argv[3] sequential TCP connections to argv[1]:argv[2], 30 ms apart, each says one byte and reads it back.
# Five of its records per connection are routine (the destination is known after the first): paced, they
# fit the tiny budget (495 records; 100 + 200/s over 3 s).
CONNECTIONS = r'''
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(n):
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"x")
        s.recv(1)
    time.sleep(0.03)
print("done", n, flush=True)
'''


@pytest.fixture(scope="session")
def hidden_argv(tmp_path_factory):
    try:
        return harness.build_helper("hidden_argv", tmp_path_factory.mktemp("hidden_argv"))
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)


def argv_file(path: Path, args: list[str]) -> list[str]:
    """Write args NUL-separated to path; their offsets, as hidden_argv takes them."""
    offsets, data = [], b""
    for a in args:
        offsets.append(str(len(data)))
        data += a.encode() + b"\0"
    path.write_bytes(data)
    return offsets


def test_hidden_argv_is_read_from_proc_marked_and_counted(tmp_path, hidden_argv):
    args = ["/bin/true", "--donate-level", "x"]
    offsets = argv_file(tmp_path / "argv", args)
    events, verdict = tmp_path / "events.ndjson", tmp_path / "verdict.json"
    episode = f"ep-argv-{secrets.token_hex(3)}"
    r = run_eptrace("run", "--episode", episode, "--output", f"file:{events}", "--verdict", verdict,
                    "--grace", "2", "--", hidden_argv, tmp_path / "argv", *offsets)
    assert r.returncode == 0, r.stderr
    docs = read_docs(events)
    started = select(docs, "process_started", process__executable="/bin/true")
    assert len(started) == 1, dump(select(docs, "process_started"))
    doc = started[0]
    # The argv from /proc, not the helper's (the exec's parent image) and not a partial kernel read.
    assert get(doc, "process.args") == args, doc
    assert get(doc, "eptrace.process.args_complete") is False, doc
    # The helper's own exec was read whole: no mark.
    helper = select(docs, "process_started", process__executable=str(hidden_argv))
    assert helper and get(helper[0], "eptrace.process.args_complete") is None, dump(helper)
    # The miner option hidden that way still raises crypto_mining.
    mining = alerts(docs, "crypto_mining")
    assert mining and get(mining[0], "process.pid") == get(doc, "process.pid"), dump(docs)
    v = json.loads(verdict.read_text())
    assert v["losses"].get("argv_unread") == 1, v
    assert v["losses"].get("argv_from_proc") == 1, v
    # /proc supplied it: the record is complete; the alert makes it unclean.
    assert v["complete"] is True and v["incomplete_reasons"] == [], v
    assert v["alerted"] is True and v["clean"] is False, v


@pytest.mark.parametrize("kind", ["dns", "evidence"])
def test_a_flood_is_refused_and_spares_the_other_episode(net, tmp_path, episode_cgroup, kind):
    token = secrets.token_hex(3)
    state, events, config = tmp_path / "state", tmp_path / "events.ndjson", tmp_path / "limits.toml"
    config.write_text(TINY_BUDGET)
    stop_file = tmp_path / "stop"
    flooder_cg, victim_cg = episode_cgroup(f"flood-{token}"), episode_cgroup(f"victim-{token}")
    for eid, cg in (("ep-flood", flooder_cg), ("ep-victim", victim_cg)):
        r = run_eptrace("episode", "add", "--id", eid, "--cgroup", cg, state_dir=state)
        assert r.returncode == 0, r.stderr
    port = 7811
    with harness.tcp_echo_server(net, port), Watcher(events, state, config=config) as watcher:
        watcher.ready(episodes=2)
        connections = tmp_path / "connections.py"      # a file: the victim's argvs are read whole
        connections.write_text(CONNECTIONS)
        flooder = harness.spawn_in_cgroup(flooder_cg, flood_argv(net, kind, tmp_path, stop_file, "60"),
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert flooder.stdout.readline().strip() == "flooding", flooder.stderr.read()
            victim = harness.spawn_in_cgroup(
                victim_cg, net.sandbox_prefix() + [PYTHON, connections, HOST_IP, port, "100"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            out, err = victim.communicate(timeout=120)
            assert victim.returncode == 0 and out.strip() == "done 100", err
            stop_file.touch()
            flooded = flooder.communicate(timeout=60)[0]
        finally:
            kill(flooder)
        _, sent, _, seconds = flooded.split()
        sent, seconds = int(sent), float(seconds)

        def victim_done(docs):
            ended = select(docs, "flow_ended", episode="ep-victim", port=port)
            return len(ended) >= 100 and ended
        wait_for_docs(events, victim_done, 30, "the victim's 100 flow_ended")

        def losses_reported(docs):
            metrics = [d for d in docs if get(d, "event.kind") == "metric"]
            return metrics and losses_of(metrics[-1]).get("ep-flood", {}).get(refused_as)
        refused_as = "budget" if kind == "dns" else "ring_share"
        wait_for_docs(events, losses_reported, 20, f"the flood's {refused_as} losses in a metric document")
        assert watcher.stop() == 0, watcher.stderr.text()

    docs = read_docs(events)
    metric = final_metric(docs)
    attempts = select(docs, "connection_attempted", episode="ep-victim", port=port)
    assert len(attempts) == 100, dump(attempts)
    assert all(get(d, "event.outcome") == "success" for d in attempts), dump(attempts)
    assert len(select(docs, "connection_established", episode="ep-victim", port=port)) == 100
    by_episode = losses_of(metric)
    # The victim lost nothing.
    assert not gaps(by_episode.get("ep-victim", {})), by_episode
    flood_losses = by_episode["ep-flood"]
    if kind == "dns":
        # Each query is one payload record; the first two are evidence, the others took a token or were refused.
        allowed = BUDGET_BURST + BUDGET_RATE * (seconds + 1)
        assert flood_losses["budget"] >= sent - 2 - allowed, (sent, seconds, flood_losses)
        assert set(gaps(flood_losses)) <= {"budget", "ring_share"}, flood_losses   # and nothing else was lost
    else:
        # Evidence takes no budget: the share refused it, and nothing else was lost.
        assert flood_losses["ring_share"] > 0, (sent, seconds, flood_losses)
        assert set(gaps(flood_losses)) <= {"ring_share", "budget"}, flood_losses
    # The share kept the ring from filling. (A "ring full for an instant" seen here was the reader's
    # consumer position read half-written by the probes: tracer/kernel/bpf.py, test_ringbuf.py.)
    assert get(metric, "eptrace.stats.records_lost_by_reason.ringbuf_full") == 0, metric


def losses_of(metric: dict) -> dict[str, dict[str, int]]:
    """Episode id -> its losses by reason, from a metric document's eptrace.stats.episode_losses."""
    return {item["episode_id"]: item["losses"] for item in get(metric, "eptrace.stats.episode_losses") or []}


def gaps(losses: dict[str, int]) -> dict[str, int]:
    return {reason: n for reason, n in losses.items() if reason not in NOT_GAPS}


@pytest.mark.parametrize("kind", ["dns", "evidence"])
def test_run_fail_on_incomplete_exits_6_when_records_were_lost(tmp_path, net, kind):
    config, events, verdict = tmp_path / "limits.toml", tmp_path / "events.ndjson", tmp_path / "verdict.json"
    config.write_text(TINY_BUDGET)
    flood = flood_argv(net, kind, tmp_path, tmp_path / "never", "count", "20000")
    # The episode is alone in its tracer: the ring share (which protects episodes from each other) is not in
    # force, and the evidence flood fills the ring.
    refused_as = "budget" if kind == "dns" else "ringbuf_full"
    r = run_eptrace("run", "--episode", "ep-flood-run", "--config", config, "--output", f"file:{events}",
                    "--verdict", verdict, "--grace", "2", "--fail-on-incomplete", "--", *flood)
    assert r.returncode == EXIT_INCOMPLETE, r.stderr
    v = json.loads(verdict.read_text())
    assert v["exit_code"] == 0, v                      # the command itself succeeded
    assert v["complete"] is False and refused_as in v["incomplete_reasons"], v
    assert v["losses"][refused_as] > 0 and v["records_lost"] >= v["losses"][refused_as], v
    assert v["clean"] is False, v
    if kind == "dns":
        assert v["alerted"] is False, v        # (the evidence flood's raw sockets and scans may alert)
    assert "INCOMPLETE" in r.stderr and refused_as in r.stderr, r.stderr

    # The same episode without the flag: the command's status; a short, quiet one is complete.
    r = run_eptrace("run", "--episode", "ep-quiet-run", "--verdict", verdict, "--output", f"file:{events}",
                    "--fail-on-incomplete", "--grace", "1", "--", "/bin/true")
    assert r.returncode == 0, r.stderr
    v = json.loads(verdict.read_text())
    assert v["complete"] is True and v["clean"] is True and v["losses"] == {}, v

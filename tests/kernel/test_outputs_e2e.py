"""Network and file outputs driven by `eptrace run` itself, not only their classes: Splunk HEC and
Elasticsearch (HTTP servers that answer like them), Fluent Forward (the real FluentServer), syslog over UDP
with the receiver down, and a file output whose writes fail.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path


from eptrace_helpers import (alerts, assert_contract, get, output_stats, read_docs, run_eptrace,
                             start_eptrace)
from http_receivers import EsReceiver, HecReceiver, Server
from support import require, wait_for
from test_forward import fluent  # noqa: F401  (fixture)
from test_syslog import rsyslog_factory  # noqa: F401  (fixture)

TOKEN = "3f1e9a5c-eptrace-test"

# 30 loopback connections: about 150 documents, plus an alert (a connect to 169.254.169.254 is refused in
# the host namespace, but asked for).
WORKLOAD = ("import socket\n"
            "for i in range(30):\n"
            "    l=socket.create_server(('127.0.0.1',0)); s=socket.create_connection(l.getsockname())\n"
            "    c,_=l.accept(); c.close(); s.close(); l.close()\n"
            "t=socket.socket(); t.settimeout(0.2); t.connect_ex(('169.254.169.254',80)); t.close()\n")


def run_with(tmp_path: Path, episode: str, *outputs: str, workload: str = WORKLOAD):
    """`eptrace run` with a file output (the reference) and the given outputs; returns the reference docs."""
    events = tmp_path / f"{episode}.ndjson"
    args = ["run", "--episode", episode, "--grace", 1, "--output", f"file:{events}"]
    for spec in outputs:
        args += ["--output", spec]
    r = run_eptrace(*args, "--", "/usr/bin/python3", "-c", workload, state_dir=tmp_path / "state")
    assert r.returncode == 0, r.stderr
    docs = read_docs(events)
    assert_contract(docs)
    return docs


def ids(docs) -> set[str]:
    return {get(d, "event.id") for d in docs}


def test_run_delivers_every_document_to_hec_es_and_forward(tmp_path, fluent):  # noqa: F811
    hec, es = HecReceiver(), EsReceiver()
    hec_server, es_server = Server(hec), Server(es)
    forward = fluent()
    try:
        docs = run_with(tmp_path, "ep-outs", f"hec://127.0.0.1:{hec_server.port}?token={TOKEN}&index=sandbox",
                        f"es://127.0.0.1:{es_server.port}/eptrace-test", f"forward://127.0.0.1:{forward.port}")
        want = ids(docs)
        assert len(want) > 100 and alerts(docs, "cloud_metadata_access"), len(want)
        # The final metric is written to every output after the run's last flush: all must arrive.
        wait_for(lambda: {e["event"]["event"]["id"] for e in hec.events} >= want, 20, "HEC to get every document")
        wait_for(lambda: set(es.store) >= want, 20, "Elasticsearch to get every document")
        forward.wait_ids(want)
    finally:
        hec_server.close()
        es_server.close()
    for path, headers, _ in hec_server.requests:
        assert path == "/services/collector/event" and headers["Authorization"] == f"Splunk {TOKEN}"
    assert all(e["index"] == "sandbox" for e in hec.events)
    by_id = {get(d, "event.id"): d for d in docs}
    for doc_id, (index, doc) in es.store.items():
        assert index == "eptrace-test" and doc == by_id[doc_id], doc_id        # _id is event.id; the doc whole
    final = [d for d in docs if get(d, "event.kind") == "metric"][-1]
    for prefix in ("hec://", "es://", "forward://"):
        stats = output_stats(final, prefix)
        assert stats is not None and stats["dropped"] == {}, (prefix, stats)


def test_syslog_udp_with_the_receiver_down_then_up(tmp_path, rsyslog_factory):  # noqa: F811
    """UDP has no acknowledgement: the ICMP port-unreachable of a datagram is reported on the next send, and the
    sender then holds documents back (queue and spool) until the receiver answers again. What was sent before
    the first error was noticed is lost, as syslog over UDP loses it anywhere: at most the first batch. (The
    receiver's socket buffer is made large enough for the drain's burst: a small one drops datagrams, which no
    sender can see.)"""
    r = rsyslog_factory()
    r.stop()
    events = tmp_path / "udp.ndjson"
    go = tmp_path / "go"
    workload = WORKLOAD.replace("for i in range(30):", "import os,time\nfor i in range(200):\n"
                                "    if i == 100:\n"
                                f"        while not os.path.exists('{go}'): time.sleep(0.05)")
    proc = start_eptrace("run", "--episode", "ep-udp", "--grace", 1, "--stats-interval", 0.5,
                         "--output", f"file:{events}", "--output", f"syslog+udp://127.0.0.1:{r.udp_port}", "--",
                         "/usr/bin/python3", "-c", workload, state_dir=tmp_path / "state",
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        def held_back():
            return [s for d in read_docs(events) if get(d, "event.kind") == "metric"
                    and (s := output_stats(d, "syslog+udp")) and (s["queued"] or s["spooled_bytes"])]
        wait_for(held_back, 30, "documents held back while the UDP receiver is down")
        r.start()
        go.touch()
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    # What was still held back at exit is in the spool: the next run delivers it first.
    after = run_eptrace("run", "--episode", "ep-udp-next", "--output", f"syslog+udp://127.0.0.1:{r.udp_port}",
                        "--", "true", state_dir=tmp_path / "state")
    assert after.returncode == 0, after.stderr
    docs = read_docs(events)
    want = ids(docs)
    wait_for(lambda: len(want - {json.loads(line)["event"]["id"] for line in r.lines()}) <= 64, 20,
             "the documents held back to reach rsyslog")
    got = {json.loads(line)["event"]["id"] for line in r.lines()}
    lost = want - got
    # at most what was handed to the socket before the first ICMP error came back: one batch
    assert len(lost) <= 64, f"{len(lost)} of {len(want)} documents lost"
    second_half = [get(d, "event.id") for d in docs][len(docs) // 2:]
    assert set(second_half) <= got, "documents written after the receiver came back were lost"


def test_file_output_whose_writes_fail(tmp_path):
    """A full disk: writes fail, documents are counted as dropped (reason io_error), the file keeps only whole
    lines, the other outputs go on, and the episode's own exit status is kept."""
    full = tmp_path / "full"
    full.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "eptrace-full", str(full)],
                       capture_output=True, text=True)
    require(r.returncode == 0, f"cannot mount a small tmpfs: {r.stderr.strip()}")
    try:
        docs = run_with(tmp_path, "ep-full", f"file:{full}/events.ndjson")
        data = (full / "events.ndjson").read_bytes()
    finally:
        subprocess.run(["umount", str(full)], capture_output=True)
    assert data and data.endswith(b"\n"), data[-200:]
    written = [json.loads(line) for line in data.decode().splitlines()]       # whole lines, every one
    assert ids(written) <= ids(docs)
    final = [d for d in docs if get(d, "event.kind") == "metric"][-1]
    stats = output_stats(final, f"file:{full}")
    assert stats["dropped"].get("io_error", 0) > 0, stats
    # the final metric counts what came before it; it may itself have fitted in the file
    assert stats["sent"] == len([d for d in written if get(d, "event.id") != get(final, "event.id")]), stats

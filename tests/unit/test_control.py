"""The daemon protocol's framing and the verdict carried over a daemon restart (no kernel needed)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgpack

from tracer import control
from tracer.detect.rules import REVERSE_SHELL
from tracer.events import Alert, Episode, Metric
from tracer.schema.document import restamp
from tracer.schema.ecs import EcsEncoder
from tracer.verdict import Verdict, from_dict, merge

REPO = Path(__file__).resolve().parents[2]


def test_a_document_travels_as_its_exact_text():
    text = '{"a":1.50,"b":"ü \\"q\\"","c":{"d":[1,2]}}'
    line = control.encode_doc("alert", text)
    assert line.endswith(b"\n") and b"\n" not in line[:-1]
    message = json.loads(line)                 # an ordinary JSON message for any client
    assert message == {"v": control.PROTOCOL_VERSION, "type": "doc", "kind": "alert", "doc": json.loads(text)}
    assert control.decode_doc(line[:-1]) == ("alert", text, None)      # and byte-exact for eptrace's
    assert control.decode_doc(control.encode({"type": "verdict"})[:-1]) is None
    numbered = control.encode_doc("event", text, 42)       # an episode's document: its number in the episode
    assert json.loads(numbered)["seq"] == 42 and json.loads(numbered)["doc"] == json.loads(text)
    assert control.decode_doc(numbered[:-1]) == ("event", text, 42)


def test_a_capture_entry_travels_as_base64_of_its_msgpack():
    entry = msgpack.packb(["rec", bytes(range(256))], use_bin_type=True)
    line = control.encode_capture(entry)
    assert json.loads(line)["type"] == "capture" and b"\n" not in line[:-1]
    assert control.decode_capture(line[:-1]) == entry
    assert control.decode_capture(control.encode_doc("event", "{}", 1)[:-1]) is None


def test_a_client_document_gets_the_clients_sequence_and_run_id_and_keeps_the_daemons_for_correlation():
    encoder = EcsEncoder("h", "0", run_id="daemon-run")
    episode = Episode("ep-1", "/eptrace/ep-1@1", 7, {"eptrace": '"eptrace":{"run":{"id":"x"}'})
    for _ in range(3):
        doc = encoder.encode_document(Alert(rule=REVERSE_SHELL, timestamp_ns=1, episode=episode, cgroup_id=7,
                                            cgroup_path="/eptrace/ep-1@1", process=None, message="m", risk_score=50.0))
    metric = encoder.encode_document(Metric(timestamp_ns=2, stats={"episode_id": "ep-1"}))
    for original in (doc, metric):
        fields = json.loads(restamp(original.json, 2, "client-run"))
        theirs = json.loads(original.json)
        assert fields["event"]["sequence"] == 2 and fields["eptrace"]["run"] == {"id": "client-run"}
        assert fields["eptrace"]["daemon"] == {"run_id": "daemon-run", "sequence": theirs["event"]["sequence"]}
        assert fields["event"]["id"] == theirs["event"]["id"]             # unique already
        del fields["eptrace"]["daemon"]
        fields["event"]["sequence"], fields["eptrace"]["run"] = theirs["event"]["sequence"], theirs["eptrace"]["run"]
        assert fields == theirs                                            # nothing else changed


def test_requests_carry_the_version():
    assert json.loads(control.encode({"op": "list"})) == {"v": 1, "op": "list"}


def test_a_verdict_from_two_daemons_adds_up_and_keeps_the_kernels_larger_counts():
    first = Verdict("ep", connections=3, bytes_out=10, destinations=["a:1/tcp", "b:2/tcp"], destination_count=2,
                    alerts=[{"rule": "x"}], connects_refused=1)
    first.account({"argv_from_proc": 1, "ringbuf_full": 2})
    second = Verdict("ep", exit_code=0, connections=2, bytes_out=5, destinations=["b:2/tcp", "c:3/tcp"],
                     destination_count=2, connects_refused=4)
    second.account({"ringbuf_full": 5})
    v = merge(first, second)
    assert (v.connections, v.bytes_out, v.exit_code, v.connects_refused) == (5, 15, 0, 4)
    assert v.destinations == ["a:1/tcp", "b:2/tcp", "c:3/tcp"] and v.destination_count == 3
    assert v.alerts == [{"rule": "x"}]
    assert v.losses == {"argv_from_proc": 1, "ringbuf_full": 5} and not v.complete and v.records_lost == 5
    assert from_dict(json.loads(v.to_json())) == v                     # alerted, clean dropped


def test_the_client_side_imports_neither_bcc_nor_the_loader():
    code = ("import sys, tracer.cli, tracer.client, tracer.control, tracer.api, tracer.session; "
            "print(sorted(m for m in sys.modules if m == 'bcc' or m.startswith('bcc.') "
            "or m in ('tracer.kernel.loader', 'tracer.pipeline', 'tracer.daemon')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_no_daemon_is_no_connection_under_auto_and_an_error_under_require(tmp_path, monkeypatch):
    monkeypatch.setenv("EPTRACE_SOCKET", str(tmp_path / "none.sock"))
    assert control.connect_if_running("auto") is None
    assert control.connect_if_running("never") is None
    try:
        control.connect_if_running("require")
    except control.NoDaemon as e:
        assert "no eptrace daemon listens" in str(e) and e.status == 2
    else:
        raise AssertionError("require without a daemon connected")


def test_a_client_numbers_its_stream_as_the_daemon_counted_so_that_undelivered_documents_show(tmp_path):
    """A daemon (here, one speaking the protocol on a real socket) that could not deliver documents 3 and 4
    of the episode: the client's stream shows the gap, under its own run id, and is not renumbered."""
    import socket
    import threading

    from support import Collect

    from tracer import client
    from tracer.outputs import Fanout
    from tracer.verdict import Verdict
    path = tmp_path / "daemon.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    encoder = EcsEncoder("h", "0", run_id="daemon-run")
    episode = Episode("ep-gap", "/eptrace/ep-gap@1", 5, {})
    docs = [encoder.encode_document(Alert(rule=REVERSE_SHELL, timestamp_ns=i, episode=episode, cgroup_id=5,
                                          cgroup_path="/eptrace/ep-gap@1", process=None, message="m",
                                          risk_score=50.0)) for i in range(5)]
    requests = []

    def daemon() -> None:
        sock, _ = server.accept()
        with sock, sock.makefile("rwb") as f:
            requests.append(_greeted(f, "i"))
            f.write(control.encode({"type": "started", "cgroup": "/x", "cgroup_id": 5, "instance": "i"}))
            for seq in (1, 2, 5):
                f.write(control.encode_doc(docs[seq - 1].kind, docs[seq - 1].json, seq))
            f.flush()
            requests.append(json.loads(f.readline()))
            f.write(control.encode({"type": "verdict", "final": True, "id": "ep-gap",
                                    "verdict": Verdict("ep-gap", exit_code=0).__dict__}))
            f.flush()
    thread = threading.Thread(target=daemon)
    thread.start()
    sink = Collect()
    ep = client.Episode(control.Connection(path, timeout=10), Fanout([sink]), "ep-gap")
    verdict = ep.end(0.0)
    thread.join(10)
    server.close()
    assert [r["op"] for r in requests] == ["start", "end"] and "capture" not in requests[0]
    assert verdict.episode_id == "ep-gap"
    assert [d["event"]["sequence"] for d in sink.docs] == [1, 2, 5]
    assert {d["eptrace"]["run"]["id"] for d in sink.docs} == {ep.run_id} != {"daemon-run"}
    assert [d["eptrace"]["daemon"]["sequence"] for d in sink.docs] == [1, 2, 5]


def test_documents_a_restarted_daemon_could_not_keep_make_the_clients_verdict_incomplete(tmp_path):
    """A daemon (one speaking the protocol on a real socket) dies after the start; the restarted one resumes
    the episode with 3 documents it could not keep (beyond its limit): the client's output lacks them, so its
    verdict is incomplete (documents_not_kept), not clean."""
    import socket
    import threading

    from support import Collect

    from tracer import client
    from tracer.outputs import Fanout
    from tracer.verdict import Verdict
    path = tmp_path / "daemon.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(2)
    requests = []

    def daemon() -> None:
        sock, _ = server.accept()              # the first daemon: it dies after the start
        with sock, sock.makefile("rwb") as f:
            requests.append(_greeted(f, "first"))
            f.write(control.encode({"type": "started", "cgroup": "/x", "cgroup_id": 5, "instance": "first"}))
            f.flush()
        sock, _ = server.accept()              # the restarted one
        with sock, sock.makefile("rwb") as f:
            requests.append(_greeted(f, "second"))
            f.write(control.encode({"type": "resumed", "id": "ep-kept", "cgroup_id": 5, "instance": "second",
                                    "delivered_from_restart": 0, "not_kept": 3, "capture_carried": False}))
            f.flush()
            requests.append(json.loads(f.readline()))
            f.write(control.encode({"type": "verdict", "final": True, "id": "ep-kept",
                                    "verdict": Verdict("ep-kept", exit_code=0).__dict__}))
            f.flush()
    thread = threading.Thread(target=daemon)
    thread.start()
    ep = client.Episode(control.Connection(path, timeout=10), Fanout([Collect()]), "ep-kept")
    verdict = ep.end(0.0)
    thread.join(10)
    server.close()
    assert [r["op"] for r in requests] == ["start", "resume", "end"], requests
    assert verdict.losses == {"documents_not_kept": 3} and not verdict.complete, verdict
    assert verdict.incomplete_reasons == ["documents_not_kept"]


def _greeted(f, instance: str) -> dict:
    """A fake daemon's side of a connection: its hello, then the client's request."""
    f.write(control.encode({"type": "hello", "instance": instance}))
    f.flush()
    return json.loads(f.readline())

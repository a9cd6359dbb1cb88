"""The daemon protocol's framing and the verdict carried over a daemon restart (no kernel needed)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tracer import control
from tracer.verdict import Verdict, from_dict, merge

REPO = Path(__file__).resolve().parents[2]


def test_a_document_travels_as_its_exact_text():
    text = '{"a":1.50,"b":"ü \\"q\\"","c":{"d":[1,2]}}'
    line = control.encode_doc("alert", text)
    assert line.endswith(b"\n") and b"\n" not in line[:-1]
    message = json.loads(line)                 # an ordinary JSON message for any client
    assert message == {"v": control.PROTOCOL_VERSION, "type": "doc", "kind": "alert", "doc": json.loads(text)}
    assert control.decode_doc(line[:-1]) == ("alert", text)      # and byte-exact for eptrace's
    assert control.decode_doc(control.encode({"type": "verdict"})[:-1]) is None


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

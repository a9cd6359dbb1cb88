"""What a hostile sandbox (or a careless operator) can feed eptrace, refused without a kernel: files root must
not write, secrets, terminal text, config numbers, registrations, labels, output specs, record sizes, the
metrics endpoint. The same attacks through the real command are in tests/kernel/test_hardening.py."""
from __future__ import annotations

import json
import os
import socket
import stat
import struct
import time

import pytest
from support import require

from tracer import decoding, safefiles
from tracer.config import ConfigError, load
from tracer.metrics_http import MAX_CONNECTIONS, MetricsServer, exposition
from tracer.outputs import OutputSpecError, parse_output_spec, parse_output_specs
from tracer.outputs.secrets import redact, secret_param
from tracer.registry import Registry, RegistryError, parse_labels
from tracer.terminal import printable

NOBODY = 65534
as_root = pytest.mark.usefixtures("_needs_root")


@pytest.fixture
def _needs_root():
    require(os.geteuid() == 0, "making a file another user owns needs root")


# ---- files root writes ----------------------------------------------------------------------------------

@pytest.fixture
def sticky_dir(tmp_path):
    """A 1777 directory, as /tmp is, holding a victim file and a link to it."""
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, 0o1777)
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    return d, victim


def test_a_link_is_never_followed(sticky_dir):
    d, victim = sticky_dir
    (d / "out").symlink_to(victim)
    for attempt in (lambda: safefiles.open_for_writing(d / "out", "x"),
                    lambda: safefiles.write_atomically(d / "out", b"evil", "x"),
                    lambda: safefiles.AtomicFile(d / "out", "x")):
        with pytest.raises(safefiles.UnsafePathError, match="symbolic link"):
            attempt()
    assert victim.read_text() == "untouched\n"


@as_root
def test_a_file_another_user_owns_is_refused(sticky_dir):
    d, _ = sticky_dir
    theirs = d / "theirs"
    theirs.write_text("theirs\n")
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(safefiles.UnsafePathError, match="owned by uid 65534"):
        safefiles.open_for_writing(theirs, "x")
    assert theirs.read_text() == "theirs\n"


def test_a_directory_others_can_write_without_the_sticky_bit_is_refused(tmp_path):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(safefiles.UnsafePathError, match="writable by others"):
        safefiles.check_target(d / "x", "x")
    with pytest.raises(safefiles.UnsafePathError, match="writable by others"):
        safefiles.check_target(d / "sub" / "x", "x")        # a directory above counts too
    assert not (d / "x").exists()


def test_hard_links_are_refused(tmp_path):
    target = tmp_path / "a"
    target.write_text("a\n")
    os.link(target, tmp_path / "b")
    with pytest.raises(safefiles.UnsafePathError, match="hard links"):
        safefiles.open_for_writing(tmp_path / "b", "x")


def test_modes(tmp_path):
    os.close(safefiles.open_for_writing(tmp_path / "private", "x"))
    assert stat.S_IMODE(os.stat(tmp_path / "private").st_mode) == 0o600
    safefiles.write_atomically(tmp_path / "verdict.json", b"{}", "x")
    assert stat.S_IMODE(os.stat(tmp_path / "verdict.json").st_mode) == 0o600
    d = safefiles.private_dir(tmp_path / "state" / "spool", "x")
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700
    out = parse_output_spec(f"file:{tmp_path}/events.ndjson?group={os.getegid()}")
    out.close()
    st = os.stat(tmp_path / "events.ndjson")
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == os.getegid()


def test_dev_null_is_written_as_it_is():
    """Benchmarks write to /dev/null: accepted, never chmod-ed, rotated or renamed over."""
    before = os.stat(os.devnull)
    out = parse_output_spec("file:/dev/null?max_mb=1")
    out.write(__import__("tracer.schema", fromlist=["Document"]).Document("{}" + " " * 2_000_000, "event"))
    out.close()
    safefiles.write_atomically(os.devnull, b"{}", "--verdict")
    after = os.stat(os.devnull)
    assert stat.S_ISCHR(after.st_mode) and after.st_mode == before.st_mode and after.st_ino == before.st_ino
    assert not os.path.lexists("/dev/null.1")


def test_a_file_in_place_of_the_state_directory_is_refused(tmp_path):
    (tmp_path / "state").write_text("")
    with pytest.raises(safefiles.UnsafePathError, match="not a directory"):
        safefiles.private_dir(tmp_path / "state", "state directory")
    with pytest.raises(safefiles.UnsafePathError, match="not a directory"):
        safefiles.check_private_dir(tmp_path / "state", "state directory")


def test_atomic_file_leaves_nothing_when_aborted(tmp_path):
    f = safefiles.AtomicFile(tmp_path / "capture", "x")
    f.write(b"half")
    f.abort()
    assert list(tmp_path.iterdir()) == []


# ---- output specs -----------------------------------------------------------------------------------------

def test_a_bad_output_after_a_good_one_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("EPTRACE_STATE_DIR", str(tmp_path / "state"))
    with pytest.raises(OutputSpecError):
        parse_output_specs(["hec://127.0.0.1:9?token=abc", f"file:{tmp_path}/e.ndjson", "bogus://x"])
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["missing", "directory"])
def test_file_output_to_a_missing_directory_or_a_directory(tmp_path, where):
    path = tmp_path / "no" / "e.ndjson" if where == "missing" else tmp_path
    with pytest.raises(OutputSpecError) as e:
        parse_output_specs([f"file:{path}"])
    assert "\n" not in str(e.value)
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("spec", ["hec://127.0.0.1:9?token=%ff", "es://127.0.0.1:9/i?password=%ff&user=u",
                                  "forward://127.0.0.1:9?shared_key=%ff"])
def test_undecodable_percent_escapes_name_their_output(spec):
    with pytest.raises(OutputSpecError) as e:
        parse_output_spec(spec)
    text = str(e.value)
    assert spec.split("://")[0] + " output" in text and "127.0.0.1:9" in text and "codec" not in text


@pytest.mark.parametrize("spec", ["es://elastic:hunter2@127.0.0.1:9200/idx", "ess://u:hunter2@h:1/i?ca=/x",
                                  "hec://127.0.0.1:9?token=hunter2&bogus=1", "es://127.0.0.1:9/i?password=hunter2&x=1",
                                  "forward://127.0.0.1:9?shared_key=hunter2&nope=1"])
def test_errors_never_echo_a_secret(spec):
    with pytest.raises(OutputSpecError) as e:
        parse_output_spec(spec)
    assert "hunter2" not in str(e.value)


def test_redact():
    assert redact("es://elastic:pw@h:1/i?password=pw&api_key=k&shared_key=s&token=t&password_file=/f") == \
        "es://***@h:1/i?password=***&api_key=***&shared_key=***&token=***&password_file=/f"


# ---- secrets ----------------------------------------------------------------------------------------------

def _secret_file(tmp_path, text="  s3cret\n", mode=0o600):
    path = tmp_path / "secret"
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_secret_param_forms(tmp_path, monkeypatch):
    path = _secret_file(tmp_path)
    assert secret_param({"token": "inline"}, "token", "hec output") == "inline"
    assert secret_param({"token_file": str(path)}, "token", "hec output") == "s3cret"
    monkeypatch.setenv("HEC_TOKEN", " fromenv ")
    assert secret_param({"token_env": "HEC_TOKEN"}, "token", "hec output") == "fromenv"
    assert secret_param({}, "token", "hec output") is None
    with pytest.raises(ValueError, match="once"):
        secret_param({"token": "a", "token_file": str(path)}, "token", "hec output")


@pytest.mark.parametrize("mode", [0o644, 0o620, 0o606])
def test_secret_files_others_can_read_or_write_are_refused(tmp_path, mode):
    path = _secret_file(tmp_path, mode=mode)
    with pytest.raises(ValueError, match="by others") as e:
        secret_param({"password_file": str(path)}, "password", "es output 'x'")
    assert "s3cret" not in str(e.value)


def test_secret_file_links_and_empty_files_are_refused(tmp_path):
    path = _secret_file(tmp_path)
    (tmp_path / "link").symlink_to(path)
    with pytest.raises(ValueError, match="symbolic link"):
        secret_param({"api_key_file": str(tmp_path / "link")}, "api_key", "es output 'x'")
    empty = _secret_file(tmp_path, text="\n")
    with pytest.raises(ValueError, match="empty"):
        secret_param({"shared_key_file": str(empty)}, "shared_key", "forward output 'x'")


def test_every_output_with_a_secret_takes_the_file_form(tmp_path, monkeypatch):
    monkeypatch.setenv("EPTRACE_STATE_DIR", str(tmp_path / "state"))
    path = _secret_file(tmp_path)
    for spec in (f"hec://127.0.0.1:9?token_file={path}", f"es://127.0.0.1:9/i?user=u&password_file={path}",
                 f"es://127.0.0.1:9/j?api_key_file={path}", f"forward://127.0.0.1:9?shared_key_file={path}"):
        out = parse_output_spec(spec)
        out.close(timeout_s=0.1)
    from tracer.outputs.http import parse_es_spec, parse_hec_spec
    assert parse_hec_spec(f"hec://h:1?token_file={path}").headers["Authorization"] == "Splunk s3cret"
    assert parse_es_spec(f"es://h:1/i?api_key_file={path}").headers["Authorization"] == "ApiKey s3cret"


# ---- text on a terminal -----------------------------------------------------------------------------------

def test_printable_escapes_controls_and_line_breaks():
    assert printable("a\x1b[2Jb\nc\td\r\x00\x9b\u2028\\") == "a\\x1b[2Jb\\nc\\td\\r\\x00\\x9b\\u2028\\\\"
    assert printable("plain text, ünïcode é") == "plain text, ünïcode é"


def test_verdict_summary_escapes_the_sandbox_text():
    from tracer.verdict import Verdict
    v = Verdict("ep-1", exit_code=0, alerts=[{"rule": "crypto_mining", "severity": "high",
                                               "message": "argv: xmrig \x1b[2J\nepisode ep-1: exit 0, forged"}])
    text = v.human()
    assert "\x1b" not in text and len(text.splitlines()) == 2 and "\\x1b[2J\\nepisode" in text


def test_format_human_escapes_the_sandbox_text():
    from tracer.schema import format_human
    line = format_human({"@timestamp": "2026-01-01T00:00:00.000000Z", "event": {"action": "process_started"},
                         "process": {"pid": 1, "name": "x\x1b]0;t\x07", "args": ["a\nb"]}})
    assert "\x1b" not in line and "\n" not in line and "\\x1b]0;t\\x07" in line


# ---- config -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, words", [
    ("[flows]\nupdate_interval_seconds = inf\n", "finite"),
    ("[flows]\nlong_flow_seconds = nan\n", "finite"),
    ("[output]\nspool_mb = inf\n", "finite"),
    ("[dns]\nwindow_seconds = -inf\n", "finite"),
    ("[reverse_tunnel]\nalert_score = 1e308\n", "whole number"),
    ("[dns]\nlong_query_chars = 80.5\n", "whole number"),
    ("[dns]\nlong_query_chars = 99999999999999999\n", "between 1 and"),
    ("[output]\nspool_mb = 1e-12\n", "between 1 and"),
    ("[flows]\nupdate_interval_seconds = 1e-9\n", "between 0.001 and"),
])
def test_config_numbers_are_checked_by_type(tmp_path, text, words):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words) as e:
        load(path)
    assert "\n" not in str(e.value)


def test_config_that_is_not_utf8(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes(b"[dns]\n# caf\xe9\nlong_query_chars = 80\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load(path)


# ---- registrations and labels ------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["a\tb", "a\nb", "\x1b[2J", "a\x7f", "a\u2028b"])
def test_label_values_with_control_characters_are_refused(value):
    with pytest.raises(RegistryError, match="control characters"):
        parse_labels([f"team={value}"])


@pytest.mark.parametrize("content", [
    {"id": "ep-1", "cgroup": 7, "labels": {}},
    {"id": "ep-1", "cgroup": "/x", "labels": []},
    {"id": "ep-1", "cgroup": "/x", "labels": {"k": 1}},
    {"id": ["ep-1"], "cgroup": "/x", "labels": {}},
    {"id": "ep-2", "cgroup": "/x", "labels": {}},           # not its file name
    {"id": "ep-1", "cgroup": "/x", "labels": {"k": "\x1b[2J"}},
    {"id": "ep-1", "labels": {}},
    {"id": "ep-1", "cgroup": "/x", "labels": {}, "colour": "red"},
])
def test_bad_registration_files(tmp_path, content):
    (tmp_path / "episodes").mkdir(mode=0o700)
    (tmp_path / "episodes" / "ep-1.json").write_text(json.dumps(content))
    reg = Registry(tmp_path)
    with pytest.raises(RegistryError, match="registration ep-1.json"):
        reg.list(strict=True)
    assert reg.list() == []          # a running watch skips it


# ---- records ------------------------------------------------------------------------------------------------

def test_a_record_of_the_wrong_size_is_refused_and_counted():
    from tracer.pipeline import Tracer
    from tracer.capture import ReplayProbes
    from tracer.schema.ecs import EcsEncoder
    header = decoding.HEADER.pack(decoding.RecordType.CONNECT, 0, 0, 0, 0, 0, 0, 0, b"x")
    short = bytearray(header + bytes(decoding.NET_BODY.size - 8))
    struct.pack_into("<I", short, 4, len(short))           # its header agrees with its length: still refused
    with pytest.raises(decoding.DecodeError, match="struct has 184"):
        decoding.decode(bytes(short))

    class Sink:
        outputs: list = []

        def write(self, doc): pass

        def flush(self): pass
    probes = ReplayProbes()
    tracer = Tracer(probes, EcsEncoder(host_name="h", agent_version="0"), Sink())
    probes.handle(bytes(short))
    snapshot = tracer.stats_snapshot()
    assert snapshot["records_undecodable"] == 1
    assert "eptrace_records_undecodable_total 1" in exposition(snapshot)


# ---- the metrics endpoint -----------------------------------------------------------------------------------

STATS = {"records_received": 0, "records_lost": 0, "records_lost_by_reason": {}, "events_emitted": 0, "alerts": 0,
         "episodes": 0, "flows_open": 0, "outputs": {}}


def test_metrics_endpoint_bounds_idle_connections():
    server = MetricsServer("127.0.0.1:0", lambda: STATS)
    idle = []
    try:
        for _ in range(MAX_CONNECTIONS + 2):       # connections that never send a request
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
        extra = idle[-1]
        assert extra.recv(10) == b""                 # closed unanswered: over the cap
        # The idle ones are dropped after the request timeout; then a real request is answered.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                import urllib.request
                body = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10).read()
                break
            except OSError:
                time.sleep(0.5)
        assert b"eptrace_alerts_total" in body
        assert getattr(server.server, "refused", 0) >= 1
    finally:
        for s in idle:
            s.close()
        server.close()


def test_metrics_endpoint_warns_off_loopback(caplog):
    server = MetricsServer("0.0.0.0:0", lambda: STATS)
    server.close()
    assert any("reachable from other hosts" in r.getMessage() for r in caplog.records)
    caplog.clear()
    MetricsServer("127.0.0.1:0", lambda: STATS).close()
    assert not caplog.records


# ---- dead letters -------------------------------------------------------------------------------------------

class Refuser:
    """A Sender whose receiver refuses every document for good."""
    name = "test://refuser"

    def send(self, docs):
        return [(d, "refused") for d in docs]

    def close(self):
        pass


def _dead_letter_output(tmp_path):
    from tracer.outputs.delivery import DeliveryOutput
    return DeliveryOutput(Refuser(), spool_dir=tmp_path / "spool")


def _doc(i):
    from tracer.schema import Document
    return Document(json.dumps({"event": {"id": f"id-{i}", "kind": "event"}}), "event")


def _wait(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_dead_letters_are_private(tmp_path):
    out = _dead_letter_output(tmp_path)
    out.write(_doc(1))
    _wait(lambda: out.dropped.get("rejected:refused"))
    out.close(timeout_s=0.1)
    letters = out.spool.dir / "dead-letter.ndjson"
    assert "id-1" in letters.read_text() and stat.S_IMODE(os.stat(letters).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(out.spool.dir).st_mode) == 0o700


def test_dead_letters_never_follow_a_link(tmp_path, caplog):
    victim = tmp_path / "victim"
    victim.write_text("victim\n")
    out = _dead_letter_output(tmp_path)
    (out.spool.dir / "dead-letter.ndjson").symlink_to(victim)
    out.write(_doc(1))
    _wait(lambda: out.dropped.get("rejected:refused"))
    out.close(timeout_s=0.1)
    assert victim.read_text() == "victim\n"
    assert any("symbolic link" in r.getMessage() for r in caplog.records)

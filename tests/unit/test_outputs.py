"""Outputs: whole lines, rotation without loss, spec parsing, stdout, fan-out."""
import io
import json
import os

import pytest

from tracer.outputs import (Fanout, FileOutput, Output, OutputError, OutputSpecError, StdoutOutput,
                            parse_output_spec, parse_output_specs)
from tracer.schema import Document, to_json


def doc(i: int) -> Document:
    return as_doc({"event": {"sequence": i}, "message": f"document {i} " + "x" * (i % 50)})


def as_doc(fields: dict) -> Document:
    return Document(to_json(fields), "event")


def read_lines(path: str) -> list[dict]:
    with open(path, "rb") as f:
        data = f.read()
    assert data == b"" or data.endswith(b"\n"), "a file ends with a whole line"
    return [json.loads(line) for line in data.splitlines()]


def test_file_lines_are_whole_and_parseable(tmp_path):
    path = str(tmp_path / "events.ndjson")
    out = FileOutput(path)
    for i in range(3000):  # > 64 KiB: forces intermediate batch writes
        out.write(doc(i))
    out.close()
    assert [d["event"]["sequence"] for d in read_lines(path)] == list(range(3000))
    assert out.sent == 3000 and out.dropped == {}


def test_new_file_mode_is_0640(tmp_path):
    old = os.umask(0o022)
    try:
        FileOutput(str(tmp_path / "e.ndjson")).close()
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "e.ndjson").st_mode & 0o777 == 0o640


def test_each_write_is_whole_lines(tmp_path, monkeypatch):
    writes: list[bytes] = []
    real_write = os.write

    def spy(fd, data):
        writes.append(bytes(data))
        return real_write(fd, data)

    out = FileOutput(str(tmp_path / "e.ndjson"), max_mb=0.01)
    monkeypatch.setattr(os, "write", spy)
    for i in range(2000):
        out.write(doc(i))
    out.close()
    assert len(writes) > 1
    for data in writes:
        assert data.endswith(b"\n")
        for line in data.splitlines():
            json.loads(line)


def test_file_appends_to_existing_file(tmp_path):
    path = tmp_path / "e.ndjson"
    path.write_text('{"old":1}\n')
    out = FileOutput(str(path))
    out.write(doc(1))
    out.close()
    assert read_lines(str(path))[0] == {"old": 1} and len(read_lines(str(path))) == 2


def test_rotation_keeps_every_line_exactly_once(tmp_path):
    path = str(tmp_path / "e.ndjson")
    out = FileOutput(path, max_mb=2 / 1024, keep=100)  # ~2 KiB per file
    n = 1000
    for i in range(n):
        out.write(doc(i))
        if i % 7 == 0:
            out.flush()
    out.close()
    files = [path] + [f"{path}.{k}" for k in range(1, 101) if os.path.exists(f"{path}.{k}")]
    assert len(files) > 5
    seen = [d["event"]["sequence"] for f in reversed(files) for d in read_lines(f)]
    assert seen == list(range(n))  # oldest file first, nothing lost, nothing twice
    for f in files:
        assert os.path.getsize(f) <= 2048


def test_rotation_keeps_only_keep_files(tmp_path):
    path = str(tmp_path / "e.ndjson")
    out = FileOutput(path, max_mb=1 / 1024, keep=2)
    for i in range(500):
        out.write(doc(i))
        out.flush()
    out.close()
    assert sorted(os.listdir(tmp_path)) == ["e.ndjson", "e.ndjson.1", "e.ndjson.2"]
    seen = [d["event"]["sequence"] for f in (path + ".2", path + ".1", path) for d in read_lines(f)]
    assert seen == list(range(seen[0], 500))  # the newest lines, contiguous


def test_a_tailer_following_renames_reads_every_line_once(tmp_path):
    """Like Filebeat/Vector: read to EOF; when the path is a new file, drain the old fd, reopen."""
    path = str(tmp_path / "e.ndjson")
    out = FileOutput(path, max_mb=1 / 1024, keep=3)
    reader = open(path, "rb")
    got: list[int] = []
    partial = b""

    def drain() -> None:
        nonlocal reader, partial
        while True:
            partial += reader.read()
            *lines, partial = partial.split(b"\n")
            got.extend(json.loads(line)["event"]["sequence"] for line in lines)
            assert partial == b"", "a tailer never sees half a line"
            if os.stat(path).st_ino == os.fstat(reader.fileno()).st_ino:
                return
            reader.close()
            reader = open(path, "rb")

    for i in range(400):
        out.write(doc(i))
        if i % 3 == 0:
            out.flush()
            drain()
    out.close()
    drain()
    reader.close()
    assert got == list(range(400))


def test_file_errors_at_construction(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        FileOutput(str(tmp_path / "missing" / "e.ndjson"))
    with pytest.raises(OutputError, match="is a directory"):
        FileOutput(str(tmp_path))
    with pytest.raises(OutputError):
        FileOutput(str(tmp_path / "e"), keep=0)


def test_write_after_close_is_counted(tmp_path):
    out = FileOutput(str(tmp_path / "e.ndjson"))
    out.close()
    out.write(doc(1))
    assert out.dropped == {"closed": 1}


def test_parse_specs(tmp_path):
    assert isinstance(parse_output_spec("-"), StdoutOutput)
    out = parse_output_spec(f"file:{tmp_path}/a.ndjson?max_mb=10&keep=3")
    assert isinstance(out, FileOutput) and out.max_bytes == 10 * 1024 * 1024 and out.keep == 3
    assert out.name == f"file:{tmp_path}/a.ndjson"
    out.close()
    plain = parse_output_spec(f"file:{tmp_path}/b.ndjson")
    assert plain.max_bytes is None and plain.keep == 5
    plain.close()
    [default] = parse_output_specs([])
    assert isinstance(default, StdoutOutput)
    assert len(parse_output_specs(["-", f"file:{tmp_path}/c.ndjson"])) == 2


@pytest.mark.parametrize("spec", [
    "", "stdout", "tcp://127.0.0.1:5140", "file:", "file:/tmp/x?max_mb=0", "file:/tmp/x?max_mb=-1",
    "file:/tmp/x?max_mb=1.5", "file:/tmp/x?keep=abc", "file:/tmp/x?colour=red", "file:/tmp/x?max_mb",
    "file:/tmp/x?keep=1&keep=2",
])
def test_bad_specs_are_one_line_errors(spec):
    with pytest.raises(OutputSpecError) as err:
        parse_output_spec(spec)
    assert "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)


def test_unknown_spec_lists_the_accepted_forms():
    with pytest.raises(OutputSpecError, match=r"'-' \(stdout\), 'file:PATH', 'file:PATH\?max_mb=N&keep=K&group=G'"):
        parse_output_spec("amqp://localhost:5672")


def test_same_sink_twice_is_an_error(tmp_path):
    with pytest.raises(OutputSpecError, match="twice"):
        parse_output_specs(["-", "-"])
    with pytest.raises(OutputSpecError, match="twice"):
        parse_output_specs([f"file:{tmp_path}/a", f"file:{tmp_path}/a?max_mb=1"])


def test_stdout_writes_json_lines_on_flush(capsys):
    out = StdoutOutput()
    out.write(as_doc({"a": 1, "text": "ü"}))
    out.write(as_doc({"b": 2}))
    assert capsys.readouterr().out == ""  # buffered
    out.flush()
    assert capsys.readouterr().out == '{"a":1,"text":"ü"}\n{"b":2}\n'
    assert out.sent == 2 and out.dropped == {}


class BrokenStream(io.StringIO):
    def write(self, s):
        raise BrokenPipeError(32, "Broken pipe")


def test_stdout_broken_pipe_counts_drops_and_warns_once(caplog):
    out = StdoutOutput(stream=BrokenStream())
    out.write(as_doc({"a": 1}))
    out.write(as_doc({"a": 2}))
    out.flush()
    out.write(as_doc({"a": 3}))
    out.flush()
    out.close()
    assert out.dropped == {"broken_pipe": 3} and out.sent == 0
    assert len([r for r in caplog.records if "broken pipe" in r.getMessage()]) == 1


class Exploding(Output):
    name = "exploding"

    def write(self, doc):
        raise RuntimeError("boom")


class Collecting(Output):
    name = "collecting"

    def __init__(self):
        super().__init__()
        self.docs = []

    def write(self, doc):
        self.docs.append(doc)
        self.sent += 1


def test_fanout_isolates_a_failing_output(caplog):
    bad, good = Exploding(), Collecting()
    fan = Fanout([bad, good])
    for i in range(3):
        fan.write(doc(i))
    fan.flush()
    fan.close()
    assert len(good.docs) == 3 and good.dropped == {}
    assert bad.dropped == {"error": 3}
    assert len([r for r in caplog.records if "exploding" in r.getMessage()]) == 1

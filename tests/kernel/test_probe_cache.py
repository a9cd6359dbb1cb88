"""The probe cache (tracer/kernel/probecache.py): a start with unchanged probes loads the programs bcc loaded
before, without clang or bcc, and traces as a compiled start does; a cache file that is corrupt, refused by
the verifier, or that someone else could have written is not used: the probes are compiled (with a warning)
and the cache is written again."""
from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import stat
import subprocess
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import harness
from harness import PYTHON
from eptrace_helpers import wait_until
from tracer import decoding
from tracer.decoding import RecordType as T
from tracer.kernel import probecache
from tracer.kernel.loader import Probes

COMPILER_STEPS = {"import bcc", "compile", "load"}          # the compiling child's step timings with bcc

# One loopback connection, listener and client in the workload: its port on stdout.
WORKLOAD = r'''
import socket
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
c = socket.create_connection(listener.getsockname())
s, _ = listener.accept()
s.close()
c.close()
'''


@pytest.fixture(scope="module")
def compiled_entry(tmp_path_factory):
    """A cache entry written by a real compile (the first start in an empty cache directory): its file."""
    d = tmp_path_factory.mktemp("probe-cache") / "cache"
    saved = os.environ.get("EPTRACE_CACHE_DIR")
    os.environ["EPTRACE_CACHE_DIR"] = str(d)
    try:
        probes = Probes()
        try:
            assert probes.cache == "miss", probes.load_seconds
            assert COMPILER_STEPS <= set(probes.load_seconds), probes.load_seconds
        finally:
            probes.close()
    finally:
        if saved is None:
            os.environ.pop("EPTRACE_CACHE_DIR")
        else:
            os.environ["EPTRACE_CACHE_DIR"] = saved
    entries = list(d.glob("*.json"))
    assert len(entries) == 1, entries
    st = entries[0].stat()
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    return entries[0]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch, compiled_entry):
    """A cache directory of this test's own, holding a copy of the compiled entry."""
    d = tmp_path / "cache"
    d.mkdir(mode=0o700)
    shutil.copy2(compiled_entry, d / compiled_entry.name)
    monkeypatch.setenv("EPTRACE_CACHE_DIR", str(d))
    return d


def assert_traces_a_connect(probes: Probes, cgroup: Path) -> None:
    """A real loopback connection from an episode cgroup arrives as its records, with its port."""
    got: list = []
    probes.open_records(lambda raw: got.append(decoding.decode(raw)))
    probes.attach(cgroup)
    proc = harness.spawn_in_cgroup(cgroup, [PYTHON, "-c", WORKLOAD], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        assert proc.wait(timeout=30) == 0

        def mine() -> list:
            return [r for r in got if isinstance(r, decoding.NetRecord) and r.header.owner.tgid == proc.pid]
        wait_until(lambda: (probes.poll(100), Counter(r.header.type for r in mine())[T.FLOW_ENDED] >= 2)[1],
                           timeout=15, message=lambda: f"records of the workload: {mine()}")
    finally:
        proc.kill()
        proc.wait()
    counts = Counter(r.header.type for r in mine())
    assert counts == Counter({T.LISTENING: 1, T.CONNECT: 1, T.ESTABLISHED: 1, T.ACCEPTED: 1, T.FLOW_ENDED: 2}), counts
    connect = next(r for r in mine() if r.header.type == T.CONNECT)
    assert (connect.remote_ip, connect.remote_port) == ("127.0.0.1", port)


def test_a_second_start_loads_the_cached_probes_without_bcc_and_traces(cache_dir, episode_cgroup):
    entry = next(cache_dir.glob("*.json"))
    before = entry.read_bytes()
    probes = Probes()
    try:
        assert probes.cache == "hit", probes.load_seconds
        assert not COMPILER_STEPS & set(probes.load_seconds), probes.load_seconds
        assert_traces_a_connect(probes, episode_cgroup(f"probecache-hit-{os.getpid()}"))
    finally:
        probes.close()
    assert entry.read_bytes() == before         # a hit rewrites nothing


def test_tracers_starting_side_by_side_share_an_empty_cache(tmp_path, monkeypatch):
    """Two tracers that miss at once both compile and write the same entry (each renames a whole file over
    it): no temporary file is left, and a third tracer loads the entry."""
    monkeypatch.setenv("EPTRACE_CACHE_DIR", str(tmp_path / "cache"))
    with ThreadPoolExecutor(2) as pool:
        started = list(pool.map(lambda _: Probes(), range(2)))
    try:
        # both miss (each compiles for about 3 s), unless one was scheduled that much later than the other
        assert "miss" in [p.cache for p in started] and {p.cache for p in started} <= {"miss", "hit"}, \
            [p.load_seconds for p in started]
    finally:
        for p in started:
            p.close()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [next((tmp_path / "cache").glob("*.json")).name]
    third = Probes()
    try:
        assert third.cache == "hit", third.load_seconds
    finally:
        third.close()


def corrupt(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def refused_by_the_verifier(path: Path) -> None:
    """A well-formed entry whose first program returns r0 without writing it: the verifier refuses it, after
    the maps were created."""
    entry = json.loads(path.read_text())
    entry["programs"][0]["insns"] = base64.b64encode(bytes([0x95, 0, 0, 0, 0, 0, 0, 0])).decode()   # exit
    entry["programs"][0]["maps"] = []
    path.write_text(json.dumps(entry))


def other_instructions(path: Path) -> None:
    """Instructions the verifier accepts, but not the ones bcc loaded: the program's tag tells."""
    entry = json.loads(path.read_text())
    entry["programs"][0]["insns"] = base64.b64encode(bytes([0xb7, 0, 0, 0, 0, 0, 0, 0,            # r0 = 0
                                                            0x95, 0, 0, 0, 0, 0, 0, 0])).decode()  # exit
    entry["programs"][0]["maps"] = []
    path.write_text(json.dumps(entry))


def writable_by_others(path: Path) -> None:
    path.chmod(0o666)


def owned_by_nobody(path: Path) -> None:
    os.chown(path, 65534, 65534)


@pytest.mark.parametrize("spoil", [corrupt, refused_by_the_verifier, other_instructions, writable_by_others,
                                   owned_by_nobody])
def test_an_unusable_cache_file_is_compiled_over_with_a_warning(spoil, cache_dir, episode_cgroup, caplog):
    entry = next(cache_dir.glob("*.json"))
    spoil(entry)
    with caplog.at_level(logging.WARNING, logger="tracer.kernel.loader"):
        probes = Probes()
    try:
        assert probes.cache == "refused", probes.load_seconds
        assert COMPILER_STEPS <= set(probes.load_seconds), probes.load_seconds
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(w.startswith("probe cache not used, compiling instead") for w in warnings), warnings
        assert_traces_a_connect(probes, episode_cgroup(f"probecache-{spoil.__name__}-{os.getpid()}"))
    finally:
        probes.close()
    st = entry.stat()                           # written again, whole and root's own
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600
    again = Probes()
    try:
        assert again.cache == "hit", again.load_seconds
    finally:
        again.close()


def test_the_key_changes_with_the_probes_the_flags_and_the_headers(tmp_path):
    probes = tmp_path / "probes"
    probes.mkdir()
    (probes / "records.h").write_text("struct r { int a; };")
    source, cflags = "int x;", ["-DRINGBUF_PAGES=8"]
    attach = {"on_connect4": (18, 10)}
    k = probecache.key(source, cflags, attach, probes)
    assert k == probecache.key(source, list(cflags), dict(attach), probes)
    assert k != probecache.key(source + " ", cflags, attach, probes)
    assert k != probecache.key(source, ["-DRINGBUF_PAGES=16"], attach, probes)
    assert k != probecache.key(source, cflags, {"on_connect4": (18, 11)}, probes)
    (probes / "records.h").write_text("struct r { long a; };")     # an #included header, not in source
    assert k != probecache.key(source, cflags, attach, probes)

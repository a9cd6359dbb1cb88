"""No compiler in the tracer: bcc compiles in a short-lived child (tracer/kernel/compile.py) and the tracer,
`eptrace watch` or `eptrace run`, reads the probes with libbpf alone. Its address space never holds libLLVM,
libclang or libbcc, and the compiling child is gone once the tracer runs."""
from __future__ import annotations

import os
from pathlib import Path

from eptrace_helpers import Watcher, run_eptrace

COMPILER = ("libLLVM", "libclang", "libbcc")


def mapped_libraries(maps: str) -> set[str]:
    return {os.path.basename(fields[5]) for fields in (line.split() for line in maps.splitlines()) if len(fields) > 5}


def assert_no_compiler(maps: str, who: str) -> None:
    libraries = mapped_libraries(maps)
    assert any(lib.startswith("libbpf.so") for lib in libraries), \
        f"{who} does not map libbpf, so it does not read the probes: {sorted(libraries)}"
    compiler = sorted(lib for lib in libraries if lib.startswith(COMPILER))
    assert not compiler, f"{who} maps the compiler: {compiler}"


def children(pid: int) -> list[str]:
    """The command lines of pid's child processes."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                found.append(Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode())
            except OSError:
                pass            # exited meanwhile
    return found


def test_watch_never_maps_the_compiler(tmp_path):
    with Watcher(tmp_path / "events.ndjson", tmp_path / "state") as watcher:
        watcher.ready()
        assert_no_compiler(Path(f"/proc/{watcher.proc.pid}/maps").read_text(), "eptrace watch")
        assert not [c for c in children(watcher.proc.pid) if "tracer.kernel.compile" in c], \
            "the compiling child still runs after watch is ready"
        assert watcher.stop() == 0


def test_run_never_maps_the_compiler(tmp_path):
    """The command's parent is the tracer: it copies the tracer's mappings while the episode is traced."""
    copy = tmp_path / "tracer-maps"
    r = run_eptrace("run", "--episode", f"nocompiler-{os.getpid()}", "--output", f"file:{tmp_path / 'events.ndjson'}",
                    "--", "sh", "-c", f'cat /proc/$PPID/maps > {copy}')
    assert r.returncode == 0, r.stderr
    assert_no_compiler(copy.read_text(), "eptrace run")

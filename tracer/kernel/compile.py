"""The compiling child: `python -m tracer.kernel.compile MAPS LINKS PROGRAMS RINGBUF_PAGES [PROBES_DIR]`.

bcc compiles probes/ (clang and LLVM are mapped only here), loads every program, and pins what the
tracer needs: every map declared PINNED() under MAPS (bcc re-opens a map pinned there before), a BPF
link of every tracepoint program under LINKS (tp-<category>-<event>, replacing what a dead tracer
pinned), and every cgroup program under PROGRAMS, for the tracer to attach per episode. Then it prints
one JSON object on stdout (each map's type and its key and value types, the tracepoint links, each
cgroup program's attach type, the time each step took) and exits: the tracer (tracer/kernel/loader.py)
goes on with libbpf alone. On failure: one line on stderr that names the kernel's reason, status 1.

With unchanged probes, the programs come from the probe cache instead (tracer/kernel/probecache.py: bcc is
never imported then); after a compile, what bcc loaded is recorded there. The JSON says which ("cache":
hit, miss, or refused: an entry was there but unusable, with a warning, so the probes were compiled).
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from .. import safefiles
from . import bpf, loader, probecache
from .loader import probe_build

BPF_PERF_EVENT = 41                                    # enum bpf_attach_type: a tracepoint's perf event
PERF_TYPE_TRACEPOINT, PERF_SAMPLE_RAW, PERF_ATTR_SIZE = 2, 1 << 10, 128
SYS_PERF_EVENT_OPEN = 298                              # x86_64
TRACEPOINT_PREFIX = b"tracepoint__"                    # TRACEPOINT_PROBE(category, event)'s function names
STARTED = time.monotonic()


class CompileError(Exception):
    pass


@contextlib.contextmanager
def _libbcc_messages(lines: list[str]):
    """libbcc prints its errors (a refused map, the verifier's log) straight to fd 2: collect them into
    lines, so that a failure is one line that names the kernel's reason, and success stays quiet."""
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines.extend(line for line in captured.read().decode(errors="replace").splitlines() if line.strip())


def _error(what: str, error: Exception, messages: list[str]) -> CompileError:
    kernel_says = next((m for m in messages if "error" in m.lower() or "permission" in m.lower()), None)
    reason = f"{kernel_says} ({error})" if kernel_says else str(error)
    return CompileError(f"{what}: {reason} (run 'eptrace doctor' to see which kernel feature is missing)")


def _tracepoint_event(tracefs: str, category: str, name: str) -> int:
    """A perf event fd for a tracepoint, for a BPF_PERF_EVENT link (which bcc 0.26 cannot make)."""
    tp_id = int(Path(tracefs, "events", category, name, "id").read_text())
    attr = (ctypes.c_ubyte * PERF_ATTR_SIZE)()
    ctypes.c_uint32.from_buffer(attr, 0).value = PERF_TYPE_TRACEPOINT
    ctypes.c_uint32.from_buffer(attr, 4).value = PERF_ATTR_SIZE
    ctypes.c_uint64.from_buffer(attr, 8).value = tp_id
    ctypes.c_uint64.from_buffer(attr, 16).value = 1               # sample_period
    ctypes.c_uint64.from_buffer(attr, 24).value = PERF_SAMPLE_RAW
    ctypes.c_uint32.from_buffer(attr, 48).value = 1               # wakeup_events
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(SYS_PERF_EVENT_OPEN, attr, -1, 0, -1, 8)     # pid -1, cpu 0, PERF_FLAG_FD_CLOEXEC
    if fd < 0:
        raise CompileError(f"cannot open tracepoint {category}:{name}: {os.strerror(ctypes.get_errno())}")
    return fd


def _replace_pin(fd: int, path: Path) -> None:
    """Pin fd at path; what was pinned there (a dead tracer's link: its tracepoint) goes."""
    path.unlink(missing_ok=True)
    bpf.obj_pin(fd, path)


BPF_PROG_TYPE_TRACEPOINT = 5
# name -> (enum bpf_prog_type, enum bpf_attach_type) of each cgroup program
CGROUP_PROGRAMS = {
    "on_sock_create": (9, 2),           # CGROUP_SOCK, CGROUP_INET_SOCK_CREATE
    "on_sock_release": (9, 34),         # CGROUP_SOCK, CGROUP_INET_SOCK_RELEASE
    "on_connect4": (18, 10),            # CGROUP_SOCK_ADDR, CGROUP_INET4_CONNECT
    "on_connect6": (18, 11),            # CGROUP_SOCK_ADDR, CGROUP_INET6_CONNECT
    "on_sendmsg4": (18, 14),            # CGROUP_SOCK_ADDR, CGROUP_UDP4_SENDMSG
    "on_sendmsg6": (18, 15),            # CGROUP_SOCK_ADDR, CGROUP_UDP6_SENDMSG
    "on_bind4": (18, 8),                # CGROUP_SOCK_ADDR, CGROUP_INET4_BIND
    "on_bind6": (18, 9),                # CGROUP_SOCK_ADDR, CGROUP_INET6_BIND
    "on_sock_ops": (13, 3),             # SOCK_OPS, CGROUP_SOCK_OPS
    "on_egress": (8, 1),                # CGROUP_SKB, CGROUP_INET_EGRESS
    "on_ingress": (8, 0),               # CGROUP_SKB, CGROUP_INET_INGRESS
}


def _tracefs() -> str:
    return next((d for d in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing") if Path(d, "events").is_dir()),
                "/sys/kernel/tracing")


class _Timer:
    """The seconds each step took, since the child started."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def step(self, name: str) -> None:
        self.seconds[name] = time.monotonic() - STARTED - sum(self.seconds.values())


def _compile_with_bcc(maps: Path, source: str, cflags: list[str], timer: _Timer, cache_key: str,
                      warnings: list[str]) -> tuple[dict, dict[str, int], dict | None]:
    """bcc compiles and loads the probes: the maps' description, each program's fd by function name, and
    the cache entry of what was loaded (None, with a warning, when it cannot be recorded)."""
    from bcc import BPF  # Debian's python3-bpfcc
    from bcc import lib as libbcc
    libbcc.bpf_num_tables.argtypes, libbcc.bpf_num_tables.restype = [ctypes.c_void_p], ctypes.c_ulonglong
    libbcc.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_ulonglong]
    libbcc.bpf_table_name.restype = ctypes.c_char_p

    class Compiler(BPF):
        def _trace_autoload(self):
            """bcc would attach each tracepoint through a perf event fd, which cannot be pinned (and
            detaching it again costs a grace period each): they are linked below instead."""

    timer.step("import bcc")
    messages: list[str] = []
    try:
        with _libbcc_messages(messages):
            compiled = Compiler(text=source.encode(), cflags=[*cflags, f'-DPIN_DIR="{maps}"'])
    except Exception as e:  # bcc raises bare Exceptions
        raise _error("cannot compile or load the probes", e, messages) from e
    timer.step("compile")

    described: dict[str, dict] = {}
    tables: dict[str, bool] = {}                        # every map by name: pinned or the probes' scratch
    for i in range(libbcc.bpf_num_tables(compiled.module)):
        name = libbcc.bpf_table_name(compiled.module, i)
        tables[name.decode()] = (maps / name.decode()).exists()
        if not tables[name.decode()]:
            continue                # the probes' own scratch space: the tracer reaches only pinned maps
        map_id = libbcc.bpf_table_id(compiled.module, name)
        entry: dict = {"type": libbcc.bpf_table_type_id(compiled.module, map_id),
                       "max_entries": libbcc.bpf_table_max_entries_id(compiled.module, map_id), "key": None,
                       "value": None}
        try:
            entry["key"] = bpf.describe_type(BPF._decode_table_type(
                json.loads(libbcc.bpf_table_key_desc(compiled.module, name))))
            entry["value"] = bpf.describe_type(BPF._decode_table_type(
                json.loads(libbcc.bpf_table_leaf_desc(compiled.module, name))))
        except (TypeError, ValueError, KeyError):
            pass                    # no plain key or value (a ring buffer, socket storage): not looked up
        described[name.decode()] = entry

    functions: dict[str, tuple[int, int]] = {}          # name -> (program type, expected attach type or -1)
    for i in range(libbcc.bpf_num_functions(compiled.module)):
        fn_name = libbcc.bpf_function_name(compiled.module, i)
        if fn_name.startswith(TRACEPOINT_PREFIX):
            functions[fn_name.decode()] = (BPF_PROG_TYPE_TRACEPOINT, -1)
    functions.update(CGROUP_PROGRAMS)
    programs: dict[str, int] = {}
    messages.clear()
    try:
        with _libbcc_messages(messages):
            for name, (prog_type, attach_type) in functions.items():
                programs[name] = compiled.load_func(name.encode(), prog_type, attach_type=attach_type).fd
    except Exception as e:
        raise _error("cannot load a program", e, messages) from e
    timer.step("load")

    try:
        names_by_fd = {libbcc.bpf_table_fd(compiled.module, name.encode()): name for name in tables}
        recorded = probecache.entry(
            cache_key, [probecache.describe_map(name, fd, tables[name]) for fd, name in names_by_fd.items()],
            [probecache.describe_program(name, programs[name], compiled.dump_func(name.encode()),
                                         max(attach_type, 0), names_by_fd)
             for name, (_, attach_type) in functions.items()],
            _as_bytes(libbcc.bpf_module_license(compiled.module)),
            libbcc.bpf_module_kern_version(compiled.module), {"maps": described})
    except (probecache.CacheError, OSError) as e:
        warnings.append(f"the probes are not cached: {e}")
        recorded = None
    # The programs' fds stay open (bcc holds them) until this child exits, after linking and pinning.
    return described, programs, recorded


def _as_bytes(license) -> bytes:
    return license if isinstance(license, bytes) else ctypes.string_at(license)


def _link_and_pin(prog_fds: dict[str, int], links: Path, programs: Path, timer: _Timer) -> list[str]:
    """Link each tracepoint program under links and pin each cgroup program under programs: the tracepoint
    link names."""
    tracefs = _tracefs()
    tracepoints: list[str] = []
    try:
        for fn_name, fd in prog_fds.items():
            if not fn_name.startswith(TRACEPOINT_PREFIX.decode()):
                continue
            category, event_name = fn_name[len(TRACEPOINT_PREFIX):].split("__", 1)
            event = _tracepoint_event(tracefs, category, event_name)
            try:
                link = bpf.link_create(fd, event, BPF_PERF_EVENT)
            finally:
                os.close(event)         # the link holds the event
            tracepoints.append(f"tp-{category}-{event_name}")
            _replace_pin(link, links / tracepoints[-1])
            os.close(link)
        timer.step("tracepoints")
        for name in CGROUP_PROGRAMS:
            _replace_pin(prog_fds[name], programs / name)
    except OSError as e:
        raise CompileError(str(e)) from e
    timer.step("cgroup programs")
    return tracepoints


def compile_and_pin(maps: Path, links: Path, programs: Path, ringbuf_pages: int) -> dict:
    """Load the probes, from the probe cache when it has them (tracer/kernel/probecache.py), else with bcc
    (then recorded in the cache); link and pin them. The JSON the tracer reads."""
    timer = _Timer()
    timer.step("import")
    source, cflags = probe_build(ringbuf_pages)
    cache_key = probecache.key(source, cflags, CGROUP_PROGRAMS, loader.PROBES_DIR)
    warnings: list[str] = []
    cached, loaded = None, None
    try:
        cached = probecache.read(cache_key)
        if cached is not None:
            loaded = probecache.load(cached, maps)
    except probecache.CacheError as e:
        warnings.append(f"probe cache not used, compiling instead: {e}")
    if loaded is not None:
        timer.step("cache hit")
        cache = "hit"
        described, prog_fds, recorded = cached["described"]["maps"], loaded.programs, None
    else:
        timer.step("cache miss")
        cache = "miss" if cached is None and not warnings else "refused"
        described, prog_fds, recorded = _compile_with_bcc(maps, source, cflags, timer, cache_key, warnings)
    try:
        tracepoints = _link_and_pin(prog_fds, links, programs, timer)
    finally:
        if loaded is not None:
            loaded.close()
    if recorded is not None:
        try:
            probecache.write(recorded)
        except (OSError, safefiles.UnsafePathError) as e:
            warnings.append(f"cannot write the probe cache: {e}")
        timer.step("cache write")
    return {"seconds": timer.seconds, "cache": cache, "warnings": warnings, "maps": described,
            "tracepoints": tracepoints, "programs": {name: attach for name, (_, attach) in CGROUP_PROGRAMS.items()}}


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if len(argv) not in (4, 5):
        print("usage: python -m tracer.kernel.compile MAPS LINKS PROGRAMS RINGBUF_PAGES [PROBES_DIR]",
              file=sys.stderr)
        return 2
    maps, links, programs = (Path(a) for a in argv[:3])
    if len(argv) == 5:
        loader.PROBES_DIR = Path(argv[4])       # the parent's (bench.probecost compares probe variants)
    try:
        result = compile_and_pin(maps, links, programs, int(argv[3]))
    except CompileError as e:
        print(e, file=sys.stderr)
        return 1
    json.dump(result, sys.stdout)
    sys.stdout.flush()
    os._exit(0)         # now: bcc's atexit clean-up would only close what the pins keep


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

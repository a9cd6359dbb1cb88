"""A sketch of a tracer that never maps the compiler, measured: not how eptrace runs today.

bcc compiles, loads and attaches the probes in a short-lived child process that
pins everything (maps, links: tracer.kernel.pins' layout) and exits, as a dead
tracer would leave them. This process never loads libbcc (which links libLLVM
and libclang-cpp): it re-opens the pinned ring buffer with the system libbpf and
reads the records of a small loopback storm in the traced cgroup. It shows what
the split costs in start-up and that the records arrive, and what a reader
without the compiler weighs; the tracer's own pipeline is not in it.
"""
from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from tracer.kernel import cgroups, pins

from .memory import rss_by_part

CONNECTIONS = 200
# The child: the loader as the tracer uses it, then a clean exit that keeps the pins.
COMPILE = r'''
import sys
from pathlib import Path
from tracer.kernel import loader
probes = loader.Probes(pin_dir=Path(sys.argv[1]))
probes.attach(Path(sys.argv[2]))
probes.close(keep_pins=True)
'''
SAMPLE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


def storm(cgroup: Path) -> None:
    child = os.fork()
    if child == 0:
        try:
            (cgroup / "cgroup.procs").write_text("0")
            server = socket.create_server(("127.0.0.1", 0))
            for _ in range(CONNECTIONS):
                with socket.create_connection(server.getsockname()):
                    server.accept()[0].close()
        finally:
            os._exit(0)
    os.waitpid(child, 0)


def main() -> None:
    if "bcc" in sys.modules:
        raise SystemExit("bench.nocompiler must run in a process that has not loaded bcc")
    pin_dir = pins.root().with_name(pins.root().name + "-bench-nocompiler")
    parent = cgroups.cgroup2_mount() / "eptrace-bench-nocompiler"
    parent.mkdir(exist_ok=True)
    cgroup = cgroups.create(parent / "episode")
    try:
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-c", COMPILE, str(pin_dir), str(cgroup)], capture_output=True,
                              text=True, cwd=Path(__file__).parent.parent)
        compile_s = time.monotonic() - start
        if done.returncode != 0:
            print(f"  no compiler in the tracer (sketch): the compiling child failed: {done.stderr.strip()[-300:]}")
            return
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
        lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
        lib.ring_buffer__new.argtypes = [ctypes.c_int, SAMPLE, ctypes.c_void_p, ctypes.c_void_p]
        lib.ring_buffer__new.restype = ctypes.c_void_p
        lib.ring_buffer__consume.argtypes = [ctypes.c_void_p]
        lib.ring_buffer__free.argtypes = [ctypes.c_void_p]
        maps = next(pin_dir.glob(pins.MAPS_PREFIX + "*"))
        events = lib.bpf_obj_get(str(maps / "events").encode())
        records = [0]
        callback = SAMPLE(lambda _ctx, _data, _size: records.__setitem__(0, records[0] + 1) or 0)
        ring = lib.ring_buffer__new(events, callback, None, None)
        if events < 0 or not ring:
            print(f"  no compiler in the tracer (sketch): cannot re-open the ring buffer "
                  f"({os.strerror(ctypes.get_errno())})")
            return
        reopen_s = time.monotonic() - start - compile_s
        storm(cgroup)
        lib.ring_buffer__consume(ring)      # the probes never wake the reader: consume, as the tracer does
        rss = rss_by_part(os.getpid()) or {}
        lib.ring_buffer__free(ring)
        os.close(events)
        mapped = Path("/proc/self/maps").read_text()
        print(f"  no compiler in the tracer (sketch, bench/nocompiler.py): a child compiled, loaded, attached and "
              f"pinned the probes in {compile_s:.2f} s and exited; this process re-opened them in "
              f"{reopen_s * 1000:.0f} ms with libbpf alone")
        print(f"    records read {records[0]:,} for {CONNECTIONS} loopback connections; libLLVM mapped here: "
              f"{'yes' if 'libLLVM' in mapped else 'no'}; RSS {rss.get('total', 0) / 2**20:.1f} MB, of which the "
              f"ring buffer {rss.get('ring buffer', 0) / 2**20:.1f} MB (a bare reader, without the pipeline)")
    finally:
        cgroups.kill_and_remove(parent)
        pins.remove(pin_dir)


if __name__ == "__main__":
    main()

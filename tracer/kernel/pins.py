"""Pinned state under bpffs: what keeps the probes attached when a tracer dies.

Layout, under the pin root (default /sys/fs/bpf/eptrace, env EPTRACE_PIN_DIR):
    watch/            the fixed state of 'eptrace watch': a restarted watch re-opens it
    run-<pid>/        the state of one 'eptrace run' (removed when that run ends cleanly)
    private-<pid>-<n>/  the hand-over of probes without a pin directory (removed once the tracer holds them)
each holding maps-<digest of the probes>/<map name> and links/<tp-... | cg-<cgroup id>-<program>>, and
while the tracer starts, programs/<cgroup program> (the compiling child's hand-over of what it loaded).
A link holds its program, which holds its maps: while a pin exists, the probe runs.
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import mmap
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ROOT = Path("/sys/fs/bpf/eptrace")
WATCH_DIR = "watch"
RUN_PREFIX = "run-"
MAPS_PREFIX = "maps-"
PROGRAMS_DIR = "programs"


class PinError(Exception):
    """bpffs is missing or the pinned state cannot be used."""


def root() -> Path:
    return Path(os.environ.get("EPTRACE_PIN_DIR") or DEFAULT_ROOT)


def _bpffs_mounts() -> list[Path]:
    with open("/proc/mounts") as mounts:
        return [Path(f[1]) for f in (line.split() for line in mounts) if len(f) >= 3 and f[2] == "bpf"]


def ensure_bpffs(path: Path) -> None:
    """Make sure path can hold pins: mount bpffs on /sys/fs/bpf when nothing is mounted there."""
    path = Path(os.path.abspath(path))
    if ":" in str(path) or " " in str(path):
        raise PinError(f"pin directory {path} may not contain ':' or spaces (bcc reads the path from a section name)")
    if not any(m == path or m in path.parents for m in _bpffs_mounts()):
        bpffs = Path("/sys/fs/bpf")
        if bpffs not in path.parents and path != bpffs:
            raise PinError(f"pin directory {path} is not on a bpf filesystem (mount -t bpf bpf {path.parent})")
        r = subprocess.run(["mount", "-t", "bpf", "bpf", str(bpffs)], capture_output=True, text=True)
        if r.returncode != 0:
            raise PinError(f"cannot mount bpffs on {bpffs}: {r.stderr.strip()}")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def maps_dir_name(source: str, parts: list[str]) -> str:
    """Maps are re-opened only by the same probes: the name carries a digest of what was compiled
    (parts: the flags and every file of the probes directory, whose headers set the maps' layouts)."""
    return MAPS_PREFIX + hashlib.sha256("\0".join([source, *parts]).encode()).hexdigest()[:12]


def watch_dir() -> Path:
    return root() / WATCH_DIR


def run_dir(pid: int) -> Path:
    return root() / f"{RUN_PREFIX}{pid}"


def lock(path: Path) -> int:
    """Hold path (a pin directory) for this process; another live holder is an error.
    The lock goes with the process, so a dead tracer's state can be taken over."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PinError(f"another eptrace process uses the pinned state in {path}") from None
    return fd


def is_locked(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


RINGBUF_BUSY, RINGBUF_DISCARD, RINGBUF_HEADER = 1 << 31, 1 << 30, 8     # struct bpf_ringbuf_hdr (UAPI)
MAP_INFO_SIZE, MAP_INFO_MAX_ENTRIES = 80, 16                              # struct bpf_map_info (UAPI)


def undelivered(path: Path) -> tuple[int, int]:
    """(records, bytes) that no reader consumed in the ring buffers pinned under path: what a dead tracer
    recorded after its last read, lost with the pins. Read through the ring's read-only mmap, without bcc."""
    records = nbytes = 0
    for events in path.glob(MAPS_PREFIX + "*/events"):
        try:
            fd = _libbpf().bpf_obj_get(str(events).encode())
        except OSError:
            return records, nbytes
        if fd < 0:
            continue
        try:
            info = (ctypes.c_ubyte * MAP_INFO_SIZE)()
            size = ctypes.c_uint32(MAP_INFO_SIZE)
            if _libbpf().bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size)) != 0:
                continue
            ring = ctypes.c_uint32.from_buffer(info, MAP_INFO_MAX_ENTRIES).value
            page = mmap.PAGESIZE
            with mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ, offset=0) as consumer, \
                    mmap.mmap(fd, page + 2 * ring, mmap.MAP_SHARED, mmap.PROT_READ, offset=page) as producer:
                pos = struct.unpack_from("<Q", consumer, 0)[0]
                end = struct.unpack_from("<Q", producer, 0)[0]
                while pos < end:
                    header = struct.unpack_from("<I", producer, page + (pos & (ring - 1)))[0]
                    if header & RINGBUF_BUSY:
                        break                   # reserved, never submitted: the writer died with it
                    length = header & ~(RINGBUF_BUSY | RINGBUF_DISCARD)
                    if not header & RINGBUF_DISCARD:
                        records += 1
                        nbytes += length
                    pos += (length + RINGBUF_HEADER + 7) & ~7
        except (OSError, ValueError, struct.error):
            continue
        finally:
            os.close(fd)
    return records, nbytes


def _libbpf() -> ctypes.CDLL:
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
    lib.bpf_obj_get.restype = ctypes.c_int
    return lib


def remove(path: Path) -> None:
    """Unpin everything under path: its links detach and its maps go with their last user."""
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class PinnedState:
    path: Path
    owner: str          # "watch", or the pid of the run
    alive: bool         # a live eptrace holds it
    maps: int
    links: int


def list_state(at: Path | None = None) -> list[PinnedState]:
    base = at or root()
    if not base.is_dir():
        return []
    found = []
    for d in sorted(p for p in base.iterdir() if p.is_dir()):
        owner = "watch" if d.name == WATCH_DIR else d.name.removeprefix(RUN_PREFIX)
        maps = sum(len(list(m.iterdir())) for m in d.glob(MAPS_PREFIX + "*"))
        links = len(list((d / "links").iterdir())) if (d / "links").is_dir() else 0
        found.append(PinnedState(d, owner, is_locked(d), maps, links))
    return found


def dead_run_dirs() -> list[Path]:
    """Pinned state of runs whose eptrace is gone."""
    return [s.path for s in list_state() if s.owner != "watch" and not s.alive]

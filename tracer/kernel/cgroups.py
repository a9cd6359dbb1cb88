"""Cgroup v2 helpers. The mount point is read from /proc/mounts, never assumed."""
from __future__ import annotations

import errno
import os
import time
from pathlib import Path


class CgroupError(Exception):
    """A cgroup path is missing, not cgroup v2, or cannot be used."""


def cgroup2_mount() -> Path:
    """The cgroup2 mount point (unified or hybrid layout)."""
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) >= 3 and fields[2] == "cgroup2":
                return Path(fields[1])
    raise CgroupError("no cgroup2 filesystem is mounted (see /proc/mounts); "
                      "mount one with: mount -t cgroup2 none /sys/fs/cgroup/unified")


def resolve(path: str | os.PathLike) -> Path:
    """An absolute path of an existing cgroup v2 directory.

    A relative path is taken under the cgroup2 mount, so "sandboxes/ep1" works.
    """
    root = cgroup2_mount()
    p = Path(path)
    if not p.is_absolute():
        p = root / p
    p = Path(os.path.realpath(p))
    if not p.is_dir():
        raise CgroupError(f"cgroup {p} does not exist")
    if p != root and root not in p.parents:
        raise CgroupError(f"{p} is not a cgroup v2 directory: it is not under the cgroup2 mount {root}")
    if not (p / "cgroup.procs").exists():
        raise CgroupError(f"{p} is not a cgroup directory (no cgroup.procs)")
    return p


def cgroup_id(path: str | os.PathLike) -> int:
    """The id the kernel reports for a cgroup (bpf_get_current_cgroup_id): its inode number."""
    return os.stat(path).st_ino


def level(path: Path) -> int:
    """Depth below the cgroup2 root, as bpf_get_current_ancestor_cgroup_id counts it (root = 0)."""
    return len(path.relative_to(cgroup2_mount()).parts)


def relative(path: Path) -> str:
    """The path as cgroup tools show it: "/" for the root, "/a/b" below it."""
    return "/" + str(path.relative_to(cgroup2_mount())).lstrip(".")


def create(path: Path) -> Path:
    path.mkdir(parents=False, exist_ok=False)
    return path


def add_process(path: Path, pid: int) -> None:
    (path / "cgroup.procs").write_text(str(pid))


def pids(path: Path) -> list[int]:
    """Every process in the cgroup and its descendants."""
    found = []
    for procs in [path / "cgroup.procs", *path.rglob("*/cgroup.procs")]:
        try:
            found += [int(p) for p in procs.read_text().split()]
        except FileNotFoundError:
            pass
    return found


def kill_and_remove(path: Path, timeout: float = 5.0) -> None:
    """Kill everything in the cgroup tree (cgroup.kill), then remove it, children first."""
    if not path.exists():
        return
    try:
        (path / "cgroup.kill").write_text("1")
    except OSError:
        pass
    deadline = time.monotonic() + timeout
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True) + [path]:
        while True:
            try:
                sub.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise CgroupError(f"cannot remove cgroup {sub}: {e.strerror}") from e
                time.sleep(0.02)

"""The probe cache: the programs as bcc loaded them, so that a start with unchanged probes skips clang and bcc.

After a real compile, the compiling child (tracer/kernel/compile.py) records what the kernel needs to load
the same programs again: each program's instructions (a map reference is an ld_imm64 of a map fd: the fd
is recorded as the map's name), type, expected attach type, name and license; each map's definition as the
kernel has it; the BTF blob its maps were created with. A later start with the same key loads these
directly (load()), in about a tenth of a second instead of seconds.

The key covers what changes the bytecode or its meaning: the probe source and clang flags (the pin
directory aside: it only says where the maps are pinned), the cgroup programs' attach types, bcc's
version, the kernel's release and build, and FORMAT. One file per key, <key>.json, in a directory only
root may write (default /var/cache/eptrace/probes, env EPTRACE_CACHE_DIR): the file is bytecode root
loads into the kernel, so a file or directory someone else could have written is refused. Files are
written whole under a temporary name and renamed (tracer/safefiles.py): concurrent starters each see
a whole file.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import importlib.util
import json
import os
import stat
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .. import safefiles
from . import bpf

FORMAT = 1
DEFAULT_DIR = Path("/var/cache/eptrace/probes")
KEPT = 16                       # entries kept: probe variants (bench/probecost.py) and kernels side by side
MAX_BYTES = 64 << 20
WHAT = "probe cache"
LD_IMM64 = 0x18                 # BPF_LD | BPF_IMM | BPF_DW: two instruction slots
PSEUDO_MAP_FD = 1               # its src_reg when imm is a map fd


class CacheError(Exception):
    """No usable cache entry: the message says why, in one line."""


def directory() -> Path:
    return Path(os.environ.get("EPTRACE_CACHE_DIR") or DEFAULT_DIR)


def bcc_version() -> str:
    """bcc's version, read without importing bcc (which maps LLVM)."""
    spec = importlib.util.find_spec("bcc")
    if spec is None or spec.origin is None:
        return "none"
    try:
        return (Path(spec.origin).parent / "version.py").read_text()
    except OSError:
        return "unknown"


def probe_files(probes_dir: Path) -> list[str]:
    """Every file of the probes directory, named: the headers the source #includes (records.h) among them."""
    return [f"{p.relative_to(probes_dir)}\0{p.read_text(errors='replace')}"
            for p in sorted(probes_dir.rglob("*")) if p.is_file()]


def key(source: str, cflags: list[str], attach_types: dict[str, tuple[int, int]], probes_dir: Path) -> str:
    with open("/proc/version") as f:
        kernel = f.read()
    parts = [str(FORMAT), bcc_version(), kernel, json.dumps(attach_types, sort_keys=True), source, *cflags,
             *probe_files(probes_dir)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def path_of(cache_key: str) -> Path:
    return directory() / f"{cache_key}.json"


# -- reading ----------------------------------------------------------------------------------------------
def _problem(st: os.stat_result, path: Path) -> str | None:
    """Why a cache file must not be loaded, if it must not: root loads its bytecode into the kernel."""
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if st.st_uid not in (0, os.geteuid()):
        return f"{path} is owned by uid {st.st_uid}, not root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
    if st.st_size > MAX_BYTES:
        return f"{path} is too large ({st.st_size} bytes)"
    return None


def read(cache_key: str) -> dict | None:
    """The entry for cache_key; None when there is none. CacheError when one is there but unsafe or unreadable."""
    path = path_of(cache_key)
    if not path.exists():
        return None
    try:
        safefiles.check_directory(path.parent, WHAT)
    except safefiles.UnsafePathError as e:
        raise CacheError(str(e)) from None
    try:
        fd = safefiles.open_for_reading(path)
    except OSError as e:
        raise CacheError(f"cannot open {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        problem = _problem(os.fstat(f.fileno()), path)
        if problem:
            raise CacheError(problem)
        data = f.read()
    try:
        entry = json.loads(data)
        if entry.get("format") != FORMAT or entry.get("key") != cache_key:
            raise CacheError(f"{path} is another format or key")
        if not isinstance(entry["described"]["maps"], dict) or not entry["programs"] or not entry["maps"]:
            raise CacheError(f"{path} is incomplete")
        return entry
    except (ValueError, AttributeError, KeyError, TypeError) as e:
        raise CacheError(f"{path} is corrupt: {type(e).__name__} {e}") from None


# -- recording ----------------------------------------------------------------------------------------------
def map_references(insns: bytes, names_by_fd: dict[int, str]) -> list[list]:
    """[instruction index, map name] of each ld_imm64 of a map fd. CacheError for any other ld_imm64 (a map
    value, a BTF id): those would need relocations this cache does not record."""
    if len(insns) % 8:
        raise CacheError("instructions are not whole")
    refs, i = [], 0
    while i < len(insns) // 8:
        code, regs, _, imm = struct.unpack_from("<BBhi", insns, i * 8)
        if code == LD_IMM64:
            src = regs >> 4
            if src == PSEUDO_MAP_FD:
                if imm not in names_by_fd:
                    raise CacheError(f"instruction {i} refers to fd {imm}, which is none of the probes' maps")
                refs.append([i, names_by_fd[imm]])
            elif src != 0:
                raise CacheError(f"instruction {i} is an ld_imm64 with src_reg {src}: not cached")
            i += 2
        else:
            i += 1
    return refs


def describe_map(name: str, fd: int, pinned: bool) -> dict:
    info = bpf.map_info(fd)
    return {"name": name, "pinned": pinned, "type": info.type, "key_size": info.key_size,
            "value_size": info.value_size, "max_entries": info.max_entries, "flags": info.map_flags,
            "kernel_name": info.name.decode(), "btf": info.btf_id, "btf_key_type_id": info.btf_key_type_id,
            "btf_value_type_id": info.btf_value_type_id, "map_extra": info.map_extra}


def describe_program(function: str, fd: int, insns: bytes, expected_attach_type: int,
                     names_by_fd: dict[int, str]) -> dict:
    info = bpf.prog_info(fd)
    return {"function": function, "type": info.type, "kernel_name": info.name.decode(),
            "expected_attach_type": expected_attach_type, "tag": bytes(info.tag).hex(),
            "insns": base64.b64encode(insns).decode(), "maps": map_references(insns, names_by_fd)}


def entry(cache_key: str, maps: list[dict], programs: list[dict], license: bytes, kern_version: int,
          described: dict) -> dict:
    """The whole entry; the BTF blobs the maps were created with are read back from the kernel."""
    btf = {str(m["btf"]): base64.b64encode(bpf.btf_data(m["btf"])).decode() for m in maps if m["btf"]}
    return {"format": FORMAT, "key": cache_key, "bcc": bcc_version().strip(), "license": license.decode(),
            "kern_version": kern_version, "btf": btf, "maps": maps, "programs": programs, "described": described}


def write(e: dict) -> Path:
    """Write an entry atomically (safefiles), and drop the oldest beyond KEPT."""
    d = safefiles.private_dir(directory(), WHAT)
    path = d / f"{e['key']}.json"
    if os.path.lexists(path) and _problem(os.lstat(path), path):
        path.unlink()                   # refused when read: replaced (safefiles would not rename over it)
    safefiles.write_atomically(path, json.dumps(e).encode(), WHAT)
    entries = []
    for p in d.glob("*.json"):
        try:
            entries.append((p.stat().st_mtime, p))
        except FileNotFoundError:
            pass                        # dropped meanwhile by a tracer starting side by side
    for _, old in sorted(entries, reverse=True)[KEPT:]:
        old.unlink(missing_ok=True)
    return path


# -- loading ------------------------------------------------------------------------------------------------
@dataclass
class Loaded:
    programs: dict[str, int] = field(default_factory=dict)      # function name -> program fd
    fds: list[int] = field(default_factory=list)                # maps and BTF: held by the programs once loaded
    created_pins: list[Path] = field(default_factory=list)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

    def abandon(self) -> None:
        """Undo a load that failed half-way: nothing of it stays, not even a new map's pin."""
        for fd in self.programs.values():
            os.close(fd)
        self.programs.clear()
        self.close()
        for pin in self.created_pins:
            pin.unlink(missing_ok=True)


def _open_pinned(path: Path, m: dict) -> int:
    fd = bpf.obj_get(path)
    info = bpf.map_info(fd)
    if (info.type, info.key_size, info.value_size, info.max_entries) != \
            (m["type"], m["key_size"], m["value_size"], m["max_entries"]):
        os.close(fd)
        raise CacheError(f"the map pinned at {path} differs from the cached definition")
    return fd


def load(e: dict, maps_dir: Path) -> Loaded:
    """Load what e describes: open each pinned map's existing pin or create and pin it (as bcc's PINNED does),
    create the scratch maps, and load the programs with their map fds patched in. CacheError (and nothing
    left behind) on any failure, the kernel's refusal included."""
    loaded = Loaded()
    try:
        btf_fds = {}
        for btf_id, blob in e["btf"].items():
            btf_fds[int(btf_id)] = bpf.btf_load(base64.b64decode(blob, validate=True))
            loaded.fds.append(btf_fds[int(btf_id)])
        map_fds: dict[str, int] = {}
        for m in e["maps"]:
            pin = maps_dir / m["name"]
            if m["pinned"] and pin.exists():
                fd = _open_pinned(pin, m)
            else:
                fd = bpf.map_create(m["type"], m["kernel_name"].encode(), m["key_size"], m["value_size"],
                                    m["max_entries"], m["flags"], btf_fds.get(m["btf"], 0) if m["btf"] else 0,
                                    m["btf_key_type_id"], m["btf_value_type_id"], m["map_extra"])
                if m["pinned"]:
                    bpf.obj_pin(fd, pin)
                    loaded.created_pins.append(pin)
            loaded.fds.append(fd)
            map_fds[m["name"]] = fd
        def load_program(p: dict) -> int:
            insns = bytearray(base64.b64decode(p["insns"], validate=True))
            for index, name in p["maps"]:
                struct.pack_into("<i", insns, index * 8 + 4, map_fds[name])
            return bpf.prog_load(p["type"], p["kernel_name"].encode(), bytes(insns), e["license"].encode(),
                                 p["expected_attach_type"], e["kern_version"])

        # The verifier's work is most of a hit: side by side, one program per CPU (ctypes lets go of the GIL).
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            futures = [(p, pool.submit(load_program, p)) for p in e["programs"]]
        for p, future in futures:
            if future.exception() is None:
                loaded.programs[p["function"]] = future.result()     # kept in order, and closed if one failed
        for p, future in futures:
            if future.exception() is not None:
                raise future.exception()
            tag = bytes(bpf.prog_info(future.result()).tag).hex()
            if tag != p["tag"]:
                raise CacheError(f"program {p['function']} loaded with tag {tag}, not the cached {p['tag']}")
    except CacheError:
        loaded.abandon()
        raise
    except (OSError, KeyError, ValueError, TypeError, IndexError, struct.error, binascii.Error) as e:
        loaded.abandon()
        raise CacheError(f"{type(e).__name__}: {e}") from None
    return loaded


def clear() -> int:
    """Remove every cache entry; how many there were."""
    d = directory()
    removed = 0
    for path in d.glob("*.json") if d.is_dir() else ():
        path.unlink(missing_ok=True)
        removed += 1
    return removed

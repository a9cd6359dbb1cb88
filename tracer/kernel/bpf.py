"""The system libbpf through ctypes: what the tracer needs of loaded BPF objects, without bcc.

bcc (which maps libLLVM and libclang, about 100 MB) only compiles, in a short-lived child
(tracer/kernel/compile.py). That child describes each map's key and value as bcc decoded them from
clang's types (describe_type); this process rebuilds the same ctypes types (build_type), so each
struct stays defined once, in probes/.
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import select
import struct
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

PERCPU_MAP_TYPES = {5, 6, 10}           # enum bpf_map_type: percpu_hash, percpu_array, lru_percpu_hash
BPF_F_ALLOW_MULTI = 2


class BpfError(OSError):
    """A libbpf call failed: the message names the call and the kernel's reason."""


def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    sigs = {
        "bpf_obj_get": ([ctypes.c_char_p], ctypes.c_int),
        "bpf_obj_pin": ([ctypes.c_int, ctypes.c_char_p], ctypes.c_int),
        "bpf_link_create": ([ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p], ctypes.c_int),
        "bpf_link_update": ([ctypes.c_int, ctypes.c_int, ctypes.c_void_p], ctypes.c_int),
        "bpf_map_lookup_elem": ([ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int),
        "bpf_map_update_elem": ([ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64], ctypes.c_int),
        "bpf_map_delete_elem": ([ctypes.c_int, ctypes.c_void_p], ctypes.c_int),
        "bpf_map_get_next_key": ([ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int),
        "libbpf_num_possible_cpus": ([], ctypes.c_int),
        "bpf_prog_get_fd_by_id": ([ctypes.c_uint32], ctypes.c_int),
    }
    for name, (argtypes, restype) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


lib = _lib()


def _error(what: str, result: int = -1) -> BpfError:
    err = ctypes.get_errno() or abs(result)
    return BpfError(err, f"{what}: {os.strerror(err)}")


def obj_get(path: os.PathLike | str) -> int:
    """An fd of the map, program or link pinned at path."""
    fd = lib.bpf_obj_get(os.fsencode(path))
    if fd < 0:
        raise _error(f"cannot open {path}", fd)
    return fd


def obj_pin(fd: int, path: os.PathLike | str) -> None:
    if lib.bpf_obj_pin(fd, os.fsencode(path)) < 0:
        raise _error(f"cannot pin {path}")


def prog_fd_of_link(link_fd: int) -> int:
    """An fd of the program a link runs (from the prog_id in the link's fdinfo)."""
    with open(f"/proc/self/fdinfo/{link_fd}") as f:
        prog_id = next(int(line.split()[1]) for line in f if line.startswith("prog_id:"))
    fd = lib.bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        raise _error(f"cannot open program {prog_id}", fd)
    return fd


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    fd = lib.bpf_link_create(prog_fd, target_fd, attach_type, None)
    if fd < 0:
        raise _error("cannot attach", fd)
    return fd


def link_update(link_fd: int, prog_fd: int) -> bool:
    """Switch a link to another program atomically; False when the link is defunct."""
    return lib.bpf_link_update(link_fd, prog_fd, None) == 0


# -- types: bcc's ctypes, described and rebuilt -------------------------------------------------------
def describe_type(t: type) -> Any:
    """A JSON-able description of a ctypes type (structs, unions, arrays, bit fields, scalars)."""
    if issubclass(t, ctypes.Array):
        return {"array": describe_type(t._type_), "length": t._length_}
    if issubclass(t, (ctypes.Structure, ctypes.Union)):
        return {"union" if issubclass(t, ctypes.Union) else "struct": t.__name__,
                "fields": [[f[0], describe_type(f[1]), *f[2:]] for f in t._fields_],
                "pack": getattr(t, "_pack_", 0), "anonymous": list(getattr(t, "_anonymous_", []))}
    if not hasattr(ctypes, t.__name__):
        raise TypeError(f"no ctypes scalar named {t.__name__}")
    return t.__name__


def build_type(desc: Any) -> type:
    if isinstance(desc, str):
        return getattr(ctypes, desc)
    if "array" in desc:
        return build_type(desc["array"]) * desc["length"]
    base, name = (ctypes.Union, desc["union"]) if "union" in desc else (ctypes.Structure, desc["struct"])
    body: dict[str, Any] = {"_fields_": [(f[0], build_type(f[1]), *f[2:]) for f in desc["fields"]],
                            "_anonymous_": desc["anonymous"]}
    if desc["pack"]:
        body["_pack_"] = desc["pack"]
    return type(name, (base,), body)


# -- maps -----------------------------------------------------------------------------------------------
class Map:
    """A BPF map by fd, used like bcc's tables: map[key], map[key] = value, del map[key], keys(), items().
    Keys and values are instances of Key and Leaf; a per-CPU map's value reads as a list, one per CPU."""

    def __init__(self, name: str, fd: int, map_type: int, max_entries: int, key: type | None, leaf: type | None):
        self.name, self.fd, self.map_type, self.max_entries = name, fd, map_type, max_entries
        self.Key, self.Leaf = key, leaf
        self.percpu = map_type in PERCPU_MAP_TYPES

    def _key(self, key) -> Any:
        if ctypes.sizeof(key) != ctypes.sizeof(self.Key):
            raise TypeError(f"map {self.name}: a key of {ctypes.sizeof(key)} bytes, not {ctypes.sizeof(self.Key)}")
        return ctypes.byref(key)

    def _value_buffer(self):
        if not self.percpu:
            return self.Leaf()
        # The kernel copies each CPU's value rounded up to 8 bytes.
        size = (ctypes.sizeof(self.Leaf) + 7) // 8 * 8
        return (ctypes.c_ubyte * (size * lib.libbpf_num_possible_cpus()))()

    def _percpu_values(self, buffer) -> list:
        size = (ctypes.sizeof(self.Leaf) + 7) // 8 * 8
        values = [self.Leaf.from_buffer_copy(buffer, i * size) for i in range(len(buffer) // size)]
        return [v.value if hasattr(v, "value") else v for v in values]

    def __getitem__(self, key):
        value = self._value_buffer()
        if lib.bpf_map_lookup_elem(self.fd, self._key(key), ctypes.byref(value)) < 0:
            raise KeyError(key)
        return self._percpu_values(value) if self.percpu else value

    def __setitem__(self, key, value) -> None:
        if not isinstance(value, self.Leaf):
            value = self.Leaf(value.value if hasattr(value, "value") else value)
        if lib.bpf_map_update_elem(self.fd, self._key(key), ctypes.byref(value), 0) < 0:
            raise _error(f"cannot update map {self.name}")

    def __delitem__(self, key) -> None:
        if lib.bpf_map_delete_elem(self.fd, self._key(key)) < 0:
            raise KeyError(key)

    def __iter__(self) -> Iterator:
        return iter(self.keys())

    def keys(self) -> list:
        found, key, previous = [], self.Key(), None
        while lib.bpf_map_get_next_key(self.fd, previous, ctypes.byref(key)) == 0:
            found.append(key)
            previous, key = ctypes.byref(key), self.Key()
        return found

    def items(self) -> list:
        pairs = []
        for key in self.keys():
            try:
                pairs.append((key, self[key]))
            except KeyError:        # deleted meanwhile
                pass
        return pairs

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class RingBuffer:
    """A reader of a BPF ring buffer: handle(bytes) for each record, from poll() and consume().

    libbpf's reader maps the data pages twice in a row, so that a record that wraps around reads as one
    piece; RSS then counts the whole buffer twice (64 MB for the default 32 MB). This one maps them
    once and joins the two pieces of the rare record that wraps."""

    BUSY, DISCARD, HEADER = 1 << 31, 1 << 30, 8         # struct bpf_ringbuf_hdr, in the kernel's uapi

    def __init__(self, map_fd: int, data_size: int, handle: Callable[[bytes], None]):
        page = mmap.PAGESIZE
        self._handle, self._size = handle, data_size
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._producer = mmap.mmap(map_fd, page + data_size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._data = memoryview(self._producer)[page:]
        self._epoll = select.epoll()
        self._epoll.register(map_fd, select.EPOLLIN)    # woken only when the probes ask (BPF_RB_FORCE_WAKEUP
                                                        # or a full buffer): the poll timeout paces reading

    def poll(self, timeout_ms: int) -> None:
        self._epoll.poll(timeout_ms / 1000)
        self.consume()

    def consume(self) -> None:
        # x86-64 keeps loads and stores in order: plain reads and writes are the acquire and release
        # the kernel's ring protocol asks for.
        size, data = self._size, self._data
        consumer = struct.unpack_from("<Q", self._consumer)[0]
        while True:
            producer = struct.unpack_from("<Q", self._producer)[0]
            if consumer >= producer:
                return
            while consumer < producer:
                at = consumer & (size - 1)
                header = struct.unpack_from("<I", data, at)[0]
                if header & self.BUSY:
                    return                      # still being written: the next consume() reads it
                length = header & ~self.DISCARD
                start = (at + self.HEADER) & (size - 1)
                end = start + length
                # a record that runs past the end of the buffer goes on at its start
                record = bytes(data[start:end]) if end <= size else bytes(data[start:]) + bytes(data[:end - size])
                consumer += (length + self.HEADER + 7) & ~7
                struct.pack_into("<Q", self._consumer, 0, consumer)
                if not header & self.DISCARD:
                    try:
                        self._handle(record)
                    except Exception:       # one record's bug must not stop the reading
                        log.exception("handling a ring-buffer record failed")

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
            self._data.release()
            self._producer.close()
            self._consumer.close()
            self._epoll = None

"""The system libbpf through ctypes: what the tracer needs of loaded BPF objects, without bcc.

bcc (which maps libLLVM and libclang, about 100 MB) only compiles, in a short-lived child
(tracer/kernel/compile.py). That child describes each map's key and value as bcc decoded them from
clang's types (describe_type); this process rebuilds the same ctypes types (build_type), so each
struct stays defined once, in probes/.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import select
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

PERCPU_MAP_TYPES = {5, 6, 10}           # enum bpf_map_type: percpu_hash, percpu_array, lru_percpu_hash
BATCH_MAP_TYPES = {1, 2, 5, 6, 9, 10}   # hash, array, percpu_hash, percpu_array, lru_hash, lru_percpu_hash
BATCH = 1024                            # entries read per BPF_MAP_LOOKUP_BATCH
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
        "bpf_map_lookup_batch": ([ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p], ctypes.c_int),
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


# -- loading without bcc: the raw bpf(2) commands the probe cache needs ------------------------------------
SYS_BPF = 321                                          # x86_64
BPF_MAP_CREATE, BPF_PROG_LOAD, BPF_OBJ_GET_INFO_BY_FD, BPF_BTF_LOAD, BPF_BTF_GET_FD_BY_ID = 0, 5, 15, 18, 19
OBJ_NAME_LEN = 16
_libc = ctypes.CDLL(None, use_errno=True)


class MapInfo(ctypes.Structure):                       # struct bpf_map_info, in the kernel's uapi
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * OBJ_NAME_LEN), ("ifindex", ctypes.c_uint32),
                ("btf_vmlinux_value_type_id", ctypes.c_uint32), ("netns_dev", ctypes.c_uint64),
                ("netns_ino", ctypes.c_uint64), ("btf_id", ctypes.c_uint32), ("btf_key_type_id", ctypes.c_uint32),
                ("btf_value_type_id", ctypes.c_uint32), ("btf_vmlinux_id", ctypes.c_uint32),
                ("map_extra", ctypes.c_uint64)]


class ProgInfo(ctypes.Structure):                      # the head of struct bpf_prog_info
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_ubyte * 8),
                ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
                ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
                ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32), ("nr_map_ids", ctypes.c_uint32),
                ("map_ids", ctypes.c_uint64), ("name", ctypes.c_char * OBJ_NAME_LEN)]


class BtfInfo(ctypes.Structure):                       # struct bpf_btf_info
    _fields_ = [("btf", ctypes.c_uint64), ("btf_size", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("name", ctypes.c_uint64), ("name_len", ctypes.c_uint32), ("kernel_btf", ctypes.c_uint32)]


def _sys_bpf(cmd: int, attr: ctypes.Array, what: str) -> int:
    result = _libc.syscall(SYS_BPF, cmd, attr, ctypes.sizeof(attr))
    if result < 0:
        raise _error(what, result)
    return result


def _attr(size: int, *fields: tuple[int, type, Any]) -> ctypes.Array:
    """A union bpf_attr of size bytes, zero but for fields: (offset, ctypes type, value)."""
    attr = (ctypes.c_ubyte * size)()
    for offset, kind, value in fields:
        kind.from_buffer(attr, offset).value = value
    return attr


def _info(fd: int, info: ctypes.Structure, what: str) -> None:
    attr = _attr(16, (0, ctypes.c_uint32, fd), (4, ctypes.c_uint32, ctypes.sizeof(info)),
                 (8, ctypes.c_uint64, ctypes.addressof(info)))
    _sys_bpf(BPF_OBJ_GET_INFO_BY_FD, attr, what)


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    _info(fd, info, "cannot read a map's definition")
    return info


def prog_info(fd: int) -> ProgInfo:
    info = ProgInfo()
    _info(fd, info, "cannot read a program's definition")
    return info


def btf_data(btf_id: int) -> bytes:
    """The BTF blob loaded as btf_id, as its loader handed it to the kernel."""
    fd = _sys_bpf(BPF_BTF_GET_FD_BY_ID, _attr(12, (0, ctypes.c_uint32, btf_id)), f"cannot open BTF {btf_id}")
    try:
        info = BtfInfo()
        _info(fd, info, "cannot read BTF")
        buffer = (ctypes.c_ubyte * info.btf_size)()
        info = BtfInfo(btf=ctypes.addressof(buffer), btf_size=len(buffer))
        _info(fd, info, "cannot read BTF")
        return bytes(buffer)
    finally:
        os.close(fd)


def _log_tail(log_buf: ctypes.Array) -> str:
    lines = log_buf.value.decode(errors="replace").strip().splitlines()
    return " | ".join(lines[-3:])


def btf_load(data: bytes) -> int:
    blob = ctypes.create_string_buffer(data, len(data))
    log_buf = ctypes.create_string_buffer(1 << 16)
    attr = _attr(28, (0, ctypes.c_uint64, ctypes.addressof(blob)), (8, ctypes.c_uint64, ctypes.addressof(log_buf)),
                 (16, ctypes.c_uint32, len(data)), (20, ctypes.c_uint32, len(log_buf)), (24, ctypes.c_uint32, 1))
    result = _libc.syscall(SYS_BPF, BPF_BTF_LOAD, attr, ctypes.sizeof(attr))
    if result < 0:
        raise _error(f"cannot load BTF ({_log_tail(log_buf)})", result)
    return result


def map_create(map_type: int, name: bytes, key_size: int, value_size: int, max_entries: int, flags: int,
               btf_fd: int = 0, btf_key_type_id: int = 0, btf_value_type_id: int = 0, map_extra: int = 0) -> int:
    attr = _attr(72, (0, ctypes.c_uint32, map_type), (4, ctypes.c_uint32, key_size), (8, ctypes.c_uint32, value_size),
                 (12, ctypes.c_uint32, max_entries), (16, ctypes.c_uint32, flags),
                 (48, ctypes.c_uint32, btf_fd), (52, ctypes.c_uint32, btf_key_type_id),
                 (56, ctypes.c_uint32, btf_value_type_id), (64, ctypes.c_uint64, map_extra))
    ctypes.memmove(ctypes.addressof(attr) + 28, name[:OBJ_NAME_LEN - 1], len(name[:OBJ_NAME_LEN - 1]))
    return _sys_bpf(BPF_MAP_CREATE, attr, f"cannot create map {name.decode(errors='replace')}")


def prog_load(prog_type: int, name: bytes, insns: bytes, license: bytes, expected_attach_type: int = 0,
              kern_version: int = 0) -> int:
    """Load a program; a refusal names the last lines of the verifier's log."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license)
    attr = _attr(72, (0, ctypes.c_uint32, prog_type), (4, ctypes.c_uint32, len(insns) // 8),
                 (8, ctypes.c_uint64, ctypes.addressof(code)), (16, ctypes.c_uint64, ctypes.addressof(lic)),
                 (40, ctypes.c_uint32, kern_version), (68, ctypes.c_uint32, expected_attach_type))
    ctypes.memmove(ctypes.addressof(attr) + 48, name[:OBJ_NAME_LEN - 1], len(name[:OBJ_NAME_LEN - 1]))
    result = _libc.syscall(SYS_BPF, BPF_PROG_LOAD, attr, ctypes.sizeof(attr))
    if result >= 0:
        return result
    err = ctypes.get_errno()
    log_buf = ctypes.create_string_buffer(1 << 20)    # again with the verifier's log, to say why
    ctypes.c_uint32.from_buffer(attr, 24).value = 1
    ctypes.c_uint32.from_buffer(attr, 28).value = len(log_buf)
    ctypes.c_uint64.from_buffer(attr, 32).value = ctypes.addressof(log_buf)
    result = _libc.syscall(SYS_BPF, BPF_PROG_LOAD, attr, ctypes.sizeof(attr))
    if result >= 0:
        return result
    raise BpfError(err, f"cannot load program {name.decode(errors='replace')}: {os.strerror(err)} "
                        f"({_log_tail(log_buf)})")


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
        """Every (key, value): a thousand per system call where the kernel can, else two per entry (the
        daemon reads its episodes' counters this way at every health request and metric document)."""
        if self.map_type in BATCH_MAP_TYPES:
            try:
                return self._items_batched()
            except BpfError:
                pass                # ENOSPC: a hash bucket larger than the batch; the key by key walk below
        pairs = []
        for key in self.keys():
            try:
                pairs.append((key, self[key]))
            except KeyError:        # deleted meanwhile
                pass
        return pairs

    def _items_batched(self) -> list:
        count = min(self.max_entries, BATCH)
        key_size, value_size = ctypes.sizeof(self.Key), ctypes.sizeof(self._value_buffer())
        keys = (ctypes.c_ubyte * (key_size * count))()
        values = (ctypes.c_ubyte * (value_size * count))()
        position = (ctypes.c_ubyte * max(key_size, 8))()     # the kernel's opaque batch token (hash: a bucket)
        found, pairs, first = ctypes.c_uint32(), [], True
        while True:
            found.value = count
            result = lib.bpf_map_lookup_batch(self.fd, None if first else position, position, keys, values,
                                              ctypes.byref(found), None)
            err = ctypes.get_errno() if result < 0 else 0
            for i in range(found.value):
                value = (self.Leaf if not self.percpu else ctypes.c_ubyte * value_size).from_buffer_copy(
                    values, i * value_size)
                pairs.append((self.Key.from_buffer_copy(keys, i * key_size),
                              self._percpu_values(value) if self.percpu else value))
            if result < 0:
                if err == errno.ENOENT:         # the end of the map
                    return pairs
                raise _error(f"cannot read map {self.name}", result)
            first = False

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
        self.unread_max = 0                             # the most bytes found unread at once: the reader's worst lag
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._producer = mmap.mmap(map_fd, page + data_size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._data = memoryview(self._producer)[page:]
        # The positions are read and written as one aligned 8-byte load or store, as the kernel does: the
        # probes read consumer_pos at every reservation, and struct.pack_into("<Q") writes zeroes first, then
        # byte by byte, so that a reservation in between saw the ring full (the losses of issue 12).
        self._consumer_pos = memoryview(self._consumer)[:8].cast("Q")
        self._producer_pos = memoryview(self._producer)[:8].cast("Q")
        self._headers = self._data.cast("I")            # a record's header: 8-byte aligned, its length first
        # Edge-triggered: only the few records submitted with a forced wakeup (probes/common.h SUBMIT_NOW)
        # end a wait early; the rest (BPF_RB_NO_WAKEUP) wait for the timeout, which paces reading.
        self._epoll = select.epoll()
        self._epoll.register(map_fd, select.EPOLLIN | select.EPOLLET)

    def fileno(self) -> int:
        """An fd that polls readable when a record asked to be read at once (for a caller's own wait)."""
        return self._epoll.fileno()

    def poll(self, timeout_ms: int) -> None:
        self._epoll.poll(timeout_ms / 1000)
        self.consume()

    def consume(self) -> None:
        # x86-64 keeps loads and stores in order: plain reads and writes are the acquire and release
        # the kernel's ring protocol asks for.
        size, data = self._size, self._data
        consumer = self._consumer_pos[0]
        while True:
            producer = self._producer_pos[0]
            if consumer >= producer:
                return
            if producer - consumer > self.unread_max:
                self.unread_max = producer - consumer
            while consumer < producer:
                at = consumer & (size - 1)
                header = self._headers[at >> 2]
                if header & self.BUSY:
                    return                      # still being written: the next consume() reads it
                length = header & ~self.DISCARD
                start = (at + self.HEADER) & (size - 1)
                end = start + length
                # a record that runs past the end of the buffer goes on at its start
                record = bytes(data[start:end]) if end <= size else bytes(data[start:]) + bytes(data[:end - size])
                consumer += (length + self.HEADER + 7) & ~7
                self._consumer_pos[0] = consumer
                if not header & self.DISCARD:
                    try:
                        self._handle(record)
                    except Exception:       # one record's bug must not stop the reading
                        log.exception("handling a ring-buffer record failed")

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
            for view in (self._headers, self._consumer_pos, self._producer_pos, self._data):
                view.release()
            self._producer.close()
            self._consumer.close()
            self._epoll = None

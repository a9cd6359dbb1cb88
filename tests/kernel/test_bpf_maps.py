"""tracer.kernel.bpf.Map against real kernel maps: items() read in batches gives what the key-by-key walk
gives, for maps larger than one batch, per-CPU ones included."""
from __future__ import annotations

import ctypes

import pytest

from tracer.kernel import bpf

ENTRIES = 2 * bpf.BATCH + 37          # three batches, the last one partial


class Account(ctypes.Structure):      # shaped like the probes' episode_account: counters in an array
    _fields_ = [("seen", ctypes.c_uint64), ("lost", ctypes.c_uint64 * 12)]


STRIDE = (ctypes.sizeof(Account) + 7) // 8 * 8       # a per-CPU value's room in the kernel's copy


def walked(table: bpf.Map) -> dict:
    """The key-by-key walk (get_next_key, then a lookup each): what items() gave before batches."""
    return {key.value: table[key] for key in table.keys()}


def as_bytes(value) -> bytes | list:
    return [bytes(v) if not isinstance(v, int) else v for v in value] if isinstance(value, list) else bytes(value)


@pytest.mark.parametrize("map_type, name, Key", [(1, "hash", ctypes.c_uint64), (5, "percpu_hash", ctypes.c_uint64),
                                                (9, "lru_hash", ctypes.c_uint64), (2, "array", ctypes.c_uint32)])
def test_batched_items_are_the_walk_of_the_map(map_type, name, Key):
    fd = bpf.map_create(map_type, f"test_{name}".encode(), ctypes.sizeof(Key), ctypes.sizeof(Account), ENTRIES + 100, 0)
    table = bpf.Map(name, fd, map_type, ENTRIES + 100, Key, Account)
    try:
        for key in range(ENTRIES):
            value = Account(seen=key * 3)
            value.lost[key % 12] = key + 1
            if table.percpu:                            # one value per CPU, each its own
                values = table._value_buffer()
                for cpu in range(len(values) // STRIDE):
                    value.seen = key * 3 + cpu
                    ctypes.memmove(ctypes.addressof(values) + cpu * STRIDE, ctypes.addressof(value), ctypes.sizeof(value))
                assert bpf.lib.bpf_map_update_elem(fd, ctypes.byref(Key(key)), values, 0) == 0
            else:
                table[Key(key)] = value
        batched = {key.value: value for key, value in table._items_batched()}
        expected = walked(table)
        assert len(expected) == ENTRIES + (100 if name == "array" else 0)      # an array has every index
        assert batched.keys() == expected.keys()
        assert {k: as_bytes(v) for k, v in batched.items()} == {k: as_bytes(v) for k, v in expected.items()}
        if table.percpu:
            assert [v.seen for v in batched[5]] == [15 + cpu for cpu in range(len(batched[5]))], batched[5]
            assert len(batched[5]) == bpf.lib.libbpf_num_possible_cpus()
        else:
            assert batched[5].seen == 15 and batched[5].lost[5] == 6
        assert {k.value: as_bytes(v) for k, v in table.items()} == {k: as_bytes(v) for k, v in expected.items()}
    finally:
        table.close()


def test_an_empty_map_has_no_items():
    fd = bpf.map_create(1, b"test_empty", 8, 8, 64, 0)
    table = bpf.Map("empty", fd, 1, 64, ctypes.c_uint64, ctypes.c_uint64)
    try:
        assert table._items_batched() == [] and table.items() == []
    finally:
        table.close()

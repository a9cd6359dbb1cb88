"""The probe cache records a program's map references by name (tracer/kernel/probecache.py): an ld_imm64 of a
map fd becomes [instruction index, map name]; any other ld_imm64 pseudo source means no cache entry."""
from __future__ import annotations

import struct

import pytest

from tracer.kernel.probecache import CacheError, map_references


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, src << 4 | dst, off, imm)


def ld_imm64(src: int, imm: int) -> bytes:
    return insn(0x18, dst=1, src=src, imm=imm) + insn(0)


EXIT = insn(0x95)


def test_map_fds_are_recorded_by_name_and_the_second_slot_is_skipped():
    program = insn(0xb7) + ld_imm64(1, 7) + ld_imm64(0, 7) + ld_imm64(1, 9) + EXIT
    assert map_references(program, {7: "events", 9: "sockets"}) == [[1, "events"], [5, "sockets"]]


def test_a_map_value_or_btf_id_load_is_not_cached():
    for src in (2, 3, 4, 5, 6):                     # MAP_VALUE, BTF_ID, FUNC, MAP_IDX, MAP_IDX_VALUE
        with pytest.raises(CacheError, match=f"src_reg {src}"):
            map_references(ld_imm64(src, 7) + EXIT, {7: "events"})


def test_an_fd_of_no_probe_map_or_a_torn_program_is_refused():
    with pytest.raises(CacheError, match="fd 8"):
        map_references(ld_imm64(1, 8) + EXIT, {7: "events"})
    with pytest.raises(CacheError, match="not whole"):
        map_references(EXIT[:5], {})

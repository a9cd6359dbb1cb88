"""probes/records.h and tracer/decoding.py agree: for every record type the decoder knows (decoding.LAYOUTS,
so that a record type added later is covered too), the struct's size and the offset of every field the
decoder reads are the ones clang gives, as bcc's generated ctypes types show them."""
from __future__ import annotations

import ctypes
import json

import pytest

from tracer import decoding
from tracer.kernel import bpf
from tracer.kernel.loader import PROBES_DIR

STRUCTS = sorted({layout.struct for layout in decoding.LAYOUTS.values()})


@pytest.fixture(scope="module")
def leaf_types() -> dict[str, type]:
    """struct name -> the ctypes type bcc generates for it, as the value of a one-entry array map."""
    from bcc import BPF
    source = '#include "records.h"\n' + "".join(
        f"BPF_ARRAY(layout_{name}, struct {name}, 1);\n" for name in STRUCTS)
    bpf = BPF(text=source.encode(), cflags=[f"-I{PROBES_DIR}"])
    try:
        yield {name: bpf[f"layout_{name}".encode()].Leaf for name in STRUCTS}
    finally:
        bpf.cleanup()


def offset_of(ctype: type, path: str) -> int:
    """The byte offset of a dotted field path ("h.owner.tgid") in a ctypes structure."""
    offset = 0
    for name in path.split("."):
        fields = dict(ctype._fields_)
        assert name in fields, f"{ctype.__name__} has no field {name!r} (it has {', '.join(fields)})"
        offset += getattr(ctype, name).offset
        ctype = fields[name]
    return offset


def test_every_record_type_has_a_layout():
    assert set(decoding.LAYOUTS) == set(decoding.RecordType), "a record type the decoder cannot size"


@pytest.mark.parametrize("record_type", list(decoding.LAYOUTS), ids=lambda t: t.name)
def test_layout_matches_the_compiled_struct(leaf_types, record_type):
    layout = decoding.LAYOUTS[record_type]
    leaf = leaf_types[layout.struct]
    assert ctypes.sizeof(leaf) == layout.size, f"sizeof(struct {layout.struct})"
    for path, offset in layout.offsets.items():
        assert offset_of(leaf, path) == offset, f"offsetof(struct {layout.struct}, {path})"
    unchecked = set(field_paths(leaf)) - set(layout.offsets)
    assert not unchecked, f"fields of struct {layout.struct} the decoder does not place: {sorted(unchecked)}"


def test_a_wrong_offset_is_seen(leaf_types):
    """The comparison above can fail: one byte off in a copy of a layout is caught."""
    layout = decoding.NET_LAYOUT
    assert offset_of(leaf_types[layout.struct], "ep.dport") != layout.offsets["ep.dport"] + 1


@pytest.mark.parametrize("struct", STRUCTS)
def test_the_tracer_rebuilds_bccs_type(leaf_types, struct):
    """The tracer never imports bcc: it rebuilds bcc's ctypes types from the compiling child's JSON
    description of them (tracer/kernel/bpf.py). Same size, same fields at the same offsets."""
    original = leaf_types[struct]
    rebuilt = bpf.build_type(json.loads(json.dumps(bpf.describe_type(original))))
    assert layout_of(rebuilt) == layout_of(original)
    assert layout_of(rebuilt)[0][2] > 0


def layout_of(ctype: type, prefix: str = "", base: int = 0) -> list[tuple]:
    """(path, offset, size, scalar type) of the type and every field in it, nested structs and arrays unrolled."""
    entries = [(prefix or ctype.__name__, base, ctypes.sizeof(ctype), getattr(ctype, "_type_", "") if
                not issubclass(ctype, ctypes.Array) else "")]
    if issubclass(ctype, ctypes.Array):
        step = ctypes.sizeof(ctype._type_)
        for i in range(ctype._length_):
            entries += layout_of(ctype._type_, f"{prefix}[{i}]", base + i * step)
    elif issubclass(ctype, (ctypes.Structure, ctypes.Union)):
        for field in ctype._fields_:
            entries += layout_of(field[1], f"{prefix}.{field[0]}", base + getattr(ctype, field[0]).offset)
    return entries


def field_paths(ctype: type, prefix: str = "") -> list[str]:
    """Every field of a struct, nested structs flattened ("h.owner.tgid"); arrays and padding are one name."""
    paths = []
    for name, ftype in ctype._fields_:
        if name.startswith("pad") or name.startswith("__pad"):
            continue
        if isinstance(ftype, type) and issubclass(ftype, ctypes.Structure):
            paths += field_paths(ftype, f"{prefix}{name}.")
        else:
            paths.append(prefix + name)
    return paths

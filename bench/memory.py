"""Where a running tracer's RSS goes, from /proc/PID/smaps: the compiler (none since bcc compiles in a child
that exits: tracer/kernel/compile.py), the ring buffer, the rest."""
from __future__ import annotations

import re
from pathlib import Path

MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")
COMPILER = ("libLLVM", "libclang")      # libbcc links both
RING_BUFFER = "anon_inode:bpf-map"      # mmapped BPF maps: the ring buffer, its data pages mapped twice


def rss_by_part(pid: int) -> dict[str, int] | None:
    """Bytes of RSS: "compiler", "ring buffer", "private" (anonymous, dirty: the tracer's own) and "total"."""
    parts = {"compiler": 0, "ring buffer": 0, "private": 0, "total": 0}
    part = None
    try:
        lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if MAPPING.match(line):
            fields = line.split()
            name = fields[5] if len(fields) > 5 else ""
            part = ("compiler" if any(c in name for c in COMPILER) else
                    "ring buffer" if name.startswith(RING_BUFFER) else None)
        elif line.startswith("Rss:"):
            kb = int(line.split()[1])
            parts["total"] += kb * 1024
            if part:
                parts[part] += kb * 1024
        elif line.startswith("Private_Dirty:"):
            parts["private"] += int(line.split()[1]) * 1024
    return parts

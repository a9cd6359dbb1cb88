"""Kills a run's episode when its tracer dies without a clean end.

    python -m tracer.watchdog CGROUP PIN_DIR     (stdin: a pipe whose only writer is the tracer)

The tracer writes "done" before it ends the episode itself. End of file without
it means the tracer died (kill -9, crash, OOM): the kernel closes the pipe at
once, and this process kills the cgroup (cgroup.kill), removes it, counts the
records the tracer had not read yet (they cannot be delivered: the episode's
cgroup is gone), and unpins the run's probes. It runs outside the episode cgroup, in its own session; it
imports nothing heavy, so it starts in tens of milliseconds.
"""
from __future__ import annotations

import os
import sys
import time

from .kernel import cgroups, pins

DONE = b"done"


def main(argv: list[str]) -> int:
    cgroup, pin_dir = argv
    received = b""
    while chunk := os.read(0, 64):
        received += chunk
    if received.endswith(DONE):
        return 0
    started = time.monotonic()
    try:
        with open(os.path.join(cgroup, "cgroup.kill"), "w") as f:
            f.write("1")
    except OSError as e:
        print(f"eptrace: error: the tracer of {cgroup} died and its processes cannot be killed: {e.strerror}",
              file=sys.stderr)
        return 1
    print(f"eptrace: error: the tracer of {cgroup} died: killed the episode "
          f"(cgroup.kill {(time.monotonic() - started) * 1000:.0f} ms after the tracer's pipe closed)",
          file=sys.stderr)
    try:
        cgroups.kill_and_remove(cgroups.Path(cgroup))
    except cgroups.CgroupError as e:
        print(f"eptrace: warning: {e}", file=sys.stderr)
    records, nbytes = pins.undelivered(cgroups.Path(pin_dir))
    if records:
        print(f"eptrace: error: the tracer of {cgroup} died with {records} record(s) ({nbytes} bytes) it had not "
              "read yet: they are lost with its pins", file=sys.stderr)
    pins.remove(cgroups.Path(pin_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

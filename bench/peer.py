"""The peer side by side: bcc's tcplife on the same connect storm, in the same `make bench` run.

tcplife traces every TCP socket of the host (a tracepoint, no cgroup filter), so
its phases alternate in time rather than by cgroup: the storm (storm.py --gated --untraced)
stops before each phase and this module starts tcplife before a "peer" phase and
stops it before an "alone" one. Its start (compiling its probe, seconds) is
never timed: a phase begins only once its probe is attached and its perf buffers
are open. Pairs go in ABBA order, so one start serves two adjacent peer phases.
tcplife prints a line per closed socket to a pipe that this process drains, as
a terminal or a log collector would.

The storm runs in an eptrace episode, its peer and alone phases in a cgroup
eptrace does not trace, and beside each alone phase one back in the episode:
eptrace's cost and tcplife's are then each measured against the same alone
phases, seconds apart, and their ratio does not swing with the machine's state
between two separate storms (which on these VMs moves either cost by a third).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

TCPLIFE = "tcplife-bpfcc"
SECONDS = 16.0          # 16 pairs of 0.5 s phases, 9 starts of tcplife
READY_TIMEOUT = 120.0


def available() -> bool:
    return shutil.which(TCPLIFE) is not None


def perf_event_fds(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) == "anon_inode:[perf_event]":
                count += 1
        except OSError:
            pass
    return count


class Tcplife:
    """One tcplife process: started and waited for until it traces, stopped with SIGINT as a user would."""

    def __init__(self) -> None:
        self.lines = 0
        self.lost = 0           # samples its perf buffers dropped, as bcc reports them
        self.stderr_tail: list[str] = []
        self.proc = subprocess.Popen([shutil.which(TCPLIFE)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._readers = [threading.Thread(target=self._count, daemon=True),
                         threading.Thread(target=self._errors, daemon=True)]
        for t in self._readers:
            t.start()
        # attached: its tracepoint's perf event, then one perf buffer per CPU for IPv4 and for IPv6
        wanted = 1 + 2 * (os.cpu_count() or 1)
        deadline = time.monotonic() + READY_TIMEOUT
        while perf_event_fds(self.proc.pid) < wanted:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{TCPLIFE} did not start: {' '.join(self.stderr_tail)[-300:]}")
            time.sleep(0.05)

    def _count(self) -> None:
        for _ in self.proc.stdout:
            self.lines += 1

    def _errors(self) -> None:
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").strip()
            if line.startswith("Possibly lost") and line.split()[2].isdigit():
                self.lost += int(line.split()[2])
            self.stderr_tail = (self.stderr_tail + [line])[-5:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for t in self._readers:
            t.join(timeout=5)


def storm(storm_py: Path, eptrace_run: list[str], untraced: Path) -> tuple[list[dict], int, int]:
    """(the gated storm's phases, lines tcplife printed, samples it lost). The storm runs under
    `eptrace_run` (an eptrace run command line up to its "--"), and its "peer" and "alone" phases in
    `untraced`, so that its "traced" phases measure eptrace beside the same "alone" ones."""
    run = subprocess.Popen([*eptrace_run, sys.executable, str(storm_py), str(SECONDS), "--gated",
                            "--untraced", str(untraced)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    peer: Tcplife | None = None
    lines, lost = 0, 0
    try:
        for line in run.stdout:
            message = json.loads(line)
            if "phases" in message:
                phases = message["phases"]
                break
            if message["next"] == "peer" and peer is None:
                peer = Tcplife()
            elif message["next"] == "alone" and peer is not None:
                peer.stop()
                lines, lost = lines + peer.lines, lost + peer.lost
                peer = None
            run.stdin.write("go\n")
            run.stdin.flush()
        else:
            raise RuntimeError(f"the gated storm ended without its phases ({run.wait()})")
    finally:
        if peer is not None:
            peer.stop()
            lines, lost = lines + peer.lines, lost + peer.lost
        if run.poll() is None:
            run.kill()
        run.wait()
    return phases, lines, lost

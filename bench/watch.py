"""Steady RSS of `eptrace watch`, the tracer that runs for hours: started, one episode registered, a
loopback storm traced in it, then left idle; RSS sampled from /proc/PID/smaps (memory.py) at the end.
Also says whether the tracer maps the compiler (bcc compiles in a child that exits: it should not)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tracer.kernel import cgroups, pins

from .memory import COMPILER, rss_by_part

CONNECTIONS = 2000
IDLE_SECONDS = 5.0
READY_TIMEOUT = 120.0
EPTRACE = [sys.executable, "-m", "tracer"]
TARGET_MB = 80


def storm(cgroup: Path) -> None:
    child = os.fork()
    if child == 0:
        try:
            (cgroup / "cgroup.procs").write_text("0")
            server = socket.create_server(("127.0.0.1", 0))
            for _ in range(CONNECTIONS):
                with socket.create_connection(server.getsockname()):
                    server.accept()[0].close()
        finally:
            os._exit(0)
    os.waitpid(child, 0)


def metrics(events: Path) -> list[dict]:
    try:
        lines = events.read_text().splitlines()
    except OSError:
        return []
    docs = []
    for line in lines:
        try:
            doc = json.loads(line)
        except ValueError:
            continue        # still being written
        if doc.get("event", {}).get("kind") == "metric":
            docs.append(doc)
    return docs


def wait_for(check, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    return None


def main() -> None:
    parent = cgroups.cgroup2_mount() / "eptrace-bench-watch"
    parent.mkdir(exist_ok=True)
    cgroup = cgroups.create(parent / "episode")
    pin_root = pins.root().with_name(pins.root().name + "-bench-watch")
    env = dict(os.environ, EPTRACE_PIN_DIR=str(pin_root))
    with tempfile.TemporaryDirectory() as tmp:
        events, state = Path(tmp) / "events.ndjson", Path(tmp) / "state"
        env["EPTRACE_STATE_DIR"] = str(state)
        start = time.monotonic()
        proc = subprocess.Popen([*EPTRACE, "watch", "--output", f"file:{events}", "--stats-interval", "0.5"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            subprocess.run([*EPTRACE, "episode", "add", "--id", "bench-watch", "--cgroup", str(cgroup)], env=env,
                           check=True, capture_output=True)
            ready = wait_for(lambda: [m for m in metrics(events)
                                      if m.get("eptrace", {}).get("stats", {}).get("episodes") == 1], READY_TIMEOUT)
            if not ready or proc.poll() is not None:
                said = proc.stderr.read()[-300:] if proc.poll() is not None else "(still starting)"
                print(f"  eptrace watch: not ready in {READY_TIMEOUT:.0f} s: {said}")
                return
            ready_s = time.monotonic() - start
            storm(cgroup)
            time.sleep(IDLE_SECONDS)
            rss = rss_by_part(proc.pid) or {}
            maps = Path(f"/proc/{proc.pid}/maps").read_text()
            stats = metrics(events)[-1].get("eptrace", {}).get("stats", {})
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            cgroups.kill_and_remove(parent)
            pins.remove(pin_root)
    mb = {k: v / 2**20 for k, v in rss.items()}
    compiler = "yes" if any(c in maps for c in (*COMPILER, "libbcc")) else "no"
    print(f"  eptrace watch, steady: one episode, {CONNECTIONS:,} loopback connections traced, then "
          f"{IDLE_SECONDS:.0f} s idle ({stats.get('records_received', 0):,} records read, ready {ready_s:.1f} s "
          f"after start)")
    print(f"    RSS {mb.get('total', 0):10.1f} MB    target <= {TARGET_MB}     "
          f"{'PASS' if mb.get('total', 0) <= TARGET_MB else 'MISS'}   compiler mapped: {compiler} "
          f"({mb.get('compiler', 0):.1f} MB); the mmapped ring buffer {mb.get('ring buffer', 0):.1f} MB; "
          f"private dirty {mb.get('private', 0):.1f} MB")


if __name__ == "__main__":
    main()

"""make bench: eptrace's cost to a sandbox, as ratios measured in one run.

Not a test: it prints figures against the targets and never fails on them,
since these machines are shared and noisy. Traffic stays on loopback.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tracer.kernel import cgroups

from . import outputs

ROUNDS = 5
STORM_SECONDS = 4.0
STORM = Path(__file__).with_name("storm.py")
EPTRACE = [sys.executable, "-m", "tracer"]


def storm_untraced(parent: Path, n: int) -> float:
    cg = cgroups.create(parent / f"untraced-{n}")
    try:
        procs = cg / "cgroup.procs"
        out = subprocess.run([sys.executable, str(STORM), str(STORM_SECONDS)], capture_output=True, text=True,
                             check=True, preexec_fn=lambda: procs.write_text(str(os.getpid()))).stdout
        return _rate(out)
    finally:
        cgroups.kill_and_remove(cg)


def storm_traced(n: int, events_file: Path) -> tuple[float, dict, float, int, float]:
    """(connections/s, final stats, tracer CPU seconds, peak RSS KiB, wall seconds)."""
    events_file.unlink(missing_ok=True)
    start = time.monotonic()
    proc = subprocess.Popen([*EPTRACE, "run", "--episode", f"bench-{n}", "--output", f"file:{events_file}",
                             "--", sys.executable, str(STORM), str(STORM_SECONDS)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.stdout.read(), proc.stderr.read()
    status = proc.wait()
    wall = time.monotonic() - start
    if status != 0:
        raise SystemExit(f"eptrace run failed ({status}): {err.strip()}")
    stats = {}
    with open(events_file) as f:
        for line in f:
            doc = json.loads(line)
            if doc["event"]["kind"] == "metric":
                stats = doc["eptrace"]["stats"]
    # The tracer's own usage, from its final metric: rusage of eptrace run would include the storm.
    return (_rate(out + err), stats, stats["tracer_cpu_seconds"], stats["tracer_max_rss_bytes"] // 1024, wall)


def startup_seconds() -> float:
    start = time.monotonic()
    subprocess.run([*EPTRACE, "run", "--episode", "bench-startup", "--output", "file:/dev/null", "--", "true"],
                   check=True, capture_output=True)
    return time.monotonic() - start


def _rate(text: str) -> float:
    for line in text.splitlines():
        if line.startswith("connections="):
            fields = dict(part.split("=") for part in line.split())
            return int(fields["connections"]) / float(fields["seconds"])
    raise SystemExit(f"the storm printed no result: {text!r}")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> None:
    if os.geteuid() != 0:
        raise SystemExit("make bench needs root: sudo make bench")
    parent = cgroups.cgroup2_mount() / "eptrace-bench"
    parent.mkdir(exist_ok=True)
    untraced, traced, runs = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        events_file = Path(tmp) / "events.ndjson"
        try:
            for n in range(ROUNDS):      # alternate, so that drift in machine load hits both sides alike
                untraced.append(storm_untraced(parent, n))
                rate, stats, cpu, rss, wall = storm_traced(n, events_file)
                traced.append(rate)
                runs.append((stats, cpu, rss, wall))
            startups = [startup_seconds() for _ in range(3)]
        finally:
            cgroups.kill_and_remove(parent)
    ratio = statistics.median(t / u for t, u in zip(traced, untraced))
    events_per_s = statistics.median(s.get("events_emitted", 0) / STORM_SECONDS for s, *_ in runs)
    records_per_s = statistics.median(s.get("records_received", 0) / STORM_SECONDS for s, *_ in runs)
    lost = sum(s.get("records_lost", 0) for s, *_ in runs)
    cpu = statistics.median(c for _, c, _, _ in runs)
    wall = statistics.median(w for *_, w in runs)
    rss_mb = max(r for _, _, r, _ in runs) / 1024
    startup = statistics.median(startups)
    print(f"eptrace bench: {os.cpu_count()} cores, Linux {os.uname().release}, {ROUNDS} rounds of a "
          f"{STORM_SECONDS:.0f} s loopback TCP connect/accept/close storm inside an episode cgroup "
          "(both ends traced, storm pinned to CPU 0)")
    print(f"  storm untraced        {statistics.median(untraced):10,.0f} connections/s")
    print(f"  storm traced          {statistics.median(traced):10,.0f} connections/s")
    print(f"  traced/untraced       {ratio:10.3f}      target >= 0.95   {verdict(ratio >= 0.95)}"
          f"   (rounds: {' '.join(f'{t / u:.2f}' for t, u in zip(traced, untraced))})")
    print(f"  records handled       {records_per_s:10,.0f} /s")
    print(f"  events handled        {events_per_s:10,.0f} /s")
    print(f"  records lost          {lost:10d}        target 0         {verdict(lost == 0)}")
    print(f"  tracer CPU            {cpu:10.2f} s     over {wall:.1f} s of eptrace run (user+sys)")
    print(f"  tracer peak RSS       {rss_mb:10.1f} MB    target <= 200    {verdict(rss_mb <= 200)}")
    print(f"  start-up (run -- true){startup:10.2f} s     target <= 3      {verdict(startup <= 3)}")
    outputs.main()


if __name__ == "__main__":
    main()

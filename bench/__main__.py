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

from . import floors, outputs
from .storm import pair_rates

STORM_SECONDS = 30.0     # 60 alternating phases of 0.25 s each side
STORM = Path(__file__).with_name("storm.py")
EPTRACE = [sys.executable, "-m", "tracer"]


def storm(untraced: Path, events_file: Path) -> tuple[list[dict], dict, float]:
    """One `eptrace run` of the alternating storm: (phases, final stats, wall seconds).

    The storm starts in the episode's cgroup and alternates with `untraced`, a
    cgroup eptrace does not trace (see storm.py): both sides then see the same
    machine load, which on these shared VMs swings by 10% between runs."""
    start = time.monotonic()
    proc = subprocess.run([*EPTRACE, "run", "--episode", "bench", "--output", f"file:{events_file}",
                           "--", sys.executable, str(STORM), str(STORM_SECONDS), "--untraced", str(untraced)],
                          capture_output=True, text=True)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"eptrace run failed ({proc.returncode}): {proc.stderr.strip()}")
    stats = {}
    with open(events_file) as f:
        for line in f:
            doc = json.loads(line)
            if doc["event"]["kind"] == "metric":
                stats = doc["eptrace"]["stats"]
    return json.loads(proc.stdout)["phases"], stats, wall


def startup_seconds() -> float:
    start = time.monotonic()
    subprocess.run([*EPTRACE, "run", "--episode", "bench-startup", "--output", "file:/dev/null", "--", "true"],
                   check=True, capture_output=True)
    return time.monotonic() - start


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> None:
    if os.geteuid() != 0:
        raise SystemExit("make bench needs root: sudo make bench")
    parent = cgroups.cgroup2_mount() / "eptrace-bench"
    parent.mkdir(exist_ok=True)
    untraced_cgroup = cgroups.create(parent / "untraced")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            phases, stats, wall = storm(untraced_cgroup, Path(tmp) / "events.ndjson")
            startups = [startup_seconds() for _ in range(3)]
        finally:
            cgroups.kill_and_remove(parent)
    pairs = pair_rates(phases)
    ratios = sorted(t / u for t, u in pairs)
    ratio = statistics.median(ratios)
    quartiles = statistics.quantiles(ratios, n=4)
    traced_rate = statistics.median(t for t, _ in pairs)
    untraced_rate = statistics.median(u for _, u in pairs)
    traced_seconds = sum(p["seconds"] for p in phases if p["side"] == "traced")
    cost_us = statistics.median((1 / t - 1 / u) * 1e6 for t, u in pairs)
    records_per_s = stats.get("records_received", 0) / traced_seconds
    events_per_s = stats.get("events_emitted", 0) / traced_seconds
    lost = stats.get("records_lost", 0)
    rss_mb = stats["tracer_max_rss_bytes"] / 2**20
    rss_end_mb = stats.get("tracer_rss_bytes", 0) / 2**20
    evicted = sum(stats.get("evicted", {}).values())
    startup = statistics.median(startups)
    print(f"eptrace bench: {os.cpu_count()} cores, Linux {os.uname().release}; a {STORM_SECONDS:.0f} s loopback "
          f"TCP connect/accept/close storm, pinned to CPU 0, alternating every 0.25 s between an episode cgroup "
          f"(both ends traced) and an untraced cgroup: {len(pairs)} pairs of phases")
    print(f"  storm untraced        {untraced_rate:10,.0f} connections/s")
    print(f"  storm traced          {traced_rate:10,.0f} connections/s")
    print(f"  traced/untraced       {ratio:10.3f}      target >= 0.95   {verdict(ratio >= 0.95)}"
          f"   (median of pairs; quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f})")
    print(f"  cost per connection   {cost_us:10.1f} us    both ends, on the sandbox's CPU")
    print(f"  records handled       {records_per_s:10,.0f} /s   while traced")
    print(f"  events handled        {events_per_s:10,.0f} /s   while traced")
    print(f"  records lost          {lost:10d}        target 0         {verdict(lost == 0)}")
    print(f"  tracer CPU            {stats['tracer_cpu_seconds']:10.2f} s     over {wall:.1f} s of eptrace run "
          "(user+sys)")
    print(f"  tracer peak RSS       {rss_mb:10.1f} MB    target <= 200    {verdict(rss_mb <= 200)}")
    print(f"  tracer RSS at the end {rss_end_mb:10.1f} MB    after {stats.get('records_received', 0):,} records; "
          f"{evicted} table entries evicted (capped tables)")
    by_reason = {r: n for r, n in stats.get("records_lost_by_reason", {}).items() if n}
    if by_reason:
        print(f"  records lost by reason {by_reason}   (budget: the episode's record budget, [limits])")
    print(f"  start-up (run -- true){startup:10.2f} s     target <= 3      {verdict(startup <= 3)}")
    floors.main()
    outputs.main()


if __name__ == "__main__":
    main()

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
import threading
import time
from pathlib import Path

from tracer.kernel import cgroups

from . import detection, floors, memory, outputs, peer, probecost, watch
from .storm import Figures, pair_rates

STORM_SECONDS = 30.0     # 60 alternating phases of 0.25 s each side
BULK_SECONDS = 30.0      # about 300 pairs of 64 MiB phases on two long-lived connections
STARTUP_ALLOWANCE = 4.0  # eptrace run's own start, before the storm's first phase
STORM = Path(__file__).with_name("storm.py")
EPTRACE = [sys.executable, "-m", "tracer"]


def storm(untraced: Path, events_file: Path, seconds: float = STORM_SECONDS,
          bulk: bool = False) -> tuple[list[dict], dict, float, dict | None]:
    """One `eptrace run` of the alternating storm: (phases, final stats, wall seconds, tracer RSS by part
    halfway through the storm, see memory.py).

    The storm starts in the episode's cgroup and alternates with `untraced`, a
    cgroup eptrace does not trace (see storm.py): both sides then see the same
    machine load, which on these shared VMs swings by 10% between runs."""
    start = time.monotonic()
    proc = subprocess.Popen([*EPTRACE, "run", "--episode", "bench", "--output", f"file:{events_file}",
                             "--", sys.executable, str(STORM), str(seconds), "--untraced", str(untraced),
                             *(["--bulk"] if bulk else [])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rss: dict[str, dict | None] = {}
    sampler = threading.Timer(seconds / 2 + STARTUP_ALLOWANCE,
                              lambda: rss.__setitem__("parts", memory.rss_by_part(proc.pid)))
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.cancel()
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"eptrace run failed ({proc.returncode}): {stderr.strip()}")
    return json.loads(stdout)["phases"], final_stats(events_file), wall, rss.get("parts")


def final_stats(events_file: Path) -> dict:
    """The tracer's counters from its last metric document."""
    stats = {}
    with open(events_file) as f:
        for line in f:
            doc = json.loads(line)
            if doc["event"]["kind"] == "metric":
                stats = doc["eptrace"]["stats"]
    return stats


def startup_seconds(cache_dir: Path) -> float:
    start = time.monotonic()
    subprocess.run([*EPTRACE, "run", "--episode", "bench-startup", "--output", "file:/dev/null", "--", "true"],
                   check=True, capture_output=True, env=dict(os.environ, EPTRACE_CACHE_DIR=str(cache_dir)))
    return time.monotonic() - start


def startups(rounds: int = 5) -> tuple[list[float], list[float]]:
    """Start-up of run -- true with the probe cache missing (clang and bcc compile the probes, in an empty cache
    directory each time) and hitting (the first miss's cache directory), in alternating rounds."""
    misses, hits = [], []
    with tempfile.TemporaryDirectory(prefix="eptrace-bench-cache-") as d:
        for i in range(rounds):
            misses.append(startup_seconds(Path(d, f"miss-{i}")))
            hits.append(startup_seconds(Path(d, "miss-0")))
    return misses, hits


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def quartiles(pair: tuple[float, float], digits: int = 3) -> str:
    return f"quartiles {pair[0]:.{digits}f}-{pair[1]:.{digits}f}"


def peer_side_by_side(untraced: Path, events_file: Path) -> Figures | None:
    """tcplife's figures (None when it cannot run here), with eptrace's from the same gated storm."""
    if not peer.available():
        print(f"  peer: {peer.TCPLIFE} is not installed (bpfcc-tools, see scripts/setup.sh): not compared")
        return None
    eptrace_run = [*EPTRACE, "run", "--episode", "bench-peer", "--output", f"file:{events_file}", "--"]
    try:
        phases, lines, lost = peer.storm(STORM, eptrace_run, untraced)
    except RuntimeError as e:
        print(f"  peer: not compared: {e}")
        return None
    tcplife = Figures.of(pair_rates(phases, sides=("peer", "alone")))
    eptrace = Figures.of(pair_rates(phases, sides=("traced", "alone")))
    print(f"  the peer, side by side: a gated storm in 0.5 s phases, {tcplife.pairs} pairs in ABBA order: bcc's "
          f"{peer.TCPLIFE} running host-wide or not (its starts untimed), and beside each phase without it one "
          f"traced by eptrace; it printed {lines:,} lines, lost {lost} samples; eptrace lost "
          f"{final_stats(events_file).get('records_lost', 0)} records")
    for name, f in (("eptrace", eptrace), ("tcplife", tcplife)):
        print(f"    {name:8s} traced/untraced {f.ratio:6.3f} ({quartiles(f.ratio_quartiles)})   "
              f"{f.cost:5.1f} us per connection ({quartiles(f.cost_quartiles, 1)})")
    share = eptrace.cost / tcplife.cost if tcplife.cost > 0 else float("inf")
    print(f"    eptrace's cost per connection / tcplife's {share:6.2f}     target <= 0.5    {verdict(share <= 0.5)}"
          f"   (both against the same phases without either)")
    return tcplife


def bulk(untraced: Path, events_file: Path, parent: Path) -> None:
    phases, stats, _, _ = storm(untraced, events_file, BULK_SECONDS, bulk=True)
    f = Figures.of(pair_rates(phases, "bytes"))
    cpu = Figures.of(pair_rates(phases, "bytes", per="cpu_seconds"))
    lost = stats.get("records_lost", 0)
    print(f"  bulk transfer: two long-lived loopback TCP connections, one opened in the episode and one not, "
          f"both ends on CPU 0, taking turns (ABBA) to deliver 64 MiB at full speed: {f.pairs} pairs of phases")
    print(f"    untraced {f.untraced_rate * 8 / 1e9:6.2f} Gbit/s, traced {f.traced_rate * 8 / 1e9:6.2f} Gbit/s; "
          f"{lost} records lost")
    print(f"    traced/untraced     {f.ratio:10.3f}      target >= 0.97   {verdict(f.ratio >= 0.97)}"
          f"   ({quartiles(f.ratio_quartiles)}; by the wall clock)")
    # The wall clock of a 0.25 s phase holds whatever the hypervisor and the other tenants took from CPU 0;
    # bytes per second CPU 0 spent on the transfer (the scheduler's clock, steal excluded) do not.
    print(f"    traced/untraced     {cpu.ratio:10.3f}      target >= 0.97   {verdict(cpu.ratio >= 0.97)}"
          f"   ({quartiles(cpu.ratio_quartiles)}; bytes per second of CPU 0 on the transfer, "
          f"{cpu.untraced_rate * 8 / 1e9:.2f} Gbit/s of it untraced)")
    # What target 3 can be here: the same transfers with every cgroup hook attached and its program empty.
    empty = floors.phases(parent, "bulk-empty", floors.stand_in_source(records=False), bulk=True)
    wall, cpu = (Figures.of(pair_rates(empty, "bytes", per=per)) for per in ("seconds", "cpu_seconds"))
    print(f"    hooks attached, programs empty (in-process, {wall.pairs} pairs): {wall.ratio:.3f} "
          f"({quartiles(wall.ratio_quartiles)}) by the wall clock, {cpu.ratio:.3f} ({quartiles(cpu.ratio_quartiles)}) "
          "by CPU time: the floor of target 3 here")
    # The ratio's quartiles are wide on these VMs: the programs' own time, from the kernel's statistics in
    # a separate round (they cost a clock read per run), says what the per-packet work takes.
    probecost.bulk_share()


def main() -> None:
    if os.geteuid() != 0:
        raise SystemExit("make bench needs root: sudo make bench")
    os.environ["EPTRACE_DAEMON"] = "never"     # in-process figures, even on a host whose daemon runs
    parent = cgroups.cgroup2_mount() / "eptrace-bench"
    parent.mkdir(exist_ok=True)
    untraced_cgroup = cgroups.create(parent / "untraced")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            phases, stats, wall, rss = storm(untraced_cgroup, Path(tmp) / "events.ndjson")
            report_storm(phases, stats, wall, startups(), rss)
            eptrace = Figures.of(pair_rates(phases))
            tcplife = peer_side_by_side(untraced_cgroup, Path(tmp) / "peer.ndjson")
            bulk(untraced_cgroup, Path(tmp) / "bulk.ndjson", parent)
        finally:
            cgroups.kill_and_remove(parent)
    floor = floors.main()
    records = floor["records"]
    print("  eptrace's cost per connection / the contract records' floor (same run)")
    for label, f in (("eptrace run's storm above", eptrace), ("eptrace's own probes, in-process", floor["shipped"])):
        times = f.cost / records.cost if records.cost > 0 else float("inf")
        print(f"    {label:34s} {times:5.2f} times   target <= 1.5    {verdict(times <= 1.5)}   "
              f"({f.cost:.1f} us, {quartiles(f.cost_quartiles, 1)}; floor {records.cost:.1f} us, "
              f"{quartiles(records.cost_quartiles, 1)})")
    if tcplife is not None and tcplife.cost > 0:
        # What target 2 can be here: no probe set costs less than its hooks attached with empty programs.
        print(f"    the empty hooks' floor / tcplife's cost   {floor['empty'].cost / tcplife.cost:5.2f}      "
              f"(below 0.5, halving tcplife is within reach; above, attaching the hooks alone costs more)")
    detection.main()
    watch.main()
    print("  containment: connects to a test host from an episode with no policy and from one with a policy of "
          "1,000 entries (none matching), alternating, in one tracer", flush=True)
    subprocess.run([sys.executable, "-m", "bench.policy"], cwd=Path(__file__).parent.parent)
    print("  fairness: connects from an episode with the ring share in force (two episodes) and not, alternating",
          flush=True)
    subprocess.run([sys.executable, "-m", "bench.fairness"], cwd=Path(__file__).parent.parent)
    outputs.main()
    subprocess.run([sys.executable, "-m", "bench.daemon"], cwd=Path(__file__).parent.parent)


def report_storm(phases: list[dict], stats: dict, wall: float, startup: tuple[list[float], list[float]],
                 rss: dict | None) -> None:
    f = Figures.of(pair_rates(phases))
    ratio, traced_rate, untraced_rate, cost_us = f.ratio, f.traced_rate, f.untraced_rate, f.cost
    traced_seconds = sum(p["seconds"] for p in phases if p["side"] == "traced")
    records_per_s = stats.get("records_received", 0) / traced_seconds
    events_per_s = stats.get("events_emitted", 0) / traced_seconds
    lost = stats.get("records_lost", 0)
    rss_mb = stats["tracer_max_rss_bytes"] / 2**20
    rss_end_mb = stats.get("tracer_rss_bytes", 0) / 2**20
    evicted = sum(stats.get("evicted", {}).values())
    misses, hits = startup
    print(f"eptrace bench: {os.cpu_count()} cores, Linux {os.uname().release}; a {STORM_SECONDS:.0f} s loopback "
          f"TCP connect/accept/close storm, pinned to CPU 0, alternating every 0.25 s between an episode cgroup "
          f"(both ends traced) and an untraced cgroup: {f.pairs} pairs of phases")
    print(f"  storm untraced        {untraced_rate:10,.0f} connections/s")
    print(f"  storm traced          {traced_rate:10,.0f} connections/s")
    print(f"  traced/untraced       {ratio:10.3f}      (median of pairs; {quartiles(f.ratio_quartiles)})")
    print(f"  cost per connection   {cost_us:10.1f} us    both ends, on the sandbox's CPU "
          f"({quartiles(f.cost_quartiles, 1)})")
    print(f"  records handled       {records_per_s:10,.0f} /s   while traced")
    print(f"  events handled        {events_per_s:10,.0f} /s   while traced")
    print(f"  records lost          {lost:10d}        target 0         {verdict(lost == 0)}")
    print(f"  tracer CPU            {stats['tracer_cpu_seconds']:10.2f} s     over {wall:.1f} s of eptrace run "
          "(user+sys)")
    print(f"  tracer peak RSS       {rss_mb:10.1f} MB    target <= 200    {verdict(rss_mb <= 200)}")
    print(f"  tracer RSS at the end {rss_end_mb:10.1f} MB    target <= 80     {verdict(rss_end_mb <= 80)}   after {stats.get('records_received', 0):,} records; "
          f"{evicted} table entries evicted (capped tables)")
    if rss:
        mb = {k: v / 2**20 for k, v in rss.items()}
        print(f"  tracer RSS mid-storm  {mb['total']:10.1f} MB    of which the compiler mapped (libLLVM, libclang: "
              f"bcc compiles in a child that exits) {mb['compiler']:.1f} MB, the mmapped ring buffer "
              f"{mb['ring buffer']:.1f} MB; "
              f"private dirty {mb['private']:.1f} MB")
    by_reason = {r: n for r, n in stats.get("records_lost_by_reason", {}).items() if n}
    if by_reason:
        print(f"  records lost by reason {by_reason}   (budget: the episode's record budget, [limits])")
    hit, miss = statistics.median(hits), statistics.median(misses)
    print(f"  start-up (run -- true){hit:10.2f} s     target <= 3      {verdict(hit <= 3)}"
          f"   probe cache hit (median of {len(hits)})")
    print(f"  start-up, cache miss  {miss:10.2f} s     clang and bcc compile the probes (median of {len(misses)},"
          f" alternating with the hits); hit/miss {hit / miss:.2f}")


if __name__ == "__main__":
    main()

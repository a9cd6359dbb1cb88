"""Where a connection's kernel time goes, and probe variants compared side by side.

For each probe directory given (default: probes/), in interleaved rounds: a tracer
in this process (tracer.api, as bench/floors.py does) with that directory's probes,
and the alternating storm of storm.py (traced episode cgroup against an untraced
one, pinned to CPU 0) for SECONDS. With the kernel's BPF statistics on
(sysctl kernel.bpf_stats_enabled=1, restored afterwards), each program's run_time_ns
and run_cnt are read from its fd's /proc fdinfo, as `bpftool prog show` prints them.

It prints, per variant: the storm's cost per connection (median and quartiles of
the pairs of phases of every round, as make bench does) and each program's
nanoseconds and runs per traced connection. Program time is the programs' own:
the kernel's work around them (a hook's dispatch, a socket storage cloned for an
accepted socket) and the tracer's userspace are not in it, but are in the storm's cost.
No record budget: every connection's records are made.

With --bulk, the phases are storm.py's bulk transfers (64 MiB at full speed on one of two long-lived
loopback connections, both ends on CPU 0) and each program's time is given per traced second: its share of CPU 0,
which the per-packet programs take from the transfer (make bench prints it under its bulk ratio).

Usage: python -m bench.probecost [--seconds S] [--rounds R] [--bulk] [PROBES_DIR ...]
       (root; a tool for finding costs; make bench runs its --bulk form for one round)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from tracer import api
from tracer.config import Config, Limits
from tracer.kernel import cgroups, loader

from .storm import Figures, pair_rates

STORM = Path(__file__).with_name("storm.py")
STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


def program_stats(probes) -> dict[str, tuple[int, int]]:
    """Program name -> (run_time_ns, run_cnt) from the fdinfo of the tracer's program fds."""
    out = {}
    fds = probes.program_fds()
    try:
        for name, fd in fds.items():
            text = Path(f"/proc/self/fdinfo/{fd}").read_text()
            fields = dict(re.findall(r"^(\w+):\s+(\S+)", text, re.M))
            out[name] = (int(fields.get("run_time_ns", 0)), int(fields.get("run_cnt", 0)))
    finally:
        for name, fd in fds.items():
            if name.startswith("tp-"):
                os.close(fd)        # opened by id for us; the cgroup programs' are the tracer's
    return out


def one_round(probes: Path, parent: Path, seconds: float,
              bulk: bool = False) -> tuple[list[tuple[float, float]], dict, float, dict]:
    """(pairs of rates, program name -> (ns, runs) during the storm, traced connections (bulk: traced
    seconds), losses)."""
    traced, untraced = cgroups.create(parent / "traced"), cgroups.create(parent / "untraced")
    shipped = loader.PROBES_DIR
    loader.PROBES_DIR = probes
    try:
        config = Config(limits=Limits(record_budget_per_second=0))
        with api.trace_cgroup("bench-probecost", traced, outputs=["file:/dev/null"], config=config) as trace:
            probes = trace._trace.tracer.probes      # in-process (EPTRACE_DAEMON=never, set below)
            before = program_stats(probes)
            cpu = time.process_time()     # this process: the tracer's userspace (the storm is a child)
            procs = traced / "cgroup.procs"
            out = subprocess.run([sys.executable, str(STORM), str(seconds), "--untraced", str(untraced),
                                  *(["--bulk"] if bulk else [])], capture_output=True, text=True, check=True,
                                 preexec_fn=lambda: procs.write_text("0")).stdout
            after = program_stats(probes)
            cpu = time.process_time() - cpu
    finally:
        loader.PROBES_DIR = shipped
        cgroups.kill_and_remove(traced)
        cgroups.kill_and_remove(untraced)
    phases = json.loads(out)["phases"]
    traced = [p for p in phases if p["side"] == "traced"]
    units = sum(p["seconds"] for p in traced) if bulk else sum(p["connections"] for p in traced)
    delta = {name: (after[name][0] - before[name][0], after[name][1] - before[name][1]) for name in after}
    delta["(tracer userspace CPU)"] = (int(cpu * 1e9), units)
    return pair_rates(phases, "bytes" if bulk else "connections"), delta, units, \
        trace.verdict.losses if trace.verdict else {}


def bulk_share(seconds: float = 10.0) -> None:
    """make bench: the per-packet programs' share of CPU 0 during traced bulk transfers (one round)."""
    rounds([loader.PROBES_DIR], seconds, 1, bulk=True, indent="    ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="storm seconds per round and variant")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bulk", action="store_true", help="bulk transfers instead of the connect storm")
    parser.add_argument("probes", nargs="*", type=Path, default=[loader.PROBES_DIR])
    args = parser.parse_args()
    rounds([p.resolve() for p in args.probes], args.seconds, args.rounds, args.bulk)


def rounds(variants: list[Path], seconds: float, count: int, bulk: bool = False, indent: str = "") -> None:
    os.environ["EPTRACE_DAEMON"] = "never"     # this process's own probes, whose program fds it reads
    if os.geteuid() != 0:
        raise SystemExit("bench.probecost needs root")
    parent = cgroups.cgroup2_mount() / f"eptrace-probecost-{os.getpid()}"
    parent.mkdir()
    old = STATS.read_text().strip()
    STATS.write_text("1")
    pairs: dict[Path, list] = defaultdict(list)
    programs: dict[Path, dict] = {p: defaultdict(lambda: [0, 0]) for p in variants}
    units: dict[Path, float] = defaultdict(float)
    losses: dict[Path, dict] = defaultdict(dict)
    try:
        for r in range(count):
            for probes in (variants if r % 2 == 0 else list(reversed(variants))):
                p, delta, n, lost = one_round(probes, parent, seconds, bulk)
                pairs[probes] += p
                units[probes] += n
                for name, (ns, runs) in delta.items():
                    programs[probes][name][0] += ns
                    programs[probes][name][1] += runs
                for reason, lost_count in lost.items():
                    losses[probes][reason] = losses[probes].get(reason, 0) + lost_count
                if not bulk:
                    print(f"  round {r + 1} {probes}: {Figures.of(p).cost:.1f} us per connection", file=sys.stderr,
                          flush=True)
    finally:
        STATS.write_text(old)
        cgroups.kill_and_remove(parent)
    for probes in variants:
        f = Figures.of(pairs[probes])
        n = units[probes]
        if bulk:
            rows = sorted(((ns / n, runs / n, ns / runs, name) for name, (ns, runs) in programs[probes].items()
                           if runs and not name.startswith("(")), reverse=True)
            share = sum(r[0] for r in rows) / 1e9
            if len(variants) > 1:
                print(f"{indent}{probes}:")
            print(f"{indent}program time while traced ({n:.1f} s of traced bulk phases, kernel BPF statistics; "
                  f"that run's own ratio {f.ratio:.3f}): {share * 100:.2f}% of CPU 0, so about {1 - share:.3f} of "
                  "the transfer is left to it")
            for per_s, runs, per_run, name in rows[:4]:
                print(f"{indent}  {name:28s} {per_s / 1e6:7.2f} ms/s  {runs:9,.0f} runs/s  {per_run:5.0f} ns/run")
            continue
        print(f"{probes}: {f.pairs} pairs of 0.25 s phases, {n:,.0f} traced connections; losses {losses[probes] or 0}")
        print(f"  storm traced/untraced {f.ratio:.3f} (quartiles {f.ratio_quartiles[0]:.3f}-{f.ratio_quartiles[1]:.3f})"
              f"   {f.cost:.1f} us per connection (quartiles {f.cost_quartiles[0]:.1f}-{f.cost_quartiles[1]:.1f})")
        rows = sorted(((ns / n, runs / n, ns / runs, name) for name, (ns, runs) in programs[probes].items()
                       if runs and ns / n >= 1), reverse=True)
        print(f"  {'program':42s} {'ns/conn':>8s} {'runs/conn':>9s} {'ns/run':>7s}")
        for per_conn, runs, per_run, name in rows:
            print(f"  {name:42s} {per_conn:8.0f} {runs:9.2f} {per_run:7.0f}")
        print(f"  {'all programs':42s} {sum(r[0] for r in rows if not r[3].startswith('(')):8.0f}")


if __name__ == "__main__":
    main()

"""Detection's own cost: the tracer's CPU seconds per 100,000 records, no kernel involved.

The end-to-end scenarios' captures (tests/fixtures/*.capture, recorded with
`eptrace run --capture`) are replayed at full speed through tracer.capture.replay,
with the default config (every detector on) and documents encoded and written
to /dev/null as the file output does: decoding, state, every detector, the ECS
encoder and the output, as in a running tracer, minus the ring buffer.

It also prints where that CPU goes: the functions with the most self time, with their shares, sampled
by SIGPROF on this process's CPU (asked for every millisecond; the kernel's tick is the floor, 4 ms here).
A sample counts to the innermost Python function; C code counts to the function that ran it. Capture
reading and the replay loop (tracer/capture.py) and this file are the replay's own cost, not the
tracer's: their share is printed, and the figure without them.

Usage: python -m bench.detection [--profile]   (--profile prints cProfile's top entries by self time)
"""
from __future__ import annotations

import cProfile
import collections
import pstats
import signal
import statistics
import sys
import time
from pathlib import Path

from tracer.capture import replay
from tracer.outputs import Fanout
from tracer.outputs.file import FileOutput
from tracer.schema import EcsEncoder

FIXTURES = Path(__file__).parent.parent / "tests" / "fixtures"
ROUNDS = 5              # each round replays every capture; ROUNDS give the quartiles
MIN_ROUND_SECONDS = 1.0  # a round repeats the whole set until it has spent this much CPU
SAMPLE_SECONDS = 4.0     # CPU seconds of sampling for the self-time table
SAMPLE_INTERVAL_S = 0.001
TOP = 12
ROOT = str(Path(__file__).parent.parent) + "/"


def replay_all(captures: list[Path]) -> int:
    """Every capture once through a fresh pipeline; the records handled."""
    records = 0
    for capture in captures:
        out = FileOutput("/dev/null")
        tracer = replay(capture, EcsEncoder("bench", "0"), Fanout([out]))
        out.close()
        records += tracer.stats["records_received"]
    return records


def rounds(captures: list[Path]) -> list[float]:
    """CPU seconds (user+sys of this process) per 100,000 records, one figure per round."""
    per_100k = []
    for _ in range(ROUNDS):
        records, start = 0, time.process_time()
        while time.process_time() - start < MIN_ROUND_SECONDS:
            records += replay_all(captures)
        per_100k.append((time.process_time() - start) / records * 100_000)
    return per_100k


def self_time(captures: list[Path], seconds: float = SAMPLE_SECONDS) -> tuple[int, list[tuple[str, int]]]:
    """(samples, [(function, samples)] most first): where the replay's CPU goes, by self time."""
    counts: collections.Counter[str] = collections.Counter()

    def sample(signum, frame) -> None:
        if frame.f_lineno == frame.f_code.co_firstlineno and frame.f_back is not None:
            # Python takes a signal at a function's start or a loop's jump: one taken as a function
            # starts came during the caller's work since its last check (an f-string, a join): the caller's.
            frame = frame.f_back
        code = frame.f_code
        if code.co_filename == "<string>":      # a dataclass's generated __init__: name its class
            counts[f"{type(frame.f_locals.get('self')).__name__}.__init__ (dataclass)"] += 1
        else:
            counts[f"{code.co_filename.removeprefix(ROOT)}:{code.co_name}"] += 1

    previous = signal.signal(signal.SIGPROF, sample)
    signal.setitimer(signal.ITIMER_PROF, SAMPLE_INTERVAL_S, SAMPLE_INTERVAL_S)
    try:
        start = time.process_time()
        while time.process_time() - start < seconds:
            replay_all(captures)
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        signal.signal(signal.SIGPROF, previous)
    return sum(counts.values()), counts.most_common()


def _replay_own(function: str) -> bool:
    return function.startswith(("tracer/capture.py", "bench/"))


def print_self_time(captures: list[Path], per_100k: float, top: int = TOP) -> None:
    samples, functions = self_time(captures)
    if not samples:
        return
    replay_share = sum(count for function, count in functions if _replay_own(function)) / samples
    print(f"    the replay's own (capture reading, its loop) {replay_share:.0%} of the CPU; without it, the "
          f"tracer's {per_100k * (1 - replay_share):.2f} s per 100,000 records")
    print(f"    where the CPU goes, by self time ({samples:,} samples):")
    for function, count in functions[:top]:
        print(f"      {count / samples:6.1%}  {function}{'  (replay)' if _replay_own(function) else ''}")


def captures() -> list[Path]:
    return sorted(FIXTURES.glob("*.capture"))


def main() -> None:
    files = captures()
    records = replay_all(files)         # also warms imports and caches
    figures = rounds(files)
    q = statistics.quantiles(figures, n=4)
    print(f"  detection's own cost: {len(files)} end-to-end captures ({records:,} records a pass) replayed at full "
          f"speed, every detector on, documents to /dev/null")
    print(f"    tracer CPU per 100,000 records {statistics.median(figures):8.2f} s   "
          f"(median of {ROUNDS} rounds; quartiles {q[0]:.2f}-{q[2]:.2f})")
    print_self_time(files, statistics.median(figures))


def profile(top: int = 25) -> None:
    files = captures()
    replay_all(files)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(3):
        replay_all(files)
    profiler.disable()
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(top)


if __name__ == "__main__":
    profile() if "--profile" in sys.argv else main()

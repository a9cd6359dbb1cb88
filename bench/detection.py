"""Detection's own cost: the tracer's CPU seconds per 100,000 records, no kernel involved.

The end-to-end scenarios' captures (tests/fixtures/*.capture, recorded with
`eptrace run --capture`) are replayed at full speed through tracer.capture.replay,
with the default config (every detector on) and documents encoded and written
to /dev/null as the file output does: decoding, state, every detector, the ECS
encoder and the output, as in a running tracer, minus the ring buffer.

Usage: python -m bench.detection [--profile]   (--profile prints cProfile's top entries)
"""
from __future__ import annotations

import cProfile
import pstats
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

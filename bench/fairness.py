"""The ring share's cost on the connect path: `sudo python -m bench.fairness`.

Two episode cgroups (the share is in force only while episodes share the ring), one set of probes; a connect loop in a sandbox network namespace (bench.policy's) runs
in short alternating phases with the ring share on (the default watermark: one bpf_ringbuf_query and one
array lookup per record, nothing paid below the watermark) and off (watermark 0: the lookup only). Printed:
connects per second and cgroup/connect4's run time per call (kernel.bpf_stats_enabled), median over the
phases. Not a test: figures only, on shared and noisy machines.
"""
from __future__ import annotations

import ctypes
import os
import subprocess

from tracer.config import Limits
from tracer.kernel import cgroups, loader
from tracer.testbed import TestNetwork

from .policy import phase, report

PHASES = 20


def main() -> None:
    if os.geteuid() != 0:
        raise SystemExit("needs root: sudo python -m bench.fairness")
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=1"], check=True)
    parent = cgroups.cgroup2_mount() / f"eptrace-bench-fairness-{os.getpid()}"
    parent.mkdir(exist_ok=True)
    probes = loader.Probes()
    limits = Limits()
    try:
        episode = cgroups.create(parent / "episode")
        probes.attach(episode)
        probes.attach(cgroups.create(parent / "idle"))
        probes.open_records(lambda record: None)        # drained between phases: the ring stays low
        fd = probes.program_fd("on_connect4")
        results: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
        with TestNetwork() as net:
            for _ in range(PHASES):
                for side, percent in (("off", 0), ("on", limits.ring_share_watermark_percent)):
                    probes.set_ring_share(percent, limits.ring_share_per_second, limits.ring_share_burst)
                    results[side].append(phase(net, episode, lib, fd))
                    probes.poll(0)
        report("ring share", results, "off", "on")
    finally:
        probes.close()
        cgroups.kill_and_remove(parent)
        subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=0"])


if __name__ == "__main__":
    main()

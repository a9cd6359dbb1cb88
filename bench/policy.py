"""The policy check's cost on the connect path: `sudo python -m bench.policy`.

Two episode cgroups traced by one set of probes, one without a policy and one with a policy of 1,000
entries (999 denied /24 prefixes and one port rule, none matching the destination). A connect loop in
a sandbox network namespace runs in each in turn, in short alternating phases (both sides under the
same machine load), to the test host 198.51.100.1 on a port nobody listens on (SYN, then RST: no data).
Printed: connects per second and cgroup/connect4's run time per call (kernel.bpf_stats_enabled), median
over the phases. Not a test: figures only, on shared and noisy machines.
"""
from __future__ import annotations

import ctypes
import os
import statistics
import subprocess
import sys
import time

from tracer.kernel import cgroups, loader
from tracer.policy import parse
from tracer.testbed import HOST_IP, TestNetwork

PHASES = 10
CONNECTS = 1000
PROG_INFO_SIZE = 256
RUN_TIME_NS, RUN_CNT = 192, 200          # offsets in struct bpf_prog_info (UAPI)
LOOP = f'''
import socket, sys, time
start = time.perf_counter()
for i in range({CONNECTS}):
    s = socket.socket()
    try:
        s.connect(("{HOST_IP}", 7999))
    except OSError:
        pass
    s.close()
print({CONNECTS} / (time.perf_counter() - start))
'''
BIG = parse({"default": "allow", "deny": [f"10.{i // 250}.{i % 250}.0/24" for i in range(999)] + ["203.0.113.0/24:22"]})


def run_stats(lib, fd: int) -> tuple[int, int]:
    info = (ctypes.c_ubyte * PROG_INFO_SIZE)()
    size = ctypes.c_uint32(PROG_INFO_SIZE)
    if lib.bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size)) != 0:
        raise SystemExit(f"bpf_obj_get_info_by_fd: {os.strerror(ctypes.get_errno())}")
    return ctypes.c_uint64.from_buffer(info, RUN_TIME_NS).value, ctypes.c_uint64.from_buffer(info, RUN_CNT).value


def phase(net: TestNetwork, cgroup, lib, fd: int) -> tuple[float, float]:
    """(connects per second, ns per connect4 call) of one phase in cgroup."""
    before = run_stats(lib, fd)
    join = 'echo $$ > "$0" && exec "$@"'
    out = subprocess.run(["/bin/sh", "-c", join, str(cgroup / "cgroup.procs"), *net.sandbox_prefix(),
                          sys.executable, "-c", LOOP], capture_output=True, text=True, check=True).stdout
    after = run_stats(lib, fd)
    return float(out), (after[0] - before[0]) / max(1, after[1] - before[1])


def report(what: str, results: dict[str, list[tuple[float, float]]], without: str, with_: str) -> None:
    """Print each side's median connect rate and connect4 cost, and the ratio of the rates phase by phase."""
    for side, phases in results.items():
        rate, cost = statistics.median(r for r, _ in phases), statistics.median(c for _, c in phases)
        print(f"{what} {side:>13}: {rate:8.0f} connects/s, connect4 {cost:6.0f} ns per call (median of "
              f"{len(phases)} phases of {CONNECTS})")
    ratios = [w[0] / wo[0] for wo, w in zip(results[without], results[with_])]
    print(f"connect rate with / without the {what}: {statistics.median(ratios):.3f} (median of phase pairs; "
          f"quartiles {', '.join(f'{q:.3f}' for q in statistics.quantiles(ratios, n=4))})")


def main() -> None:
    if os.geteuid() != 0:
        raise SystemExit("needs root: sudo python -m bench.policy")
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=1"], check=True)
    parent = cgroups.cgroup2_mount() / "eptrace-bench-policy"
    parent.mkdir(exist_ok=True)
    probes = loader.Probes()
    try:
        plain, policed = cgroups.create(parent / "plain"), cgroups.create(parent / "policy")
        probes.attach(plain)
        probes.attach(policed, BIG)
        fd = probes.program_fd("on_connect4")
        results: dict[str, list[tuple[float, float]]] = {"none": [], "1000 entries": []}
        with TestNetwork() as net:
            for _ in range(PHASES):
                results["none"].append(phase(net, plain, lib, fd))
                results["1000 entries"].append(phase(net, policed, lib, fd))
                time.sleep(0.05)
        report("policy", results, "none", "1000 entries")
    finally:
        probes.close()
        cgroups.kill_and_remove(parent)
        subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=0"])


if __name__ == "__main__":
    main()

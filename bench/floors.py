"""What the storm's traced/untraced ratio can be on this machine, whatever the probes do.

The same alternating storm as the main bench, traced in this process (tracer.api)
with stand-in cgroup programs in place of probes/sockets.c, tcp.c and packets.c.
The tracepoints (probes/processes.c) stay as shipped: they run host-wide.

- "hooks attached, empty": every cgroup program returns at once. What attaching
  costs before any work is done.
- "contract records only": one bare ring-buffer record (a header: type, time,
  cookie) at each point where the event contract needs one for a connection:
  connect, established, accepted, and each side's close. No owner, endpoints,
  counters, socket storage or per-packet work.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tracer import api
from tracer.kernel import cgroups, loader

from .storm import Figures, pair_rates

SECONDS = 30.0
STORM = Path(__file__).with_name("storm.py")

CGROUP_PROGRAMS = ("on_sock_create", "on_sock_release", "on_connect4", "on_connect6", "on_sendmsg4",
                   "on_sendmsg6", "on_bind4", "on_bind6", "on_egress", "on_ingress", "on_sock_ops")
CONTEXT = {"on_sock_create": "struct bpf_sock", "on_sock_release": "struct bpf_sock", "on_sock_ops":
           "struct bpf_sock_ops", "on_egress": "struct __sk_buff", "on_ingress": "struct __sk_buff"}

BARE_RECORD = """
static __always_inline void bare_record(__u32 type, __u64 cookie)
{
    struct net_record *r = reserve_net(0);
    if (!r)
        return;
    r->h.type = type;
    r->h.size = sizeof(*r);
    r->h.ts_ns = bpf_ktime_get_ns();
    r->h.cookie = cookie;
    r->h.owner.episode_cgroup_id = 0;   /* userspace drops it: no episode */
    events.ringbuf_submit(r, SUBMIT_FLAGS);
}
"""

BARE_SOCK_OPS = """
int on_sock_ops(struct bpf_sock_ops *ops)
{
    __u32 type;
    switch (ops->op) {
    case BPF_SOCK_OPS_TCP_CONNECT_CB:       /* state changes are how a close is seen */
        bpf_sock_ops_cb_flags_set(ops, ops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
        return 1;
    case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
        type = REC_ESTABLISHED;
        break;
    case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
        bpf_sock_ops_cb_flags_set(ops, ops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
        type = REC_ACCEPTED;
        break;
    case BPF_SOCK_OPS_STATE_CB:
        if (ops->args[1] != 7 /* TCP_CLOSE */)
            return 1;
        type = REC_FLOW_ENDED;
        break;
    default:
        return 1;
    }
    bare_record(type, bpf_get_socket_cookie(ops));
    return 1;
}
"""


def stand_in_source(records: bool) -> str:
    common = (loader.PROBES_DIR / "common.h").read_text()
    tracepoints = (loader.PROBES_DIR / "processes.c").read_text().replace('#include "common.h"', "")
    programs = [BARE_RECORD] if records else []
    for name in CGROUP_PROGRAMS:
        if records and name == "on_sock_ops":
            programs.append(BARE_SOCK_OPS)
        elif records and name == "on_connect4":
            programs.append("int on_connect4(struct bpf_sock_addr *ctx)\n"
                            "{ bare_record(REC_CONNECT, bpf_get_socket_cookie(ctx)); return 1; }\n")
        else:
            programs.append(f"int {name}({CONTEXT.get(name, 'struct bpf_sock_addr')} *ctx) {{ return 1; }}\n")
    return "\n".join([common, tracepoints, *programs])


def measure(parent: Path, name: str, source: str | None) -> Figures:
    """The storm's figures with the given probe source."""
    return Figures.of(pair_rates(phases(parent, name, source)))


def phases(parent: Path, name: str, source: str | None, bulk: bool = False) -> list[dict]:
    """storm.py's phases (the connect storm, or with bulk its bulk transfers) with the given probe source."""
    traced, untraced = cgroups.create(parent / f"{name}-traced"), cgroups.create(parent / f"{name}-untraced")
    shipped = loader.probe_source
    if source is not None:
        loader.probe_source = lambda: source
    try:
        with api.trace_cgroup("bench-floor", traced, outputs=["file:/dev/null"]):
            procs = traced / "cgroup.procs"
            out = subprocess.run([sys.executable, str(STORM), str(SECONDS), "--untraced", str(untraced),
                                  *(["--bulk"] if bulk else [])],
                                 capture_output=True, text=True, check=True,
                                 preexec_fn=lambda: procs.write_text("0")).stdout
    finally:
        loader.probe_source = shipped
        cgroups.kill_and_remove(traced)
        cgroups.kill_and_remove(untraced)
    return json.loads(out)["phases"]


def main() -> dict[str, Figures]:
    """Prints the floors; returns them by key: "empty", "records", "shipped"."""
    parent = cgroups.cgroup2_mount() / "eptrace-bench-floors"
    parent.mkdir(exist_ok=True)
    try:
        rows = [("empty", "hooks attached, programs empty", measure(parent, "empty", stand_in_source(records=False))),
                ("records", "the contract's records only", measure(parent, "records", stand_in_source(records=True))),
                ("shipped", "eptrace's own probes", measure(parent, "shipped", None))]
    finally:
        cgroups.kill_and_remove(parent)
    print("  what the ratio can be here: the same storm, traced in-process with stand-in cgroup programs")
    for _, label, f in rows:
        print(f"    {label:34s} {f.ratio:6.3f} (quartiles {f.ratio_quartiles[0]:.3f}-{f.ratio_quartiles[1]:.3f})   "
              f"{f.cost:5.1f} us per connection (quartiles {f.cost_quartiles[0]:.1f}-{f.cost_quartiles[1]:.1f})")
    return {key: f for key, _, f in rows}


if __name__ == "__main__":
    main()

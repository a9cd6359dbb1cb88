"""reverse_tunnel by behaviour: an outbound TCP flow scored on several signals.

Duration alone is weak (model downloads run for minutes), so points add up
from independent signals, after the field's scored model
(shared/research/detection-heuristics.md); the alert goes out when the sum
reaches [reverse_tunnel] alert_score. Argv that names a tunnel outright is
handled in commands.py and alerts at once.
"""
from __future__ import annotations

import os
import re
from typing import Iterator

from ..events import NetworkEvent, PayloadSeen
from . import Context, Finding, rules, where, who

SSH_CLIENTS = {"ssh", "dbclient", "autossh", "scp", "sftp", "rsync", "git", "sshpass", "mosh-client"}
_FORWARD_SPEC = re.compile(r"^(\[?[\w.:-]+\]?:)?\d{1,5}:[\w.\-\[\]:]+:\d{1,5}$")   # [bind:]port:host:hostport
_FORWARD_FLAGS = re.compile(r"^-[A-Za-z]*[NRDLw][A-Za-z]*$")


def score(flow, process, ctx: Context, now_ns: int) -> list[tuple[int, str]]:
    """(points, why) for each signal the flow shows."""
    signals: list[tuple[int, str]] = []
    dport = flow.remote.port if flow.remote else 0
    long_s = ctx.config.flows.long_flow_seconds
    age_s = (now_ns - flow.start_ns) / 1e9
    if age_s >= long_s:
        signals.append((30, f"open {age_s:.0f} s (long-flow threshold {long_s:.0f} s)"))
    ssh = flow.saw("ssh")
    if ssh:
        signals.append((5, "SSH on port 22") if dport == 22 else (15, f"SSH on port {dport}"))
        name = os.path.basename(process.executable or process.name or "") if process else ""
        if name and name not in SSH_CLIENTS and not name.startswith("git"):
            signals.append((15, f"SSH spoken by {name!r}, not an SSH client"))
        if flow.saw("http", status=101):
            signals.append((30, "SSH inside an HTTP 101 upgrade"))
    first_out = next((s for egress, s in flow.sightings if egress), None)
    if dport == 443 and first_out is not None and first_out.protocol != "tls":
        signals.append((20, f"{first_out.protocol} instead of TLS on port 443"))
    weak = _weak_argv(process, ctx)
    if weak:
        signals.append((25, weak))
    latest = flow.latest
    if latest is not None:
        gaps = latest.gaps
        total_gaps = sum(gaps)
        if total_gaps >= 3 and max(gaps) >= 0.6 * total_gaps:
            signals.append((10, f"keep-alive cadence ({max(gaps)} of {total_gaps} silences alike)"))
        exchanges = latest.exchanges_in + latest.exchanges_out
        if exchanges >= 5 and latest.exchanges_in >= 0.6 * exchanges:
            signals.append((25, f"role inversion: the peer started {latest.exchanges_in} of {exchanges} exchanges"))
    return signals


def _weak_argv(process, ctx: Context) -> str | None:
    for proc in ctx.lineage(process):
        args = proc.args[1:]
        if any(_FORWARD_SPEC.match(a) for a in args):
            return f"a port-forward spec in `{' '.join(proc.args)[:200]}`"
        if proc.name in SSH_CLIENTS and any(_FORWARD_FLAGS.match(a) and "N" in a for a in args):
            return f"ssh -N (no remote command) in `{' '.join(proc.args)[:200]}`"
    return None


def reverse_tunnel_score(event, ctx: Context) -> Iterator[Finding]:
    if isinstance(event, NetworkEvent):
        if event.action != "flow_updated" or event.transport != "tcp" or event.direction != "egress":
            return
    elif not isinstance(event, PayloadSeen) or event.transport != "tcp":
        return
    flow = ctx.flow_of(event.cookie)
    if flow is None or not flow.initiated:
        return
    now_ns = flow.latest.header.ts_ns if flow.latest else flow.start_ns
    if isinstance(event, NetworkEvent) and event.duration_ns:
        now_ns = flow.start_ns + event.duration_ns
    signals = score(flow, event.process, ctx, now_ns)
    total = sum(points for points, _ in signals)
    if total >= ctx.config.reverse_tunnel.alert_score:
        target = where(event) if isinstance(event, NetworkEvent) else f"{flow.remote.ip}:{flow.remote.port}"
        yield Finding(rules.REVERSE_TUNNEL, ("pid", event.process.pid if event.process else event.cookie),
                      f"{who(event.process)} in episode {event.episode.id} keeps an outbound flow to {target} "
                      f"that looks like a tunnel (score {total}): " + "; ".join(why for _, why in signals),
                      min(100, total), [event] if isinstance(event, NetworkEvent) else [])


def detectors() -> tuple:
    return (reverse_tunnel_score,)

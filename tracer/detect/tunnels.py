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

from ..decoding import is_loopback
from ..events import NetworkEvent, PayloadSeen
from . import Context, Finding, rules, who

SSH_CLIENTS = {"ssh", "dbclient", "autossh", "scp", "sftp", "rsync", "git", "sshpass", "mosh-client"}
_FORWARD_SPEC = re.compile(r"^(\[?[\w.:-]+\]?:)?\d{1,5}:[\w.\-\[\]:]+:\d{1,5}$")   # [bind:]port:host:hostport
_FORWARD_FLAGS = re.compile(r"^-[A-Za-z]*[NRDLw][A-Za-z]*$")


def score(flow, process, ctx: Context, age_s: float) -> list[tuple[int, str]]:
    """(points, why) for each signal the flow shows, at the flow's age age_s."""
    signals: list[tuple[int, str]] = []
    dport = flow.remote.port if flow.remote else 0
    long_s = ctx.config.flows.long_flow_seconds
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
    relays = ctx.flows.local_flows_since(process.pid, flow.start_ns) if process and ctx.flows else 0
    if relays:
        signals.append((30, f"local relay: {relays} loopback connection(s) by it or a descendant while the flow "
                            "is open"))
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


def _is_local_connection(event) -> bool:
    if not isinstance(event, NetworkEvent) or event.action not in ("connection_established", "connection_accepted"):
        return False
    peer = event.destination if event.action == "connection_established" else event.source
    return peer is not None and is_loopback(peer.ip)


def reverse_tunnel_score(event, ctx: Context) -> Iterator[Finding]:
    """Score outbound TCP flows when something new is known about them: an update, first bytes, a relay."""
    if ctx.flows is None:
        return
    if ctx.flows.outbound_by_pid and _is_local_connection(event):
        # a possible relay: score the outside flows this process and its ancestors hold open, now
        for flow in ctx.flows.open_outbound_of([p.pid for p in ctx.lineage(event.process)]):
            age_s = (event.timestamp_ns - ctx.flows.wall_ns(flow.start_ns)) / 1e9
            yield from _finding(flow, flow.process, ctx, age_s, event)
        return
    if isinstance(event, NetworkEvent):
        if event.action != "flow_updated" or event.transport != "tcp" or event.direction != "egress":
            return
        age_s = (event.duration_ns or 0) / 1e9
    elif isinstance(event, PayloadSeen) and event.transport == "tcp":
        age_s = 0.0      # first bytes come at the start of a flow
    else:
        return
    flow = ctx.flow_of(event.cookie)
    if flow is not None and flow.initiated:
        yield from _finding(flow, event.process, ctx, age_s, event)


def _finding(flow, process, ctx: Context, age_s: float, trigger) -> Iterator[Finding]:
    signals = score(flow, process, ctx, age_s)
    total = sum(points for points, _ in signals)
    if total >= ctx.config.reverse_tunnel.alert_score:
        target = f"{flow.remote.ip}:{flow.remote.port}/tcp" if flow.remote else "an unknown peer"
        yield Finding(rules.REVERSE_TUNNEL, ("pid", process.pid if process else flow.cookie),
                      f"{who(process)} in episode {flow.episode.id} keeps an outbound flow to {target} "
                      f"that looks like a tunnel (score {total}): " + "; ".join(why for _, why in signals),
                      min(100, total), [trigger] if isinstance(trigger, NetworkEvent) else [])


reverse_tunnel_score.sees_loopback = True     # a loopback connection may be a relay (see Engine)


def detectors() -> tuple:
    return (reverse_tunnel_score,)

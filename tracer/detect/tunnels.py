"""reverse_tunnel by behaviour: outbound flows scored on several signals, and relays caught by timing.

Duration alone is weak (model downloads run for minutes), so points add up
from independent signals, after the field's scored model
(shared/research/detection-heuristics.md); the alert goes out when the sum
reaches [reverse_tunnel] alert_score. Every weight is in the config.

Relay correlation (Zhang and Paxson's stepping stones, on the kernel's burst
records): a flow to the outside is relayed when a local flow of the same
episode mirrors it. The remote speaks (a burst in), and within mirror_ms the
same bytes go out on a local flow, or a local flow is connected; the local
answer comes in, and within mirror_ms it goes out to the remote. Sizes match
within the framing a tunnel adds (TLS records, WebSocket frames, SSH packets).
exchanges_to_alert such exchanges alert at once; fewer add to the score.
Direction matters: when the local side spoke first (a forward proxy's client),
the pair never counts. Argv that names a tunnel outright is handled in
commands.py and alerts at once.
"""
from __future__ import annotations

import os
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Protocol

from ..config import ReverseTunnel
from ..decoding import is_loopback
from ..events import Burst, Endpoint, NetworkEvent, PayloadSeen, Process
from . import Context, Finding, rules, who

SSH_CLIENTS = {"ssh", "dbclient", "autossh", "scp", "sftp", "rsync", "git", "sshpass", "mosh-client"}
_FORWARD_SPEC = re.compile(r"^(\[?[\w.:-]+\]?:)?\d{1,5}:[\w.\-\[\]:]+:\d{1,5}$")   # [bind:]port:host:hostport
_FORWARD_FLAGS = re.compile(r"^-[A-Za-z]*[NRDLw][A-Za-z]*$")
SHRINK_BYTES = 8          # a relayed burst may lose this much (a proxy that rewrites headers loses more)
RECENT_BURSTS = 256       # bursts kept per episode and kind for matching (pruned by mirror_ms anyway)
MAX_EPISODES = 4096
MAX_PAIRS = 4096          # (outside flow, local flow) pairs remembered per episode
MAX_STEPS = 8             # mirrored bursts described per pair


class FlowView(Protocol):
    """What the tunnel detectors read of a flow (state.flows.Flow; a fake in unit tests)."""
    cookie: int
    start_ns: int             # CLOCK_MONOTONIC
    initiated: bool
    transport: str
    remote: Endpoint | None
    local: Endpoint | None
    process: Process | None
    sightings: list
    latest: object            # the last NetRecord of a flow update: gaps, exchanges_in/out

    @property
    def is_local(self) -> bool: ...

    def saw(self, protocol: str, **details) -> bool: ...


@dataclass(frozen=True)
class FlowFacts:
    """Everything the score weighs, gathered from a flow and its process: score() is pure."""
    age_s: float
    remote_port: int
    ssh: bool = False
    ssh_in_upgrade: bool = False
    first_out_protocol: str | None = None
    program: str = ""                     # basename of the executable (or comm)
    local_relays: int = 0                 # loopback connections by it or a descendant while the flow is open
    forward_argv: str | None = None       # a port-forward spec or ssh -N, quoted
    gaps: tuple[int, ...] = ()            # silences by length (kernel activity)
    exchanges_in: int = 0
    exchanges_out: int = 0
    mirrored_exchanges: int = 0           # relay correlation on this flow


def score(facts: FlowFacts, cfg: ReverseTunnel, long_flow_s: float) -> list[tuple[int, str]]:
    """(points, why) for each signal the flow shows."""
    signals: list[tuple[int, str]] = []
    port = facts.remote_port
    if facts.age_s >= long_flow_s:
        signals.append((cfg.long_flow_points, f"open {facts.age_s:.0f} s (long-flow threshold {long_flow_s:.0f} s)"))
    if facts.ssh:
        signals.append((cfg.ssh_on_22_points, "SSH on port 22") if port == 22 else
                       (cfg.ssh_off_22_points, f"SSH on port {port}"))
        if facts.program and facts.program not in SSH_CLIENTS and not facts.program.startswith("git"):
            signals.append((cfg.ssh_not_a_client_points, f"SSH spoken by {facts.program!r}, not an SSH client"))
        if facts.ssh_in_upgrade:
            signals.append((cfg.ssh_in_upgrade_points, "SSH inside an HTTP 101 upgrade"))
    if port == 443 and facts.first_out_protocol is not None and facts.first_out_protocol != "tls":
        signals.append((cfg.not_tls_on_443_points, f"{facts.first_out_protocol} instead of TLS on port 443"))
    if facts.mirrored_exchanges:     # the stronger form of the local relay below: the two never add up
        signals.append((cfg.mirrored_exchange_points * facts.mirrored_exchanges,
                        f"local relay: {facts.mirrored_exchanges} exchange(s) mirrored on a local flow"))
    elif facts.local_relays:
        signals.append((cfg.local_relay_points, f"local relay: {facts.local_relays} loopback connection(s) by it "
                                                "or a descendant while the flow is open"))
    if facts.forward_argv:
        signals.append((cfg.forward_argv_points, facts.forward_argv))
    total_gaps = sum(facts.gaps)
    if total_gaps >= 3 and max(facts.gaps) >= 0.6 * total_gaps:
        signals.append((cfg.keepalive_points, f"keep-alive cadence ({max(facts.gaps)} of {total_gaps} silences alike)"))
    exchanges = facts.exchanges_in + facts.exchanges_out
    if exchanges >= 5 and facts.exchanges_in >= 0.6 * exchanges:
        signals.append((cfg.peer_starts_points,
                        f"role inversion: the peer started {facts.exchanges_in} of {exchanges} exchanges"))
    return signals


def facts_of(flow: FlowView, process: Process | None, ctx: Context, age_s: float, mirrored: int = 0) -> FlowFacts:
    first_out = next((s for egress, s in flow.sightings if egress), None)
    latest = flow.latest
    return FlowFacts(
        age_s=age_s, remote_port=flow.remote.port if flow.remote else 0, ssh=flow.saw("ssh"),
        ssh_in_upgrade=flow.saw("http", status=101), first_out_protocol=first_out.protocol if first_out else None,
        program=os.path.basename(process.executable or process.name or "") if process else "",
        local_relays=ctx.flows.local_flows_since(process.pid, flow.start_ns) if process and ctx.flows else 0,
        forward_argv=_forward_argv(process, ctx),
        gaps=tuple(latest.gaps) if latest is not None else (),
        exchanges_in=latest.exchanges_in if latest is not None else 0,
        exchanges_out=latest.exchanges_out if latest is not None else 0,
        mirrored_exchanges=mirrored)


def _forward_argv(process, ctx: Context) -> str | None:
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


# ---- relay correlation -------------------------------------------------------------------------------

@dataclass
class _Seen:
    burst: Burst
    peer: str = ""            # a local flow's peer, ip:port (the flow may have ended when it is matched)
    used: bool = False        # mirrored already: one burst mirrors at most one other


@dataclass
class _Pair:
    """An outside flow and a local flow that mirrored each other at least once."""
    reverse: bool             # the remote spoke first (or a local connect followed it)
    local: str                # the local flow's peer, ip:port
    inbound: int = 0          # remote -> local: bursts mirrored, or local connects that followed the remote
    outbound: int = 0         # local answers mirrored out to the remote
    steps: deque = field(default_factory=lambda: deque(maxlen=MAX_STEPS))   # the latest, for the message

    @property
    def exchanges(self) -> int:
        return min(self.inbound, self.outbound) if self.reverse else 0


@dataclass
class _EpisodeRelays:
    remote_in: deque = field(default_factory=lambda: deque(maxlen=RECENT_BURSTS))   # outside flows, bursts in
    local_in: deque = field(default_factory=lambda: deque(maxlen=RECENT_BURSTS))    # local flows, bursts in
    pairs: dict[tuple[int, int], _Pair] = field(default_factory=dict)
    connects_checked: set[int] = field(default_factory=set)                         # local flows seen


def sizes_match(outside: int, local: int, cfg: ReverseTunnel) -> bool:
    """The outside burst carries the local one plus framing (or both are segment-sized first packets)."""
    return -SHRINK_BYTES <= outside - local <= cfg.framing_bytes or min(outside, local) >= cfg.segment_bytes


def _latest_unused(seen: deque, t_ns: int, window_ns: int, size_ok) -> _Seen | None:
    for item in reversed(seen):
        dt = t_ns - item.burst.timestamp_ns
        if dt > window_ns:
            return None
        if 0 <= dt and not item.used and size_ok(item.burst):
            return item
    return None


def _endpoint(e: Endpoint | None) -> str:
    return f"{e.ip}:{e.port}" if e else "?"


class Tunnels:
    """The reverse_tunnel detector: the score on flow events, relay correlation on bursts.
    One per engine: it keeps recent bursts per episode."""
    sees_loopback = True     # a loopback connection may be a relay (see Engine)
    sees_bursts = True

    def __init__(self) -> None:
        self.relays: dict[str, _EpisodeRelays] = {}

    def __call__(self, event, ctx: Context) -> Iterator[Finding]:
        if isinstance(event, Burst):
            return self._burst(event, ctx)
        return self._score_event(event, ctx)

    def mirrored_exchanges(self, episode_id: str, cookie: int) -> int:
        relays = self.relays.get(episode_id)
        if relays is None:
            return 0
        return sum(p.exchanges for (outside, _), p in relays.pairs.items() if outside == cookie)

    # -- the score ---------------------------------------------------------------------
    def _score_event(self, event, ctx: Context) -> Iterator[Finding]:
        """Score outbound flows when something new is known about them: an update, first bytes, a relay."""
        if ctx.flows is None:
            return
        if ctx.flows.outbound_by_pid and _is_local_connection(event):
            # a possible relay: score the outside flows this process and its ancestors hold open, now
            for flow in ctx.flows.open_outbound_of([p.pid for p in ctx.lineage(event.process)]):
                age_s = (event.timestamp_ns - ctx.flows.wall_ns(flow.start_ns)) / 1e9
                yield from self._finding(flow, flow.process, ctx, age_s, event)
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
            yield from self._finding(flow, event.process, ctx, age_s, event)

    def _finding(self, flow: FlowView, process, ctx: Context, age_s: float, trigger) -> Iterator[Finding]:
        cfg = ctx.config.reverse_tunnel
        mirrored = self.mirrored_exchanges(flow.episode.id, flow.cookie)
        signals = score(facts_of(flow, process, ctx, age_s, mirrored), cfg, ctx.config.flows.long_flow_seconds)
        total = sum(points for points, _ in signals)
        if total >= cfg.alert_score:
            yield Finding(rules.REVERSE_TUNNEL, ("pid", process.pid if process else flow.cookie),
                          f"{who(process)} in episode {flow.episode.id} keeps an outbound flow to {_target(flow)} "
                          f"that looks like a tunnel (score {total}): " + "; ".join(why for _, why in signals),
                          min(100, total), [trigger] if isinstance(trigger, (NetworkEvent, Burst)) else [])

    # -- relay correlation ----------------------------------------------------------------
    def _episode(self, episode_id: str) -> _EpisodeRelays:
        relays = self.relays.get(episode_id)
        if relays is None:
            if len(self.relays) >= MAX_EPISODES:
                self.relays.pop(next(iter(self.relays)))
            relays = self.relays[episode_id] = _EpisodeRelays()
        return relays

    def _pair(self, relays: _EpisodeRelays, outside: int, local: int, peer: str, reverse: bool) -> _Pair:
        pair = relays.pairs.get((outside, local))
        if pair is None:
            if len(relays.pairs) >= MAX_PAIRS:
                relays.pairs.pop(next(iter(relays.pairs)))
            pair = relays.pairs[(outside, local)] = _Pair(reverse, peer)
        return pair

    def _burst(self, burst: Burst, ctx: Context) -> Iterator[Finding]:
        flow = ctx.flow_of(burst.cookie)
        if flow is None or ctx.flows is None:
            return
        cfg = ctx.config.reverse_tunnel
        window = int(cfg.mirror_ms * 1e6)
        t = burst.timestamp_ns
        if flow.is_local:
            relays = self._episode(burst.episode.id)
            touched = []
            if relays.remote_in and flow.cookie not in relays.connects_checked:
                if len(relays.connects_checked) >= MAX_PAIRS:
                    relays.connects_checked.clear()
                relays.connects_checked.add(flow.cookie)
                # the remote spoke and the same process (or a child) connected locally: the remote opened a
                # channel. Not another process: a forward proxy's next client may connect just then.
                start = ctx.flows.wall_ns(flow.start_ns)
                lineage = {p.pid for p in ctx.lineage(flow.process)} if flow.initiated else set()
                cause = _latest_unused(relays.remote_in, start, window,
                                       lambda b: b.process is not None and b.process.pid in lineage)
                if cause is not None:
                    touched.append(self._inbound(relays, cause, flow, start, "then a local connect to "
                                                 f"{_endpoint(flow.remote)}"))
            if not burst.egress:
                relays.local_in.append(_Seen(burst, _endpoint(flow.remote)))
            elif relays.remote_in:
                cause = _latest_unused(relays.remote_in, t, window, lambda b: sizes_match(b.bytes, burst.bytes, cfg))
                if cause is not None:
                    touched.append(self._inbound(relays, cause, flow, t, f"local {burst.bytes} B out"))
            for pair, outside in touched:
                yield from self._conclude(relays, pair, outside, burst, ctx)
            return
        if not flow.initiated:
            return              # an inbound connection from outside: inbound_listener's business
        relays = self._episode(burst.episode.id)
        if not burst.egress:
            relays.remote_in.append(_Seen(burst))
            return
        answer = _latest_unused(relays.local_in, t, window, lambda b: sizes_match(burst.bytes, b.bytes, cfg))
        if answer is None:
            return
        answer.used = True
        # a new pair here means the local side spoke first: a forward proxy, never counted
        pair = self._pair(relays, flow.cookie, answer.burst.cookie, answer.peer, reverse=False)
        pair.outbound += 1
        pair.steps.append(f"local {answer.burst.bytes} B in, remote {burst.bytes} B out "
                          f"{(t - answer.burst.timestamp_ns) / 1e6:.1f} ms later")
        yield from self._conclude(relays, pair, burst, answer.burst, ctx)

    def _inbound(self, relays: _EpisodeRelays, cause: _Seen, local: FlowView, t_ns: int,
                 what: str) -> tuple[_Pair, Burst]:
        """The remote's burst `cause` was mirrored on a local flow (or made it connect) at t_ns."""
        cause.used = True
        pair = self._pair(relays, cause.burst.cookie, local.cookie, _endpoint(local.remote), reverse=True)
        pair.inbound += 1
        pair.steps.append(f"remote {cause.burst.bytes} B in, {what} {(t_ns - cause.burst.timestamp_ns) / 1e6:.1f} ms later")
        return pair, cause.burst

    def _conclude(self, relays: _EpisodeRelays, pair: _Pair, outside: Burst, local: Burst,
                  ctx: Context) -> Iterator[Finding]:
        """Alert once the outside flow has exchanges_to_alert mirrored exchanges; score it at the first."""
        if not pair.exchanges:
            return
        cfg = ctx.config.reverse_tunnel
        flow = ctx.flow_of(outside.cookie)
        if flow is None:
            return
        exchanges = self.mirrored_exchanges(outside.episode.id, outside.cookie)
        if exchanges < cfg.exchanges_to_alert:
            age_s = (outside.timestamp_ns - ctx.flows.wall_ns(flow.start_ns)) / 1e9
            yield from self._finding(flow, flow.process, ctx, age_s, outside)
            return
        relayed = [p for (o, _), p in relays.pairs.items() if o == outside.cookie and p.reverse]
        steps = [s for p in relayed for s in p.steps]
        locals_ = sorted({p.local for p in relayed})
        process = flow.process
        yield Finding(rules.REVERSE_TUNNEL, ("pid", process.pid if process else flow.cookie),
                      f"{who(process)} in episode {flow.episode.id} relays its outbound flow to {_target(flow)} "
                      f"to local flows ({', '.join(locals_) or _endpoint(local.destination)}): {exchanges} exchanges "
                      f"started by the remote were mirrored within {cfg.mirror_ms:.0f} ms: " + "; ".join(steps[-8:]),
                      100, [outside, local])


def _target(flow: FlowView) -> str:
    return f"{_endpoint(flow.remote)}/{flow.transport}" if flow.remote else "an unknown peer"


def detectors() -> tuple:
    return (Tunnels(),)

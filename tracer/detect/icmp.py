"""icmp_tunnel: ICMP echo requests that carry data.

The kernel (probes/packets.c) digests each echo request's payload after ping's timestamp and sums,
per episode and destination, the echoes whose payload changed from the one before (or a first one
longer than `[icmp] large_payload_bytes`): a ping repeats its fill pattern, a tunnel does not. It
reports those sums only when they grow (decoding.IcmpRecord); the rule alerts when they pass
`[icmp] data_echoes` or `[icmp] data_bytes`, counted since the first echo to that destination, or when
the data bytes to all the episode's destinations pass `[icmp] episode_data_bytes`.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterator

from ..events import IcmpEchoes
from . import Context, Finding, rules, who
from .rules import RISK

MAX_EPISODES = 4096         # episodes whose destinations are remembered; the least recently used go first
MAX_DESTINATIONS = 1024     # destinations per episode; beyond, each report counts in full (over, never under)
OTHERS = "(others)"


class IcmpTunnel:
    """Data echoes to one destination, or to all of an episode's."""

    def __init__(self) -> None:
        self._sent: OrderedDict[str, dict[str, int]] = OrderedDict()   # episode -> destination -> data bytes
        self.evicted = 0          # episodes forgotten for room (tracer stats)

    def __call__(self, event, ctx: Context) -> Iterator[Finding]:
        if not isinstance(event, IcmpEchoes):
            return
        limits = ctx.config.icmp
        how = f"through a {'ping' if event.socket_type == 'SOCK_DGRAM' else 'raw'} socket"
        if event.data_echoes >= limits.data_echoes or event.data_bytes >= limits.data_bytes:
            seconds = max(0, event.timestamp_ns - event.first_ns) / 1e9
            yield Finding(rules.ICMP_TUNNEL, ("destination", event.destination.ip),
                          f"{who(event.process)} in episode {event.episode.id} sent {event.data_echoes} ICMP echo "
                          f"requests carrying data ({event.data_bytes} payload bytes, the largest {event.largest}) "
                          f"to {event.destination.ip} in {seconds:.1f} s, of {event.echoes} echoes there, {how} "
                          f"(limits {limits.data_echoes} echoes or {limits.data_bytes} bytes)", RISK.icmp_data,
                          [event])
        sent = self._sent.pop(event.episode.id, None) or {}
        self._sent[event.episode.id] = sent
        if len(self._sent) > MAX_EPISODES:
            self._sent.popitem(last=False)
            self.evicted += 1
        if event.destination.ip in sent or len(sent) < MAX_DESTINATIONS:
            sent[event.destination.ip] = event.data_bytes
        else:
            sent[OTHERS] = sent.get(OTHERS, 0) + event.data_bytes
        total = sum(sent.values())
        if total >= limits.episode_data_bytes:
            yield Finding(rules.ICMP_TUNNEL, ("episode",),
                          f"{who(event.process)} in episode {event.episode.id} sent {total} payload bytes in ICMP "
                          f"echo requests carrying data to {len(sent)} destinations, the latest {event.destination.ip} "
                          f"{how} (limit {limits.episode_data_bytes} bytes)", RISK.icmp_data, [event])


def detectors() -> tuple:
    return (IcmpTunnel(),)

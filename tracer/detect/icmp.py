"""icmp_tunnel: ICMP echo requests that carry data.

The kernel (probes/packets.c) digests each echo request's payload after ping's timestamp and sums,
per episode and destination, the echoes whose payload changed from the one before (or a first one
longer than `[icmp] large_payload_bytes`): a ping repeats its fill pattern, a tunnel does not. It
reports those sums only when they grow (decoding.IcmpRecord); the rule alerts when they pass
`[icmp] data_echoes` or `[icmp] data_bytes`, counted since the first echo to that destination.
"""
from __future__ import annotations

from typing import Iterator

from ..events import IcmpEchoes
from . import Context, Finding, rules, who
from .rules import RISK


def icmp_tunnel(event, ctx: Context) -> Iterator[Finding]:
    if not isinstance(event, IcmpEchoes):
        return
    limits = ctx.config.icmp
    if event.data_echoes < limits.data_echoes and event.data_bytes < limits.data_bytes:
        return
    seconds = max(0, event.timestamp_ns - event.first_ns) / 1e9
    yield Finding(rules.ICMP_TUNNEL, ("destination", event.destination.ip),
                  f"{who(event.process)} in episode {event.episode.id} sent {event.data_echoes} ICMP echo "
                  f"requests carrying data ({event.data_bytes} payload bytes, the largest {event.largest}) to "
                  f"{event.destination.ip} in {seconds:.1f} s, of {event.echoes} echoes there, through a "
                  f"{'ping' if event.socket_type == 'SOCK_DGRAM' else 'raw'} socket (limits "
                  f"{limits.data_echoes} echoes or {limits.data_bytes} bytes)", RISK.icmp_data, [event])


DETECTORS = (icmp_tunnel,)

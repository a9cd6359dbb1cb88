"""Rules on what flows say in their first bytes and DNS queries: Stratum mining,
metadata hostnames (DNS tunnels: dns.py)."""
from __future__ import annotations

from typing import Iterator

from ..events import PayloadSeen
from . import Context, Finding, rules, who
from .rules import RISK


def stratum(event, ctx: Context) -> Iterator[Finding]:
    if isinstance(event, PayloadSeen) and event.protocol == "stratum":
        method = event.details.get("method")
        yield Finding(rules.CRYPTO_MINING, ("pid", event.process.pid if event.process else None),
                      f"{who(event.process)} in episode {event.episode.id} speaks the Stratum mining protocol "
                      f"with {_peer(event)}: JSON-RPC method {method!r}", RISK.stratum, [event])


def metadata_hostname(event, ctx: Context) -> Iterator[Finding]:
    if isinstance(event, PayloadSeen) and event.protocol == "dns":
        name = (event.details.get("qname") or "").rstrip(".").lower()
        if name in ctx.config.cloud_metadata.hostnames:
            yield Finding(rules.CLOUD_METADATA_ACCESS, ("dns", name),
                          f"{who(event.process)} in episode {event.episode.id} looked up the cloud metadata "
                          f"host {name}", rules.CLOUD_METADATA_ACCESS.severity, [])


def _peer(event: PayloadSeen) -> str:
    dst = event.destination if event.egress else event.source
    return f"{dst.ip}:{dst.port}" if dst else "an unknown peer"


def detectors() -> tuple:
    return (stratum, metadata_hostname)


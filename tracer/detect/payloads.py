"""Rules on what flows say in their first bytes and DNS queries: Stratum mining,
metadata hostnames, DNS tunnels."""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Iterator

from ..events import PayloadSeen
from . import Context, Finding, rules, who

MAX_DOMAINS = 4096      # (episode, domain) windows remembered


def stratum(event, ctx: Context) -> Iterator[Finding]:
    if isinstance(event, PayloadSeen) and event.protocol == "stratum":
        method = event.details.get("method")
        yield Finding(rules.CRYPTO_MINING, ("pid", event.process.pid if event.process else None),
                      f"{who(event.process)} in episode {event.episode.id} speaks the Stratum mining protocol "
                      f"with {_peer(event)}: JSON-RPC method {method!r}", 90, [event])


def metadata_hostname(event, ctx: Context) -> Iterator[Finding]:
    if isinstance(event, PayloadSeen) and event.protocol == "dns":
        name = (event.details.get("qname") or "").rstrip(".").lower()
        if name in ctx.config.cloud_metadata.hostnames:
            yield Finding(rules.CLOUD_METADATA_ACCESS, ("dns", name),
                          f"{who(event.process)} in episode {event.episode.id} looked up the cloud metadata "
                          f"host {name}", rules.CLOUD_METADATA_ACCESS.severity, [])


class DnsTunnel:
    """Long query names, or many distinct names under one domain in a window, per episode."""

    def __init__(self) -> None:
        self._windows: OrderedDict[tuple[str, str], tuple[float, set[str]]] = OrderedDict()

    def __call__(self, event, ctx: Context) -> Iterator[Finding]:
        if not isinstance(event, PayloadSeen) or event.protocol != "dns":
            return
        name = (event.details.get("qname") or "").rstrip(".").lower()
        limits = ctx.config.dns
        if ctx.config.allowlist.domains and any(name == d or name.endswith("." + d)
                                                for d in ctx.config.allowlist.domains):
            return
        domain = base_domain(name)
        if len(name) > limits.long_query_chars:
            yield Finding(rules.DNS_TUNNEL, ("long", domain),
                          f"{who(event.process)} in episode {event.episode.id} queried a {len(name)}-character "
                          f"name under {domain} (limit {limits.long_query_chars}): {name[:120]}", 80, [])
        now = time.monotonic()
        key = (event.episode.id, domain)
        start, names = self._windows.pop(key, (now, set()))
        if now - start > limits.window_seconds:
            start, names = now, set()
        names.add(name)
        self._windows[key] = (start, names)
        if len(self._windows) > MAX_DOMAINS:
            self._windows.popitem(last=False)
        if len(names) > limits.unique_subdomains:
            yield Finding(rules.DNS_TUNNEL, ("many", domain),
                          f"{who(event.process)} in episode {event.episode.id} queried {len(names)} distinct names "
                          f"under {domain} within {limits.window_seconds:.0f} s (limit {limits.unique_subdomains})",
                          80, [])


def base_domain(name: str) -> str:
    """The registrable part of a name, roughly: the last two labels, three under short second levels."""
    labels = name.split(".")
    take = 3 if len(labels) >= 3 and len(labels[-2]) <= 3 and len(labels[-1]) == 2 else 2
    return ".".join(labels[-take:])


def _peer(event: PayloadSeen) -> str:
    dst = event.destination if event.egress else event.source
    return f"{dst.ip}:{dst.port}" if dst else "an unknown peer"


def detectors() -> tuple:
    return (stratum, metadata_hostname, DnsTunnel())


"""Rules on where the sandbox connects and what sockets it opens:
cloud_metadata_access, raw_socket, inbound_listener, egress_denied and ingress_denied."""
from __future__ import annotations

from typing import Iterator

from ..decoding import is_loopback
from ..events import NetworkEvent
from . import Context, Finding, rules, where, who

OUTBOUND = ("connection_attempted", "udp_sent")


def cloud_metadata(event, ctx: Context) -> Iterator[Finding]:
    if not isinstance(event, NetworkEvent) or event.action not in OUTBOUND or event.destination is None:
        return
    ip = event.destination.ip
    if ip in ctx.config.cloud_metadata.addresses:
        yield Finding(rules.CLOUD_METADATA_ACCESS, (event.process and event.process.pid, ip),
                      f"{who(event.process)} in episode {event.episode.id} connected to the cloud metadata "
                      f"service at {where(event)}, where instance credentials are served",
                      rules.CLOUD_METADATA_ACCESS.severity, [event])


def raw_socket(event, ctx: Context) -> Iterator[Finding]:
    if not isinstance(event, NetworkEvent) or event.action != "socket_created" or event.outcome == "failure":
        return
    if event.socket_type == "SOCK_RAW" or event.socket_family == "AF_PACKET":
        kind = f"{event.socket_family} {event.socket_type} protocol {event.socket_protocol}"
        yield Finding(rules.RAW_SOCKET, (event.process and event.process.pid, kind),
                      f"{who(event.process)} in episode {event.episode.id} opened a raw socket ({kind}): it can "
                      "craft packets and tunnel outside TCP/UDP", rules.RAW_SOCKET.severity, [event])


def inbound_listener(event, ctx: Context) -> Iterator[Finding]:
    if not isinstance(event, NetworkEvent) or event.action != "connection_accepted" or event.source is None \
            or event.outcome == "failure":          # refused by the policy: ingress_denied
        return
    src = event.source.ip
    if src and not is_loopback(src):
        listener = event.destination.port if event.destination else "?"
        yield Finding(rules.INBOUND_LISTENER, (listener, src),
                      f"{who(event.process)} in episode {event.episode.id} accepted a connection from {src} on its "
                      f"listener port {listener}: the sandbox is reachable from outside",
                      rules.INBOUND_LISTENER.severity, [event])


def egress_denied(event, ctx: Context) -> Iterator[Finding]:
    if not isinstance(event, NetworkEvent) or not event.denied_by:
        return
    if event.direction == "ingress":          # a listener's refusal: once per source address and listener
        src = event.source.ip if event.source else "?"
        listener = event.destination.port if event.destination else "?"
        yield Finding(rules.INGRESS_DENIED, (src, listener),
                      f"a connection from {src} to the listener on port {listener} of {who(event.process)} in "
                      f"episode {event.episode.id} was refused by its policy ({event.denied_by})",
                      rules.INGRESS_DENIED.severity, [event])
        return
    target = where(event) if event.destination else f"a {event.socket_family} {event.socket_type} socket"
    yield Finding(rules.EGRESS_DENIED, (event.process and event.process.pid, event.action, target),
                  f"{who(event.process)} in episode {event.episode.id}: {target} refused by its policy "
                  f"({event.denied_by})", rules.EGRESS_DENIED.severity, [event])


DETECTORS = (cloud_metadata, raw_socket, inbound_listener, egress_denied)

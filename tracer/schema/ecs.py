"""Typed events -> ECS 9.x documents (plain nested dicts, ready for JSON).

This is the one place that knows the event contract of DESIGN.md. Fields that
are unknown are left out: a document never carries None or empty placeholders.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any

from tracer.events import Episode, Metric, NetworkEvent, Process, ProcessEvent
from tracer.schema.community_id import community_id

ECS_VERSION = "9.4.0"
AGENT_NAME = "eptrace"

# event.action -> (event.category, event.type). Values are ECS allowed values;
# the network category allows: access, allowed, connection, denied, end, info,
# protocol, start. We never claim allowed/denied: no policy decided anything yet.
NETWORK_ACTIONS: dict[str, tuple[list[str], list[str]]] = {
    "socket_created": (["network"], ["info"]),           # no peer yet: a fact about the socket
    "connection_attempted": (["network"], ["connection", "start"]),
    "connection_established": (["network"], ["connection", "start"]),
    "connection_accepted": (["network"], ["connection", "start"]),
    "listening": (["network"], ["info"]),                # a listener, not a connection
    "udp_sent": (["network"], ["connection", "start"]),  # first datagram = start of a UDP flow
    "flow_updated": (["network"], ["connection", "info"]),
    "flow_ended": (["network"], ["connection", "end"]),
}
PROCESS_ACTIONS: dict[str, tuple[list[str], list[str]]] = {
    "process_started": (["process"], ["start"]),
    "process_ended": (["process"], ["end"]),
}
# Tracer health: ECS has no "self-monitoring" category; host/info is the closest.
METRIC_ACTION = "stats"
METRIC_CATEGORY_TYPE: tuple[list[str], list[str]] = (["host"], ["info"])

# A connection that got this far did succeed, whether or not decoding said so.
_IMPLIED_SUCCESS = frozenset({"connection_established", "connection_accepted"})

# network.transport -> IANA protocol number (network.iana_number, Community ID).
IANA_NUMBERS: dict[str, int] = {"icmp": 1, "tcp": 6, "udp": 17, "ipv6-icmp": 58, "sctp": 132}
_PORT_TRANSPORTS = frozenset({"tcp", "udp", "sctp"})
# ICMP has no ports, and the tuple we get does not carry the message type. Probes
# see ping sockets (echo only) and raw ICMP; we hash as echo, which is what
# Zeek/Suricata compute for ping flows (request and reply hash alike).
_ICMP_ECHO_TYPE = {"icmp": 8, "ipv6-icmp": 128}


def format_timestamp(ns: int) -> str:
    """RFC 3339 UTC with microseconds, e.g. 2026-11-27T23:00:45.123456Z."""
    seconds, rest = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{rest // 1000:06d}Z"


def to_json(doc: dict[str, Any]) -> str:
    """One compact JSON line (no trailing newline)."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


def _put(doc: dict[str, Any], dotted: str, value: Any) -> None:
    """Set doc[a][b][c] = value for "a.b.c", skipping unknown (None) and empty values."""
    if value is None or value == "" or value == [] or value == {}:
        return
    *parents, leaf = dotted.split(".")
    for key in parents:
        doc = doc.setdefault(key, {})
    doc[leaf] = value


class EcsEncoder:
    """Encodes the events of one tracer run, numbering them with event.sequence."""

    def __init__(self, host_name: str, agent_version: str, run_id: str | None = None) -> None:
        self.host_name = host_name
        self.agent_version = agent_version
        # A random prefix keeps event.id unique across runs even if run_id is reused.
        self._id_prefix = uuid.uuid4().hex[:16]
        self.run_id = run_id or self._id_prefix
        self._sequence = 0

    @property
    def sequence(self) -> int:
        """The last event.sequence handed out (0 before the first document)."""
        return self._sequence

    def encode(self, event: NetworkEvent | ProcessEvent | Metric) -> dict[str, Any]:
        if isinstance(event, NetworkEvent):
            return self._network(event)
        if isinstance(event, ProcessEvent):
            return self._process_event(event)
        if isinstance(event, Metric):
            return self._metric(event)
        # Alerts (event.kind "alert", rule.*, threat.*, message, related.*) get their
        # branch here once tracer.detect defines them.
        raise TypeError(f"cannot encode {type(event).__name__} as ECS")

    # --- document kinds -------------------------------------------------------

    def _network(self, ev: NetworkEvent) -> dict[str, Any]:
        category, types = _lookup(NETWORK_ACTIONS, ev.action)
        outcome = ev.outcome or ("success" if ev.action in _IMPLIED_SUCCESS else None)
        doc = self._base(ev.timestamp_ns, "event", category, types, ev.action, "network", outcome)
        self._sandbox(doc, ev.episode, ev.cgroup_id, ev.cgroup_path, ev.process)

        for side, endpoint in (("source", ev.source), ("destination", ev.destination)):
            if endpoint is not None:
                _put(doc, f"{side}.ip", endpoint.ip)
                _put(doc, f"{side}.port", endpoint.port or None)  # 0 = not known (yet)
        _put(doc, "network.transport", ev.transport)
        iana = IANA_NUMBERS.get(ev.transport or "")
        if iana is not None:
            _put(doc, "network.iana_number", str(iana))  # ECS keyword
        _put(doc, "network.type", ev.network_type)
        _put(doc, "network.direction", ev.direction)
        _put(doc, "network.community_id", _flow_community_id(ev))

        _put(doc, "event.duration", ev.duration_ns)
        _put(doc, "source.bytes", ev.source_bytes)
        _put(doc, "destination.bytes", ev.destination_bytes)
        _put(doc, "source.packets", ev.source_packets)
        _put(doc, "destination.packets", ev.destination_packets)
        if ev.source_bytes is not None and ev.destination_bytes is not None:
            _put(doc, "network.bytes", ev.source_bytes + ev.destination_bytes)
        if ev.source_packets is not None and ev.destination_packets is not None:
            _put(doc, "network.packets", ev.source_packets + ev.destination_packets)
        _put(doc, "error.message", ev.error_message)

        _put(doc, "eptrace.socket.family", ev.socket_family)
        _put(doc, "eptrace.socket.type", ev.socket_type)
        _put(doc, "eptrace.socket.protocol", ev.socket_protocol)
        _put(doc, "eptrace.socket.cookie", ev.cookie or None)
        return doc

    def _process_event(self, ev: ProcessEvent) -> dict[str, Any]:
        category, types = _lookup(PROCESS_ACTIONS, ev.action)
        outcome = None
        if ev.action == "process_ended" and ev.process.exit_code is not None:
            outcome = "success" if ev.process.exit_code == 0 else "failure"
        doc = self._base(ev.timestamp_ns, "event", category, types, ev.action, "process", outcome)
        self._sandbox(doc, ev.episode, ev.cgroup_id, ev.cgroup_path, ev.process)
        return doc

    def _metric(self, ev: Metric) -> dict[str, Any]:
        category, types = METRIC_CATEGORY_TYPE
        doc = self._base(ev.timestamp_ns, "metric", category, types, METRIC_ACTION, "health", None)
        doc.setdefault("eptrace", {})["stats"] = dict(ev.stats)  # zeros matter: keep them all
        return doc

    # --- shared parts ---------------------------------------------------------

    def _base(self, ts_ns: int, kind: str, category: list[str], types: list[str],
              action: str, dataset: str, outcome: str | None) -> dict[str, Any]:
        self._sequence += 1
        doc: dict[str, Any] = {"@timestamp": format_timestamp(ts_ns), "ecs": {"version": ECS_VERSION}}
        _put(doc, "event.id", f"{self._id_prefix}-{self._sequence}")
        _put(doc, "event.sequence", self._sequence)
        _put(doc, "event.kind", kind)
        _put(doc, "event.category", list(category))
        _put(doc, "event.type", list(types))
        _put(doc, "event.action", action)
        _put(doc, "event.outcome", outcome)
        _put(doc, "event.module", AGENT_NAME)
        _put(doc, "event.dataset", f"{AGENT_NAME}.{dataset}")
        _put(doc, "host.name", self.host_name)
        _put(doc, "agent.name", AGENT_NAME)
        _put(doc, "agent.type", AGENT_NAME)
        _put(doc, "agent.version", self.agent_version)
        _put(doc, "eptrace.run.id", self.run_id)
        return doc

    @staticmethod
    def _sandbox(doc: dict[str, Any], episode: Episode, cgroup_id: int, cgroup_path: str,
                 process: Process | None) -> None:
        labels = {str(k): str(v) for k, v in episode.labels.items()}
        labels["episode_id"] = episode.id  # the episode id wins over a label of that name
        doc["labels"] = labels
        _put(doc, "eptrace.cgroup.id", cgroup_id)
        _put(doc, "eptrace.cgroup.path", cgroup_path)
        _put(doc, "eptrace.episode.cgroup.id", episode.cgroup_id)
        _put(doc, "eptrace.episode.cgroup.path", episode.cgroup_path)
        if process is None:
            return
        _put(doc, "process.pid", process.pid)
        _put(doc, "process.name", process.name)
        _put(doc, "process.executable", process.executable)
        if process.args:
            _put(doc, "process.args", list(process.args))
            _put(doc, "process.args_count", len(process.args))
        _put(doc, "process.parent.pid", process.parent_pid)
        _put(doc, "process.thread.id", process.thread_id)
        if process.start_ns is not None:
            _put(doc, "process.start", format_timestamp(process.start_ns))
        _put(doc, "process.exit_code", process.exit_code)


def _lookup(table: dict[str, tuple[list[str], list[str]]], action: str) -> tuple[list[str], list[str]]:
    try:
        return table[action]
    except KeyError:
        raise ValueError(f"unknown event.action {action!r}: add it to the tables in "
                         f"tracer/schema/ecs.py (known: {', '.join(table)})") from None


def _flow_community_id(ev: NetworkEvent) -> str | None:
    """Community ID of the flow, or None when the tuple is not complete enough."""
    transport = ev.transport or ""
    proto = IANA_NUMBERS.get(transport)
    if proto is None or ev.source is None or ev.destination is None:
        return None
    if transport in _PORT_TRANSPORTS:
        if not ev.source.port or not ev.destination.port:
            return None  # a hash without the real ports would match no other sensor
        sport, dport = ev.source.port, ev.destination.port
    else:
        sport, dport = _ICMP_ECHO_TYPE[transport], 0
    try:
        return community_id(ev.source.ip, sport, ev.destination.ip, dport, proto)
    except ValueError:
        return None  # e.g. mixed address families: no id rather than a wrong one


# --- human rendering for the demo and for terminals ------------------------------

def format_human(doc: dict[str, Any]) -> str:
    """One readable line, e.g.
    23:00:45.123 [ep-7] python3(1234) connection_established tcp 198.51.100.2:41234 -> 198.51.100.1:80
    """
    event = doc.get("event", {})
    ts = str(doc.get("@timestamp", ""))
    parts = [ts[11:23] if len(ts) >= 23 else ts]
    episode = doc.get("labels", {}).get("episode_id")
    if episode:
        parts.append(f"[{episode}]")
    process = doc.get("process", {})
    if "pid" in process:
        parts.append(f"{process.get('name') or '?'}({process['pid']})")
    action = event.get("action", "?")
    parts.append(action)

    if event.get("kind") == "metric":
        stats = doc.get("eptrace", {}).get("stats", {})
        parts.extend(f"{k}={v}" for k, v in stats.items())
    elif action == "process_started":
        parts.append(process.get("executable") or process.get("name") or "?")
        parts.append(_shorten(" ".join(process.get("args", []))))
    elif action == "process_ended" and "exit_code" in process:
        parts.append(f"exit={process['exit_code']}")
    else:
        parts.extend(_network_words(doc))
    if event.get("outcome") == "failure":
        parts.append("FAILED" + (f": {doc['error']['message']}" if "error" in doc else ""))
    return " ".join(p for p in parts if p)


def _network_words(doc: dict[str, Any]) -> list[str]:
    words: list[str] = []
    network = doc.get("network", {})
    words.append(network.get("transport", ""))
    sock = doc.get("eptrace", {}).get("socket", {})
    if "family" in sock or "type" in sock:
        words += [sock.get("family", ""), sock.get("type", "")]
        if "protocol" in sock:
            words.append(f"proto={sock['protocol']}")
    src, dst = _address(doc.get("source")), _address(doc.get("destination"))
    if src and dst:
        words += [src, "->", dst]
    elif src or dst:
        words.append(src or dst)
    # source.bytes is what source sent; the sandbox is the source of egress flows.
    out_key, in_key = ("source", "destination")
    if network.get("direction") == "ingress":
        out_key, in_key = in_key, out_key
    sent, received = doc.get(out_key, {}).get("bytes"), doc.get(in_key, {}).get("bytes")
    if sent is not None or received is not None:
        words += [f"{sent if sent is not None else '?'}B out", f"{received if received is not None else '?'}B in"]
    duration = doc.get("event", {}).get("duration")
    if duration is not None:
        words.append(f"{duration / 1e9:.2f}s")
    return words


def _address(side: dict[str, Any] | None) -> str:
    if not side or "ip" not in side:
        return ""
    ip = side["ip"]
    if "port" not in side:
        return ip
    return f"[{ip}]:{side['port']}" if ":" in ip else f"{ip}:{side['port']}"


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"

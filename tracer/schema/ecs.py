"""Typed events -> ECS 9.4.0 documents (plain nested dicts, ready for JSON).

This is the one place that knows the event contract of DESIGN.md. Fields that
are unknown are left out: a document never carries None or empty placeholders.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any

from tracer.events import Alert, Episode, Metric, NetworkEvent, Process, ProcessEvent
from tracer.schema.community_id import community_id
from tracer.schema.document import ECS_VERSION, Document
from tracer.terminal import printable

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
# Alerts: event.kind alert; the rule's name is the action.
ALERT_CATEGORY_TYPE: tuple[list[str], list[str]] = (["intrusion_detection", "network"], ["info"])
THREAT_FRAMEWORK = "MITRE ATT&CK"
# Tracer health: ECS has no "self-monitoring" category; host/info is the closest.
METRIC_ACTION = "stats"
METRIC_CATEGORY_TYPE: tuple[list[str], list[str]] = (["host"], ["info"])

# The JSON of every category/type list above, by identity (they are constants).
_LISTS = {id(lst): json.dumps(lst, separators=(",", ":")) for table in (NETWORK_ACTIONS, PROCESS_ACTIONS,
                                                 {"m": METRIC_CATEGORY_TYPE, "a": ALERT_CATEGORY_TYPE})
          for pair in table.values() for lst in pair}

# A connection that got this far did succeed, whether or not decoding said so.
_IMPLIED_SUCCESS = frozenset({"connection_established", "connection_accepted"})

# network.transport -> IANA protocol number (network.iana_number, Community ID). ECS wants IANA keywords
# in network.transport: our other words ("raw", "packet": a raw or packet socket) go to eptrace.transport.
IANA_NUMBERS: dict[str, int] = {"icmp": 1, "tcp": 6, "udp": 17, "ipv6-icmp": 58, "sctp": 132, "udplite": 136}
_PORT_TRANSPORTS = frozenset({"tcp", "udp", "sctp"})
# ICMP has no ports, and the tuple we get does not carry the message type. Probes
# see ping sockets (echo only) and raw ICMP; we hash as echo, which is what
# Zeek/Suricata compute for ping flows (request and reply hash alike).
_ICMP_ECHO_TYPE = {"icmp": 8, "ipv6-icmp": 128}


_last_second = -1
_last_prefix = ""


def format_timestamp(ns: int) -> str:
    """RFC 3339 UTC with microseconds, e.g. 2026-11-27T23:00:45.123456Z."""
    global _last_second, _last_prefix
    seconds, rest = divmod(ns, 1_000_000_000)
    if seconds != _last_second:   # strftime is the slow part; events come many per second
        _last_second, _last_prefix = seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{_last_prefix}.{rest // 1000:06d}Z"


def to_json(doc: dict[str, Any]) -> str:
    """One compact JSON line (no trailing newline)."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


# One encoder, built once: json.dumps with options would build a new one per call.
_j = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_s = json.encoder.encode_basestring      # what _j does with a str: "..." with escapes, non-ASCII kept


class EcsEncoder:
    """Encodes the events of one tracer run, numbering them with event.sequence.

    This is the tracer's hot path, so a document is written as JSON text
    directly, from parts that repeat (the run, an episode's labels, a process)
    serialized once and cached. Only values that need escaping go through json.
    """

    def __init__(self, host_name: str, agent_version: str, run_id: str | None = None) -> None:
        self.host_name = host_name
        self.agent_version = agent_version
        # A random prefix keeps event.id unique across runs even if run_id is reused.
        self._id_prefix = uuid.uuid4().hex[:16]
        self.run_id = run_id or self._id_prefix
        self._sequence = 0
        self._tail = (f',"host":{{"name":{_j(host_name)}}},"agent":{{"name":"{AGENT_NAME}","type":"{AGENT_NAME}",'
                      f'"version":{_j(agent_version)}}}')
        self._run = f'"run":{{"id":{_j(self.run_id)}}}'
        self._community_ids: dict[tuple, str | None] = {}
        self._contexts: dict[tuple, str] = {}     # (episode, cgroup) -> labels + eptrace prefix
        self._processes: dict[tuple, str] = {}    # process state -> ,"process":{...}

    @property
    def sequence(self) -> int:
        """The last event.sequence handed out (0 before the first document)."""
        return self._sequence

    def encode(self, event: NetworkEvent | ProcessEvent | Metric) -> dict[str, Any]:
        """The document as a dict (tests, tools); the tracer uses encode_document."""
        return self.encode_document(event).fields()

    def encode_document(self, event: NetworkEvent | ProcessEvent | Metric) -> Document:
        if isinstance(event, NetworkEvent):
            return Document(self._network(event), "event")
        if isinstance(event, ProcessEvent):
            return Document(self._process_event(event), "event")
        if isinstance(event, Metric):
            return Document(self._metric(event), "metric")
        if isinstance(event, Alert):
            return Document(self._alert(event), "alert")
        raise TypeError(f"cannot encode {type(event).__name__} as ECS")

    # --- document kinds -------------------------------------------------------

    def _network(self, ev: NetworkEvent) -> str:
        category, types = _lookup(NETWORK_ACTIONS, ev.action)
        outcome = ev.outcome or ("success" if ev.action in _IMPLIED_SUCCESS else None)
        extra = f',"duration":{int(ev.duration_ns)}' if ev.duration_ns is not None else ""
        parts = [self._head(ev.timestamp_ns, "event", category, types, ev.action, "network", outcome, extra),
                 self._context(ev.episode, ev.cgroup_id, ev.cgroup_path)]
        sock = []
        if ev.socket_family:
            sock.append(f'"family":{_j(ev.socket_family)}')
        if ev.socket_type:
            sock.append(f'"type":{_j(ev.socket_type)}')
        if ev.socket_protocol is not None:
            sock.append(f'"protocol":{int(ev.socket_protocol)}')
        if ev.cookie:
            sock.append(f'"cookie":{int(ev.cookie)}')
        if sock:
            parts.append(',"socket":{' + ",".join(sock) + "}")
        if ev.transport and ev.transport not in IANA_NUMBERS:
            parts.append(f',"transport":{_j(ev.transport)}')
        parts.append("}")    # closes eptrace
        if ev.process is not None:
            parts.append(self._process(ev.process))
        for side, endpoint, nbytes, npackets in (("source", ev.source, ev.source_bytes, ev.source_packets),
                                                 ("destination", ev.destination, ev.destination_bytes,
                                                  ev.destination_packets)):
            fields = []
            if endpoint is not None:
                if endpoint.ip:
                    fields.append(f'"ip":"{endpoint.ip}"')     # address text needs no escaping
                if endpoint.port:
                    fields.append(f'"port":{int(endpoint.port)}')
            if nbytes is not None:
                fields.append(f'"bytes":{int(nbytes)}')
            if npackets is not None:
                fields.append(f'"packets":{int(npackets)}')
            if fields:
                parts.append(f',"{side}":{{' + ",".join(fields) + "}")
        network = []
        iana = IANA_NUMBERS.get(ev.transport or "")
        if iana is not None:
            network.append(f'"transport":"{ev.transport}","iana_number":"{iana}"')   # iana_number: ECS keyword
        if ev.protocol:
            network.append(f'"protocol":{_j(ev.protocol)}')
        if ev.network_type:
            network.append(f'"type":"{ev.network_type}"')
        if ev.direction:
            network.append(f'"direction":"{ev.direction}"')
        cid = self._community_id(ev)
        if cid:
            network.append(f'"community_id":"{cid}"')
        if ev.source_bytes is not None and ev.destination_bytes is not None:
            network.append(f'"bytes":{int(ev.source_bytes + ev.destination_bytes)}')
        if ev.source_packets is not None and ev.destination_packets is not None:
            network.append(f'"packets":{int(ev.source_packets + ev.destination_packets)}')
        if network:
            parts.append(',"network":{' + ",".join(network) + "}")
        details = ev.protocol_details or {}
        if ev.protocol == "tls" and details.get("sni"):
            parts.append(f',"tls":{{"client":{{"server_name":{_j(details["sni"])}}}}}')
        elif ev.protocol == "dns" and details.get("qname"):
            parts.append(f',"dns":{{"type":"query","question":{{"name":{_j(details["qname"])}}}}}')
        if ev.error_message:
            parts.append(f',"error":{{"message":{_j(ev.error_message)}}}')
        parts.append("}")
        return "".join(parts)

    def _process_event(self, ev: ProcessEvent) -> str:
        category, types = _lookup(PROCESS_ACTIONS, ev.action)
        outcome = None
        if ev.action == "process_ended" and ev.process.exit_code is not None:
            outcome = "success" if ev.process.exit_code == 0 else "failure"
        return (self._head(ev.timestamp_ns, "event", category, types, ev.action, "process", outcome)
                + self._context(ev.episode, ev.cgroup_id, ev.cgroup_path) + _args_incomplete(ev.process) + "}"
                + self._process(ev.process) + "}")

    def _metric(self, ev: Metric) -> str:
        category, types = METRIC_CATEGORY_TYPE
        # zeros matter: every counter is kept
        return (self._head(ev.timestamp_ns, "metric", category, types, METRIC_ACTION, "health", None)
                + f',"eptrace":{{{self._run},"stats":{_j(ev.stats)}}}}}')

    def _alert(self, ev: Alert) -> str:
        category, types = ALERT_CATEGORY_TYPE
        rule = ev.rule
        extra = f',"severity":{int(rule.severity)},"risk_score":{float(ev.risk_score)}'
        parts = [self._head(ev.timestamp_ns, "alert", category, types, rule.name, "alert", None, extra),
                 self._context(ev.episode, ev.cgroup_id, ev.cgroup_path), _args_incomplete(ev.process),
                 f',"containment":{_j(ev.containment)}' if ev.containment else "", "}"]
        if ev.process is not None:
            parts.append(self._process(ev.process))
        parts.append(',"rule":' + _j({"id": rule.id, "name": rule.name, "description": rule.description,
                                       "ruleset": AGENT_NAME, "reference": _attack_url(rule.attack_id)}))
        technique: dict[str, Any] = {"id": [rule.technique_id], "name": [rule.technique_name],
                                     "reference": [_attack_url(rule.technique_id)]}
        if rule.subtechnique_id:
            technique["subtechnique"] = {"id": [rule.subtechnique_id], "name": [rule.subtechnique_name or ""],
                                         "reference": [_attack_url(rule.subtechnique_id)]}
        parts.append(',"threat":' + _j({"framework": THREAT_FRAMEWORK, "technique": technique,
                                         "tactic": {"id": [rule.tactic_id], "name": [rule.tactic_name]}}))
        parts.append(f',"message":{_j(ev.message)}')
        ips = sorted({e.ip for ev_ in ev.evidence for e in (ev_.source, ev_.destination) if e is not None and e.ip})
        if ips:
            parts.append(',"related":{"ip":' + _j(ips) + "}")
        if ev.evidence:
            first = ev.evidence[0]
            for side, endpoint in (("source", first.source), ("destination", first.destination)):
                if endpoint is not None and (endpoint.ip or endpoint.port):
                    fields = {"ip": endpoint.ip} if endpoint.ip else {}
                    if endpoint.port:
                        fields["port"] = endpoint.port
                    parts.append(f',"{side}":{_j(fields)}')
            # network.* describes the first evidence, like source and destination: one flow, one id.
            network: dict[str, Any] = {}
            if first.transport in IANA_NUMBERS:
                network.update(transport=first.transport, iana_number=str(IANA_NUMBERS[first.transport]))
            if first.direction:
                network["direction"] = first.direction
            cid = self._community_id(first)
            if cid:
                network["community_id"] = cid
            if network:
                parts.append(',"network":' + _j(network))
        parts.append("}")
        return "".join(parts)

    # --- shared parts ---------------------------------------------------------

    def _head(self, ts_ns: int, kind: str, category: list[str], types: list[str], action: str,
              dataset: str, outcome: str | None, extra: str = "") -> str:
        """The document up to and including agent, without the closing brace."""
        self._sequence += 1
        seq = self._sequence
        out = f',"outcome":"{outcome}"' if outcome else ""
        return (f'{{"@timestamp":"{format_timestamp(ts_ns)}","ecs":{{"version":"{ECS_VERSION}"}},'
                f'"event":{{"id":"{self._id_prefix}-{seq}","sequence":{seq},"kind":"{kind}",'
                f'"category":{_LISTS[id(category)]},"type":{_LISTS[id(types)]},"action":"{action}"{out},'
                f'"module":"{AGENT_NAME}","dataset":"{AGENT_NAME}.{dataset}"{extra}}}{self._tail}')

    def _context(self, episode: Episode, cgroup_id: int, cgroup_path: str) -> str:
        """labels and the open eptrace object (the caller closes it)."""
        key = (episode.id, episode.cgroup_id, cgroup_id, cgroup_path)
        text = self._contexts.get(key)
        if text is None:
            labels = {str(k): str(v) for k, v in episode.labels.items()}
            labels["episode_id"] = episode.id  # the episode id wins over a label of that name
            text = (f',"labels":{_j(labels)},"eptrace":{{{self._run},'
                    f'"cgroup":{{"id":{int(cgroup_id)},"path":{_j(cgroup_path)}}},'
                    f'"episode":{{"cgroup":{{"id":{int(episode.cgroup_id)},"path":{_j(episode.cgroup_path)}}}}}')
            if len(self._contexts) >= 4096:
                self._contexts.clear()
            self._contexts[key] = text
        return text

    def _process(self, process: Process) -> str:
        key = (process.pid, process.name, process.executable, process.parent_pid, process.thread_id,
               process.start_ns, process.exit_code, tuple(process.args))
        text = self._processes.get(key)
        if text is None:
            # Written out, not through json's encoder for a dict: a process event's process is new each
            # time, and encoding it as a dict was the encoder's largest cost. Strings go through json's
            # own string encoder, numbers are ints: the same text as _j(the dict).
            proc = [f'"pid":{int(process.pid)}']
            if process.name:
                proc.append(f'"name":{_s(process.name)}')
            if process.executable:
                proc.append(f'"executable":{_s(process.executable)}')
            if process.args:
                args = list(process.args)
                # ECS: args start with the absolute path of the executable. argv[0] is whatever the
                # process was given (a bare name, a disguise): then the command line as the process
                # shows it (/proc/PID/cmdline) goes to process.title.
                if process.executable.startswith("/") and args[0] != process.executable:
                    proc.append(f'"title":{_s(" ".join(args))}')
                    args[0] = process.executable
                proc.append(f'"args":[{",".join(map(_s, args))}],"args_count":{len(args)}')
            if process.parent_pid is not None:
                proc.append(f'"parent":{{"pid":{int(process.parent_pid)}}}')
            if process.thread_id is not None:
                proc.append(f'"thread":{{"id":{int(process.thread_id)}}}')
            if process.start_ns is not None:
                proc.append(f'"start":"{format_timestamp(process.start_ns)}"')
            if process.exit_code is not None:
                proc.append(f'"exit_code":{int(process.exit_code)}')
            text = ',"process":{' + ",".join(proc) + "}"
            if len(self._processes) >= 16384:
                self._processes.clear()
            self._processes[key] = text
        return text

    def _community_id(self, ev: NetworkEvent) -> str | None:
        """Community ID of the flow (cached: a flow's events share their tuple)."""
        if ev.source is None or ev.destination is None:
            return None
        key = (ev.transport, ev.source.ip, ev.source.port, ev.destination.ip, ev.destination.port)
        cid = self._community_ids.get(key, False)
        if cid is False:
            if len(self._community_ids) >= 8192:
                self._community_ids.clear()
            cid = self._community_ids[key] = _flow_community_id(ev)
        return cid


def _attack_url(attack_id: str) -> str:
    """https://attack.mitre.org/techniques/T1059/004/ for T1059.004."""
    return f"https://attack.mitre.org/techniques/{attack_id.replace('.', '/')}/"


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

    if event.get("kind") == "alert":
        parts[-1] = f"ALERT {doc.get('rule', {}).get('name', action)}:"
        parts.append(doc.get("message", ""))
    elif event.get("kind") == "metric":
        stats = doc.get("eptrace", {}).get("stats", {})
        parts.extend(f"{k}={v}" for k, v in stats.items())
    elif action == "process_started":
        parts.append(process.get("executable") or process.get("name") or "?")
        parts.append(_shorten(process.get("title") or " ".join(process.get("args", []))))   # argv as given
    elif action == "process_ended" and "exit_code" in process:
        parts.append(f"exit={process['exit_code']}")
    else:
        parts.extend(_network_words(doc))
    if event.get("outcome") == "failure":
        parts.append("FAILED" + (f": {doc['error']['message']}" if "error" in doc else ""))
    return printable(" ".join(str(p) for p in parts if p))     # argv, names: the sandbox's text


def _network_words(doc: dict[str, Any]) -> list[str]:
    words: list[str] = []
    network = doc.get("network", {})
    words.append(network.get("transport") or doc.get("eptrace", {}).get("transport", ""))
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
    if not side or ("ip" not in side and "port" not in side):
        return ""
    ip = side.get("ip", "*")
    if "port" not in side:
        return ip
    return f"[{ip}]:{side['port']}" if ":" in ip else f"{ip}:{side['port']}"


def _shorten(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())     # one line, whatever the argv held
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _args_incomplete(process: Process | None) -> str:
    """eptrace.process.args_complete, only when false: the kernel could not read argv whole, and
    process.args came from /proc (or is what the kernel read, if /proc had it no more)."""
    return ',"process":{"args_complete":false}' if process is not None and not process.args_complete else ""

"""--schema ocsf: ECS documents mapped to OCSF 1.8.0, for pipelines that want OCSF.

Network events become Network Activity (4001), process events Process Activity
(1007), alerts Detection Finding (2004). Health metrics have no OCSF class and
stay ECS. Anything without an OCSF home (the episode, cgroups, the DNS question)
goes to `unmapped`, so nothing is lost in the mapping. tests/conformance.py checks
the documents against OCSF's own exported schema of OCSF_VERSION.
"""
from __future__ import annotations

import calendar
import json
import time
from typing import Any

from tracer.schema.document import OCSF_VERSION, Document

# device and actor belong to the host profile in Network Activity and Detection Finding.
PROFILES = ["host"]

NETWORK_ACTIVITY = {        # event.action -> activity_id (Open 1, Close 2, Reset 3, Fail 4, Refuse 5,
    "connection_attempted": 1, "connection_established": 1, "connection_accepted": 1,     # Traffic 6, Listen 7)
    "flow_ended": 2, "flow_updated": 6, "udp_sent": 6, "listening": 7, "socket_created": 99,
}
OTHER_ACTIVITY_NAMES = {"socket_created": "Socket Created"}       # activity_id 99 names what it is
FAIL, REFUSE = 4, 5
PROCESS_ACTIVITY = {"process_started": 1, "process_ended": 2}     # Launch, Terminate
STATUS = {"success": (1, "Success"), "failure": (2, "Failure"), "unknown": (0, "Unknown")}   # status_id, status
DIRECTION = {"ingress": (1, "Inbound"), "egress": (2, "Outbound")}          # connection_info.direction_id
UNKNOWN_DIRECTION = (0, "Unknown")
EXECUTABLE_FILE = 8         # file.type_id of a process's executable


def convert(doc: Document) -> Document:
    fields = doc.fields()
    if doc.kind == "alert":
        return Document(_dumps(detection_finding(fields)), doc.kind)
    action = fields.get("event", {}).get("action")
    if action in NETWORK_ACTIVITY:
        return Document(_dumps(network_activity(fields)), doc.kind)
    if action in PROCESS_ACTIVITY:
        return Document(_dumps(process_activity(fields)), doc.kind)
    return doc      # health metrics: no OCSF class


def _dumps(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _epoch_ms(ts: str) -> int:
    seconds = calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S"))
    micros = int(ts[20:26]) if len(ts) > 26 else 0
    return seconds * 1000 + micros // 1000


def _base(fields: dict, class_uid: int, category_uid: int, activity_id: int) -> dict[str, Any]:
    event = fields.get("event", {})
    outcome = event.get("outcome")
    out: dict[str, Any] = {
        "class_uid": class_uid, "category_uid": category_uid, "activity_id": activity_id,
        "type_uid": class_uid * 100 + activity_id, "time": _epoch_ms(fields["@timestamp"]),
        "severity_id": 1,
        "metadata": {"version": OCSF_VERSION, "profiles": PROFILES, "uid": event.get("id"),
                     "sequence": event.get("sequence"),
                     "product": {"name": "eptrace", "vendor_name": "eptrace",
                                 "version": fields.get("agent", {}).get("version")},
                     "log_name": event.get("dataset")},
        "unmapped": {"labels": fields.get("labels", {}), "eptrace": fields.get("eptrace", {}),
                     "event.action": event.get("action")},
    }
    for ecs_only in ("dns", "tls"):       # no OCSF home in these classes (tls.version is unknown)
        if ecs_only in fields:
            out["unmapped"][ecs_only] = fields[ecs_only]
    if outcome:
        out["status_id"], out["status"] = STATUS.get(outcome, STATUS["unknown"])
    if "error" in fields:
        out["status_detail"] = fields["error"].get("message")
    if "host" in fields:
        out["device"] = {"hostname": fields["host"].get("name"), "type_id": 0}
    if "process" in fields:
        out["actor"] = {"process": _process(fields["process"])}
    return out


def _process(p: dict) -> dict:
    out: dict[str, Any] = {"pid": p.get("pid"), "name": p.get("name")}
    if p.get("executable"):
        out["file"] = {"path": p["executable"], "name": p["executable"].rsplit("/", 1)[-1],
                       "type_id": EXECUTABLE_FILE, "type": "Executable File"}
    if p.get("args"):
        out["cmd_line"] = " ".join(p["args"])
    if "parent" in p:
        out["parent_process"] = {"pid": p["parent"].get("pid")}
    return out


def _endpoint(side: dict | None, local: bool, host: str | None) -> dict | None:
    """A network endpoint needs an address: the sandbox's own end without an IP (an unbound or
    unconnected socket) is named by the host; a peer without an IP is left out."""
    side = side or {}
    out = {k: side[k] for k in ("ip", "port") if k in side}
    if "ip" not in out:
        if not local or not host:
            return None
        out["hostname"] = host
    return out


def _network_parts(fields: dict, traffic: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {}
    network = fields.get("network", {})
    ingress = network.get("direction") == "ingress"
    host = fields.get("host", {}).get("name")
    for ecs_side, ocsf_side, local in (("source", "src_endpoint", not ingress),
                                       ("destination", "dst_endpoint", ingress)):
        if ecs_side in fields:
            endpoint = _endpoint(fields[ecs_side], local, host)
            if endpoint:
                out[ocsf_side] = endpoint
    if not out and host:
        out["src_endpoint"] = {"hostname": host}      # no peer yet (socket_created): the socket's host
    direction_id, direction = DIRECTION.get(network.get("direction"), UNKNOWN_DIRECTION)
    info: dict[str, Any] = {"direction_id": direction_id, "direction": direction}
    if "transport" in network:
        info["protocol_name"] = network["transport"]
    if "iana_number" in network:
        info["protocol_num"] = int(network["iana_number"])
    if "type" in network:
        info["protocol_ver_id"] = {"ipv4": 4, "ipv6": 6}.get(network["type"], 0)
    if "community_id" in network:
        info["community_uid"] = network["community_id"]
    out["connection_info"] = info
    src, dst = fields.get("source", {}), fields.get("destination", {})
    counters = {k: v for k, v in (("bytes_out", src.get("bytes")), ("bytes_in", dst.get("bytes")),
                                  ("packets_out", src.get("packets")), ("packets_in", dst.get("packets")))
                if v is not None}
    if counters and traffic:
        out["traffic"] = counters
    return out


def network_activity(fields: dict) -> dict:
    event = fields["event"]
    activity = NETWORK_ACTIVITY[event["action"]]
    if event.get("outcome") == "failure" and activity == 1:
        refused = fields.get("error", {}).get("message", "").startswith("ECONNREFUSED")
        activity = REFUSE if refused else FAIL
    out = _base(fields, 4001, 4, activity)
    if event["action"] in OTHER_ACTIVITY_NAMES:
        out["activity_name"] = OTHER_ACTIVITY_NAMES[event["action"]]
    out.update(_network_parts(fields))
    if "protocol" in fields.get("network", {}):
        out["app_protocol_name"] = fields["network"]["protocol"]
    if "duration" in event:
        out["duration"] = event["duration"] // 1_000_000       # OCSF: milliseconds
    return out


def process_activity(fields: dict) -> dict:
    out = _base(fields, 1007, 1, PROCESS_ACTIVITY[fields["event"]["action"]])
    if "process" in fields:
        out["process"] = _process(fields["process"])
        if "exit_code" in fields["process"]:
            out["exit_code"] = fields["process"]["exit_code"]
    return out


def detection_finding(fields: dict) -> dict:
    event, rule, threat = fields["event"], fields.get("rule", {}), fields.get("threat", {})
    out = _base(fields, 2004, 2, 1)        # Create
    severity = event.get("severity", 0)
    out["severity_id"] = 5 if severity >= 90 else 4 if severity >= 70 else 3 if severity >= 40 else 2
    if "risk_score" in event:
        out["risk_score"] = round(event["risk_score"])        # OCSF: integer
    out["message"] = fields.get("message")
    technique, tactic = threat.get("technique", {}), threat.get("tactic", {})
    out["finding_info"] = {
        "uid": event.get("id"), "title": rule.get("name"), "desc": fields.get("message"),
        "analytic": {"uid": rule.get("id"), "name": rule.get("name"), "desc": rule.get("description"),
                     "type_id": 1, "type": "Rule"},
        "attacks": [_attack(t_id, t_name, technique.get("subtechnique", {}), tactic)
                    for t_id, t_name in zip(technique.get("id", []), technique.get("name", []))],
    }
    if "network" in fields or "source" in fields or "destination" in fields:
        out["evidences"] = [_network_parts(fields, traffic=False)]    # evidences have no traffic
    return out


def _attack(t_id: str, t_name: str, sub: dict, tactic: dict) -> dict:
    """One ATT&CK entry: the parent technique, its sub-technique in sub_technique."""
    attack: dict[str, Any] = {"technique": {"uid": t_id, "name": t_name}, "version": "v15"}
    if sub.get("id"):
        attack["sub_technique"] = {"uid": sub["id"][0], "name": (sub.get("name") or [""])[0]}
    if tactic.get("id"):
        attack["tactic"] = {"uid": tactic["id"][0], "name": (tactic.get("name") or [""])[0]}
    return attack

"""--schema ocsf: ECS documents mapped to OCSF 1.x, for pipelines that want OCSF.

Network events become Network Activity (4001), process events Process Activity
(1007), alerts Detection Finding (2004). Health metrics have no OCSF class and
stay ECS. Anything without an OCSF home (the episode, cgroups) goes to
`unmapped`, so nothing is lost in the mapping.
"""
from __future__ import annotations

import calendar
import json
import time
from typing import Any

from tracer.schema.ecs import Document

OCSF_VERSION = "1.3.0"

NETWORK_ACTIVITY = {        # event.action -> activity_id (Open 1, Close 2, Reset 3, Fail 4, Traffic 6, Listen 7)
    "connection_attempted": 1, "connection_established": 1, "connection_accepted": 1, "flow_ended": 2,
    "flow_updated": 6, "udp_sent": 6, "listening": 7, "socket_created": 99,
}
PROCESS_ACTIVITY = {"process_started": 1, "process_ended": 2}     # Launch, Terminate


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
        "metadata": {"version": OCSF_VERSION, "uid": event.get("id"), "sequence": event.get("sequence"),
                     "product": {"name": "eptrace", "vendor_name": "eptrace",
                                 "version": fields.get("agent", {}).get("version")},
                     "log_name": event.get("dataset")},
        "unmapped": {"labels": fields.get("labels", {}), "eptrace": fields.get("eptrace", {}),
                     "event.action": event.get("action")},
    }
    if outcome:
        out["status_id"] = {"success": 1, "failure": 2}.get(outcome, 0)
        out["status"] = outcome
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
        out["file"] = {"path": p["executable"], "name": p["executable"].rsplit("/", 1)[-1]}
    if p.get("args"):
        out["cmd_line"] = " ".join(p["args"])
    if "parent" in p:
        out["parent_process"] = {"pid": p["parent"].get("pid")}
    return out


def _endpoint(side: dict | None) -> dict | None:
    if not side:
        return None
    out = {k: side[k] for k in ("ip", "port") if k in side}
    return out or None


def _network_parts(fields: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for ecs_side, ocsf_side in (("source", "src_endpoint"), ("destination", "dst_endpoint")):
        endpoint = _endpoint(fields.get(ecs_side))
        if endpoint:
            out[ocsf_side] = endpoint
    network = fields.get("network", {})
    info: dict[str, Any] = {}
    if "transport" in network:
        info["protocol_name"] = network["transport"]
    if "iana_number" in network:
        info["protocol_num"] = int(network["iana_number"])
    if "direction" in network:
        info["direction_id"] = {"ingress": 1, "egress": 2}.get(network["direction"], 0)
        info["direction"] = {"ingress": "Inbound", "egress": "Outbound"}.get(network["direction"], "Unknown")
    if "type" in network:
        info["protocol_ver_id"] = {"ipv4": 4, "ipv6": 6}.get(network["type"], 0)
    if "community_id" in network:
        info["community_uid"] = network["community_id"]
    if info:
        out["connection_info"] = info
    src, dst = fields.get("source", {}), fields.get("destination", {})
    traffic = {k: v for k, v in (("bytes_out", src.get("bytes")), ("bytes_in", dst.get("bytes")),
                                 ("packets_out", src.get("packets")), ("packets_in", dst.get("packets")))
               if v is not None}
    if traffic:
        out["traffic"] = traffic
    return out


def network_activity(fields: dict) -> dict:
    event = fields["event"]
    activity = NETWORK_ACTIVITY[event["action"]]
    if event.get("outcome") == "failure" and activity == 1:
        activity = 4        # Fail
    out = _base(fields, 4001, 4, activity)
    out.update(_network_parts(fields))
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
    out["risk_score"] = event.get("risk_score")
    out["message"] = fields.get("message")
    technique, tactic = threat.get("technique", {}), threat.get("tactic", {})
    out["finding_info"] = {
        "uid": event.get("id"), "title": rule.get("name"), "desc": fields.get("message"),
        "analytic": {"uid": rule.get("id"), "name": rule.get("name"), "desc": rule.get("description"),
                     "type_id": 1, "type": "Rule"},
        "attacks": [{"technique": {"uid": t_id, "name": t_name},
                     "tactic": {"uid": (tactic.get("id") or [None])[0], "name": (tactic.get("name") or [None])[0]},
                     "version": "v15"}
                    for t_id, t_name in zip(technique.get("id", []), technique.get("name", []))],
    }
    evidence = _network_parts(fields)
    if evidence:
        out["evidences"] = [evidence]
    return out

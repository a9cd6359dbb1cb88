"""What a serialized document is, known without the encoders: Document, the schema versions, and restamp
(a daemon's document as one of its client's). Light to import: a run client through the daemon
writes documents without loading the events or the ECS encoder (tracer/schema/ecs.py)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

ECS_VERSION = "9.4.0"
OCSF_VERSION = "1.8.0"


@dataclass(frozen=True, slots=True)
class Document:
    """One ECS document, already serialized: outputs write `json` as it is."""
    json: str          # one compact line, no newline
    kind: str          # event.kind: event, metric, alert

    def fields(self) -> dict[str, Any]:
        return json.loads(self.json)


# Where the ECS encoder's _head and _context put event.sequence and eptrace.run.id (restamp finds them).
SEQUENCE_FIELD = ',"sequence":'
RUN_FIELD = '"eptrace":{"run":{"id":'

# One encoder, built once: json.dumps with options would build a new one per call.
_j = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def restamp(text: str, sequence: int, run_id: str) -> str:
    """Another run's document (the daemon's) as one of this run's (a daemon client's): event.sequence and
    eptrace.run.id become this run's, and the daemon's go to eptrace.daemon.run_id and .sequence for
    correlation; event.id stays (unique already). The fields are found where _head and _context put them,
    before any text from the sandbox (which is JSON-escaped: its quotes cannot match)."""
    at = text.index(SEQUENCE_FIELD) + len(SEQUENCE_FIELD)
    end = text.index(",", at)
    theirs = text[at:end]
    text = f"{text[:at]}{int(sequence)}{text[end:]}"
    at = text.index(RUN_FIELD) + len(RUN_FIELD)
    end = text.index("}", at)
    return (f"{text[:at]}{_j(run_id)}}},\"daemon\":{{\"run_id\":{text[at:end]},\"sequence\":{theirs}}}"
            f"{text[end + 1:]}")

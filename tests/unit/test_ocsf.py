"""--schema ocsf on the documents of a captured episode (tests/fixtures)."""
import json
from pathlib import Path

from tracer.capture import replay
from tracer.outputs import Fanout, Transform
from tracer.schema import EcsEncoder
from tracer.schema.ocsf import convert

FIXTURES = Path(__file__).parent.parent / "fixtures"


class Collect:
    name, sent, dropped = "collect", 0, {}

    def __init__(self):
        self.docs = []

    def write(self, doc):
        self.docs.append((doc.kind, json.loads(doc.json)))

    def flush(self):
        pass

    def close(self):
        pass


def ocsf_docs(capture):
    sink = Collect()
    replay(FIXTURES / capture, EcsEncoder("h", "0.1.0"), Transform(Fanout([sink]), convert))
    return sink.docs


def test_every_document_gets_its_ocsf_class():
    docs = ocsf_docs("metadata_and_raw_socket.capture")
    classes = {d.get("class_uid") for kind, d in docs if kind != "metric"}
    assert classes == {4001, 1007, 2004}
    for kind, d in docs:
        if kind == "metric":
            assert "ecs" in d            # no OCSF class for health: kept as ECS
            continue
        assert d["type_uid"] == d["class_uid"] * 100 + d["activity_id"]
        assert d["metadata"]["product"]["name"] == "eptrace" and d["metadata"]["uid"]
        assert d["unmapped"]["labels"]["episode_id"] and isinstance(d["time"], int)


def test_a_connection_and_its_end_map_to_open_and_close_with_traffic():
    docs = [d for _, d in ocsf_docs("metadata_and_raw_socket.capture") if d.get("class_uid") == 4001]
    opened = next(d for d in docs if d["unmapped"]["event.action"] == "connection_established")
    closed = next(d for d in docs if d["unmapped"]["event.action"] == "flow_ended")
    assert opened["activity_id"] == 1 and closed["activity_id"] == 2
    assert closed["dst_endpoint"] == {"ip": "169.254.169.254", "port": 80}
    assert closed["connection_info"]["direction_id"] == 2 and closed["connection_info"]["community_uid"]
    assert closed["traffic"]["bytes_in"] > 0 and closed["actor"]["process"]["name"] == "python3"


def test_alerts_are_detection_findings_with_the_attack():
    findings = [d for _, d in ocsf_docs("metadata_and_raw_socket.capture") if d.get("class_uid") == 2004]
    metadata = next(f for f in findings if f["finding_info"]["title"] == "cloud_metadata_access")
    attack = metadata["finding_info"]["attacks"][0]
    assert attack["technique"] == {"uid": "T1552", "name": "Unsecured Credentials"}
    assert attack["sub_technique"] == {"uid": "T1552.005", "name": "Cloud Instance Metadata API"}
    assert metadata["severity_id"] == 4 and "169.254.169.254" in metadata["message"]
    assert metadata["evidences"][0]["dst_endpoint"]["ip"] == "169.254.169.254"

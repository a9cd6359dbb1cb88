"""Every document of the fixtures, in ECS and in OCSF, against the official definitions (tests/conformance.py),
and the checker itself: it must catch what the issue found (a test that cannot fail is a defect)."""
import copy
import functools
import sys
from pathlib import Path

import pytest

from tracer import config as config_module
from tracer.capture import replay
from tracer.events import Alert, Endpoint, Episode, Metric, NetworkEvent, Process
from tracer.detect import rules
from tracer.outputs import Fanout
from tracer.pipeline import drop_counters
from tracer.schema import EcsEncoder
from tracer.schema.ocsf import OCSF_VERSION, convert

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import conformance  # noqa: E402

FIXTURES = Path(__file__).parent.parent / "fixtures"
SHORT = config_module.load(FIXTURES / "short_long_flow.toml")   # flow_updated every second
CAPTURES = sorted(p.name for p in FIXTURES.glob("*.capture"))


class Collect:
    name, sent, dropped = "collect", 0, {}

    def __init__(self):
        self.docs = []

    def write(self, doc):
        self.docs.append(doc)

    def flush(self):
        pass

    def close(self):
        pass


def fixture_documents(capture: str):
    sink = Collect()
    tracer = replay(FIXTURES / capture, EcsEncoder("replay", "0.1.0"), Fanout([sink]), config=SHORT)
    tracer.emit_stats()                  # a metric document, with its outputs list
    return sink.docs


def synthetic_documents():
    """Events the fixtures lack: a packet socket, a refused connect, an unconnected UDP end, the protocols."""
    ep = Episode("ep-1", "/sys/fs/cgroup/unified/eptrace/ep-1", 4242, {"team": "red"})
    proc = Process(pid=1234, name="python3", executable="/usr/bin/python3.11", args=["python3", "-c", "x"],
                   parent_pid=1, start_ns=1_700_000_000_000_000_000)
    base = dict(timestamp_ns=1_700_000_001_000_000_000, episode=ep, cgroup_id=4242, cgroup_path=ep.cgroup_path,
                process=proc, cookie=77)
    local, peer = Endpoint("198.51.100.2", 41234), Endpoint("198.51.100.1", 443)
    events = [
        NetworkEvent("socket_created", **base, network_type=None, transport="packet", direction=None,
                     outcome="success", socket_family="AF_PACKET", socket_type="SOCK_RAW", socket_protocol=768),
        NetworkEvent("connection_attempted", **base, network_type="ipv4", transport="tcp", direction="egress",
                     destination=peer, outcome="failure", error_message="ECONNREFUSED: Connection refused"),
        NetworkEvent("connection_attempted", **base, network_type="ipv4", transport="tcp", direction="egress",
                     destination=peer, outcome="unknown"),
        NetworkEvent("flow_ended", **base, network_type="ipv4", transport="udp", direction="egress",
                     source=Endpoint(None, 5353), outcome="success", duration_ns=5, source_bytes=40,
                     destination_bytes=0, source_packets=1, destination_packets=0),
        NetworkEvent("flow_updated", **base, network_type="ipv4", transport="tcp", direction="egress",
                     source=local, destination=peer, outcome="success", duration_ns=10,
                     protocol="tls", protocol_details={"sni": "example.test"}),
        NetworkEvent("flow_ended", **base, network_type="ipv4", transport="udp", direction="egress",
                     source=Endpoint("198.51.100.2", 5353), destination=Endpoint("198.51.100.1", 53),
                     outcome="success", duration_ns=5, source_bytes=40, destination_bytes=0, source_packets=1,
                     destination_packets=0, protocol="dns", protocol_details={"qname": "a.example.test"}),
    ]
    events += [
        NetworkEvent("flow_ended", **base, network_type="ipv6", transport="tcp", direction="egress",
                     source=Endpoint("2001:db8::2", 40000), destination=Endpoint("2001:db8::1", 22),
                     outcome="success", duration_ns=7, source_bytes=1, destination_bytes=2, source_packets=1,
                     destination_packets=1, protocol="ssh", protocol_details={"banner": "SSH-2.0-OpenSSH_9.2"}),
        NetworkEvent("flow_ended", **base, network_type="ipv4", transport="icmp", direction="egress",
                     source=Endpoint("198.51.100.2", 0), destination=Endpoint("198.51.100.1", 0),
                     outcome="success", duration_ns=7, source_bytes=64, destination_bytes=64, source_packets=1,
                     destination_packets=1),
    ]
    accepted = NetworkEvent("connection_accepted", **base, network_type="ipv4", transport="tcp",
                            direction="ingress", source=Endpoint("198.51.100.1", 50000),
                            destination=Endpoint("198.51.100.2", 8000), outcome="success")
    events += [accepted, Alert(rules.INBOUND_LISTENER, base["timestamp_ns"], ep, 4242, ep.cgroup_path, proc,
                               "a listener accepted 198.51.100.1", 47.0, [accepted])]
    shell = NetworkEvent("connection_established", **base, network_type="ipv4", transport="tcp",
                         direction="egress", source=local, destination=peer, outcome="success")
    events.append(Alert(rules.REVERSE_SHELL, base["timestamp_ns"], ep, 4242, ep.cgroup_path, proc,
                        "bash wired to a socket", 99.0, [shell, shell]))
    drops = drop_counters({"spool_full": 1, "rejected:mapper_parsing_exception": 2})     # a receiver's words
    assert drops == {"dropped": {"spool_full": 1, "rejected": 2},
                     "rejected": [{"reason": "mapper_parsing_exception", "count": 2}]}
    events.append(Metric(base["timestamp_ns"], {"outputs": [{"output": "es+https://h:9200/x.y", "sent": 1,
                                                            **drops}]}))
    encoder = EcsEncoder("h", "0.1.0")
    return [encoder.encode_document(e) for e in events]


@functools.lru_cache(maxsize=1)
def all_documents() -> tuple:
    """Documents (immutable JSON text): each test takes its own dicts with .fields()."""
    docs = [d for capture in CAPTURES for d in fixture_documents(capture)] + synthetic_documents()
    assert {"alert", "event", "metric"} <= {d.kind for d in docs}
    return tuple(docs)


def test_every_fixture_document_conforms_to_ecs():
    docs = [d.fields() for d in all_documents()]
    actions = {d["event"]["action"] for d in docs}
    assert {"flow_updated", "flow_ended", "socket_created", "connection_attempted", "process_started"} <= actions
    report = conformance.check_documents(docs)
    assert report is None, report


def test_every_fixture_document_conforms_to_ocsf():
    docs = [convert(d).fields() for d in all_documents()]
    ocsf = [d for d in docs if conformance.is_ocsf(d)]
    assert {d["class_uid"] for d in ocsf} == {4001, 1007, 2004}
    assert all(d["metadata"]["version"] == OCSF_VERSION for d in ocsf)
    report = conformance.check_documents(ocsf)
    assert report is None, report
    # health metrics have no OCSF class and stay ECS: they must conform to ECS
    report = conformance.check_documents([d for d in docs if not conformance.is_ocsf(d)])
    assert report is None, report


def test_network_protocol_tls_server_name_and_dns_question():
    docs = [d.fields() for d in synthetic_documents()]
    tls = next(d for d in docs if d["event"]["action"] == "flow_updated")
    assert tls["network"]["protocol"] == "tls" and tls["tls"]["client"]["server_name"] == "example.test"
    assert "bytes" not in tls["source"] if "source" in tls else True     # no counters known: none claimed
    dns = next(d for d in docs if d.get("dns"))
    assert dns["network"]["protocol"] == "dns" and dns["dns"]["question"]["name"] == "a.example.test"
    ocsf_tls = next(o for o in (convert(d).fields() for d in synthetic_documents())
                    if o.get("app_protocol_name") == "tls")
    assert ocsf_tls["app_protocol_name"] == "tls"
    assert ocsf_tls["unmapped"]["tls"]["client"]["server_name"] == "example.test"     # OCSF tls needs a version


def test_community_ids_match_the_reference_implementation():
    """Our Community ID against PyPI communityid on a set of flows (v4, v6, tcp, udp, icmp, same address)."""
    import communityid
    from tracer.schema.community_id import community_id
    ref = communityid.CommunityID()
    flows = [(6, "198.51.100.2", 41234, "198.51.100.1", 80), (17, "198.51.100.1", 53, "198.51.100.2", 5353),
             (6, "2001:db8::2", 443, "2001:db8::1", 55000), (132, "10.0.0.1", 1, "10.0.0.1", 2),
             (17, "127.0.0.1", 9, "127.0.0.1", 9), (6, "::1", 22, "::1", 40000)]
    for proto, sip, sport, dip, dport in flows:
        assert community_id(sip, sport, dip, dport, proto) == ref.calc(
            communityid.FlowTuple(proto, sip, dip, sport, dport)), (proto, sip, sport, dip, dport)
    assert community_id("198.51.100.2", 8, "198.51.100.1", 0, 1) == ref.calc(
        communityid.FlowTuple(1, "198.51.100.2", "198.51.100.1", 8, 0))


def _first(docs, action):
    return copy.deepcopy(next(d for d in docs if d.get("event", {}).get("action") == action
                              or d.get("unmapped", {}).get("event.action") == action))


@pytest.mark.parametrize("damage,rule", [
    (lambda d: d["eptrace"].update(x=1) or d.update(foo={"bar": 1}), "foo.bar: not a field of ECS"),
    (lambda d: d["event"].update(kind="weird"), "event.kind: 'weird' is not among ECS allowed_values"),
    (lambda d: d["event"].update(type=["denied"], category=["process"]), "expected_event_types"),
    (lambda d: d["network"].update(community_id=[d["network"]["community_id"]]), "an array"),
    (lambda d: d["network"].update(community_id="1:AAAAAAAAAAAAAAAAAAAAAAAAAAA="), "reference implementation"),
    (lambda d: d["source"].update(port="80"), "does not fit ECS type long"),
    (lambda d: d["event"].update(category="network"), "normalises to an array"),
    (lambda d: d["eptrace"].update(stats={"outputs": {"file:/tmp/x.ndjson": {"sent": 1}}}), "lower case"),
    (lambda d: d["network"].update(protocol="SSH"), "normalized to lowercase"),
    (lambda d: d["process"].update(args=["curl", "-s"]), "ECS wants the absolute executable"),
    (lambda d: d.pop("@timestamp"), "@timestamp: required by ECS"),
])
def test_the_ecs_checker_names_the_field_and_the_rule(damage, rule):
    doc = _first([d.fields() for d in all_documents()], "flow_ended")
    damage(doc)
    report = conformance.check_documents([doc])
    assert report and rule in report, report


@pytest.mark.parametrize("damage,rule", [
    (lambda d: d.pop("metadata").pop("x", None) or d.update(metadata={"version": OCSF_VERSION}), "required"),
    (lambda d: d["metadata"].pop("profiles"), "device"),             # host-profile attribute, profile undeclared
    (lambda d: d.update(type_uid=400199), "type_uid"),
    (lambda d: d.update(status="success"), "caption of status_id"),
    (lambda d: d.update(activity_id=99, type_uid=400199), "activity_name: required with activity_id 99"),
    (lambda d: d["connection_info"].update(direction_id=7), "direction_id"),
    (lambda d: d["metadata"].update(version="1.3.0"), "metadata.version"),
])
def test_the_ocsf_checker_names_the_field_and_the_rule(damage, rule):
    doc = _first([convert(d).fields() for d in all_documents()], "flow_ended")
    damage(doc)
    report = conformance.check_documents([doc])
    assert report and rule in report, report

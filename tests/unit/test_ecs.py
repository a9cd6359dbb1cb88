"""The event contract of DESIGN.md, checked on hand-built events."""
import json
import re

import pytest

from tracer.events import Endpoint, Episode, Metric, NetworkEvent, Process, ProcessEvent
from tracer.schema import ECS_VERSION, EcsEncoder, format_human, to_json
from tracer.schema.community_id import community_id

TS = 1_795_820_445_123_456_789  # 2026-11-27T23:00:45.123456789Z
TIMESTAMP_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
NETWORK_ACTIONS = ["socket_created", "connection_attempted", "connection_established",
                   "connection_accepted", "listening", "udp_sent", "flow_updated", "flow_ended"]


def episode() -> Episode:
    return Episode(id="ep-7", cgroup_path="/sys/fs/cgroup/unified/eptrace/ep-7", cgroup_id=4242,
                   labels={"team": "red", "episode_id": "spoofed"})


def process() -> Process:
    return Process(pid=1234, name="python3", executable="/usr/bin/python3",
                   args=["python3", "-c", "print('hi')"], parent_pid=1000, thread_id=1235)


def network(action: str = "connection_established", **kw) -> NetworkEvent:
    fields = dict(
        action=action, timestamp_ns=TS, episode=episode(),
        cgroup_id=4243, cgroup_path="/sys/fs/cgroup/unified/eptrace/ep-7/worker",
        process=process(), cookie=99, network_type="ipv4", transport="tcp", direction="egress",
        source=Endpoint("198.51.100.2", 41234), destination=Endpoint("198.51.100.1", 80))
    fields.update(kw)
    return NetworkEvent(**fields)


def get(doc: dict, dotted: str):
    for key in dotted.split("."):
        doc = doc[key]
    return doc


def assert_no_empty(value, path="doc"):
    """No None, "", [] or {} anywhere: unknown fields are omitted, not null."""
    assert value is not None and value != "" and value != [] and value != {}, path
    if isinstance(value, dict):
        for k, v in value.items():
            assert "." not in k, f"{path}.{k}: documents are nested, not dotted"
            assert_no_empty(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            assert_no_empty(v, f"{path}[{i}]")


def assert_common(doc: dict, kind: str, dataset: str) -> None:
    assert TIMESTAMP_RE.match(doc["@timestamp"])
    assert doc["ecs"]["version"] == ECS_VERSION == "9.4.0"
    assert isinstance(get(doc, "event.id"), str)
    assert isinstance(get(doc, "event.sequence"), int)
    assert get(doc, "event.kind") == kind
    assert isinstance(get(doc, "event.category"), list) and get(doc, "event.category")
    assert isinstance(get(doc, "event.type"), list) and get(doc, "event.type")
    assert isinstance(get(doc, "event.action"), str)
    assert get(doc, "event.module") == "eptrace"
    assert get(doc, "event.dataset") == dataset
    assert get(doc, "host.name") == "vm-1"
    assert doc["agent"] == {"name": "eptrace", "type": "eptrace", "version": "0.1.0"}
    assert_no_empty(doc)
    assert json.loads(to_json(doc)) == doc


def assert_sandbox(doc: dict) -> None:
    assert doc["labels"] == {"team": "red", "episode_id": "ep-7"}  # the episode id wins
    assert get(doc, "eptrace.cgroup.id") == 4243
    assert get(doc, "eptrace.cgroup.path").endswith("/ep-7/worker")
    assert get(doc, "eptrace.episode.cgroup.path").endswith("/ep-7")
    proc = doc["process"]
    assert proc["pid"] == 1234 and proc["name"] == "python3"
    assert proc["executable"] == "/usr/bin/python3"
    # ECS: args start with the absolute executable; the command line as given is the title
    assert proc["args"] == ["/usr/bin/python3", "-c", "print('hi')"] and proc["args_count"] == 3
    assert proc["title"] == "python3 -c print('hi')"
    assert proc["parent"] == {"pid": 1000} and proc["thread"] == {"id": 1235}


@pytest.fixture
def encoder() -> EcsEncoder:
    return EcsEncoder(host_name="vm-1", agent_version="0.1.0")


def test_timestamp_is_rfc3339_utc_with_microseconds(encoder):
    assert encoder.encode(network())["@timestamp"] == "2026-11-27T23:00:45.123456Z"
    assert encoder.encode(Metric(timestamp_ns=0, stats={}))["@timestamp"] == "1970-01-01T00:00:00.000000Z"


@pytest.mark.parametrize("action", NETWORK_ACTIONS)
def test_every_network_action_meets_the_contract(encoder, action):
    doc = encoder.encode(network(action))
    assert_common(doc, "event", "eptrace.network")
    assert_sandbox(doc)
    assert doc["event"]["action"] == action
    assert doc["event"]["category"] == ["network"]
    assert set(doc["event"]["type"]) <= {"connection", "start", "end", "info", "allowed", "denied", "protocol"}
    assert doc["source"] == {"ip": "198.51.100.2", "port": 41234}
    assert doc["destination"] == {"ip": "198.51.100.1", "port": 80}
    assert doc["network"]["transport"] == "tcp" and doc["network"]["iana_number"] == "6"
    assert doc["network"]["type"] == "ipv4" and doc["network"]["direction"] == "egress"
    assert doc["network"]["community_id"] == community_id("198.51.100.2", 41234, "198.51.100.1", 80, 6)
    assert get(doc, "eptrace.socket.cookie") == 99


def test_sequence_increases_and_ids_are_unique(encoder):
    other_run = EcsEncoder(host_name="vm-1", agent_version="0.1.0", run_id="same")
    docs = [encoder.encode(network()) for _ in range(5)] + [encoder.encode(Metric(TS, {"a": 1}))]
    assert [d["event"]["sequence"] for d in docs] == [1, 2, 3, 4, 5, 6]
    ids = {d["event"]["id"] for d in docs} | {other_run.encode(network())["event"]["id"]}
    assert len(ids) == 7
    assert EcsEncoder("vm-1", "0.1.0", run_id="r1").encode(network())["eptrace"]["run"]["id"] == "r1"


def test_flow_ended_carries_counts_duration_and_sums(encoder):
    doc = encoder.encode(network("flow_ended", duration_ns=520_000_000, source_bytes=1000,
                                 destination_bytes=77, source_packets=5, destination_packets=4))
    assert doc["event"]["type"] == ["connection", "end"]
    assert doc["event"]["duration"] == 520_000_000
    assert doc["source"]["bytes"] == 1000 and doc["destination"]["bytes"] == 77
    assert doc["source"]["packets"] == 5 and doc["destination"]["packets"] == 4
    assert doc["network"]["bytes"] == 1077 and doc["network"]["packets"] == 9
    assert format_human(doc).endswith("tcp 198.51.100.2:41234 -> 198.51.100.1:80 1000B out 77B in 0.52s")


def test_failed_connect_has_outcome_and_error(encoder):
    doc = encoder.encode(network("connection_attempted", outcome="failure",
                                 error_message="connect: Connection refused"))
    assert doc["event"]["outcome"] == "failure"
    assert doc["error"]["message"] == "connect: Connection refused"
    assert "FAILED: connect: Connection refused" in format_human(doc)


def test_established_implies_success(encoder):
    assert encoder.encode(network())["event"]["outcome"] == "success"


def test_unknown_fields_are_omitted(encoder):
    ev = network("socket_created", process=None, cookie=0, network_type=None, transport="packet",
                 direction=None, source=None, destination=None, socket_family="AF_PACKET",
                 socket_type="SOCK_RAW", socket_protocol=768)
    doc = encoder.encode(ev)
    assert_common(doc, "event", "eptrace.network")
    for absent in ("process", "source", "destination", "error"):
        assert absent not in doc
    assert "network" not in doc and "cookie" not in doc["eptrace"]["socket"]    # "packet" is no IANA transport
    assert doc["eptrace"]["socket"] == {"family": "AF_PACKET", "type": "SOCK_RAW", "protocol": 768}
    assert doc["eptrace"]["transport"] == "packet"
    assert "event" in doc and "outcome" not in doc["event"]
    assert "socket_created packet AF_PACKET SOCK_RAW proto=768" in format_human(doc)


def test_community_id_for_udp_icmp_and_ipv6(encoder):
    udp = encoder.encode(network("udp_sent", transport="udp", source=Endpoint("192.168.1.52", 54585),
                                 destination=Endpoint("8.8.8.8", 53)))
    assert udp["network"]["community_id"] == "1:d/FP5EW3wiY1vCndhwleRRKHowQ="
    icmp = encoder.encode(network("flow_ended", transport="icmp", source=Endpoint("192.168.0.89", 0),
                                  destination=Endpoint("192.168.0.1", 0)))
    assert icmp["network"]["community_id"] == "1:X0snYXpgwiv9TZtqg64sgzUn6Dk="  # echo
    assert "port" not in icmp["source"]
    v6 = encoder.encode(network(network_type="ipv6", source=Endpoint("2001:db8::2", 40000),
                                destination=Endpoint("2001:db8::1", 443)))
    assert v6["network"]["community_id"] == community_id("2001:db8::2", 40000, "2001:db8::1", 443, 6)
    assert "[2001:db8::2]:40000 -> [2001:db8::1]:443" in format_human(v6)
    raw = encoder.encode(network(transport="raw"))
    assert "transport" not in raw["network"] and "community_id" not in raw["network"]
    assert raw["eptrace"]["transport"] == "raw"


def test_ingress_human_rendering_swaps_out_and_in(encoder):
    doc = encoder.encode(network("flow_ended", direction="ingress", source_bytes=10, destination_bytes=500))
    assert "500B out 10B in" in format_human(doc)


def test_process_events(encoder):
    started = encoder.encode(ProcessEvent("process_started", TS, episode(), 4243,
                                          "/sys/fs/cgroup/unified/eptrace/ep-7/worker", process()))
    assert_common(started, "event", "eptrace.process")
    assert_sandbox(started)
    assert started["event"]["category"] == ["process"] and started["event"]["type"] == ["start"]
    assert format_human(started) == ("23:00:45.123 [ep-7] python3(1234) process_started "
                                     "/usr/bin/python3 python3 -c print('hi')")
    proc = process()
    proc.exit_code = 0
    ended = encoder.encode(ProcessEvent("process_ended", TS, episode(), 4243, "/x", proc))
    assert ended["event"]["type"] == ["end"] and ended["process"]["exit_code"] == 0
    assert ended["event"]["outcome"] == "success"
    assert format_human(ended).endswith("process_ended exit=0")
    assert "exit_code" not in started["process"]


def test_metric_document(encoder):
    doc = encoder.encode(Metric(TS, {"records": 120, "lost": 0}))
    assert_common(doc, "metric", "eptrace.health")
    assert doc["eptrace"]["stats"] == {"records": 120, "lost": 0}
    assert "labels" not in doc and "process" not in doc
    assert format_human(doc) == "23:00:45.123 stats records=120 lost=0"


def test_human_line_for_a_connection(encoder):
    assert format_human(encoder.encode(network())) == (
        "23:00:45.123 [ep-7] python3(1234) connection_established tcp 198.51.100.2:41234 -> 198.51.100.1:80")


def test_unknown_action_and_type_are_rejected_without_using_a_sequence(encoder):
    with pytest.raises(ValueError, match="unknown event.action"):
        encoder.encode(network("teleported"))
    with pytest.raises(TypeError):
        encoder.encode("not an event")
    assert encoder.encode(network())["event"]["sequence"] == 1


def test_to_json_is_one_compact_line():
    text = to_json({"a": "zwei\nZeilen ü", "b": [1, 2]})
    assert text == '{"a":"zwei\\nZeilen ü","b":[1,2]}'


def test_the_process_object_is_valid_json_for_hostile_strings():
    """The process object is written out by hand (ecs._process): whatever a sandbox names its programs and
    arguments (quotes, backslashes, control characters, lone surrogates, non-ASCII), it parses back to them."""
    import random
    rng = random.Random(7)
    alphabet = ['"', "\\", "\n", "\x00", "\x1b", "\u2028", "\ud800", "é", "名", "a", " ", "/", "}", ","]
    enc = EcsEncoder("host-1", "0.1.0")
    for _ in range(500):
        def text(n: int) -> str:
            return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, n)))
        args = [text(12) for _ in range(rng.randint(0, 4))]
        proc = Process(pid=rng.randint(1, 2**22), name=text(15), executable="/" + text(20), args=args,
                       parent_pid=rng.choice([None, 1]), thread_id=rng.choice([None, 77]),
                       start_ns=rng.choice([None, TS]), exit_code=rng.choice([None, 0, -9]))
        doc = json.loads(enc.encode_document(network(process=proc)).json)
        got = doc["process"]
        assert got["pid"] == proc.pid
        assert got.get("name", "") == proc.name
        assert got["executable"] == proc.executable
        if args:
            assert got["args"][1:] == args[1:] and got["args"][0] == proc.executable
            assert got["args_count"] == len(args)
            if args[0] != proc.executable:
                assert got["title"] == " ".join(args)
        else:
            assert "args" not in got
        assert get(got, "parent.pid") == 1 if proc.parent_pid else "parent" not in got
        assert got.get("exit_code") == proc.exit_code

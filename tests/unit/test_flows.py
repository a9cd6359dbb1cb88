"""The flow table's lifecycle logic on synthetic records (the kernel tests cover the real ones)."""
import errno
import socket

import pytest

from tracer.decoding import (FLOW_ACCEPTED, FLOW_ESTABLISHED, FLOW_FAILED, FLOW_INITIATED, Header, NetRecord,
                             Owner, RecordType)
from tracer.events import Episode, Process
from tracer.state.flows import ATTEMPT_GRACE_NS, FlowTable

EPISODE = Episode("ep-1", "/eptrace/ep-1", 42)
PROCESS = Process(pid=100, name="python3")


def rec(kind, cookie=7, ts=1_000, local=("198.51.100.2", 40000), remote=("198.51.100.1", 80), proto=6,
        socktype=1, flags=0, ret=0, counts=(0, 0, 0, 0), start=0):
    return NetRecord(Header(kind, ts, cookie, Owner(42, 42, 100, 100, "python3")), socket.AF_INET, proto, socktype,
                     local[0], local[1], remote[0], remote[1], *counts, 0, 0, 0, (0,) * 8, start, flags, ret)


@pytest.fixture
def table():
    events = []
    t = FlowTable(emit=events.append, resolve=lambda r: (EPISODE, 42, "/eptrace/ep-1", PROCESS),
                  wall_ns=lambda ns: ns + 10**18)
    t.events = events
    return t


def actions(table):
    return [(e.action, e.outcome) for e in table.events]


def test_connect_resolves_as_success_when_established(table):
    table.handle(rec(RecordType.CONNECT, local=(None, 0)))
    assert table.events == []          # the outcome is not known yet
    table.handle(rec(RecordType.ESTABLISHED, ts=2_000, flags=FLOW_INITIATED | FLOW_ESTABLISHED))
    table.handle(rec(RecordType.FLOW_ENDED, ts=5_000, flags=FLOW_INITIATED | FLOW_ESTABLISHED,
                     counts=(1234, 567, 6, 4), start=1_000))
    assert actions(table) == [("connection_attempted", "success"), ("connection_established", "success"),
                              ("flow_ended", "success")]
    ended = table.events[-1]
    assert (ended.source_bytes, ended.destination_bytes, ended.source_packets, ended.destination_packets) == \
        (1234, 567, 6, 4)
    assert ended.source.ip == "198.51.100.2" and ended.destination.port == 80
    assert ended.duration_ns == 4_000 and ended.direction == "egress"
    assert table.flows == {}


def test_refused_connect_carries_the_errno_and_leaves_no_flow(table):
    table.handle(rec(RecordType.CONNECT, local=(None, 0)))
    table.handle(rec(RecordType.FLOW_ENDED, flags=FLOW_INITIATED | FLOW_FAILED))
    table.handle(rec(RecordType.CONNECT_RESULT, ret=-errno.ECONNREFUSED))
    assert actions(table) == [("connection_attempted", "failure")]
    assert table.events[0].error_message.startswith("ECONNREFUSED")
    assert table.flows == {}


def test_failed_handshake_without_syscall_result_fails_after_a_short_grace(table):
    table.handle(rec(RecordType.CONNECT, local=(None, 0)))
    table.handle(rec(RecordType.FLOW_ENDED, ts=2_000, flags=FLOW_INITIATED | FLOW_FAILED))
    table.sweep(2_000 + ATTEMPT_GRACE_NS // 10)
    assert table.events == []
    table.sweep(2_000 + ATTEMPT_GRACE_NS)
    assert actions(table) == [("connection_attempted", "failure")]
    assert "before it was established" in table.events[0].error_message


def test_unanswered_connect_goes_out_as_unknown_after_the_grace(table):
    table.handle(rec(RecordType.CONNECT, local=(None, 0)))
    table.sweep(1_000 + ATTEMPT_GRACE_NS - 1)
    assert table.events == []
    table.sweep(1_000 + ATTEMPT_GRACE_NS)
    assert actions(table) == [("connection_attempted", "unknown")]


def test_udp_connect_succeeds_at_the_syscall(table):
    table.handle(rec(RecordType.CONNECT, proto=17, socktype=2, remote=("198.51.100.1", 53), local=(None, 0)))
    table.handle(rec(RecordType.CONNECT_RESULT, proto=17, socktype=2, ret=0))
    assert actions(table) == [("connection_attempted", "success")]
    assert table.events[0].transport == "udp"


def test_accepted_flow_is_ingress_with_the_remote_as_source(table):
    table.handle(rec(RecordType.ACCEPTED, local=("198.51.100.2", 9000), remote=("198.51.100.1", 51000),
                     flags=FLOW_ACCEPTED | FLOW_ESTABLISHED))
    table.handle(rec(RecordType.FLOW_ENDED, local=("198.51.100.2", 9000), remote=("198.51.100.1", 51000),
                     flags=FLOW_ACCEPTED | FLOW_ESTABLISHED, counts=(10, 500, 2, 3)))
    accepted, ended = table.events
    assert accepted.action == "connection_accepted" and accepted.direction == "ingress"
    assert accepted.source.ip == "198.51.100.1" and accepted.destination.port == 9000
    # source is the remote initiator: what it sent is what the sandbox received
    assert (ended.source_bytes, ended.destination_bytes) == (500, 10)


def test_unconnected_udp_flow_names_its_only_destination(table):
    table.handle(rec(RecordType.UDP_SENT, proto=17, socktype=2, local=(None, 0), remote=("198.51.100.1", 53)))
    table.handle(rec(RecordType.FLOW_ENDED, proto=17, socktype=2, local=(None, 40001), remote=(None, 0),
                     flags=0, counts=(16, 16, 1, 1)))
    sent, ended = table.events
    assert sent.action == "udp_sent" and sent.destination.ip == "198.51.100.1"
    assert ended.destination.ip == "198.51.100.1" and ended.source.port == 40001 and ended.source.ip is None


def test_udp_flow_with_several_destinations_names_none(table):
    for port in (53, 5353):
        table.handle(rec(RecordType.UDP_SENT, proto=17, socktype=2, local=(None, 0),
                         remote=("198.51.100.1", port)))
    table.handle(rec(RecordType.FLOW_ENDED, proto=17, socktype=2, local=(None, 40001), remote=(None, 0)))
    assert table.events[-1].destination is None


def test_flow_updated_reports_running_totals_and_never_zeros_for_unknown(table):
    table.update_interval_ns = 1_000
    table.handle(rec(RecordType.CONNECT, local=(None, 0)))
    table.handle(rec(RecordType.ESTABLISHED, ts=2_000, flags=FLOW_INITIATED | FLOW_ESTABLISHED))
    table.sweep(3_500)                 # no counter record yet: the counters are unknown, not 0
    first = table.events[-1]
    assert first.action == "flow_updated"
    assert (first.source_bytes, first.destination_bytes, first.source_packets, first.destination_packets) == \
        (None, None, None, None)
    table.handle(rec(RecordType.FLOW_UPDATE, ts=4_000, counts=(100, 50, 3, 2)))
    table.sweep(5_000)
    second = table.events[-1]
    assert (second.source_bytes, second.destination_bytes, second.source_packets, second.destination_packets) == \
        (100, 50, 3, 2)
    table.sweep(6_500)                 # no new counter record since: the last totals again, not 0
    third = table.events[-1]
    assert third is not second and third.action == "flow_updated"
    assert (third.source_bytes, third.destination_bytes) == (100, 50)

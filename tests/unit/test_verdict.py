"""Verdict completeness, argv that the kernel could not read, and the limits that bound the record."""
from __future__ import annotations

import json
import mmap

import pytest

from tracer.config import Config, ConfigError, _build
from tracer.decoding import ARGV_FAILED, Header, Owner, ProcessRecord, RecordType
from tracer.events import Episode, Process, ProcessEvent
from tracer.metrics_http import exposition
from tracer.schema.ecs import EcsEncoder
from tracer.state.processes import Processes
from tracer.verdict import Verdict


def test_a_verdict_without_losses_is_complete_and_clean():
    v = Verdict("ep-1")
    v.account({})
    assert v.complete and v.clean and not v.alerted
    assert v.incomplete_reasons == [] and v.losses == {} and v.records_lost == 0
    doc = json.loads(v.to_json())
    assert doc["complete"] is True and doc["clean"] is True and doc["incomplete_reasons"] == []
    assert "complete" in v.human() and "INCOMPLETE" not in v.human()


def test_argv_recovered_from_proc_is_counted_but_no_gap():
    v = Verdict("ep-1")
    v.account({"argv_unread": 3, "argv_from_proc": 3, "budget": 0})
    assert v.complete and v.clean
    assert v.losses == {"argv_from_proc": 3, "argv_unread": 3}      # zeros dropped
    assert v.records_lost == 0


@pytest.mark.parametrize("reason", ["ringbuf_full", "budget", "no_socket_storage", "connects_map_full",
                                    "exit_codes_map_full", "sockets_map_full", "argv_map_full", "argv_missing",
                                    "flows_evicted", "unattributed"])
def test_every_gap_makes_the_verdict_incomplete_and_unclean(reason):
    v = Verdict("ep-1")
    v.account({reason: 2, "argv_from_proc": 1})
    assert not v.complete and not v.clean and not v.alerted
    assert v.incomplete_reasons == [reason]
    doc = json.loads(v.to_json())
    assert doc["complete"] is False and doc["clean"] is False and doc["incomplete_reasons"] == [reason]
    assert "INCOMPLETE" in v.human() and f"{reason} 2" in v.human()


def test_records_lost_counts_only_records_the_kernel_did_not_send():
    v = Verdict("ep-1")
    v.account({"ringbuf_full": 5, "budget": 7, "argv_missing": 1, "flows_evicted": 2, "argv_unread": 1})
    assert v.records_lost == 12
    assert v.incomplete_reasons == ["argv_missing", "budget", "flows_evicted", "ringbuf_full"]


def test_an_alert_makes_a_complete_verdict_unclean():
    v = Verdict("ep-1", alerts=[{"rule": "crypto_mining", "severity": 73, "message": "m"}])
    v.account({})
    assert v.complete and v.alerted and not v.clean
    assert json.loads(v.to_json())["clean"] is False


# ---- argv at exec ---------------------------------------------------------------------------------------

def _record(kind: RecordType, pid: int, data: bytes = b"", child_pid: int = 0, parent_tgid: int = 0):
    return ProcessRecord(Header(kind, 1, 0, Owner(7, 7, pid, pid, "comm")), parent_tgid, child_pid, 0, data)


def _forked_child(lookup) -> Processes:
    procs = Processes(lookup=lookup)
    procs._store(Process(pid=10, name="bash", executable="/bin/bash", args=["bash", "-c", "secret parent"]))
    procs.on_fork(ProcessRecord(Header(RecordType.PROCESS_FORKED, 1, 0, Owner(7, 7, 10, 10, "bash")), 10, 11, 0, b""))
    return procs


def test_an_exec_read_whole_by_the_kernel_keeps_its_argv():
    procs = _forked_child(lambda pid: pytest.fail("no /proc read when the kernel read argv whole"))
    procs.on_args(_record(RecordType.PROCESS_ARGS, 11, b"/bin/true\0a\0"))
    proc, from_proc = procs.on_exec(_record(RecordType.PROCESS_EXEC, 11, b"/bin/true\0", parent_tgid=11))
    assert proc.args == ["/bin/true", "a"] and proc.args_complete and from_proc is None


def test_an_exec_whose_argv_read_failed_takes_its_argv_from_proc():
    procs = _forked_child(lambda pid: Process(pid=pid, args=["/bin/true", "--donate-level", "x"]))
    procs.on_args(_record(RecordType.PROCESS_ARGS, 11, b"", child_pid=ARGV_FAILED))
    proc, from_proc = procs.on_exec(_record(RecordType.PROCESS_EXEC, 11, b"/bin/true\0", parent_tgid=11))
    assert proc.args == ["/bin/true", "--donate-level", "x"]
    assert proc.args_complete is False and from_proc is True


@pytest.mark.parametrize("args_record", [None, b"/bin/tr"])
def test_an_exec_never_borrows_its_parents_argv(args_record):
    """No ARGS record (lost) or a failed read, and /proc has nothing: what the kernel read, never the parent's."""
    procs = _forked_child(lambda pid: None)
    if args_record is not None:
        procs.on_args(_record(RecordType.PROCESS_ARGS, 11, args_record, child_pid=ARGV_FAILED))
    proc, from_proc = procs.on_exec(_record(RecordType.PROCESS_EXEC, 11, b"/bin/true\0", parent_tgid=11))
    assert "secret parent" not in proc.args
    assert proc.args == ([] if args_record is None else ["/bin/tr"])
    assert proc.args_complete is False and from_proc is False


def test_args_complete_false_reaches_the_document_only_when_false():
    enc = EcsEncoder("h", "0.1")
    episode = Episode("ep-1", "/e", 7)
    whole = enc.encode(ProcessEvent("process_started", 1, episode, 7, "/e", Process(pid=1, args=["a"])))
    assert "process" not in whole["eptrace"]
    cut = enc.encode(ProcessEvent("process_started", 1, episode, 7, "/e",
                                  Process(pid=1, args=["a"], args_complete=False)))
    assert cut["eptrace"]["process"] == {"args_complete": False}
    assert cut["process"]["args"] == ["a"]


# ---- limits ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kb", [3, 100, 0])
def test_the_ring_buffer_size_must_be_a_power_of_two_pages(kb):
    with pytest.raises(ConfigError, match="ringbuf_kb"):
        _build(Config, {"limits": {"ringbuf_kb": kb}}, "")


def test_limits_are_read_from_the_config():
    config = _build(Config, {"limits": {"ringbuf_kb": 64, "record_budget_per_second": 10,
                                        "record_budget_burst": 5, "ring_share_watermark_percent": 75,
                                        "ring_share_per_second": 7, "ring_share_burst": 3}}, "")
    assert config.limits.ringbuf_kb == 64 and config.limits.ringbuf_pages * mmap.PAGESIZE == 64 * 1024
    assert config.limits.record_budget_per_second == 10 and config.limits.record_budget_burst == 5
    assert config.limits.ring_share_watermark_percent == 75
    assert config.limits.ring_share_per_second == 7 and config.limits.ring_share_burst == 3


@pytest.mark.parametrize("key, value", [("ring_share_watermark_percent", 0), ("ring_share_watermark_percent", 101),
                                        ("ring_share_watermark_percent", 50.5), ("ring_share_per_second", 0),
                                        ("ring_share_burst", float("inf")), ("ring_share_burst", -1)])
def test_the_ring_share_must_be_sane_numbers(key, value):
    with pytest.raises(ConfigError, match=key):
        _build(Config, {"limits": {key: value}}, "")


def test_episode_losses_and_evictions_reach_prometheus():
    stats = {"records_received": 1, "records_lost_by_reason": {}, "events_emitted": 1, "alerts": 0,
             "episodes": 1, "flows_open": 0, "outputs": {},
             "episode_losses": [{"episode_id": "ep-1", "losses": {"budget": 4}}], "evicted": {"flows": 2}}
    text = exposition(stats)
    assert 'eptrace_episode_losses_total{episode="ep-1",reason="budget"} 4' in text
    assert 'eptrace_evicted_total{table="flows"} 2' in text

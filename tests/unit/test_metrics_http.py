import urllib.request

import pytest

from tracer.metrics_http import MetricsServer, exposition

STATS = {"records_received": 10, "records_lost": 0, "records_lost_by_reason": {"ringbuf_full": 0},
         "ring_unread_max_bytes": 1048576,
         "events_emitted": 8, "alerts": 1, "episodes": 2, "flows_open": 3,
         "outputs": [{"output": 'syslog+tcp://"x":1', "sent": 7, "dropped": {"spool_full": 2}, "queued": 4,
                      "spooled_bytes": 100, "latency_s": 0.25},
                     {"output": "hec://h:8088", "sent": 1, "dropped": {"rejected": 3},
                      "rejected": [{"reason": "hec_invalid_event", "count": 3}]}]}


def test_exposition_has_every_counter_and_escapes_labels():
    text = exposition(STATS)
    assert "eptrace_records_received_total 10" in text
    assert 'eptrace_records_lost_total{reason="ringbuf_full"} 0' in text          # zero is shown as zero
    assert 'eptrace_output_dropped_total{output="syslog+tcp://\\"x\\":1",reason="spool_full"} 2' in text
    assert 'eptrace_output_delivery_latency_seconds{output="syslog+tcp://\\"x\\":1"} 0.25' in text
    assert 'eptrace_output_dropped_total{output="hec://h:8088",reason="rejected:hec_invalid_event"} 3' in text
    assert 'reason="rejected"}' not in text
    assert text.count("# TYPE") == 16 and text.endswith("\n")
    assert "eptrace_records_failed_total 0" in text
    assert "eptrace_ring_unread_max_bytes 1.048576e+06" in text


def test_server_serves_metrics_and_404_elsewhere():
    server = MetricsServer("127.0.0.1:0", lambda: STATS)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5).read().decode()
        assert "eptrace_alerts_total 1" in body
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/", timeout=5)
        assert refused.value.code == 404
    finally:
        server.close()


@pytest.mark.parametrize("bad", ["9464", ":9464", "127.0.0.1:", "127.0.0.1:99999", "host:port"])
def test_bad_addresses_are_clear_errors(bad):
    with pytest.raises(ValueError, match="ADDR:PORT"):
        MetricsServer(bad, lambda: STATS)


EPISODES = {**STATS, "episode_losses": [{"episode_id": "ep-1", "losses": {"budget": 4}}],
            "episode_activity": [{"episode_id": "ep-1", "connections": 3, "alerts": 1, "connects_refused": 0,
                                  "egress_denied": 2},
                                 {"episode_id": 'ep-"2"', "connections": 0, "alerts": 0, "connects_refused": 5,
                                  "egress_denied": 0}]}


def test_per_episode_series_and_turning_them_off():
    text = exposition(EPISODES)
    assert 'eptrace_episode_connections_total{episode="ep-1"} 3' in text
    assert 'eptrace_episode_alerts_total{episode="ep-1"} 1' in text
    assert 'eptrace_episode_egress_denied_total{episode="ep-1"} 2' in text
    assert 'eptrace_episode_connects_refused_total{episode="ep-\\"2\\""} 5' in text
    assert 'eptrace_episode_losses_total{episode="ep-1",reason="budget"} 4' in text
    off = exposition(EPISODES, per_episode=False)
    assert "episode=" not in off and "eptrace_episode_connections_total" not in off
    assert "eptrace_records_received_total 10" in off and off.count("# TYPE") == 15   # the losses family too


def test_server_without_per_episode_series():
    server = MetricsServer("127.0.0.1:0", lambda: EPISODES, per_episode=False)
    try:
        response = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5)
        body = response.read().decode()
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert "eptrace_alerts_total 1" in body and "episode=" not in body
    finally:
        server.close()


def test_per_episode_counts_are_the_documents_of_each_episode():
    """A real capture replayed through the pipeline: each episode's series count its own documents."""
    from collections import Counter
    from pathlib import Path

    from support import Collect

    from tracer.capture import replay
    from tracer.outputs import Fanout
    from tracer.schema import EcsEncoder
    sink = Collect()
    tracer = replay(Path(__file__).parent.parent / "fixtures" / "metadata_and_raw_socket.capture",
                    EcsEncoder("replay", "test"), Fanout([sink]))
    episode_of = lambda d: d.get("labels", {}).get("episode_id")  # noqa: E731
    connections = Counter(episode_of(d) for d in sink.docs if d["event"].get("action") == "connection_attempted")
    alerted = Counter(episode_of(d) for d in sink.docs if d["event"].get("kind") == "alert")
    assert connections and alerted, "the fixture has connections and alerts"
    activity = {e["episode_id"]: e for e in tracer.stats_snapshot(per_episode=True)["episode_activity"]}
    assert {e: a["connections"] for e, a in activity.items() if a["connections"]} == dict(connections)
    assert {e: a["alerts"] for e, a in activity.items() if a["alerts"]} == dict(alerted)
    assert "episode_activity" not in tracer.stats_snapshot()          # the metric documents stay as they were
    episode, n = connections.most_common(1)[0]
    assert f'eptrace_episode_connections_total{{episode="{episode}"}} {float(n)}' in \
        exposition(tracer.stats_snapshot(per_episode=True))

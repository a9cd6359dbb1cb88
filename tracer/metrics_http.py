"""--metrics-listen: the tracer's health counters for Prometheus, exposed by prometheus_client.

StatsCollector reads Tracer.stats_snapshot() at each scrape, so every count is defined once (in the
tracer) and the metric documents and /metrics agree. With per_episode (the config's [metrics] per_episode,
on by default) it adds series labelled by episode; a fleet with many episodes turns them off.

The endpoint answers anyone who can reach it, so it is bounded: a request has REQUEST_TIMEOUT_S to arrive
and be answered, at most MAX_CONNECTIONS are served at once (more are closed at once), and an address
that is not loopback is warned about.
"""
from __future__ import annotations

import ipaddress
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 8

# Per-episode activity (Tracer.stats_snapshot(per_episode=True)["episode_activity"]): key -> (metric, help).
EPISODE_SERIES = {
    "connections": ("episode_connections_total", "Outbound connection attempts, per episode."),
    "alerts": ("episode_alerts_total", "Alerts raised, per episode."),
    "connects_refused": ("episode_connects_refused_total", "Connects and sends refused while no tracer was "
                         "alive (fail-closed), per episode."),
    "egress_denied": ("episode_egress_denied_total", "Connects, sends, sockets and packets the episode's "
                      "policy refused, per episode."),
}


class StatsCollector:
    """A prometheus_client collector over a stats snapshot (a zero-argument callable returning the dict)."""

    def __init__(self, snapshot: Callable[[], dict], per_episode: bool = True):
        self.snapshot, self.per_episode = snapshot, per_episode

    def describe(self) -> list:
        return []       # registering must not take a snapshot

    def collect(self) -> Iterator[Metric]:
        stats = self.snapshot()

        def family(kind, name: str, help_text: str, labels: tuple[str, ...], samples) -> Metric:
            metric = kind(f"eptrace_{name}", help_text, labels=list(labels))
            for values, value in samples:
                metric.add_metric([str(v) for v in values], value)
            return metric

        def counter(name, help_text, labels, samples) -> Metric:
            return family(CounterMetricFamily, name.removesuffix("_total"), help_text, labels, samples)

        def gauge(name, help_text, labels, samples) -> Metric:
            return family(GaugeMetricFamily, name, help_text, labels, samples)

        yield counter("records_received_total", "Ring-buffer records read.", (), [((), stats["records_received"])])
        yield counter("records_lost_total", "Records the kernel could not send, by reason.", ("reason",),
                      [((r,), n) for r, n in stats["records_lost_by_reason"].items()])
        yield counter("records_undecodable_total", "Records refused by the decoder (a size or type not in its "
                      "layouts).", (), [((), stats.get("records_undecodable", 0))])
        yield counter("records_failed_total", "Records whose handling raised in the tracer (a bug: the "
                      "episode's verdict is incomplete).", (), [((), stats.get("records_failed", 0))])
        yield gauge("ring_unread_max_bytes", "The most bytes the reader found unread in the ring buffer at once "
                    "(its worst lag; records are lost when it reaches the ring's size).", (),
                    [((), stats.get("ring_unread_max_bytes", 0))])
        if self.per_episode:
            yield counter("episode_losses_total", "What each episode's record lacks, by reason (nonzero only).",
                          ("episode", "reason"), [((item["episode_id"], r), n)
                                                  for item in stats.get("episode_losses", [])
                                                  for r, n in item["losses"].items()])
        yield counter("evicted_total", "Entries dropped from capped tables, by table.", ("table",),
                      [((t,), n) for t, n in stats.get("evicted", {}).items()])
        yield counter("events_emitted_total", "Documents produced.", (), [((), stats["events_emitted"])])
        yield counter("alerts_total", "Alerts raised.", (), [((), stats["alerts"])])
        yield gauge("episodes", "Episodes traced.", (), [((), stats["episodes"])])
        yield gauge("flows_open", "Flows open.", (), [((), stats["flows_open"])])
        outputs = stats["outputs"]     # a list of {"output": spec, "sent": ..., ...}
        yield counter("output_sent_total", "Documents delivered, per output.", ("output",),
                      [((v["output"],), v["sent"]) for v in outputs])
        yield counter("output_dropped_total", "Documents dropped, per output and reason.", ("output", "reason"),
                      [((v["output"], r), n) for v in outputs for r, n in _drop_reasons(v)])
        yield gauge("output_queue_depth", "Documents waiting in memory, per output.", ("output",),
                    [((v["output"],), v.get("queued", 0)) for v in outputs])
        yield gauge("output_spool_bytes", "Bytes waiting in the disk spool, per output.", ("output",),
                    [((v["output"],), v.get("spooled_bytes", 0)) for v in outputs])
        yield gauge("output_delivery_latency_seconds", "Time to deliver the last batch, per output.", ("output",),
                    [((v["output"],), v.get("latency_s", 0.0)) for v in outputs])
        if self.per_episode and "episode_activity" in stats:
            for key, (name, help_text) in EPISODE_SERIES.items():
                yield counter(name, help_text, ("episode",),
                              [((e["episode_id"],), e[key]) for e in stats["episode_activity"]])


def exposition(stats: dict, per_episode: bool = True) -> str:
    """The Prometheus text format (version 0.0.4) of a stats snapshot (Tracer.stats_snapshot)."""
    return generate_latest(_registry(lambda: stats, per_episode)).decode()


def _registry(snapshot: Callable[[], dict], per_episode: bool) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(snapshot, per_episode))
    return registry


def _drop_reasons(output: dict) -> list[tuple[str, int]]:
    """reason -> count, a receiver's refusals as "rejected:<its reason>" (the stats list them apart)."""
    rejected = output.get("rejected", [])
    reasons = [(r, n) for r, n in output["dropped"].items() if not (r == "rejected" and rejected)]
    return reasons + [(f"rejected:{r['reason']}", r["count"]) for r in rejected]


class MetricsServer:
    """GET /metrics: snapshot() through StatsCollector (per_episode: the per-episode series too)."""

    def __init__(self, address: str, snapshot: Callable[[], dict], per_episode: bool = True):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"--metrics-listen wants ADDR:PORT, e.g. 127.0.0.1:9464, not {address!r}")
        registry = _registry(snapshot, per_episode)

        class Handler(BaseHTTPRequestHandler):
            timeout = REQUEST_TIMEOUT_S     # a client that sends nothing, or reads nothing, is dropped

            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "see /metrics")
                    return
                body = generate_latest(registry)
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:   # no access log on stderr
                pass

        try:
            self.server = _BoundedServer((host.strip("[]"), int(port)), Handler)
        except OSError as e:
            raise ValueError(f"--metrics-listen {address}: {e.strerror}") from None
        if not _is_loopback(host.strip("[]")):
            log.warning("--metrics-listen %s is reachable from other hosts (and from sandboxes routed here); "
                        "bind it to 127.0.0.1 unless that is meant", address)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _BoundedServer(ThreadingHTTPServer):
    """One thread per connection, at most MAX_CONNECTIONS at once: the others are closed unanswered."""
    daemon_threads = True

    def __init__(self, *args, **kwargs) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused = getattr(self, "refused", 0) + 1
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

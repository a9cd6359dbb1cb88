"""--metrics-listen: the tracer's health counters in the Prometheus text format.

The endpoint answers anyone who can reach it, so it is bounded: a request has REQUEST_TIMEOUT_S to arrive
and be answered, at most MAX_CONNECTIONS are served at once (more are closed at once), and an address
that is not loopback is warned about.
"""
from __future__ import annotations

import ipaddress
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 8


def exposition(stats: dict) -> str:
    """Prometheus text format (version 0.0.4) of a stats snapshot (Tracer.stats_snapshot)."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict, float]]) -> None:
        lines.append(f"# HELP eptrace_{name} {help_text}")
        lines.append(f"# TYPE eptrace_{name} {kind}")
        for labels, value in samples:
            text = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
            lines.append(f"eptrace_{name}{{{text}}} {value}" if text else f"eptrace_{name} {value}")

    metric("records_received_total", "counter", "Ring-buffer records read.", [({}, stats["records_received"])])
    metric("records_lost_total", "counter", "Records the kernel could not send, by reason.",
           [({"reason": r}, n) for r, n in stats["records_lost_by_reason"].items()])
    metric("records_undecodable_total", "counter", "Records refused by the decoder (a size or type not "
           "in its layouts).", [({}, stats.get("records_undecodable", 0))])
    metric("episode_losses_total", "counter", "What each episode's record lacks, by reason (nonzero only).",
           [({"episode": item["episode_id"], "reason": r}, n) for item in stats.get("episode_losses", [])
            for r, n in item["losses"].items()])
    metric("evicted_total", "counter", "Entries dropped from capped tables, by table.",
           [({"table": t}, n) for t, n in stats.get("evicted", {}).items()])
    metric("events_emitted_total", "counter", "Documents produced.", [({}, stats["events_emitted"])])
    metric("alerts_total", "counter", "Alerts raised.", [({}, stats["alerts"])])
    metric("episodes", "gauge", "Episodes traced.", [({}, stats["episodes"])])
    metric("flows_open", "gauge", "Flows open.", [({}, stats["flows_open"])])
    outputs = stats["outputs"]     # a list of {"output": spec, "sent": ..., ...}
    metric("output_sent_total", "counter", "Documents delivered, per output.",
           [({"output": v["output"]}, v["sent"]) for v in outputs])
    metric("output_dropped_total", "counter", "Documents dropped, per output and reason.",
           [({"output": v["output"], "reason": r}, n) for v in outputs for r, n in _drop_reasons(v)])
    metric("output_queue_depth", "gauge", "Documents waiting in memory, per output.",
           [({"output": v["output"]}, v.get("queued", 0)) for v in outputs])
    metric("output_spool_bytes", "gauge", "Bytes waiting in the disk spool, per output.",
           [({"output": v["output"]}, v.get("spooled_bytes", 0)) for v in outputs])
    metric("output_delivery_latency_seconds", "gauge", "Time to deliver the last batch, per output.",
           [({"output": v["output"]}, v.get("latency_s", 0.0)) for v in outputs])
    return "\n".join(lines) + "\n"


def _drop_reasons(output: dict) -> list[tuple[str, int]]:
    """reason -> count, a receiver's refusals as "rejected:<its reason>" (the stats list them apart)."""
    rejected = output.get("rejected", [])
    reasons = [(r, n) for r, n in output["dropped"].items() if not (r == "rejected" and rejected)]
    return reasons + [(f"rejected:{r['reason']}", r["count"]) for r in rejected]


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class MetricsServer:
    def __init__(self, address: str, snapshot: Callable[[], dict]):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"--metrics-listen wants ADDR:PORT, e.g. 127.0.0.1:9464, not {address!r}")
        snapshot_fn = snapshot

        class Handler(BaseHTTPRequestHandler):
            timeout = REQUEST_TIMEOUT_S     # a client that sends nothing, or reads nothing, is dropped

            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "see /metrics")
                    return
                body = exposition(snapshot_fn()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
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

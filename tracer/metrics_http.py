"""--metrics-listen: the tracer's health counters in the Prometheus text format."""
from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

log = logging.getLogger(__name__)


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
            self.server = ThreadingHTTPServer((host.strip("[]"), int(port)), Handler)
        except OSError as e:
            raise ValueError(f"--metrics-listen {address}: {e.strerror}") from None
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

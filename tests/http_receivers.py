"""HTTP receivers that answer like Splunk HEC and Elasticsearch _bulk, for the unit and kernel tests.

No real Splunk or Elasticsearch can be installed here (README); these servers speak the documented
request and answer formats, including partial failures, so that the senders' handling of each is tested.
"""
from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Server:
    """ThreadingHTTPServer on 127.0.0.1 (HTTP/1.1, keep-alive). respond(path, headers, body) -> (status, bytes)."""

    def __init__(self, respond, tls_context=None, port=0):
        self.respond = respond
        self.requests = []        # (path, headers, body)
        self.connections = 0
        self.sockets = []         # open connections: closed with the server, as when a receiver dies
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                with outer.lock:
                    outer.connections += 1
                    outer.sockets.append(self.connection)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with outer.lock:
                    outer.requests.append((self.path, dict(self.headers), body))
                    status, answer = outer.respond(self.path, self.headers, body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        if tls_context is not None:
            self.httpd.socket = tls_context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        with self.lock:
            for sock in self.sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass



def hec_events(body):
    """The concatenated JSON objects of a HEC body."""
    decoder, text, at, events = json.JSONDecoder(), body.decode(), 0, []
    while at < len(text):
        event, at = decoder.raw_decode(text, at)
        events.append(event)
    return events


class HecReceiver:
    """Keeps the events of accepted requests; script is a list of (status, answer) played first."""

    def __init__(self, script=(), bad=lambda event: False):
        self.script = list(script)
        self.bad = bad
        self.events = []

    def __call__(self, path, headers, body):
        if self.script:
            return self.script.pop(0)
        events = hec_events(body)
        for k, event in enumerate(events):
            if self.bad(event):          # Splunk refuses the request and names the event
                return 400, json.dumps({"text": "Invalid data format", "code": 6, "invalid-event-number": k}).encode()
        self.events += events
        return 200, b'{"text":"Success","code":0}'

    def ids(self):
        return [e["event"]["event"]["id"] for e in self.events]


class EsReceiver:
    """A _bulk endpoint that keeps documents by _id, answering per item like Elasticsearch.

    item(doc_id, doc, attempt) -> status for the item, or None for the normal behaviour
    (201, or 409 when the _id is already there)."""

    def __init__(self, script=(), item=lambda doc_id, doc, attempt: None):
        self.script = list(script)
        self.item = item
        self.store = {}
        self.attempts = {}
        self.bodies = []

    def __call__(self, path, headers, body):
        if self.script:
            return self.script.pop(0)
        self.bodies.append(body)
        lines = body.decode().split("\n")
        assert lines[-1] == "" and len(lines) % 2 == 1, "NDJSON must end with a newline"
        items, errors = [], False
        for action_line, doc_line in zip(lines[0::2], lines[1::2]):
            action = json.loads(action_line)["create"]
            doc = json.loads(doc_line)
            doc_id = action.get("_id")
            self.attempts[doc_id] = self.attempts.get(doc_id, 0) + 1
            status = self.item(doc_id, doc, self.attempts[doc_id])
            if status is None:
                status = 409 if doc_id in self.store else 201
            result = {"_index": action["_index"], "_id": doc_id, "status": status}
            if status in (200, 201):
                self.store[doc_id] = (action["_index"], doc)
            else:
                errors = True
                kind = {409: "version_conflict_engine_exception", 400: "mapper_parsing_exception",
                        429: "es_rejected_execution_exception"}.get(status, "exception")
                result["error"] = {"type": kind, "reason": f"scripted {status}"}
            items.append({"create": result})
        return 200, json.dumps({"took": 3, "errors": errors, "items": items}).encode()

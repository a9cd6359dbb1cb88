"""Events per second through each output, on loopback to a sink in another process."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tracer.events import Endpoint, Episode, NetworkEvent, Process
from tracer.outputs import FileOutput
from tracer.schema import EcsEncoder

EVENTS = 100_000

# Counts the bytes it receives and prints the total once the connection closes.
SINK = r'''
import socket, sys
s = socket.create_server(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
total = 0
while data := c.recv(1 << 20):
    total += len(data)
print(total, flush=True)
'''


def documents(n: int):
    encoder = EcsEncoder("bench", "0")
    episode = Episode("ep-bench", "/eptrace/ep-bench", 42)
    proc = Process(pid=4242, name="python3", executable="/usr/bin/python3", args=["python3", "agent.py"])
    return [encoder.encode_document(NetworkEvent(
        "flow_ended", 1_800_000_000_000_000_000 + i, episode, 42, "/eptrace/ep-bench", proc, i, "ipv4", "tcp",
        "egress", source=Endpoint("198.51.100.2", 40000 + i % 20000), destination=Endpoint("198.51.100.1", 443),
        outcome="success", duration_ns=5_000_000, source_bytes=1234, destination_bytes=56789, source_packets=10,
        destination_packets=40)) for i in range(n)]


def file_rate(docs) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = FileOutput(str(Path(tmp) / "events.ndjson"))
        start = time.perf_counter()
        for doc in docs:
            out.write(doc)
        out.close()
        return len(docs) / (time.perf_counter() - start)


# A Forward receiver that unpacks each message and answers its chunk's ack: the sender's side is measured.
FORWARD_SINK = r'''
import socket, msgpack
s = socket.create_server(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
unpacker = msgpack.Unpacker(raw=False)
while data := c.recv(1 << 20):
    unpacker.feed(data)
    for message in unpacker:
        chunk = message[2].get("chunk") if len(message) > 2 and isinstance(message[2], dict) else None
        if chunk:
            c.sendall(msgpack.packb({"ack": chunk}))
'''


def network_rate(docs, sink_code: str, spec: str) -> float:
    """Through the delivery core to a sink in another process, until every document is acknowledged."""
    from tracer.outputs import parse_output_spec
    sink = subprocess.Popen([sys.executable, "-c", sink_code], stdout=subprocess.PIPE, text=True)
    port = int(sink.stdout.readline())
    with tempfile.TemporaryDirectory() as state:
        os.environ["EPTRACE_STATE_DIR"] = state        # the spool of this run only
        out = parse_output_spec(spec.format(port=port))
        start = time.perf_counter()
        for doc in docs:
            out.write(doc)
        while out.sent < len(docs):
            time.sleep(0.001)
        elapsed = time.perf_counter() - start
        out.close()
        del os.environ["EPTRACE_STATE_DIR"]
    sink.kill()
    return len(docs) / elapsed


def main() -> None:
    docs = documents(EVENTS)
    print(f"  output file           {file_rate(docs):10,.0f} events/s   target >= 100,000")
    syslog = network_rate(docs, SINK, "syslog+tcp://127.0.0.1:{port}")
    forward = network_rate(docs, FORWARD_SINK, "forward://127.0.0.1:{port}")
    print(f"  output syslog+tcp     {syslog:10,.0f} events/s   target >= 50,000")
    print(f"  output forward        {forward:10,.0f} events/s   target >= 50,000  (to an acking Python receiver)")


if __name__ == "__main__":
    main()

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
    sink = subprocess.Popen([sys.executable, "-c", sink_code], stdout=subprocess.PIPE, text=True)
    try:
        return delivered_rate(docs, spec.format(port=int(sink.stdout.readline())))
    finally:
        sink.kill()
        sink.wait()


def delivered_rate(docs, spec: str) -> float:
    from tracer.outputs import parse_output_spec
    with tempfile.TemporaryDirectory() as state:
        os.environ["EPTRACE_STATE_DIR"] = state        # the spool of this run only
        out = parse_output_spec(spec)
        start = time.perf_counter()
        for doc in docs:
            out.write(doc)
        while out.sent < len(docs):
            time.sleep(0.001)
        elapsed = time.perf_counter() - start
        out.close()
        del os.environ["EPTRACE_STATE_DIR"]
    return len(docs) / elapsed


KAFKA_MOCK = Path(__file__).resolve().parents[1] / "tests" / "kernel" / "helpers" / "kafka_mock.py"


def kafka_rate(docs) -> float | None:
    """To librdkafka's mock cluster (one broker, in another process): no real Kafka broker here."""
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        return None
    from tracer.outputs.kafka import parse_kafka_spec
    mock = subprocess.Popen([sys.executable, str(KAFKA_MOCK)], stdout=subprocess.PIPE, text=True)
    try:
        spec = f"kafka://{mock.stdout.readline().strip()}/bench"
        warm = parse_kafka_spec(spec)          # the topic exists beforehand, as it does in production
        warm.send(docs[:1])
        warm.close()
        return delivered_rate(docs, spec)
    finally:
        mock.kill()
        mock.wait()


def relp_rate(docs) -> float | None:
    """To a real rsyslogd with imrelp (rsyslog-relp), writing to a file."""
    if not (os.path.exists("/usr/sbin/rsyslogd") and os.path.exists("/usr/lib/x86_64-linux-gnu/rsyslog/imrelp.so")):
        return None
    import socket
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        conf = Path(tmp) / "rsyslog.conf"
        conf.write_text(f'global(workDirectory="{tmp}" maxMessageSize="64k")\nmodule(load="imrelp")\n'
                        f'input(type="imrelp" port="{port}" address="127.0.0.1" ruleset="r")\n'
                        f'ruleset(name="r") {{ action(type="omfile" file="{tmp}/msg.log") }}\n')
        rsyslogd = subprocess.Popen(["/usr/sbin/rsyslogd", "-n", "-f", str(conf), "-i", f"{tmp}/pid"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.05)
            return delivered_rate(docs, f"syslog+relp://127.0.0.1:{port}")
        finally:
            rsyslogd.terminate()
            rsyslogd.wait()


def main() -> None:
    docs = documents(EVENTS)
    print(f"  output file           {file_rate(docs):10,.0f} events/s   target >= 100,000")
    syslog = network_rate(docs, SINK, "syslog+tcp://127.0.0.1:{port}")
    forward = network_rate(docs, FORWARD_SINK, "forward://127.0.0.1:{port}")
    print(f"  output syslog+tcp     {syslog:10,.0f} events/s   target >= 50,000")
    print(f"  output forward        {forward:10,.0f} events/s   target >= 50,000  (to an acking Python receiver)")
    kafka = kafka_rate(docs)
    print(f"  output kafka          {kafka:10,.0f} events/s   target >= 100,000 (to librdkafka's mock cluster)"
          if kafka is not None else "  output kafka          skipped: confluent-kafka missing (make setup)")
    relp = relp_rate(docs)
    print(f"  output syslog+relp    {relp:10,.0f} events/s   (to rsyslogd imrelp, every frame acknowledged)"
          if relp is not None else "  output syslog+relp    skipped: rsyslog-relp missing (make setup)")


if __name__ == "__main__":
    main()

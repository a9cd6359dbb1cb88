"""The Kafka output without a broker: spec parsing, secrets, message keys, librdkafka configuration."""
import importlib.util

import pytest
from support import require

from tracer.outputs import OutputSpecError, parse_output_spec
from tracer.outputs.kafka import episode_key, parse_kafka_spec
from tracer.outputs.secrets import secret_param
from tracer.schema import Document, EcsEncoder
from tracer.events import Endpoint, Episode, Metric, NetworkEvent, Process

@pytest.fixture(autouse=True)
def _needs_confluent_kafka():
    require(importlib.util.find_spec("confluent_kafka") is not None, "confluent-kafka is not installed (make setup)")


def docs():
    enc = EcsEncoder("host-a", "0.1")
    episode = Episode(id="ep-7.a:b", cgroup_path="/x", cgroup_id=1,
                      labels={"episode_id": "spoof", "note": '"episode_id":"evil"'})
    proc = Process(pid=1, name='"episode_id":"evil"', executable="/bin/x", args=['"episode_id":"evil"'])
    net = enc.encode_document(NetworkEvent(action="connection_established", timestamp_ns=1, episode=episode,
                                           cgroup_id=1, cgroup_path="/x", process=proc, cookie=1,
                                           network_type="ipv4", transport="tcp", direction="egress",
                                           source=Endpoint("10.0.0.2", 1), destination=Endpoint("198.51.100.1", 2)))
    metric = enc.encode_document(Metric(timestamp_ns=2, stats={"events": 1}))
    return net, metric


def test_the_key_is_the_episode_id_or_the_host_name():
    net, metric = docs()
    assert episode_key(net, b"host") == b"ep-7.a:b"        # not the label that tries to spoof it
    assert episode_key(metric, b"host") == b"host"
    assert episode_key(Document('{"labels":{"episode_id":"a\\"b"}}', "event"), b"host") == b"host"


def test_spec_forms_and_producer_settings(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    s = parse_kafka_spec(f"kafka://k1:9092,[::1]:9093/events?compression=lz4&alerts_topic=alerts&sasl=scram-sha-512"
                         f"&user=eptrace&password_file={secret}")
    try:
        assert s.name == "kafka://k1:9092,[::1]:9093/events" and s.alerts_topic == "alerts"
        c = s._config
        assert c["enable.idempotence"] is True and c["acks"] == "all" and c["compression.type"] == "lz4"
        assert c["sasl.mechanism"] == "SCRAM-SHA-512" and c["sasl.password"] == "s3cret"
        assert c["security.protocol"] == "SASL_PLAINTEXT" and c["bootstrap.servers"] == "k1:9092,[::1]:9093"
    finally:
        s.close()
    s = parse_kafka_spec("kafka://k1:9092/events")
    assert s._config["compression.type"] == "zstd" and s._config["security.protocol"] == "PLAINTEXT"
    s.close()


@pytest.mark.parametrize("spec, message", [
    ("kafka://k1:9092", "topic is missing"),
    ("kafka://k1:9092/", "topic is missing"),
    ("kafka://k1/events", "HOST:PORT"),
    ("kafka://k1:9092/bad topic", "topic"),
    ("kafka://k1:9092/t?compression=snappy2", "compression"),
    ("kafka://k1:9092/t?ca=/etc/hosts", "TLS only"),
    ("kafka://k1:9092/t?sasl=plain&user=u", "password_file"),
    ("kafka://k1:9092/t?user=u&password=hunter2", "SASL only"),
    ("kafka://k1:9092/t?sasl=plain&user=u&password=hunter2&password_file=/nonexistent", "give password once"),
    ("kafka://k1:9092/t?sasl=plain&user=u&password_file=/nonexistent/hunter2", "cannot read"),
    ("kafka://k1:9092/t?bogus=1", "unknown option"),
])
def test_bad_specs_are_one_line_errors_without_the_password(spec, message):
    with pytest.raises(OutputSpecError, match=message) as err:
        parse_output_spec(spec)
    assert "\n" not in str(err.value) and "hunter2" not in str(err.value).replace("/nonexistent/hunter2", "")


def test_secret_param():
    assert secret_param({"password": "x"}, "password", "out") == "x"
    assert secret_param({}, "password", "out") is None


def test_no_broker_is_a_send_error_after_the_delivery_timeout(tmp_path):
    """Nothing listens on the port: librdkafka reports every message failed (timed out), and the
    batch is handed back for a retry, never counted as delivered."""
    import socket
    from tracer.outputs.kafka import KafkaSender
    from tracer.outputs.senders import SendError
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                  # closed again: connections are refused
    sender = KafkaSender([f"127.0.0.1:{port}"], "events", delivery_timeout_s=1.0)
    try:
        with pytest.raises(SendError, match="not delivered|not reported delivered"):
            sender.send(list(docs()))
        assert sender.delivered == 0
    finally:
        sender.close()

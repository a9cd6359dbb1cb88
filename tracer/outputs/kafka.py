"""Kafka sender: each document is one Kafka message, produced through librdkafka (confluent-kafka).

- The producer is idempotent with acks=all: librdkafka numbers each message so that its
  own retries never duplicate or reorder a partition, and the brokers in sync have it.
- The message key is the episode id (labels.episode_id), or this host's name for documents
  of no episode (metrics): Kafka hashes the key to a partition, so an episode's documents
  stay in one partition, in the order they were written.
- Alerts also go to alerts_topic when one is given (the main topic keeps every document).

The sender is driven by tracer.outputs.delivery: send() produces a batch and returns only
once librdkafka has reported every message of it delivered (acknowledged by the brokers) or
failed. A message Kafka refuses for good (too large, invalid) is returned as rejected and
dead-lettered; any other failure (broker down, timed out) raises SendError and the whole
batch is retried later (already delivered ones then arrive twice: deduplicate on event.id).
A dead broker costs send() at most DELIVERY_TIMEOUT_S; the tracer itself never waits.
"""
from __future__ import annotations

import logging
import re
import socket
import time
from typing import Any

from tracer.outputs.addresses import check_tls_files, flag_option, parse_options, split_address
from tracer.outputs.secrets import secret_param
from tracer.outputs.senders import SendError
from tracer.outputs.tls import client_context
from tracer.schema import Document

log = logging.getLogger(__name__)

ACCEPTED_FORMS = ("'kafka://BROKER[,BROKER...]/TOPIC[?compression=zstd|lz4|gzip|none&alerts_topic=T"
                  "&tls=1&ca=FILE&cert=FILE&key=FILE&sasl=plain|scram-sha-256|scram-sha-512&user=U"
                  "&password_file=FILE&max_message_bytes=N]' (BROKER is HOST:PORT, IPv6 hosts in brackets)")
OPTIONS = ("compression", "alerts_topic", "tls", "ca", "cert", "key", "sasl", "user", "password",
           "password_file", "max_message_bytes")
COMPRESSIONS = ("zstd", "lz4", "gzip", "none")
SASL_MECHANISMS = {"plain": "PLAIN", "scram-sha-256": "SCRAM-SHA-256", "scram-sha-512": "SCRAM-SHA-512"}
_TOPIC_RE = re.compile(r"[A-Za-z0-9._-]{1,249}")

# librdkafka reports every message by message.timeout.ms, delivered or failed: the longest a
# send() waits for a dead broker before the delivery core spools the batch and backs off.
DELIVERY_TIMEOUT_S = 10.0
# A broker's default message.max.bytes (Kafka 3.x): larger messages are refused for good.
DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
# Errors that the same message would get again: dead-lettered, never retried. librdkafka reports a
# message over message.max.bytes with the broker's own code, before sending it.
REFUSED_FOR_GOOD = ("MSG_SIZE_TOO_LARGE", "INVALID_MSG", "INVALID_MSG_SIZE", "INVALID_RECORD",
                    "RECORD_LIST_TOO_LARGE")
_EPISODE_KEY = '"episode_id":"'
_ERROR_LOG_EVERY_S = 60.0


def episode_key(doc: Document, default: bytes) -> bytes:
    """labels.episode_id of a document, read from its JSON text without parsing it; default if none.

    The encoder escapes every quote inside string values, so `"episode_id":"` unescaped can only
    be the key itself; episode ids are plain ASCII (tracer.registry), never escaped.
    """
    text = doc.json
    start = text.find(_EPISODE_KEY)
    if start < 0:
        return default
    start += len(_EPISODE_KEY)
    end = text.find('"', start)
    if end <= start or "\\" in text[start:end]:
        return default
    return text[start:end].encode("utf-8", "replace")


class KafkaSender:
    """Sends batches of ECS documents to Kafka (implements tracer.outputs.senders.Sender)."""

    batch_max = 5000       # one wait for delivery reports per batch: librdkafka batches underneath

    def __init__(self, brokers: list[str], topic: str, *, alerts_topic: str | None = None,
                 compression: str = "zstd", tls: bool = False, ca_file: str | None = None,
                 cert_file: str | None = None, key_file: str | None = None, sasl: str | None = None,
                 user: str | None = None, password: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, hostname: str | None = None,
                 delivery_timeout_s: float = DELIVERY_TIMEOUT_S) -> None:
        try:
            import confluent_kafka
        except ImportError:
            raise ValueError("kafka output: the confluent-kafka package is missing: run 'make setup'") from None
        self._kafka = confluent_kafka
        self._refused_for_good = frozenset(getattr(confluent_kafka.KafkaError, name) for name in REFUSED_FOR_GOOD)
        if not brokers:
            raise ValueError("kafka output: no broker given")
        for name in (topic, alerts_topic):
            if name is not None and (not _TOPIC_RE.fullmatch(name) or name in (".", "..")):
                raise ValueError(f"kafka output: a topic is 1-249 of A-Z a-z 0-9 . _ -, got {name!r}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"kafka output: compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
        check_tls_files("kafka output", tls, ca_file, cert_file, key_file)
        if sasl is not None and sasl not in SASL_MECHANISMS:
            raise ValueError(f"kafka output: sasl must be one of {', '.join(SASL_MECHANISMS)}, got {sasl!r}")
        if sasl is not None and (not user or not password):
            raise ValueError("kafka output: sasl needs user= and password_file=")
        if sasl is None and (user or password):
            raise ValueError("kafka output: user and password are for SASL only (add sasl=plain or sasl=scram-sha-512)")
        if tls:
            client_context("kafka output", ca_file, cert_file, key_file)     # the files' errors, worded as elsewhere
        self.topic, self.alerts_topic = topic, alerts_topic
        self.delivery_timeout_s = delivery_timeout_s
        self.max_message_bytes = max_message_bytes
        self.name = f"kafka://{','.join(brokers)}/{topic}"
        self._default_key = (hostname or socket.gethostname()).encode("utf-8", "replace")
        protocol = ("SASL_" if sasl else "") + ("SSL" if tls else "PLAINTEXT")
        self._config: dict[str, Any] = {
            "bootstrap.servers": ",".join(brokers),
            "client.id": "eptrace",
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": compression,
            "linger.ms": 5,
            "message.timeout.ms": int(delivery_timeout_s * 1000),
            "message.max.bytes": max_message_bytes,
            "queue.buffering.max.messages": 4 * self.batch_max,
            "security.protocol": protocol,
            "error_cb": self._on_error,
            "on_delivery": self._on_delivery,
            "delivery.report.only.error": True,
            # librdkafka logs every failed reconnect; its errors reach _on_error, which rate-limits them.
            "logger": log,
            "log_level": 2,
        }
        if tls:
            # Without ca=, "probe" finds the system's CA store (the wheel's own OpenSSL knows no default
            # path); librdkafka checks the broker's name against its certificate by default.
            self._config.update({"ssl.ca.location": ca_file or "probe", "ssl.certificate.location": cert_file,
                                 "ssl.key.location": key_file})
            self._config = {k: v for k, v in self._config.items() if v is not None}
        if sasl:
            self._config.update({"sasl.mechanism": SASL_MECHANISMS[sasl], "sasl.username": user,
                                 "sasl.password": password})
        self.delivered = 0             # messages librdkafka reported delivered
        self.producers = 0             # producers made: a fatal error makes a new one
        self._fatal = False
        self._failed: list[tuple[bytes, Any]] = []    # (value, KafkaError) of the batch being sent
        self._last_error_log = 0.0
        self._producer = self._new_producer()

    def _new_producer(self) -> Any:
        try:
            producer = self._kafka.Producer(self._config)
        except self._kafka.KafkaException as exc:     # a bad setting; never echoes sasl.password
            raise ValueError(f"{self.name}: librdkafka refused the configuration: {exc.args[0].str()}") from None
        self.producers += 1
        self._fatal = False
        return producer

    def _on_error(self, err: Any) -> None:
        """librdkafka's client-level errors (brokers down, authentication): logged, at most once a minute."""
        if err.fatal():
            self._fatal = True       # the idempotent producer cannot go on: send() makes a new one
        now = time.monotonic()
        if err.fatal() or now - self._last_error_log >= _ERROR_LOG_EVERY_S:
            self._last_error_log = now
            log.warning("%s: %s%s", self.name, err.str(), " (fatal: a new producer is made)" if err.fatal() else "")

    # --- Sender --------------------------------------------------------------------------

    def send(self, docs: list[Document]) -> list[tuple[Document, str]] | None:
        if not docs:
            return None
        if self._fatal:
            self._replace_producer()
        producer = self._producer
        self._failed = failed = []                 # filled by _on_delivery: librdkafka reports only failures
        produce, topic, alerts_topic, default_key = producer.produce, self.topic, self.alerts_topic, self._default_key
        for doc in docs:
            value = doc.json.encode("utf-8", "replace")      # a stray surrogate must not lose the document
            key = episode_key(doc, default_key)
            try:
                produce(topic, value, key)
            except (BufferError, self._kafka.KafkaException):
                self._produce_slowly(producer, topic, value, key)
            if alerts_topic and doc.kind == "alert":
                self._produce_slowly(producer, alerts_topic, value, key)
        # flush() sends at once (no linger) and returns when librdkafka has reported every message, delivered
        # or failed, which it does within message.timeout.ms; what is left then is reported as not delivered.
        left = producer.flush(self.delivery_timeout_s + 5.0)
        if left:
            raise SendError(f"{self.name}: {left} messages not reported delivered within "
                            f"{self.delivery_timeout_s + 5.0:g} s")
        retry = None
        rejected: dict[bytes, str] = {}
        for value, err in failed:
            if err.code() in self._refused_for_good:
                rejected.setdefault(value, err.name().lower())
            else:
                retry = retry or err
        if retry is not None:
            if retry.fatal():
                self._fatal = True
            raise SendError(f"{self.name}: {len(failed)} messages not delivered: {retry.str()}")
        dead = [(doc, rejected[value]) for doc in docs if rejected
                and (value := doc.json.encode("utf-8", "replace")) in rejected]
        self.delivered += len(docs) - len(dead)
        return dead or None

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._failed.append((msg.value(), err))

    def _produce_slowly(self, producer: Any, topic: str, value: bytes, key: bytes) -> None:
        """produce() when librdkafka's queue is full (wait for room) or refuses the message at once."""
        kafka = self._kafka
        while True:
            try:
                producer.produce(topic, value, key)
                return
            except BufferError:          # librdkafka's queue is full: serve delivery reports, then again
                producer.poll(0.05)
            except kafka.KafkaException as exc:
                err = exc.args[0]
                if err.code() in self._refused_for_good:
                    self._failed.append((value, err))      # refused before it was sent: dead-lettered
                    return
                raise SendError(f"{self.name}: {err.str()}") from None

    def _replace_producer(self) -> None:
        old, self._producer = self._producer, None
        try:
            old.purge()
            old.flush(0)
        except Exception:   # noqa: BLE001 - the old producer is beyond use anyway
            pass
        self._producer = self._new_producer()

    def close(self) -> None:
        """The delivery core has already had every send() reported; nothing is left to wait for."""
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.purge()
                producer.flush(0)
            except Exception:   # noqa: BLE001
                pass


def _redacted(spec: str) -> str:
    return re.sub(r"(password=)[^&#]*", r"\1***", spec)


def parse_kafka_spec(spec: str) -> KafkaSender:
    """'kafka://BROKER[,BROKER...]/TOPIC[?options]' (see ACCEPTED_FORMS); ValueError otherwise.

    Option values are URL-decoded. The password (password= or, better, password_file=)
    is never repeated in an error.
    """
    shown = _redacted(spec)
    label = f"kafka output {shown!r}"
    scheme, sep, rest = spec.partition("://")
    if scheme != "kafka" or not sep:
        raise ValueError(f"{label}: unknown form; accepted forms: {ACCEPTED_FORMS}")
    netloc, slash, after = rest.partition("/")
    topic, _, query = after.partition("?")
    if not slash or not topic:
        raise ValueError(f"{label}: the topic is missing (kafka://BROKER/TOPIC); accepted forms: {ACCEPTED_FORMS}")
    if "#" in after:
        raise ValueError(f"{label}: no fragment is accepted; accepted forms: {ACCEPTED_FORMS}")
    brokers = []
    for broker in netloc.split(","):
        _, host, port = split_address(f"kafka://{broker}", "kafka output", shown, ACCEPTED_FORMS)
        brokers.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    options = parse_options(query, OPTIONS, label, ACCEPTED_FORMS)
    tls = flag_option(options, "tls", label)
    max_bytes = options.get("max_message_bytes", str(DEFAULT_MAX_MESSAGE_BYTES))
    if not (max_bytes.isascii() and max_bytes.isdigit() and int(max_bytes) >= 1000):
        raise ValueError(f"{label}: max_message_bytes must be an integer >= 1000, got {max_bytes!r}")
    try:
        password = secret_param(options, "password", label)
        return KafkaSender(brokers, topic, alerts_topic=options.get("alerts_topic"),
                           compression=options.get("compression", "zstd"), tls=tls,
                           ca_file=options.get("ca"), cert_file=options.get("cert"), key_file=options.get("key"),
                           sasl=options.get("sasl"), user=options.get("user"), password=password,
                           max_message_bytes=int(max_bytes))
    except ValueError as exc:
        message = str(exc)
        if not message.startswith(label):
            message = f"{label}: {message.removeprefix('kafka output: ')}"
        raise ValueError(message) from None

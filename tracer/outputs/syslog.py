"""Syslog sender: RFC 5424 messages over TCP, TLS or UDP, the JSON document as MSG.

    <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG

- TIMESTAMP is the document's @timestamp, MSGID its event.kind (event, metric,
  alert), PROCID the tracer's pid, STRUCTURED-DATA is NILVALUE and MSG is the
  compact ECS JSON, UTF-8 without a BOM (RFC 5424 allows MSG-ANY; receivers
  that want the BOM-less JSON parse it directly).
- TCP (RFC 6587) and TLS (RFC 5425) use octet-counting framing, `LEN SP MSG`,
  so a document never needs escaping and is never split by a newline.
- UDP (RFC 5426) sends one datagram per document, no framing.

The sender is driven by tracer.outputs.delivery: send() either writes the whole
batch to the socket or raises SendError, and the caller retries. Syslog has no
application-level acknowledgement, so "written" means handed to the kernel: a
receiver that dies after the write but before reading loses what was in
flight. To narrow that window, a connection the receiver has already closed is
noticed before the next batch is written to it (see _peer_closed), and a new
connection is watched briefly for a receiver that hangs up at once (a TLS
client certificate refused after the handshake, a session limit: see _settle).
"""
from __future__ import annotations

import errno
import logging
import os
import re
import select
import socket
import ssl
import time
from urllib.parse import parse_qsl

from tracer.outputs.senders import SendError
from tracer.outputs.addresses import check_host_port, split_address
from tracer.outputs.tls import client_context, describe
from tracer.schema import Document

log = logging.getLogger(__name__)

__all__ = ["SendError", "SyslogSender", "parse_syslog_spec", "ACCEPTED_FORMS", "UDP_MAX_MESSAGE"]

ACCEPTED_FORMS = ("'syslog+tcp://HOST:PORT', 'syslog+udp://HOST:PORT', "
                  "'syslog+tls://HOST:PORT[?ca=CA_FILE&cert=CERT_FILE&key=KEY_FILE]' (IPv6 hosts in brackets)")
TRANSPORTS = ("tcp", "tls", "udp")

# RFC 5424 facility 13, "log audit": eptrace's documents are security audit records.
FACILITY_LOG_AUDIT = 13
SEVERITY_INFO = 6            # events and metrics

# A UDP datagram carries at most 65,507 bytes of IPv4 payload; 65,000 leaves room and is
# what RFC 5426 receivers with a 64 KiB buffer accept. A longer message is truncated to
# this many bytes (its JSON is then incomplete): use TCP or TLS for large documents.
UDP_MAX_MESSAGE = 65_000

DEFAULT_TIMEOUT_S = 10.0
# After connecting, how long to watch for a receiver that hangs up at once (see _settle).
# Paid once per connection, never per batch.
DEFAULT_SETTLE_S = 0.2
_NILVALUE = "-"
_TS_PREFIX = '{"@timestamp":"'
# RFC 5424 header fields: printable US-ASCII (33..126) only, each with a maximum length.
_NOT_PRINTUSASCII = re.compile(r"[^\x21-\x7e]")


def alert_severity(event_severity: object) -> int:
    """ECS event.severity (0-100, as Elastic's risk bands) -> syslog severity.

    critical (74-100) -> 2 crit, high (48-73) -> 3 err, medium (22-47) -> 4 warning,
    low (0-21) or unknown -> 5 notice. An alert is never below notice.
    """
    if isinstance(event_severity, bool) or not isinstance(event_severity, (int, float)):
        return 5
    if event_severity >= 74:
        return 2
    if event_severity >= 48:
        return 3
    if event_severity >= 22:
        return 4
    return 5


def header_field(value: str | None, max_len: int) -> str:
    """A header field as RFC 5424 wants it: printable ASCII, no spaces, bounded; NILVALUE if empty."""
    if not value:
        return _NILVALUE
    return _NOT_PRINTUSASCII.sub("_", value)[:max_len]


class Rfc5424:
    """The RFC 5424 message for a document (shared by the syslog and RELP senders)."""

    def __init__(self, hostname: str | None = None, app_name: str = "eptrace",
                 facility: int = FACILITY_LOG_AUDIT) -> None:
        # Everything of the header but PRI, TIMESTAMP and MSGID is the same for every message.
        self._facility8 = facility * 8
        self._middle = " ".join((header_field(hostname or socket.gethostname(), 255),
                                 header_field(app_name, 48), header_field(str(os.getpid()), 128)))

    def message(self, doc: Document) -> bytes:
        """The RFC 5424 message for one document, UTF-8, without framing."""
        text = doc.json
        if text.startswith(_TS_PREFIX):          # the encoder always writes @timestamp first
            end = text.find('"', len(_TS_PREFIX))
            timestamp = text[len(_TS_PREFIX):end] if end > 0 else _NILVALUE
        else:
            timestamp = _timestamp_of(doc)
        kind = doc.kind
        if kind == "alert":
            severity = alert_severity(_event_field(doc, "severity"))
        else:
            severity = SEVERITY_INFO
        msgid = header_field(kind, 32)
        # "replace": a stray surrogate from a process name must not lose the document.
        return (f"<{self._facility8 + severity}>1 {timestamp} {self._middle} {msgid} - {text}"
                .encode("utf-8", "replace"))


class SyslogSender:
    """Sends batches of ECS documents to a syslog receiver (implements tracer.outputs.senders.Sender).

    Connects lazily on the first send; after any network error the socket is
    closed, SendError is raised and the next send connects again.
    """

    def __init__(self, transport: str, host: str, port: int, *, ca_file: str | None = None,
                 cert_file: str | None = None, key_file: str | None = None, app_name: str = "eptrace",
                 hostname: str | None = None, facility: int = FACILITY_LOG_AUDIT,
                 timeout_s: float = DEFAULT_TIMEOUT_S, settle_s: float = DEFAULT_SETTLE_S) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"syslog transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        check_host_port("syslog output", host, port)
        if not 0 <= facility <= 23:
            raise ValueError(f"syslog facility must be 0-23, got {facility}")
        if transport != "tls" and (ca_file or cert_file or key_file):
            raise ValueError(f"syslog+{transport}: ca, cert and key are for syslog+tls only")
        self.transport, self.host, self.port = transport, host, port
        self.timeout_s = timeout_s
        self.settle_s = settle_s
        self._has_client_cert = bool(cert_file)
        shown_host = f"[{host}]" if ":" in host else host
        self.name = f"syslog+{transport}://{shown_host}:{port}"
        self.connects = 0          # sockets opened: reconnections show up here
        self._sock: socket.socket | None = None
        self._warned_truncation = False
        self._ssl_context = client_context("syslog+tls", ca_file, cert_file, key_file) if transport == "tls" else None
        self.message = Rfc5424(hostname, app_name, facility).message

    # --- formatting (no network) -------------------------------------------------------

    def frame(self, docs: list[Document]) -> bytes:
        """Octet-counted frames (RFC 6587 3.4.1 / RFC 5425 4.3) for a batch: one buffer."""
        parts = []
        for doc in docs:
            msg = self.message(doc)
            parts.append(b"%d " % len(msg))
            parts.append(msg)
        return b"".join(parts)

    # --- Sender --------------------------------------------------------------------------

    def send(self, docs: list[Document]) -> None:
        if not docs:
            return
        if self.transport == "udp":
            self._send_udp(docs)
            return
        data = self.frame(docs)
        try:
            sock = self._connected()
            sock.sendall(data)
        except (OSError, ssl.SSLError, ValueError) as exc:   # ssl.SSLError is an OSError; ValueError: closed
            self._drop_connection()
            raise SendError(f"{self.name}: {describe(exc)}") from exc

    def close(self) -> None:
        self._drop_connection()

    # --- internals -----------------------------------------------------------------------

    def _send_udp(self, docs: list[Document]) -> None:
        datagrams = []
        for doc in docs:
            msg = self.message(doc)
            if len(msg) > UDP_MAX_MESSAGE:
                msg = msg[:UDP_MAX_MESSAGE]
                if not self._warned_truncation:
                    self._warned_truncation = True
                    log.warning("%s: a document of more than %d bytes was truncated (UDP datagram limit); "
                                "use syslog+tcp or syslog+tls for whole documents", self.name, UDP_MAX_MESSAGE)
            datagrams.append(msg)
        try:
            sock = self._connected()
            for datagram in datagrams:
                # A connected UDP socket reports an ICMP port unreachable from an earlier datagram
                # as ECONNREFUSED here: the batch is retried whole (duplicates are deduplicated on event.id).
                sock.send(datagram)
        except OSError as exc:
            self._drop_connection()
            raise SendError(f"{self.name}: {describe(exc)}") from exc

    def _connected(self) -> socket.socket:
        sock = self._sock
        if sock is not None and self.transport != "udp" and _peer_closed(sock):
            self._drop_connection()
            sock = None
        if sock is None:
            sock = self._connect()
            try:
                if self.transport != "udp":
                    self._settle(sock)
            except BaseException:
                sock.close()
                raise
            self._sock = sock
            self.connects += 1
        return sock

    def _settle(self, sock: socket.socket) -> None:
        """Wait settle_s for a receiver that closes a connection it has just accepted.

        Over TLS 1.3 the client finishes its handshake before the server has checked
        the client certificate: rsyslog refusing it (or any receiver over its session
        limit) closes right after. A batch written at once would be "sent" and lost.
        """
        deadline = time.monotonic() + self.settle_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            readable, _, _ = select.select([sock], [], [], remaining)
            if not readable:
                return
            if _peer_closed(sock):
                hint = " (does it require a client certificate? give cert= and key=)" if (
                    self.transport == "tls" and not self._has_client_cert) else ""
                raise ConnectionResetError(errno.ECONNRESET,
                                           f"the receiver closed the connection right after accepting it{hint}")
            time.sleep(0.01)      # session tickets read, or half a TLS record: look again

    def _connect(self) -> socket.socket:
        if self.transport == "udp":
            family, type_, proto, _, addr = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)[0]
            sock = socket.socket(family, type_, proto)
            try:
                sock.connect(addr)
            except OSError:
                sock.close()
                raise
            return sock
        raw = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if self._ssl_context is not None:
                # server_hostname is checked against the certificate: DNS names against DNS SANs,
                # IP addresses against IP SANs (Python's ssl handles both).
                sock = self._ssl_context.wrap_socket(raw, server_hostname=self.host)
            else:
                sock = raw
        except BaseException:
            raw.close()
            raise
        return sock

    def _drop_connection(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass


def _peer_closed(sock: socket.socket) -> bool:
    """True if the receiver closed or reset the connection.

    A syslog receiver never sends application data, so a readable socket means
    EOF or an error -- except over TLS, where the server may send session tickets
    or a close_notify: those are read (non-blocking) and told apart.
    """
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    if not readable and not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
        return False
    try:
        if isinstance(sock, ssl.SSLSocket):
            timeout = sock.gettimeout()
            sock.settimeout(0.0)
            try:
                while True:
                    data = sock.recv(4096)
                    if not data:
                        return True          # close_notify or TCP EOF
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                return False                 # only handshake messages (session tickets): still open
            finally:
                try:
                    sock.settimeout(timeout)
                except OSError:
                    pass
        data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        if not data:
            return True
        sock.recv(65536, socket.MSG_DONTWAIT)   # unexpected bytes from the receiver: discard them
        return False
    except BlockingIOError:
        return False
    except OSError:
        return True


def _event_field(doc: Document, name: str) -> object:
    try:
        event = doc.fields().get("event")
    except ValueError:
        return None
    return event.get(name) if isinstance(event, dict) else None


def _timestamp_of(doc: Document) -> str:
    """@timestamp when the encoder did not write it first (documents from elsewhere); else NILVALUE."""
    try:
        value = doc.fields().get("@timestamp")
    except ValueError:
        return _NILVALUE
    return header_field(value, 64) if isinstance(value, str) else _NILVALUE


def parse_syslog_spec(spec: str) -> SyslogSender:
    """'syslog+tcp://HOST:PORT', 'syslog+udp://HOST:PORT', 'syslog+tls://HOST:PORT?ca=..&cert=..&key=..'.

    Raises ValueError naming the accepted forms for anything else, and for unreadable
    CA, certificate or key files.
    """
    scheme, sep, _ = spec.partition("://")
    transport = scheme[len("syslog+"):] if scheme.startswith("syslog+") else ""
    if not sep or transport not in TRANSPORTS:
        raise ValueError(f"syslog output {spec!r}: unknown form; accepted forms: {ACCEPTED_FORMS}")
    parts, host, port = split_address(spec, "syslog output", spec, ACCEPTED_FORMS)
    if parts.path not in ("", "/") or parts.fragment:
        raise ValueError(f"syslog output {spec!r}: no path is accepted after HOST:PORT; "
                         f"accepted forms: {ACCEPTED_FORMS}")
    if parts.netloc.startswith("[") and ":" not in host:
        raise ValueError(f"syslog output {spec!r}: only an IPv6 address goes in brackets; "
                         f"accepted forms: {ACCEPTED_FORMS}")
    options: dict[str, str] = {}
    allowed = ("ca", "cert", "key") if transport == "tls" else ()
    if parts.query:
        try:
            items = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True, errors="strict")
        except ValueError:
            raise ValueError(f"syslog output {spec!r}: malformed options {parts.query!r}; "
                             f"accepted forms: {ACCEPTED_FORMS}") from None
        for key, value in items:
            if key not in allowed:
                raise ValueError(f"syslog output {spec!r}: unknown option {key!r}"
                                 f"{' (options: ca, cert, key)' if allowed else ''}; accepted forms: {ACCEPTED_FORMS}")
            if key in options:
                raise ValueError(f"syslog output {spec!r}: option {key} is given twice; accepted forms: {ACCEPTED_FORMS}")
            if not value:
                raise ValueError(f"syslog output {spec!r}: option {key} needs a file path; "
                                 f"accepted forms: {ACCEPTED_FORMS}")
            options[key] = value
    return SyslogSender(transport, host, port, ca_file=options.get("ca"), cert_file=options.get("cert"),
                        key_file=options.get("key"))

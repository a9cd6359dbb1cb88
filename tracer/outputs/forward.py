"""Fluent Forward sender: the Forward protocol v1 of Fluentd and Fluent Bit, over TCP or TLS.

Each batch is ONE PackedForward message (CompressedPackedForward with compress=gzip):

    [TAG, ENTRIES, {"chunk": CHUNK_ID, "size": N[, "compressed": "gzip"]}]

- ENTRIES is a msgpack bin: N concatenated msgpack arrays [EVENT_TIME, RECORD] (gzipped
  when compressing). RECORD is the ECS document as a msgpack map (Fluent wants a map);
  EVENT_TIME is the EventTime ext (type 0, 4-byte big-endian seconds then nanoseconds)
  taken from the document's @timestamp.
- CHUNK_ID is a fresh base64 id; the receiver answers {"ack": CHUNK_ID} once it has the
  batch. send() returns only then: no ack within ack_timeout_s, a wrong ack or a closed
  connection raise SendError and tracer.outputs.delivery sends the batch again
  (at-least-once: receivers deduplicate on event.id).
- With a shared key, every new connection starts with the handshake of the spec: the
  server sends HELO (nonce, auth salt), the client answers PING (hostname, salt,
  sha512_hex(salt + hostname + nonce + key), empty user and password), the server
  answers PONG, whose digest sha512_hex(salt + server_hostname + nonce + key) is checked.

A document that cannot be a Fluent record (not a JSON object) is returned as rejected
(dead-lettered and counted by the delivery core); the rest of the batch is sent.
Connects lazily; after any error the connection is closed and the next send connects again.
"""
from __future__ import annotations

import base64
import calendar
import datetime
import gzip
import hashlib
import json
import logging
import os
import re
import select
import socket
import ssl
import struct
import time
from urllib.parse import parse_qsl

import msgpack

from tracer.outputs.secrets import option_names, redact, secret_param
from tracer.outputs.senders import SendError
from tracer.outputs.addresses import check_host_port, check_tls_files, split_address
from tracer.outputs.tls import client_context, describe, open_stream
from tracer.schema import Document

log = logging.getLogger(__name__)

__all__ = ["SendError", "ForwardSender", "parse_forward_spec", "ACCEPTED_FORMS", "event_time", "pack_entries",
           "forward_message", "DEFAULT_TAG"]

ACCEPTED_FORMS = ("'forward://HOST:PORT[?tag=TAG&shared_key_file=FILE&compress=gzip&tls=1&ca=CA_FILE"
                  "&cert=CERT_FILE&key=KEY_FILE]' (shared_key=, shared_key_env= too; IPv6 hosts in brackets)")
OPTIONS = ("tag", *option_names("shared_key"), "compress", "tls", "ca", "cert", "key")

DEFAULT_TAG = "eptrace"
DEFAULT_TIMEOUT_S = 10.0        # connect, handshake, write
# How long to wait for the ack of a batch. Fluentd's ack_response_timeout is 190 s; a batch
# here is at most a few MB, so a receiver that has not answered in 30 s is retried.
DEFAULT_ACK_TIMEOUT_S = 30.0
EVENT_TIME_EXT = 0
# gzip level for compress=gzip: level 3 compresses ECS batches within 7% of level 6 in half the time.
GZIP_LEVEL = 3
_READ_MAX = 1 << 20              # a server message is small (HELO, PONG, ack): cap what we buffer
_TAG_RE = re.compile(r"[\x21-\x7e]{1,255}")

_pack_event_time = struct.Struct(">II").pack


# --- formatting (no network) ---------------------------------------------------------------

_last_base = ""
_last_seconds = 0


def event_time(timestamp: object) -> msgpack.ExtType | None:
    """EventTime (ext type 0) for an RFC 3339 @timestamp, or None if it is not one."""
    data = _event_time_data(timestamp)
    return msgpack.ExtType(EVENT_TIME_EXT, data) if data is not None else None


def _event_time_data(timestamp: object) -> bytes | None:
    """The 8 bytes of event_time's EventTime, or None.

    The encoder writes 'YYYY-MM-DDTHH:MM:SS.ffffffZ': that is parsed directly (the seconds
    part cached, as events come many per second); other RFC 3339 forms go through datetime.
    """
    global _last_base, _last_seconds
    if not isinstance(timestamp, str) or len(timestamp) < 20:
        return None
    try:
        if timestamp[-1] == "Z" and timestamp[10] == "T" and (len(timestamp) == 20 or timestamp[19] == "."):
            base = timestamp[:19]
            if base == _last_base:
                seconds = _last_seconds
            else:
                if base[4] != "-" or base[7] != "-" or base[13] != ":" or base[16] != ":":
                    return None
                seconds = calendar.timegm((int(base[0:4]), int(base[5:7]), int(base[8:10]),
                                           int(base[11:13]), int(base[14:16]), int(base[17:19]), 0, 0, 0))
                if not (1 <= int(base[5:7]) <= 12 and 1 <= int(base[8:10]) <= 31 and int(base[11:13]) < 24
                        and int(base[14:16]) < 60 and int(base[17:19]) < 61):
                    return None
                _last_base, _last_seconds = base, seconds
            fraction = timestamp[20:-1]
            if fraction and not (fraction.isascii() and fraction.isdigit()):
                return None
            nanoseconds = int(fraction[:9].ljust(9, "0")) if fraction else 0
        else:
            text = timestamp[:-1] + "+00:00" if timestamp[-1] in "Zz" else timestamp
            moment = datetime.datetime.fromisoformat(text.replace("t", "T", 1))
            if moment.tzinfo is None:
                return None
            seconds = calendar.timegm(moment.utctimetuple())
            nanoseconds = moment.microsecond * 1000
        return _pack_event_time(seconds, nanoseconds)
    except (ValueError, OverflowError, struct.error):     # not a date, or before 1970 / after 2106
        return None


def _now() -> bytes:
    ns = time.time_ns()
    return _pack_event_time(ns // 1_000_000_000, ns % 1_000_000_000)


# An entry's msgpack up to its record: a 2-element array, then the EventTime as a fixext 8 of type 0
# and its 8 bytes. Written directly: an ExtType object and a list per document cost the sender ~8%.
_ENTRY_HEAD = bytes([0x92, 0xd7, EVENT_TIME_EXT])


def pack_entries(docs: list[Document]) -> tuple[bytes, int, list[tuple[Document, str]]]:
    """The concatenated msgpack entries [EventTime, record] of a batch: (entries, count, rejected).

    A document whose JSON is not an object cannot be a Fluent record: it is rejected
    ('not_a_map', 'bad_json', or 'unencodable' for an integer beyond 64 bits). A document
    without a usable @timestamp gets the current time.
    """
    packer = msgpack.Packer(use_bin_type=True)
    pack = packer.pack
    loads = json.loads
    parts: list[bytes] = []
    rejected: list[tuple[Document, str]] = []
    for doc in docs:
        try:
            record = loads(doc.json)
        except (ValueError, RecursionError):
            rejected.append((doc, "bad_json"))
            continue
        if not isinstance(record, dict):
            rejected.append((doc, "not_a_map"))
            continue
        head = _ENTRY_HEAD + (_event_time_data(record.get("@timestamp")) or _now())
        try:
            parts.append(head + pack(record))
        except UnicodeEncodeError:
            # A lone surrogate (a process name that is not UTF-8): replaced, as the other outputs do.
            record = loads(doc.json.encode("utf-8", "replace"))
            parts.append(head + pack(record))
        except (OverflowError, ValueError, TypeError, RecursionError):   # an integer beyond 64 bits
            rejected.append((doc, "unencodable"))
    return b"".join(parts), len(parts), rejected


def new_chunk_id() -> str:
    """A unique chunk id, as Fluentd makes them: 16 random bytes, base64."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


def forward_message(tag: str, entries: bytes, size: int, chunk: str, compress: bool = False) -> bytes:
    """The PackedForward (or CompressedPackedForward) message for entries from pack_entries."""
    option: dict[str, object] = {"chunk": chunk, "size": size}
    if compress:
        entries = gzip.compress(entries, compresslevel=GZIP_LEVEL, mtime=0)
        option["compressed"] = "gzip"
    return msgpack.packb([tag, entries, option], use_bin_type=True)


def shared_key_digest(salt: bytes, hostname: str, nonce: bytes, key: str) -> str:
    return hashlib.sha512(salt + hostname.encode("utf-8") + nonce + key.encode("utf-8")).hexdigest()


# --- the sender -----------------------------------------------------------------------------------

class ForwardSender:
    """Sends batches of ECS documents to a Fluent Forward receiver (implements tracer.outputs.senders.Sender)."""

    batch_max = 2000       # one ack round trip per batch: bigger batches, fewer waits

    def __init__(self, host: str, port: int, *, tag: str = DEFAULT_TAG, shared_key: str | None = None,
                 compress: bool = False, tls: bool = False, ca_file: str | None = None,
                 cert_file: str | None = None, key_file: str | None = None, hostname: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S) -> None:
        check_host_port("forward output", host, port)
        if not isinstance(tag, str) or not _TAG_RE.fullmatch(tag):
            raise ValueError(f"forward output: the tag must be 1-255 printable ASCII characters without spaces, "
                             f"got {tag!r}")
        if shared_key is not None and not shared_key:
            raise ValueError("forward output: the shared key is empty")
        check_tls_files("forward output", tls, ca_file, cert_file, key_file)
        self.host, self.port, self.tag = host, port, tag
        self.compress = compress
        self.timeout_s, self.ack_timeout_s = timeout_s, ack_timeout_s
        self._shared_key = shared_key
        self.hostname = hostname or socket.gethostname()
        shown_host = f"[{host}]" if ":" in host else host
        # The name keys the spool directory: the same receiver with another tag is another output.
        self.name = f"forward://{shown_host}:{port}" + (f"?tag={tag}" if tag != DEFAULT_TAG else "")
        self.connects = 0          # connections made (and handshakes passed): reconnections show up here
        self.acks = 0              # batches acknowledged
        self._sock: socket.socket | None = None
        self._unpacker: msgpack.Unpacker | None = None
        self._ssl_context = client_context("forward output", ca_file, cert_file, key_file) if tls else None

    # --- Sender ---------------------------------------------------------------------------------

    def send(self, docs: list[Document]) -> list[tuple[Document, str]] | None:
        if not docs:
            return None
        entries, size, rejected = pack_entries(docs)
        if not size:
            return rejected
        chunk = new_chunk_id()
        message = forward_message(self.tag, entries, size, chunk, self.compress)
        try:
            sock = self._connected()
            sock.sendall(message)
            self._wait_ack(sock, chunk)
        except SendError:
            self._drop_connection()
            raise
        except (OSError, ValueError, msgpack.UnpackException, msgpack.ExtraData) as exc:
            # ssl.SSLError and socket.timeout are OSErrors; ValueError: a closed socket, bad msgpack
            self._drop_connection()
            raise SendError(f"{self.name}: {_describe(exc)}") from exc
        self.acks += 1
        return rejected or None

    def close(self) -> None:
        self._drop_connection()

    # --- internals -----------------------------------------------------------------------------

    def _connected(self) -> socket.socket:
        sock = self._sock
        if sock is not None and _peer_closed(sock):
            self._drop_connection()        # closed while idle (receiver restarted, idle timeout): reconnect
            sock = None
        if sock is None:
            sock = self._connect()
            self._sock = sock
            self._unpacker = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape",
                                              max_buffer_size=_READ_MAX)
            if self._shared_key is not None:
                self._handshake(sock)
            self.connects += 1
        return sock

    def _connect(self) -> socket.socket:
        return open_stream(self.host, self.port, self.timeout_s, self._ssl_context)

    def _handshake(self, sock: socket.socket) -> None:
        helo = self._read_message(sock, time.monotonic() + self.timeout_s, "HELO")
        if not (isinstance(helo, list) and len(helo) == 2 and helo[0] == "HELO" and isinstance(helo[1], dict)):
            raise SendError(f"{self.name}: expected the receiver's HELO, got {_short(helo)}")
        options = helo[1]
        nonce = _as_bytes(options.get("nonce"))
        if nonce is None:
            raise SendError(f"{self.name}: the receiver's HELO has no nonce")
        if options.get("auth"):
            raise SendError(f"{self.name}: the receiver asks for a user name and password (HELO auth); "
                            "eptrace authenticates with the shared key only")
        key = self._shared_key or ""
        salt = os.urandom(16).hex().encode("ascii")
        ping = ["PING", self.hostname, salt.decode("ascii"), shared_key_digest(salt, self.hostname, nonce, key), "", ""]
        sock.sendall(msgpack.packb(ping, use_bin_type=True))
        pong = self._read_message(sock, time.monotonic() + self.timeout_s, "PONG")
        if not (isinstance(pong, list) and len(pong) == 5 and pong[0] == "PONG"):
            raise SendError(f"{self.name}: expected the receiver's PONG, got {_short(pong)}")
        _, authenticated, reason, server_hostname, digest = pong
        if authenticated is not True:
            raise SendError(f"{self.name}: the receiver refused the shared-key handshake: "
                            f"{reason or 'no reason given'} (is shared_key the receiver's?)")
        if not isinstance(server_hostname, str) or not isinstance(digest, str):
            raise SendError(f"{self.name}: malformed PONG {_short(pong)}")
        if server_hostname == self.hostname:
            raise SendError(f"{self.name}: the receiver has our hostname {server_hostname!r}: "
                            "Fluent refuses the same hostname at both ends")
        if digest != shared_key_digest(salt, server_hostname, nonce, key):
            raise SendError(f"{self.name}: the receiver's PONG digest does not match the shared key: "
                            "the receiver does not know the key")

    def _wait_ack(self, sock: socket.socket, chunk: str) -> None:
        reply = self._read_message(sock, time.monotonic() + self.ack_timeout_s, "ack")
        if isinstance(reply, dict) and "ack" in reply:
            if reply["ack"] != chunk:
                raise SendError(f"{self.name}: the receiver acknowledged chunk {_short(reply['ack'])}, "
                                f"not the one sent ({chunk})")
            return
        if isinstance(reply, list) and reply and reply[0] == "HELO":
            raise SendError(f"{self.name}: the receiver asks for the shared-key handshake (HELO): "
                            "give shared_key=KEY")
        raise SendError(f"{self.name}: expected an ack, got {_short(reply)}")

    def _read_message(self, sock: socket.socket, deadline: float, what: str) -> object:
        """The next msgpack object from the receiver, by the deadline."""
        unpacker = self._unpacker
        assert unpacker is not None
        while True:
            try:
                return next(unpacker)
            except StopIteration:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SendError(f"{self.name}: no {what} from the receiver within "
                                f"{self.ack_timeout_s if what == 'ack' else self.timeout_s:g} s")
            sock.settimeout(remaining)
            try:
                data = sock.recv(65536)
            except socket.timeout:
                continue                      # the deadline check above reports it
            finally:
                try:
                    sock.settimeout(self.timeout_s)
                except OSError:
                    pass
            if not data:
                raise SendError(f"{self.name}: the receiver closed the connection before the {what}")
            unpacker.feed(data)

    def _drop_connection(self) -> None:
        sock, self._sock = self._sock, None
        self._unpacker = None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass


def _peer_closed(sock: socket.socket) -> bool:
    """True if the receiver closed or reset an idle connection (it sends nothing unasked).

    Over TLS, session tickets or a close_notify may be waiting: they are read
    (non-blocking) and told apart. Anything else is discarded: nothing is owed to us.
    """
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    if not readable and not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
        return False
    timeout = sock.gettimeout()
    try:
        sock.settimeout(0.0)
        while True:
            if not sock.recv(65536):
                return True                    # EOF or close_notify
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
        return False
    except OSError:
        return True
    finally:
        try:
            sock.settimeout(timeout)
        except OSError:
            pass


def _as_bytes(value: object) -> bytes | None:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    return None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (msgpack.UnpackException, msgpack.ExtraData)) or type(exc) is ValueError:
        return f"unreadable reply from the receiver ({exc or type(exc).__name__})"
    return describe(exc)


def _redacted(spec: str) -> str:
    return redact(spec)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_forward_spec(spec: str) -> ForwardSender:
    """'forward://HOST:PORT[?tag=T&shared_key=K&compress=gzip&tls=1&ca=FILE&cert=FILE&key=FILE]'.

    Option values are URL-decoded (a '+' or '&' in the shared key is written %2B, %26).
    Raises ValueError naming the accepted forms for anything else, and for unreadable
    CA, certificate or key files. The shared key is never repeated in an error.
    """
    shown = _redacted(spec)
    scheme, sep, rest = spec.partition("://")
    if scheme != "forward" or not sep:
        raise ValueError(f"forward output {shown!r}: unknown form; accepted forms: {ACCEPTED_FORMS}")
    parts, host, port = split_address(spec, "forward output", shown, ACCEPTED_FORMS)
    if parts.path not in ("", "/") or parts.fragment:
        raise ValueError(f"forward output {shown!r}: no path is accepted after HOST:PORT; "
                         f"accepted forms: {ACCEPTED_FORMS}")
    if parts.netloc.startswith("[") and ":" not in host:
        raise ValueError(f"forward output {shown!r}: only an IPv6 address goes in brackets; "
                         f"accepted forms: {ACCEPTED_FORMS}")
    options: dict[str, str] = {}
    if parts.query:
        try:
            items = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True, errors="strict")
        except ValueError:
            raise ValueError(f"forward output {shown!r}: malformed options {_redacted(parts.query)!r}; "
                             f"accepted forms: {ACCEPTED_FORMS}") from None
        for key, value in items:
            if key not in OPTIONS:
                raise ValueError(f"forward output {shown!r}: unknown option {key!r} (options: {', '.join(OPTIONS)}); "
                                 f"accepted forms: {ACCEPTED_FORMS}")
            if key in options:
                raise ValueError(f"forward output {shown!r}: option {key} is given twice; "
                                 f"accepted forms: {ACCEPTED_FORMS}")
            if not value:
                raise ValueError(f"forward output {shown!r}: option {key} needs a value; "
                                 f"accepted forms: {ACCEPTED_FORMS}")
            options[key] = value
    tls_value = options.get("tls", "0").lower()
    if tls_value not in _TRUE + _FALSE:
        raise ValueError(f"forward output {shown!r}: tls must be 1 or 0, got {options['tls']!r}")
    compress = options.get("compress")
    if compress not in (None, "gzip"):
        raise ValueError(f"forward output {shown!r}: compress must be gzip (the only Forward compression), "
                         f"got {compress!r}")
    shared_key = secret_param(options, "shared_key", f"forward output {shown!r}")
    try:
        return ForwardSender(host, port, tag=options.get("tag", DEFAULT_TAG), shared_key=shared_key,
                             compress=compress == "gzip", tls=tls_value in _TRUE, ca_file=options.get("ca"),
                             cert_file=options.get("cert"), key_file=options.get("key"))
    except ValueError as exc:
        raise ValueError(f"forward output {shown!r}: {str(exc).removeprefix('forward output: ')}") from None

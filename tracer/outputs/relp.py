"""RELP sender: RFC 5424 messages over the Reliable Event Logging Protocol (rsyslog's imrelp).

No maintained Python binding of librelp exists (Debian has none; PyPI's pyrelp is from 2014),
so this implements the documented protocol. Every frame is

    TXNR SP COMMAND SP DATALEN [SP DATA] LF

with TXNR counting 1..999,999,999 per session. A session starts with `open` (offers:
relp_version=0, commands=syslog), which the receiver answers with `rsp` 200 and the
commands it supports; each document is one `syslog` frame, carrying the same RFC 5424
message as the syslog outputs (tracer.outputs.syslog.Rfc5424); the receiver answers every
frame with `rsp` 200, in order; `close` ends the session. The receiver may announce its
own end with `serverclose`.

Up to WINDOW frames are in flight at once. send() returns only when every frame of the
batch is acknowledged; a session that breaks first (receiver killed, reset, timed out)
raises SendError, and the delivery core sends the whole batch again on a new session: the
frames acknowledged before the break then arrive twice (deduplicate on event.id), none is lost.
"Acknowledged" means the receiver took the message: rsyslog keeps it through its own crash
only when its queue for the input is direct or disk-assisted.
"""
from __future__ import annotations

import logging
import select
import socket
import ssl
import time

from tracer.outputs.addresses import check_host_port, check_tls_files, flag_option, parse_options, split_address
from tracer.outputs.senders import SendError
from tracer.outputs.syslog import Rfc5424
from tracer.outputs.tls import client_context, close_quietly, describe, open_stream
from tracer.schema import Document

log = logging.getLogger(__name__)

ACCEPTED_FORMS = "'syslog+relp://HOST:PORT[?tls=1&ca=FILE&cert=FILE&key=FILE]' (IPv6 hosts in brackets)"
OPTIONS = ("tls", "ca", "cert", "key")
WINDOW = 128                    # frames in flight, librelp's default window
TXNR_MAX = 999_999_999
DEFAULT_TIMEOUT_S = 10.0        # connect, and the wait for each acknowledgement
OFFERS = b"relp_version=0\nrelp_software=eptrace\ncommands=syslog"
_HEADER_MAX = 32                # "999999999 serverclose 999999999 "


class RelpError(Exception):
    """The receiver broke the protocol or refused a frame."""


def relp_frame(txnr: int, command: bytes, data: bytes = b"") -> bytes:
    if data:
        return b"%d %s %d %s\n" % (txnr, command, len(data), data)
    return b"%d %s 0\n" % (txnr, command)


class FrameReader:
    """Splits the receiver's byte stream into (txnr, command, data) frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next(self) -> tuple[int, bytes, bytes] | None:
        """The next whole frame, or None if more bytes are needed. RelpError for a malformed one."""
        buf = self._buf
        fields = []
        pos = 0
        for _ in range(3):                       # TXNR, COMMAND, DATALEN, each ended by SP or LF
            end = next((i for i in range(pos, min(len(buf), pos + _HEADER_MAX)) if buf[i] in b" \n"), -1)
            if end < 0:
                if len(buf) - pos >= _HEADER_MAX:
                    raise RelpError(f"malformed frame header {bytes(buf[:_HEADER_MAX])!r}")
                return None
            fields.append(bytes(buf[pos:end]))
            pos = end + 1
            if buf[end] == 10 and len(fields) < 3:
                raise RelpError(f"malformed frame header {bytes(buf[:end])!r}")
        txnr, command, datalen = fields
        if not (txnr.isdigit() and datalen.isdigit() and command.isalpha()):
            raise RelpError(f"malformed frame header {bytes(buf[:pos])!r}")
        length = int(datalen)
        if length == 0:
            if buf[pos - 1] != 10:               # "N cmd 0\n": the LF ended DATALEN
                raise RelpError("frame with DATALEN 0 has data")
            del buf[:pos]
            return int(txnr), command, b""
        if len(buf) < pos + length + 1:
            return None
        data = bytes(buf[pos:pos + length])
        if buf[pos + length] != 10:
            raise RelpError("frame not ended by LF")
        del buf[:pos + length + 1]
        return int(txnr), command, data


def rsp_status(data: bytes) -> tuple[int, str]:
    """`rsp` data: '200 OK[\\nCMDDATA]' -> (200, 'OK')."""
    line = data.split(b"\n", 1)[0].decode("utf-8", "replace")
    code, _, text = line.partition(" ")
    if not code.isdigit():
        raise RelpError(f"malformed rsp {line[:80]!r}")
    return int(code), text


class RelpSender:
    """Sends batches of ECS documents to a RELP receiver (implements tracer.outputs.senders.Sender)."""

    batch_max = 2000

    def __init__(self, host: str, port: int, *, tls: bool = False, ca_file: str | None = None,
                 cert_file: str | None = None, key_file: str | None = None, hostname: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, window: int = WINDOW) -> None:
        check_host_port("relp output", host, port)
        check_tls_files("relp output", tls, ca_file, cert_file, key_file)
        self.host, self.port = host, port
        self.timeout_s, self.window = timeout_s, window
        shown_host = f"[{host}]" if ":" in host else host
        self.name = f"syslog+relp://{shown_host}:{port}"
        self.sessions = 0          # sessions opened: reconnections show up here
        self.acked = 0             # syslog frames acknowledged
        self._format = Rfc5424(hostname).message
        self._ssl_context = client_context("relp output", ca_file, cert_file, key_file) if tls else None
        self._sock: socket.socket | None = None
        self._reader = FrameReader()
        self._txnr = 0

    # --- Sender ---------------------------------------------------------------------------

    def send(self, docs: list[Document]) -> None:
        if not docs:
            return
        messages = [self._format(doc) for doc in docs]
        try:
            sock = self._session()
            self._send_window(sock, messages)
        except (OSError, ValueError, RelpError) as exc:   # ssl.SSLError and socket.timeout are OSErrors
            self._drop_session()
            raise SendError(f"{self.name}: {_describe(exc)}") from exc
        except SendError:
            self._drop_session()
            raise

    def close(self) -> None:
        """Ends the session politely (close, then its rsp) when it is still up."""
        sock = self._sock
        if sock is not None:
            try:
                txnr = self._next_txnr()
                sock.sendall(relp_frame(txnr, b"close"))
                self._read_frame(sock, time.monotonic() + 2.0)
            except (OSError, ValueError, RelpError, SendError):
                pass
        self._drop_session()

    # --- internals ------------------------------------------------------------------------

    def _send_window(self, sock: socket.socket, messages: list[bytes]) -> None:
        """Frames out while fewer than `window` await their rsp; rsps must come back in order."""
        pending: list[int] = []          # txnrs sent, not yet acknowledged, oldest first
        out = bytearray()
        i = 0
        while i < len(messages) or pending:
            while i < len(messages) and len(pending) < self.window:
                txnr = self._next_txnr()
                out += relp_frame(txnr, b"syslog", messages[i])
                pending.append(txnr)
                i += 1
            if out:
                sock.sendall(out)
                out.clear()
            self._await_rsp(sock, pending)

    def _await_rsp(self, sock: socket.socket, pending: list[int]) -> None:
        """Reads at least one frame; acknowledges every rsp that has arrived."""
        deadline = time.monotonic() + self.timeout_s
        first = True
        while pending:
            frame = self._reader.next()
            if frame is None:
                if not first and not _readable(sock):
                    return               # room in the window: send more
                frame = self._read_frame(sock, deadline)
            first = False
            txnr, command, data = frame
            if command == b"serverclose":
                raise RelpError(f"the receiver closed the session (serverclose) with {len(pending)} frames "
                                "unacknowledged")
            if command != b"rsp":
                raise RelpError(f"unexpected {command.decode('ascii', 'replace')!r} frame from the receiver")
            if txnr != pending[0]:
                raise RelpError(f"rsp for txnr {txnr}, expected {pending[0]}")
            code, text = rsp_status(data)
            if code != 200:
                raise RelpError(f"the receiver refused frame {txnr}: {code} {text}")
            pending.pop(0)
            self.acked += 1

    def _read_frame(self, sock: socket.socket, deadline: float) -> tuple[int, bytes, bytes]:
        while True:
            frame = self._reader.next()
            if frame is not None:
                return frame
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SendError(f"{self.name}: no acknowledgement from the receiver within {self.timeout_s:g} s")
            sock.settimeout(remaining)
            try:
                data = sock.recv(65536)
            except socket.timeout:
                continue
            finally:
                try:
                    sock.settimeout(self.timeout_s)
                except OSError:
                    pass
            if not data:
                raise RelpError("the receiver closed the connection")
            self._reader.feed(data)

    def _session(self) -> socket.socket:
        sock = self._sock
        if sock is not None and _readable(sock):
            # An idle session has nothing owed to us: this is a serverclose, or EOF.
            try:
                self._drain_idle(sock)
            except (OSError, RelpError):
                self._drop_session()
                sock = None
        if sock is None:
            sock = self._connect()
            self._sock = sock
            self._reader = FrameReader()
            self._txnr = 0
            self._open(sock)
            self.sessions += 1
        return sock

    def _drain_idle(self, sock: socket.socket) -> None:
        sock.settimeout(0.0)
        try:
            data = sock.recv(65536)
        except (BlockingIOError, ssl.SSLWantReadError):
            return
        finally:
            sock.settimeout(self.timeout_s)
        if not data:
            raise RelpError("the receiver closed the idle session")
        self._reader.feed(data)
        frame = self._reader.next()
        if frame is not None:
            raise RelpError(f"the receiver sent {frame[1].decode('ascii', 'replace')!r} on an idle session")

    def _open(self, sock: socket.socket) -> None:
        txnr = self._next_txnr()
        sock.sendall(relp_frame(txnr, b"open", OFFERS))
        got, command, data = self._read_frame(sock, time.monotonic() + self.timeout_s)
        if command != b"rsp" or got != txnr:
            raise RelpError(f"expected the rsp to open, got {command.decode('ascii', 'replace')!r} {got}")
        code, text = rsp_status(data)
        if code != 200:
            raise RelpError(f"the receiver refused the session: {code} {text}")
        offers = data.split(b"\n")[1:]
        commands = next((o.partition(b"=")[2] for o in offers if o.startswith(b"commands=")), b"")
        if b"syslog" not in commands.split(b","):
            raise RelpError("the receiver does not offer the syslog command")

    def _next_txnr(self) -> int:
        self._txnr = self._txnr % TXNR_MAX + 1
        return self._txnr

    def _connect(self) -> socket.socket:
        return open_stream(self.host, self.port, self.timeout_s, self._ssl_context)

    def _drop_session(self) -> None:
        sock, self._sock = self._sock, None
        close_quietly(sock)


def _readable(sock: socket.socket) -> bool:
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


def _describe(exc: BaseException) -> str:
    if isinstance(exc, RelpError):
        return str(exc)
    return describe(exc)


def parse_relp_spec(spec: str) -> RelpSender:
    """'syslog+relp://HOST:PORT[?tls=1&ca=FILE&cert=FILE&key=FILE]'; ValueError naming the accepted forms."""
    label = f"relp output {spec!r}"
    parts, host, port = split_address(spec, "relp output", spec, ACCEPTED_FORMS)
    if parts.path not in ("", "/") or parts.fragment:
        raise ValueError(f"{label}: no path is accepted after HOST:PORT; accepted forms: {ACCEPTED_FORMS}")
    options = parse_options(parts.query, OPTIONS, label, ACCEPTED_FORMS)
    tls = flag_option(options, "tls", label)
    try:
        return RelpSender(host, port, tls=tls, ca_file=options.get("ca"),
                          cert_file=options.get("cert"), key_file=options.get("key"))
    except ValueError as exc:
        raise ValueError(f"{label}: {str(exc).removeprefix('relp output: ')}") from None

"""The daemon's control socket: the protocol both sides speak, and the client's connection.

One message per line, each a JSON object with "v" (PROTOCOL_VERSION). The client sends requests
({"v":1,"op":...}); the daemon answers with {"v":1,"type":...}, and streams {"type":"doc"} lines to
subscribers. The README documents every operation. This module imports nothing heavy: run clients
and the API load it without bcc or the probes.
"""
from __future__ import annotations

import base64
import json
import os
import socket
from pathlib import Path

PROTOCOL_VERSION = 1
DEFAULT_SOCKET = Path("/run/eptrace/eptrace.sock")
MAX_LINE = 16 << 20           # a request or answer longer than this is refused
# A document travels as its exact ECS text: DOC_PREFIX + kind + '"' [+ ',"seq":N'] + ',"doc":' + text + "}".
# seq numbers the documents of one episode (1, 2, ...): a client's own event.sequence, gaps included.
DOC_PREFIX = b'{"v":1,"type":"doc","kind":"'


class DaemonError(Exception):
    """The daemon refused a request, or answered what the client cannot use. status: the exit status."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


class NoDaemon(DaemonError):
    """No daemon listens on the socket."""


class Refused(DaemonError):
    """The socket or the daemon refused this user (not root, not in the socket's group)."""

    def __init__(self, message: str):
        super().__init__(message, status=4)


class DaemonGone(DaemonError):
    """The daemon closed the connection (it stopped or died)."""


def socket_path() -> Path:
    return Path(os.environ.get("EPTRACE_SOCKET") or DEFAULT_SOCKET)


def encode(message: dict) -> bytes:
    return (json.dumps({"v": PROTOCOL_VERSION, **message}, separators=(",", ":")) + "\n").encode()


def encode_doc(kind: str, text: str, seq: int | None = None) -> bytes:
    numbered = b"" if seq is None else b',"seq":%d' % seq
    return DOC_PREFIX + kind.encode() + b'"' + numbered + b',"doc":' + text.encode() + b"}\n"


CAPTURE_PREFIX = b'{"v":1,"type":"capture","entry":"'


def encode_capture(entry: bytes) -> bytes:
    """One capture entry (msgpack, as a capture file holds it) for a client that asked for a capture."""
    return CAPTURE_PREFIX + base64.b64encode(entry) + b'"}\n'


def decode_capture(line: bytes) -> bytes | None:
    """The packed capture entry of a capture line, or None for any other message."""
    if not line.startswith(CAPTURE_PREFIX) or not line.endswith(b'"}'):
        return None
    return base64.b64decode(line[len(CAPTURE_PREFIX):-2], validate=True)


def decode_doc(line: bytes) -> tuple[str, str, int | None] | None:
    """(kind, exact document text, its episode's seq or None) of a doc line, or None for any other message."""
    if not line.startswith(DOC_PREFIX):
        return None
    kind, sep, rest = line[len(DOC_PREFIX):].partition(b'"')
    seq = None
    if rest.startswith(b',"seq":'):
        number, _, rest = rest[7:].partition(b",")
        if not number.isdigit():
            return None
        seq, rest = int(number), b"," + rest
    if not sep or not rest.startswith(b',"doc":') or not rest.endswith(b"}"):
        return None
    return kind.decode(), rest[7:-1].decode(), seq


class Connection:
    """A client's connection: requests, and the lines the daemon sends back (blocking)."""

    def __init__(self, path: Path | None = None, timeout: float | None = None, greet: bool = True):
        """greet: read the daemon's hello now (else: greet() before the first request; the daemon answers
        meanwhile)."""
        self.path = path or socket_path()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(str(self.path))
        except PermissionError:
            self.sock.close()
            raise Refused(f"the eptrace daemon's socket {self.path} refuses this user "
                          "(root, or a member of the daemon's --socket-group only)") from None
        except (FileNotFoundError, ConnectionRefusedError):
            self.sock.close()
            raise NoDaemon(f"no eptrace daemon listens on {self.path} (start one: eptrace daemon)") from None
        except OSError as e:
            self.sock.close()
            raise NoDaemon(f"cannot reach the eptrace daemon on {self.path}: {e.strerror or e}") from None
        self._buffer = b""
        self.instance = None
        if greet:
            self.greet()

    def greet(self) -> None:
        """Read the daemon's hello: Refused or DaemonError (the connection closed) when it refuses this client."""
        try:
            hello = self.message()
        except BaseException:
            self.sock.close()
            raise
        if hello.get("type") == "error":
            self.close()
            if hello.get("status") == 4:
                raise Refused(hello.get("error", "refused"))
            raise DaemonError(hello.get("error", "refused"), hello.get("status", 2))
        if hello.get("type") != "hello":
            self.close()
            raise DaemonError(f"the eptrace daemon on {self.path} did not say hello: {hello!r}")
        self.instance = hello.get("instance")

    def send(self, op: str, **fields) -> None:
        try:
            self.sock.sendall(encode({"op": op, **fields}))
        except OSError as e:
            raise DaemonGone(f"the eptrace daemon went away ({e.strerror or e})") from None

    def line(self) -> bytes:
        """The next line (without its newline); DaemonGone at end of file."""
        while b"\n" not in self._buffer:
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                raise               # the caller's timeout: the connection is fine
            except OSError as e:
                raise DaemonGone(f"the eptrace daemon went away ({e.strerror or e})") from None
            if not chunk:
                raise DaemonGone("the eptrace daemon went away (its connection closed)")
            self._buffer += chunk
            if len(self._buffer) > MAX_LINE and b"\n" not in self._buffer:
                raise DaemonError("the eptrace daemon sent a line longer than the protocol allows")
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def message(self) -> dict:
        return json.loads(self.line())

    def request(self, op: str, **fields) -> dict:
        """Send a request and return its answer (documents in between are not expected here)."""
        self.send(op, **fields)
        answer = self.message()
        if answer.get("type") == "error":
            raise DaemonError(answer.get("error", "error"), answer.get("status", 2))
        return answer

    def close(self) -> None:
        self.sock.close()


def connect_if_running(mode: str, greet: bool = True) -> Connection | None:
    """The daemon's connection for --daemon MODE: auto (None when no daemon listens), never, require."""
    if mode == "never":
        return None
    try:
        return Connection(greet=greet)
    except NoDaemon:
        if mode == "require":
            raise
        return None

"""TLS and error wording shared by the network senders."""
from __future__ import annotations

import os
import socket
import ssl


def client_context(label: str, ca_file: str | None, cert_file: str | None = None,
                   key_file: str | None = None) -> ssl.SSLContext:
    """A client context that verifies the server (against ca_file, or the system's CAs without it) and
    presents a client certificate if given. Bad files are ValueErrors naming the output (label)."""
    for what, path in (("CA file", ca_file), ("client certificate", cert_file), ("client key", key_file)):
        if path is not None and not os.access(path, os.R_OK):
            raise ValueError(f"{label}: cannot read the {what} {path!r}: "
                             f"{'no such file' if not os.path.exists(path) else 'permission denied'}")
    if key_file and not cert_file:
        raise ValueError(f"{label}: a client key was given without a client certificate (cert=...)")
    try:
        context = ssl.create_default_context(cafile=ca_file)   # CERT_REQUIRED, check_hostname, TLS >= 1.2
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"{label}: cannot load the CA file {ca_file!r}: {describe(exc)}") from None
    if ca_file is not None and not context.get_ca_certs():
        raise ValueError(f"{label}: the CA file {ca_file!r} holds no CA certificate (PEM expected)")
    if cert_file:
        try:
            context.load_cert_chain(cert_file, key_file)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"{label}: cannot load the client certificate {cert_file!r}"
                             f"{f' with key {key_file!r}' if key_file else ''}: {describe(exc)}") from None
    return context


def open_stream(host: str, port: int, timeout_s: float, ssl_context: ssl.SSLContext | None) -> socket.socket:
    """A TCP connection (no Nagle, keep-alives on), wrapped in TLS when a context is given; the server's
    name (DNS or IP) is checked against its certificate."""
    raw = socket.create_connection((host, port), timeout=timeout_s)
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if ssl_context is not None:
            return ssl_context.wrap_socket(raw, server_hostname=host)
        return raw
    except BaseException:
        raw.close()
        raise


def close_quietly(sock: socket.socket | None) -> None:
    """Close a connection that is being given up on: an error closing it changes nothing."""
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass


def describe(exc: BaseException) -> str:
    """A network error in a few words, for SendError messages."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {exc.verify_message}"
    if isinstance(exc, socket.timeout):
        return "timed out"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__

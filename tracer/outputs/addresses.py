"""The HOST:PORT part of a network output's spec, checked the same way for every sender."""
from __future__ import annotations

import re
from urllib.parse import SplitResult, parse_qsl, urlsplit


def split_address(spec: str, label: str, shown: str, forms: str) -> tuple[SplitResult, str, int]:
    """(parts, host, port) of SCHEME://HOST:PORT[...]; a ValueError naming the accepted forms otherwise.

    label names the output in messages ("syslog output"); shown is the spec with secrets redacted.
    """
    scheme, _, rest = spec.partition("://")
    netloc = re.split(r"[/?#]", rest, maxsplit=1)[0]

    def bad(why: str) -> ValueError:
        return ValueError(f"{label} {shown!r}: {why}; accepted forms: {forms}")

    if "@" in netloc:
        raise bad("no user or password (no user@) before the host: credentials go in the options")
    if not netloc.startswith("[") and netloc.count(":") > 1:
        raise bad(f"an IPv6 address goes in brackets, e.g. {scheme}://[::1]:PORT")
    if not re.fullmatch(r"[^\s/?#@]+:\d{1,5}", netloc):
        raise bad("HOST:PORT is required (PORT 1-65535)")
    try:
        parts = urlsplit(spec)
        port = parts.port
    except ValueError as exc:       # a bad port, or an unclosed [
        raise bad(str(exc)) from None
    host = parts.hostname
    if not host or not port:
        raise bad("HOST:PORT is required (PORT 1-65535)")
    if parts.netloc.startswith("[") and ":" not in host:
        raise bad("only an IPv6 address goes in brackets")
    return parts, host, port


def parse_options(query: str, allowed: tuple[str, ...], label: str, forms: str) -> dict[str, str]:
    """The URL-decoded options of a spec's query: each allowed, given once, with a value; ValueError otherwise.

    label names the output and its (redacted) spec in messages; values are never repeated in them.
    """
    options: dict[str, str] = {}
    if not query:
        return options
    try:
        items = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ValueError(f"{label}: malformed options; accepted forms: {forms}") from None
    for key, value in items:
        if key not in allowed:
            raise ValueError(f"{label}: unknown option {key!r} (options: {', '.join(allowed)}); accepted forms: {forms}")
        if key in options:
            raise ValueError(f"{label}: option {key} is given twice; accepted forms: {forms}")
        if not value:
            raise ValueError(f"{label}: option {key} needs a value; accepted forms: {forms}")
        options[key] = value
    return options


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def flag_option(options: dict[str, str], name: str, label: str) -> bool:
    """A 1/0 (true/false, yes/no, on/off) option, off when absent."""
    value = options.get(name, "0").lower()
    if value not in _TRUE + _FALSE:
        raise ValueError(f"{label}: {name} must be 1 or 0, got {options[name]!r}")
    return value in _TRUE


def check_host_port(label: str, host: str, port: int) -> None:
    """The checks every network sender makes of its receiver's address; label: "forward output", ..."""
    if not host:
        raise ValueError(f"{label}: the host is empty")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ValueError(f"{label}: port must be 1-65535, got {port!r}")


def check_tls_files(label: str, tls: bool, *files: str | None) -> None:
    """ca=, cert= and key= mean nothing without TLS: an error, never silently ignored."""
    if not tls and any(files):
        raise ValueError(f"{label}: ca, cert and key are for TLS only (add tls=1)")

"""The HOST:PORT part of a network output's spec, checked the same way for every sender."""
from __future__ import annotations

import re
from urllib.parse import SplitResult, urlsplit


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

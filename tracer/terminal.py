"""Text from the sandbox (argv, comm, DNS names, labels) on a terminal: control characters escaped.

An ANSI escape or a newline in an argv could otherwise clear the screen, forge a summary line or an
`episode ls` row. Human-readable output goes through printable(); JSON and syslog stay exact.
"""
from __future__ import annotations

import re

# C0 controls (tab and newline included), DEL, C1 controls, Unicode line/paragraph separators and the
# bidirectional overrides that reorder what a terminal shows.
CONTROL_CHARS = "\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069"
CONTROL = re.compile(f"[{CONTROL_CHARS}]")
# ... and the backslash, so that an escape shown can never be told from the same text typed literally.
_UNPRINTABLE = re.compile(f"[{CONTROL_CHARS}\\\\]")


_NAMED = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape(match: re.Match) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """text with every control character written as \\n, \\t, \\r or \\xNN (\\uNNNN), and '\\' as '\\\\':
    one visible line."""
    return _UNPRINTABLE.sub(_escape, text)

"""NDJSON on stdout: the default event stream."""
from __future__ import annotations

import os
import sys
from typing import TextIO

from tracer import logs
from tracer.outputs.base import Output
from tracer.schema import Document

log = logs.getLogger(__name__)

FLUSH_BYTES = 64 * 1024


class StdoutOutput(Output):
    """One JSON line per document, buffered until flush() or ~64 KiB.

    A closed reader (`eptrace | head`) is not a tracer crash: the documents are
    counted as dropped with reason "broken_pipe" and one warning is logged.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self._stream = stream  # None: whatever sys.stdout is when we write
        self._pending: list[str] = []
        self._pending_chars = 0
        self._broken = False

    @property
    def name(self) -> str:
        return "stdout"

    def write(self, doc: Document) -> None:
        if self._broken:
            self.count_drop("broken_pipe")
            return
        line = doc.json + "\n"
        self._pending.append(line)
        self._pending_chars += len(line)
        if self._pending_chars >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        lines, self._pending, self._pending_chars = self._pending, [], 0
        if self._broken:
            self.count_drop("broken_pipe", len(lines))
            return
        stream = self._stream or sys.stdout
        try:
            if lines:
                stream.write("".join(lines))
            stream.flush()
        except BrokenPipeError:
            self._broken = True
            self.count_drop("broken_pipe", len(lines))
            log.warning("stdout is closed (broken pipe); further documents on stdout are dropped")
            _silence(stream)
            return
        self.sent += len(lines)


def _silence(stream: TextIO) -> None:
    """Point the dead stdout at /dev/null so that the interpreter's final flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass  # not a real file descriptor (tests, wrappers): nothing to silence

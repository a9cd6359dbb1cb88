"""NDJSON file output that shippers (Filebeat, Vector, Fluent Bit) can tail safely.

- Every os.write() carries whole lines only, on an O_APPEND fd: a tailer never
  reads half a line.
- Rotation renames (path -> path.1 -> ... -> path.KEEP) and creates a new file;
  it never truncates in place, so a tailer that follows the renamed inode
  reads every line exactly once.
- The file is opened the safe way (tracer.safefiles: no link followed, no file of
  another user's, no directory others can write to) with mode 0640, its group
  given by `group=` so that a shipper in that group can read it.
"""
from __future__ import annotations

import os

from tracer import logs, safefiles
from tracer.outputs.base import Output, OutputError
from tracer.schema import Document

log = logs.getLogger(__name__)

FLUSH_BYTES = 64 * 1024
MODE = 0o640


class FileOutput(Output):
    """Appends NDJSON to path; rotates by size when max_mb is set, keeping `keep` old files."""

    def __init__(self, path: str, max_mb: float | None = None, keep: int = 5, group: int | None = None) -> None:
        super().__init__()
        if max_mb is not None and max_mb <= 0:
            raise OutputError(f"file output {path}: max_mb must be positive, got {max_mb}")
        if keep < 1:
            raise OutputError(f"file output {path}: keep must be at least 1, got {keep}")
        self.path = path
        self.keep = keep
        self.group = group
        self.max_bytes = int(max_mb * 1024 * 1024) if max_mb is not None else None
        if os.path.abspath(path) == os.devnull:
            self.max_bytes = None       # never rotated: that would rename /dev/null
        check_file_target(path)
        self._fd = self._open()
        self._size = os.fstat(self._fd).st_size
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._warned = False

    @property
    def name(self) -> str:
        return f"file:{self.path}"

    def write(self, doc: Document) -> None:
        if self._fd < 0:
            self.count_drop("closed")
            return
        # "replace": a stray surrogate from a process name must not lose the document.
        line = (doc.json + "\n").encode("utf-8", "replace")
        self._pending.append(line)
        self._pending_bytes += len(line)
        if self._pending_bytes >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        lines, self._pending, self._pending_bytes = self._pending, [], 0
        if not lines:
            return
        if self._fd < 0:
            self.count_drop("closed", len(lines))
            return
        chunk: list[bytes] = []
        chunk_bytes = 0
        for i, line in enumerate(lines):
            if self._must_rotate(chunk_bytes, len(line)):
                self._write_chunk(chunk)
                chunk, chunk_bytes = [], 0
                if not self._rotate():
                    self.count_drop("io_error", len(lines) - i)
                    return
            chunk.append(line)
            chunk_bytes += len(line)
        self._write_chunk(chunk)

    def close(self) -> None:
        if self._fd < 0:
            return
        self.flush()
        os.close(self._fd)
        self._fd = -1

    # --- internals ----------------------------------------------------------------

    def _open(self) -> int:
        try:
            return safefiles.open_for_writing(self.path, "file output", MODE, group=self.group)
        except safefiles.UnsafePathError as exc:
            raise OutputError(str(exc)) from None
        except OSError as exc:
            raise OutputError(f"file output {self.path}: cannot open for appending: {exc.strerror}; "
                              "check the path and its permissions") from None

    def _must_rotate(self, chunk_bytes: int, line_bytes: int) -> bool:
        """Rotate before a line that would push the file past max_bytes.

        A file that is still empty takes the line anyway, so a line bigger than
        max_bytes gets a file of its own instead of looping.
        """
        used = self._size + chunk_bytes
        return self.max_bytes is not None and used > 0 and used + line_bytes > self.max_bytes

    def _write_chunk(self, chunk: list[bytes]) -> None:
        if not chunk:
            return
        data = b"".join(chunk)
        try:
            done = 0
            while done < len(data):  # short writes only happen on a full disk or a signal
                done += os.write(self._fd, data[done:])
        except OSError as exc:
            if done:   # a short write before the failure left a torn line: cut the file back to whole lines
                try:
                    os.ftruncate(self._fd, self._size)
                except OSError:
                    pass
            self.count_drop("io_error", len(chunk))
            self._warn(f"write failed ({exc.strerror}); documents are counted as dropped")
            return
        self._size += len(data)
        self.sent += len(chunk)

    def _rotate(self) -> bool:
        """Rename path -> path.1 -> ... -> path.KEEP and open a new path; False if no file is open."""
        os.close(self._fd)
        self._fd = -1
        try:
            for i in range(self.keep - 1, 0, -1):
                older = f"{self.path}.{i}"
                if os.path.lexists(older):
                    os.replace(older, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        except OSError as exc:  # keep appending to the same file rather than lose documents
            self._warn(f"rotation failed ({exc.strerror}); appending past max_mb")
        try:
            self._fd = self._open()
        except OutputError as exc:
            self._warn(f"{exc}; documents are counted as dropped")
            return False
        self._size = os.fstat(self._fd).st_size
        return True

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("file output %s: %s", self.path, message)


def check_file_target(path: str) -> None:
    """What FileOutput would refuse, checked before anything is made: OutputError."""
    try:
        safefiles.check_target(path, "file output")
    except safefiles.UnsafePathError as exc:
        raise OutputError(str(exc)) from None

"""At-least-once delivery for network outputs, the way mature shippers do it.

A DeliveryOutput puts documents in a bounded in-memory queue; a sender thread
takes batches and hands them to a Sender (syslog, forward, HEC, ES...), retrying
with exponential backoff and jitter while the receiver is down. What does not fit
in memory goes to a disk spool, which a restarted tracer delivers first. When
the spool is full, events are dropped before alerts: alerts are kept as long as
anything can be. Every drop is counted by reason; nothing is lost silently. The
kernel side, the detectors and other outputs never wait for a slow receiver.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import os
import random
import threading
import time
from pathlib import Path

from tracer import safefiles
from tracer.outputs.base import Output
from tracer.outputs.senders import SendError, Sender
from tracer.schema import Document

log = logging.getLogger(__name__)

QUEUE_MAX = 50_000                 # documents in memory per output
SEGMENT_BYTES = 1 << 20            # a spool file is closed at this size
BATCH_MAX = 500
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.2, 30.0
SPILL_EVERY_S = 0.5                # while the receiver is down, memory goes to disk this often
DEFAULT_SPOOL_DIR = Path("/var/lib/eptrace/spool")
DEFAULT_SPOOL_MB = 512


class Spool:
    """Segment files of 'kind<TAB>json' lines, oldest first; a segment is deleted once delivered.
    They hold argv and payload text: the directories are 0700, the files 0600, no link is followed."""

    def __init__(self, directory: Path, max_bytes: int):
        safefiles.private_dir(directory.parent, "spool directory")
        self.dir = safefiles.private_dir(directory, "spool directory")
        self.max_bytes = max_bytes
        self._next = max((int(p.name.split(".")[0]) for p in self.dir.glob("*.spool")), default=0) + 1

    def segments(self, kind: str) -> list[Path]:
        return sorted(self.dir.glob(f"*.{kind}.spool"), key=lambda p: int(p.name.split(".")[0]))

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.dir.glob("*.spool") if p.exists())

    def write(self, docs: list[Document], kind: str) -> None:
        path = self.dir / f"{self._next}.{kind}.spool"
        self._next += 1
        data = "".join(f"{d.kind}\t{d.json}\n" for d in docs).encode("utf-8", "replace")
        tmp = path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)     # left by a run killed while writing it
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, safefiles.PRIVATE_FILE)
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)      # a segment appears whole or not at all

    @staticmethod
    def read(path: Path) -> list[Document]:
        docs = []
        with open(safefiles.open_for_reading(path), encoding="utf-8", errors="replace") as f:
            for line in f:
                kind, _, text = line.rstrip("\n").partition("\t")
                if text:
                    docs.append(Document(text, kind))
        return docs


class DeliveryOutput(Output):
    def __init__(self, sender: Sender, spool_dir: Path | None = None, spool_mb: float = DEFAULT_SPOOL_MB,
                 queue_max: int = QUEUE_MAX):
        super().__init__()
        self.sender = sender
        key = hashlib.sha1(sender.name.encode()).hexdigest()[:12]
        self.spool = Spool((spool_dir or DEFAULT_SPOOL_DIR) / key, int(spool_mb * 1024 * 1024))
        self.queue_max = queue_max
        self._queue: collections.deque[Document] = collections.deque()
        self._lock = threading.Condition()
        self._closing = False
        self._failures = 0
        self._inflight: list[Document] = []
        self.latency_s = 0.0               # of the last delivered batch: write -> acknowledged
        self._thread = threading.Thread(target=self._run, name=f"deliver {sender.name}", daemon=True)
        self._thread.start()

    @property
    def name(self) -> str:
        return self.sender.name

    @property
    def queued(self) -> int:
        return len(self._queue)

    def write(self, doc: Document) -> None:
        with self._lock:
            if self._closing:
                self.count_drop("closed")
                return
            self._queue.append(doc)
            if len(self._queue) > self.queue_max:
                self._spill()
            self._lock.notify()

    def _spill(self, everything: bool = False) -> None:
        """To disk, alerts and events apart: the oldest half when memory is full, or all of it."""
        count = len(self._queue) if everything else len(self._queue) // 2
        spill = [self._queue.popleft() for _ in range(count)]
        for kind, docs in (("alert", [d for d in spill if d.kind == "alert"]),
                           ("event", [d for d in spill if d.kind != "alert"])):
            if docs:
                self._spool_docs(docs, kind)

    def _spool_docs(self, docs: list[Document], kind: str) -> None:
        need = sum(len(d.json) + 8 for d in docs)
        while self.spool.size() + need > self.spool.max_bytes:
            events = self.spool.segments("event")
            if kind == "alert" and events:
                oldest = events[0]       # alerts are kept as long as anything can be
                self.count_drop("spool_full", len(Spool.read(oldest)))
                oldest.unlink(missing_ok=True)
                continue
            self.count_drop("spool_full", len(docs))
            return
        try:
            self.spool.write(docs, kind)
        except OSError as e:
            self.count_drop("spool_error", len(docs))
            log.warning("output %s: cannot spool %d documents: %s", self.name, len(docs), e)

    # -- the sender thread -------------------------------------------------------------------
    def _run(self) -> None:
        while not self._closing:
            batch, segment = self._next_batch()
            if batch is None:
                return
            if segment is None:
                self._inflight = batch     # close() spools it if this send never returns
            started = time.monotonic()
            try:
                rejected = self.sender.send(batch) or []
            except SendError as e:
                self._retry_later(batch, segment, e)
                continue
            finally:
                self._inflight = []
            self._failures = 0
            self.latency_s = time.monotonic() - started
            self.sent += len(batch) - len(rejected)
            if rejected:
                self._dead_letter(rejected)
            if segment is not None:
                segment.unlink(missing_ok=True)

    def _next_batch(self) -> tuple[list[Document] | None, Path | None]:
        """Spooled segments first (alerts, then events), then memory; None when closed and empty."""
        for kind in ("alert", "event"):
            segments = self.spool.segments(kind)
            if segments:
                return Spool.read(segments[0]), segments[0]
        with self._lock:
            while not self._queue:
                if self._closing:
                    return None, None
                self._lock.wait(0.5)
                for kind in ("alert", "event"):
                    if self.spool.segments(kind):
                        return self._next_batch()
            size = getattr(self.sender, "batch_max", BATCH_MAX)
            return [self._queue.popleft() for _ in range(min(size, len(self._queue)))], None

    def _retry_later(self, batch: list[Document], segment: Path | None, error: Exception) -> None:
        self._failures += 1
        if self._failures == 1:
            log.warning("output %s: delivery failed (%s); retrying with backoff", self.name, error)
        if segment is None:
            # The receiver is down: the batch and everything queued go to disk now, so that even
            # a tracer killed during the outage (SIGKILL) loses nothing a restart cannot deliver.
            with self._lock:
                self._queue.extendleft(reversed(batch))
                self._spill(everything=True)
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** min(self._failures - 1, 10))
        wake = time.monotonic() + delay * random.uniform(0.5, 1.5)
        last_spill = time.monotonic()
        with self._lock:
            while not self._closing and time.monotonic() < wake:
                self._lock.wait(min(SPILL_EVERY_S, max(0.0, wake - time.monotonic())))
                if self._queue and time.monotonic() - last_spill >= SPILL_EVERY_S:
                    self._spill(everything=True)     # what came in meanwhile goes to disk too
                    last_spill = time.monotonic()

    def _dead_letter(self, rejected: list[tuple[Document, str]]) -> None:
        """Refused for good by the receiver: kept in dead-letter.ndjson beside the spool, and counted."""
        for _, reason in rejected:
            self.count_drop(f"rejected:{reason}")
        try:
            fd = safefiles.open_for_writing(self.spool.dir / "dead-letter.ndjson", "dead-letter file")
            with open(fd, "a", encoding="utf-8") as f:
                f.write("".join(f"{doc.json}\n" for doc, _ in rejected))
        except (OSError, safefiles.UnsafePathError) as e:
            log.warning("output %s: cannot write the dead letters: %s", self.name, e)

    # -- shutdown ----------------------------------------------------------------------------
    def flush(self) -> None:
        """Non-blocking: the thread delivers on its own."""

    def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what can be within timeout_s; spool the rest for the next run."""
        deadline = time.monotonic() + timeout_s
        while (self._queue or self._inflight) and self._failures == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        self._thread.join(timeout=max(0.1, deadline - time.monotonic()))
        with self._lock:      # what is left, in flight included: delivered twice at worst, never lost
            left = list(self._inflight) + list(self._queue)
            self._queue.clear()
        for kind, docs in (("alert", [d for d in left if d.kind == "alert"]),
                           ("event", [d for d in left if d.kind != "alert"])):
            if docs:
                self._spool_docs(docs, kind)
        self.sender.close()

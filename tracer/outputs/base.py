"""The one small interface every output implements, and the fan-out over several."""
from __future__ import annotations

import abc

from tracer import logs
from tracer.schema import Document

log = logs.getLogger(__name__)


class OutputError(Exception):
    """An output cannot be set up; the message says what was wrong and how to fix it."""


class Output(abc.ABC):
    """A sink for ECS documents. Counters feed the health metrics.

    sent: documents handed to the sink; dropped: reason -> documents lost.
    """

    def __init__(self) -> None:
        self.sent = 0
        self.dropped: dict[str, int] = {}

    @property
    @abc.abstractmethod
    def name(self) -> str: ...

    @abc.abstractmethod
    def write(self, doc: Document) -> None: ...

    def flush(self) -> None:
        """Push buffered documents to the sink."""

    def close(self) -> None:
        self.flush()

    def count_drop(self, reason: str, n: int = 1) -> None:
        if n > 0:
            self.dropped[reason] = self.dropped.get(reason, 0) + n


class Fanout:
    """Writes each document to every output; one failing output never stops the others."""

    def __init__(self, outputs: list[Output]) -> None:
        self.outputs = list(outputs)
        self._warned: set[int] = set()  # ids of outputs already logged about

    def write(self, doc: Document) -> None:
        for output in self.outputs:
            try:
                output.write(doc)
            except Exception as exc:  # noqa: BLE001 - an output bug must not stop the tracer
                self._failed(output, "write", exc)

    def flush(self) -> None:
        for output in self.outputs:
            try:
                output.flush()
            except Exception as exc:  # noqa: BLE001
                self._failed(output, "flush", exc, count=False)

    def close(self) -> None:
        for output in self.outputs:
            try:
                output.close()
            except Exception as exc:  # noqa: BLE001
                self._failed(output, "close", exc, count=False)

    def _failed(self, output: Output, what: str, exc: Exception, count: bool = True) -> None:
        # A failed flush or close loses an unknown number of buffered documents;
        # outputs count what they can themselves, so only count whole failed writes here.
        if count:
            output.count_drop("error")
        if id(output) not in self._warned:
            self._warned.add(id(output))
            log.warning("output %s failed to %s (%s: %s); its documents are counted as dropped",
                        output.name, what, type(exc).__name__, exc)


class KindFilter:
    """Passes on only the documents of some event.kind values (replay prints alerts by default)."""

    def __init__(self, inner: Fanout, kinds: set[str]) -> None:
        self.inner, self.kinds = inner, kinds
        self.outputs = inner.outputs

    def write(self, doc: Document) -> None:
        if doc.kind in self.kinds:
            self.inner.write(doc)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()


class Transform:
    """Maps every document before the outputs see it (--schema ocsf)."""

    def __init__(self, inner: Fanout, convert) -> None:
        self.inner, self.convert = inner, convert
        self.outputs = inner.outputs

    def write(self, doc: Document) -> None:
        self.inner.write(self.convert(doc))

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()

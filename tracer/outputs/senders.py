"""What a network output's transport implements; tracer.outputs.delivery drives it."""
from __future__ import annotations

from typing import Protocol

from tracer.schema import Document


class SendError(Exception):
    """A batch could not be delivered (receiver down, reset, refused): retry it later."""


class Sender(Protocol):
    name: str

    def send(self, docs: list[Document]) -> list[tuple[Document, str]] | None:
        """Deliver every document of the batch, or raise SendError to have the whole batch retried.

        A receiver that accepts the batch but refuses some documents for good (e.g. an
        Elasticsearch mapping error, a 400) returns them as (document, reason): they are
        dead-lettered and counted, never retried. None or [] means all were accepted."""

    def close(self) -> None: ...

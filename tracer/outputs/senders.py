"""What a network output's transport implements; tracer.outputs.delivery drives it."""
from __future__ import annotations

from typing import Protocol

from tracer.schema import Document


class SendError(Exception):
    """A batch could not be delivered (receiver down, reset, refused): retry it later."""


class Sender(Protocol):
    name: str

    def send(self, docs: list[Document]) -> None:
        """Deliver every document of the batch, or raise SendError; never part of it silently."""

    def close(self) -> None: ...

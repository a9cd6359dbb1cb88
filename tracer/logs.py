"""Diagnostics on stderr through logging, loaded at the first use of a logger: `eptrace run` through the daemon
has nothing to say when all goes well, and never imports logging then (about 4 ms of its start). The modules of
run's client path take their logger from here (getLogger); the command line says how to set logging up
(configure), at once or deferred to that first use."""
from __future__ import annotations

import sys
import threading

_lock = threading.Lock()
_setup = None                   # callable(logging): the command line's set-up, not applied yet


class _Logger:
    """A logging.Logger, looked up (logging imported and set up) when first used."""

    def __init__(self, name: str):
        self._name = name
        self._logger = None

    def __getattr__(self, attr: str):
        if self._logger is None:
            self._logger = ready().getLogger(self._name)
        return getattr(self._logger, attr)


def getLogger(name: str) -> _Logger:
    return _Logger(name)


def configure(setup, deferred: bool = False) -> None:
    """setup(logging) sets logging up: now, or (deferred) at the first use of a logger from here or at ready()."""
    global _setup
    with _lock:
        _setup = setup
    if not deferred:
        ready()


def ready():
    """The logging module, set up: before anything that logs through logging itself (the tracer, the config, the
    policy, the network outputs) is loaded."""
    global _setup
    import logging
    with _lock:
        setup, _setup = _setup, None
        if setup is not None:
            setup(logging)
    return logging


def shutdown() -> None:
    """Flush the handlers, if logging was used at all."""
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()

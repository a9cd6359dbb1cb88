"""Episode ids, labels and on_alert actions: what `run`, `episode add`, the API and the daemon accept.

Apart from the registry and the policy, so that a run client checks them without loading either.
"""
from __future__ import annotations

import re

from .terminal import CONTROL

EPISODE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
LABEL_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
ACTIONS = ("none", "deny_network", "cut", "kill", "freeze")      # on_alert: a policy's, or --on-alert's


class RegistryError(Exception):
    """Bad input for a registration: the message is one line for the user."""


def validate_id(episode_id: str) -> str:
    if not EPISODE_ID.fullmatch(episode_id or ""):
        raise RegistryError(f"invalid episode id {episode_id!r}: use 1 to 128 characters of A-Z a-z 0-9 . _ : -")
    return episode_id


def parse_labels(pairs: tuple[str, ...] | list[str]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not LABEL_KEY.fullmatch(key):
            raise RegistryError(f"invalid label {pair!r}: use KEY=VALUE with KEY like team or run.kind")
        if key == "episode_id":
            raise RegistryError("label key 'episode_id' is reserved: it is the episode's id")
        if CONTROL.search(value):
            raise RegistryError(f"invalid label {pair!r}: the value has control characters (tabs, newlines, escapes)")
        labels[key] = value
    return labels

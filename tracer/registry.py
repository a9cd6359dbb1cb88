"""Registered episodes, kept on disk so that they survive a daemon restart.

One JSON file per episode under <state dir>/episodes/: creating it with O_EXCL
makes "already registered" race-free, and the daemon sees a change by listing
the folder.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .kernel import cgroups

DEFAULT_STATE_DIR = Path("/var/lib/eptrace")
EPISODE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
LABEL_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


class RegistryError(Exception):
    """Bad input for a registration: the message is one line for the user."""


@dataclass
class Registration:
    id: str
    cgroup: str                      # absolute path
    labels: dict[str, str] = field(default_factory=dict)


def state_dir() -> Path:
    return Path(os.environ.get("EPTRACE_STATE_DIR", DEFAULT_STATE_DIR))


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
        labels[key] = value
    return labels


class Registry:
    def __init__(self, root: Path | None = None):
        self.dir = (root or state_dir()) / "episodes"

    def _file(self, episode_id: str) -> Path:
        # ':' is allowed in ids and in file names; '.' and '..' are not valid on their own.
        return self.dir / f"{episode_id}.json"

    def add(self, episode_id: str, cgroup: str, labels: dict[str, str]) -> Registration:
        validate_id(episode_id)
        try:
            path = cgroups.resolve(cgroup)
        except cgroups.CgroupError as e:
            raise RegistryError(str(e)) from None
        for other in self.list():
            if Path(other.cgroup) == path:
                raise RegistryError(f"cgroup {path} is already registered as episode {other.id!r}")
        reg = Registration(episode_id, str(path), labels)
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{episode_id}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(reg.__dict__))
        try:
            os.link(tmp, self._file(episode_id))      # atomic, fails if it exists
        except FileExistsError:
            raise RegistryError(f"episode {episode_id!r} is already registered "
                                f"(remove it first: eptrace episode rm --id {episode_id})") from None
        finally:
            tmp.unlink(missing_ok=True)
        return reg

    def remove(self, episode_id: str) -> None:
        validate_id(episode_id)
        try:
            self._file(episode_id).unlink()
        except FileNotFoundError:
            raise RegistryError(f"episode {episode_id!r} is not registered (see: eptrace episode ls)") from None

    def list(self) -> list[Registration]:
        regs = []
        if not self.dir.is_dir():
            return regs
        for f in sorted(self.dir.glob("*.json")):
            try:
                regs.append(Registration(**json.loads(f.read_text())))
            except (OSError, ValueError, TypeError):
                continue     # being written or removed; seen on the next scan
        return regs

"""Registered episodes, kept on disk so that they survive a daemon restart.

One JSON file per episode under <state dir>/episodes/: creating it with O_EXCL
makes "already registered" race-free, and the daemon sees a change by listing
the folder.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from . import safefiles
from .episode_names import RegistryError, parse_labels, validate_id  # noqa: F401 (re-exported)
from .kernel import cgroups

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/var/lib/eptrace")
@dataclass
class Registration:
    id: str
    cgroup: str                      # absolute path
    labels: dict[str, str] = field(default_factory=dict)
    policy: dict | None = None       # its [policy] table (tracer/policy.py), checked when added


def state_dir() -> Path:
    return Path(os.environ.get("EPTRACE_STATE_DIR", DEFAULT_STATE_DIR))


def _registration(data, name: str) -> Registration:
    """A registration file's content, checked: the types of its fields, and its id against its file name."""
    known = {f.name for f in fields(Registration)}
    if not isinstance(data, dict) or not {"id", "cgroup"} <= set(data) or set(data) - known:
        raise RegistryError(f"registration {name} must be an object with id, cgroup and labels "
                            f"(fields: {', '.join(sorted(known))})")
    episode_id, cgroup, labels = data["id"], data["cgroup"], data.get("labels", {})
    if not isinstance(episode_id, str) or not isinstance(cgroup, str) or not isinstance(labels, dict):
        raise RegistryError(f"registration {name}: id and cgroup must be strings, labels an object")
    if f"{episode_id}.json" != name:
        raise RegistryError(f"registration {name} has id {episode_id!r}, which does not match its name")
    validate_id(episode_id)
    if not os.path.isabs(cgroup):
        raise RegistryError(f"registration {name}: cgroup must be an absolute path")
    if not all(isinstance(v, str) for v in labels.values()):
        raise RegistryError(f"registration {name}: label values must be strings")
    try:
        parse_labels([f"{k}={v}" for k, v in labels.items()])
    except RegistryError as e:
        raise RegistryError(f"registration {name}: {e}") from None
    if not isinstance(data.get("policy") or {}, dict):
        raise RegistryError(f"registration {name}: policy must be an object")
    return Registration(**{**data, "labels": dict(labels)})


class Registry:
    def __init__(self, root: Path | None = None):
        self.dir = (root or state_dir()) / "episodes"

    def _file(self, episode_id: str) -> Path:
        # ':' is allowed in ids and in file names; '.' and '..' are not valid on their own.
        return self.dir / f"{episode_id}.json"

    def add(self, episode_id: str, cgroup: str, labels: dict[str, str], policy: dict | None = None) -> Registration:
        validate_id(episode_id)
        try:
            path = cgroups.resolve(cgroup)
        except cgroups.CgroupError as e:
            raise RegistryError(str(e)) from None
        if path == cgroups.cgroup2_mount():
            raise RegistryError(f"cgroup {path} is the cgroup2 root: every process on the host would be the episode's")
        for other in self.list(strict=True):
            theirs = Path(other.cgroup)
            if theirs == path:
                raise RegistryError(f"cgroup {path} is already registered as episode {other.id!r}")
            if theirs in path.parents or path in theirs.parents:
                where = "inside" if theirs in path.parents else "above"
                raise RegistryError(f"cgroup {path} is {where} cgroup {theirs} of episode {other.id!r}: "
                                    "an episode's processes would be given to the other")
        reg = Registration(episode_id, str(path), labels, policy)
        try:
            safefiles.private_dir(self.dir.parent, "state directory")
            safefiles.private_dir(self.dir, "state directory")
            tmp = safefiles.AtomicFile(self.dir / f".{episode_id}.new", "registration")
        except safefiles.UnsafePathError as e:
            raise RegistryError(str(e)) from None
        tmp.write(json.dumps(reg.__dict__).encode())
        tmp.file.close()
        try:
            os.link(tmp.tmp, self._file(episode_id))      # atomic, fails if it exists
        except FileExistsError:
            raise RegistryError(f"episode {episode_id!r} is already registered "
                                f"(remove it first: eptrace episode rm --id {episode_id})") from None
        except OSError as e:
            raise RegistryError(f"cannot register episode {episode_id!r} in {self.dir}: {e.strerror}") from None
        finally:
            tmp.abort()
        return reg

    def remove(self, episode_id: str) -> None:
        validate_id(episode_id)
        try:
            self._file(episode_id).unlink()
        except FileNotFoundError:
            raise RegistryError(f"episode {episode_id!r} is not registered (see: eptrace episode ls)") from None

    def list(self, strict: bool = False) -> list[Registration]:
        """Every registration. A file that is not a valid one is a RegistryError when strict (the commands,
        and watch at start-up); otherwise (a running watch) it is logged once and skipped."""
        regs = []
        for d in (self.dir.parent, self.dir):
            if os.path.lexists(d) and (os.path.islink(d) or not os.path.isdir(d)):
                error = RegistryError(f"state directory {d} is not a directory (a file or a link is in its place)")
                if strict:
                    raise error
                if str(d) not in _reported:
                    _reported.add(str(d))
                    log.warning("%s; no registration is read from it", error)
                return regs
        if not self.dir.is_dir():
            return regs
        for f in sorted(self.dir.glob("*.json")):
            try:
                with open(safefiles.open_for_reading(f), encoding="utf-8") as fh:
                    regs.append(_registration(json.load(fh), f.name))
            except (OSError, ValueError):
                continue     # being written or removed; seen on the next scan
            except RegistryError as e:
                if strict:
                    raise
                if f.name not in _reported:
                    _reported.add(f.name)
                    log.warning("%s; it is ignored", e)
        return regs


_reported: set[str] = set()     # bad registration files already logged

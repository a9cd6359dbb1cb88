"""CMD's process, for run in-process (tracer/session.py) and through the daemon (tracer/client.py): who it
runs as (User) and how it starts (command_setup: into its episode cgroup, its packet-socket filter, its
user). Light to import: a run client through the daemon loads this, never the tracer."""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class User:
    """Who CMD runs as (run --user): set after it joins its cgroup, before exec."""
    uid: int
    gid: int
    groups: tuple[int, ...]
    name: str | None = None
    home: str | None = None


def packet_socket_filter(policy):
    """A tracer.kernel.seccomp.Installer for a tracer.policy.Policy with raw_sockets = false (the command's
    socket(AF_PACKET, ...) fails with EPERM; the probes' kill stays the backstop, and the only way for
    registered episodes), else None."""
    if policy is None or policy.raw_sockets:
        return None
    from .kernel import seccomp
    program = seccomp.packet_socket_filter()
    if program is None:
        log.warning("no seccomp filter for %s: AF_PACKET sockets are refused by a kill", os.uname().machine)
        return None
    return seccomp.Installer(program)


def command_setup(cgroup: Path, user: User | None, outputs, policy=None):
    """(preexec_fn, env, stdout) for CMD: it joins the episode cgroup before exec (so that its exec is
    traced), installs the packet-socket filter of its policy (a tracer.policy.Policy), then becomes user;
    its stdout goes to stderr when stdout carries the event stream."""
    procs_file = str(cgroup / "cgroup.procs")
    packet_filter = packet_socket_filter(policy)

    def enter_cgroup() -> None:     # runs in the child before exec
        with open(procs_file, "w") as f:
            f.write(str(os.getpid()))
        if packet_filter is not None:   # while still root: no no_new_privs needed
            packet_filter.install()
        if user is not None:        # after joining: an unprivileged process cannot move itself
            os.setgroups(user.groups)
            os.setgid(user.gid)
            os.setuid(user.uid)

    env = None
    if user is not None and user.name:
        env = {**os.environ, "USER": user.name, "LOGNAME": user.name, "HOME": user.home or "/"}
    child_stdout = sys.stderr if any(o.name == "stdout" for o in outputs.outputs) else None
    return enter_cgroup, env, child_stdout

"""Rules on command lines: a tunnel, a shell wired to a socket, or a miner.

Argv that names a tunnel (ssh -R, chisel, ...) or a reverse shell is
conclusive: the alert goes out at the first connection of that process or of
a descendant, with the flow as evidence, not after a duration threshold.
"""
from __future__ import annotations

from typing import Iterator

from ..decoding import is_loopback
from ..events import NetworkEvent, PipedShell, ProcessEvent, StdioSocket
from . import Context, Finding, argv, rules, where, who
from .rules import RISK

CONNECTS = ("connection_established", "connection_attempted", "udp_sent")


def _outbound(event) -> bool:
    return isinstance(event, NetworkEvent) and event.action in CONNECTS and event.outcome != "failure"


def reverse_tunnel(event, ctx: Context) -> Iterator[Finding]:
    if not _outbound(event):
        return
    for proc in ctx.lineage(event.process):
        why = argv.tunnel_argv(proc.args, proc.executable)
        if why:
            # keyed by the process that owns the flow, like the score: one alert per tunnel
            # process, however many connections it relays
            yield Finding(rules.REVERSE_TUNNEL, ("pid", event.process.pid if event.process else None),
                          f"{who(event.process)} in episode {event.episode.id} opened an outbound flow to "
                          f"{where(event)} for a tunnel: {why} in `{' '.join(proc.args)[:300]}`"
                          + ("" if proc is event.process else f" (its ancestor {who(proc)})"),
                          RISK.tunnel_argv, [event])
            return
    process = event.process
    if process is not None and argv.name_of(process.args, process.executable) in ("ssh", "dbclient"):
        why = ctx.ssh_forwarding(process)
        if why:
            yield Finding(rules.REVERSE_TUNNEL, ("pid", process.pid),
                          f"{who(process)} in episode {event.episode.id} opened an outbound flow to {where(event)} "
                          f"for a tunnel set in its config: {why}; `{' '.join(process.args)[:300]}`", 90, [event])


def reverse_shell(event, ctx: Context) -> Iterator[Finding]:
    if not _outbound(event):
        return
    for proc in ctx.lineage(event.process):
        why = argv.shell_argv(proc.args, proc.executable)
        if why:
            yield Finding(rules.REVERSE_SHELL, ("peer", event.destination.ip, event.destination.port),
                          f"{who(event.process)} in episode {event.episode.id} connected to {where(event)} as a "
                          f"reverse shell: {why} in `{' '.join(proc.args)[:300]}`", RISK.shell_argv, [event])
            return


def stdio_socket(event, ctx: Context) -> Iterator[Finding]:
    """A process with a network socket on stdin/stdout/stderr: the shape of a reverse shell."""
    if not isinstance(event, StdioSocket) or not event.destination.port:
        return
    if is_loopback(event.destination.ip):
        return      # local plumbing (test harnesses, supervisors), not a way out
    names = {0: "stdin", 1: "stdout", 2: "stderr"}
    seen = "after a dup2 onto it" if event.how == "dup2" else "as a shell or interpreter started"
    yield Finding(rules.REVERSE_SHELL, ("peer", event.destination.ip, event.destination.port),
                  f"{who(event.process)} in episode {event.episode.id} has a network socket on its "
                  f"{names[event.fd]} ({seen}), connected to {event.destination.ip}:{event.destination.port}/"
                  f"{event.transport}: `{' '.join(event.process.args)[:200]}`", RISK.stdio_socket, [event])


def piped_shell(event, ctx: Context) -> Iterator[Finding]:
    """A shell reading commands from stdin, fed by a network helper (nc, openssl s_client) through pipes or
    FIFOs, with its output piped back to it: tracer.state.pipes found the shape in /proc."""
    if not isinstance(event, PipedShell):
        return
    dst = event.destination
    yield Finding(rules.REVERSE_SHELL, ("peer", dst.ip, dst.port),
                  f"{who(event.process)} in episode {event.episode.id} takes its commands from the network and "
                  f"sends its output back: {event.holder_name} (pid {event.holder_pid}) holds a connection to "
                  f"{dst.ip}:{dst.port}/{event.transport}; stdin {event.feed}; output {event.back}: "
                  f"`{' '.join(event.process.args)[:200]}`", 99, [event])


def crypto_mining(event, ctx: Context) -> Iterator[Finding]:
    if isinstance(event, ProcessEvent) and event.action == "process_started":
        why = argv.miner_argv(event.process.args, event.process.executable)
        if why:
            yield Finding(rules.CRYPTO_MINING, ("pid", event.process.pid),   # shared with the Stratum rule
                          f"{who(event.process)} in episode {event.episode.id} started a crypto miner: {why} in "
                          f"`{' '.join(event.process.args)[:300]}`", RISK.miner_argv)


DETECTORS = (reverse_tunnel, reverse_shell, stdio_socket, piped_shell, crypto_mining)

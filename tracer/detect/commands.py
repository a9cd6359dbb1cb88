"""Rules on command lines: a tunnel, a shell wired to a socket, or a miner.

Argv that names a tunnel (ssh -R, chisel, ...) or a reverse shell is
conclusive: the alert goes out at the first connection of that process or of
a descendant, with the flow as evidence, not after a duration threshold.
"""
from __future__ import annotations

from typing import Iterator

from ..events import NetworkEvent, ProcessEvent
from . import Context, Finding, argv, rules, where, who

CONNECTS = ("connection_established", "connection_attempted", "udp_sent")


def _outbound(event) -> bool:
    return isinstance(event, NetworkEvent) and event.action in CONNECTS and event.outcome != "failure"


def reverse_tunnel(event, ctx: Context) -> Iterator[Finding]:
    if not _outbound(event):
        return
    for proc in ctx.lineage(event.process):
        why = argv.tunnel_argv(proc.args, proc.executable)
        if why:
            yield Finding(rules.REVERSE_TUNNEL, ("flow", event.cookie),   # the same key as the score
                          f"{who(event.process)} in episode {event.episode.id} opened an outbound flow to "
                          f"{where(event)} for a tunnel: {why} in `{' '.join(proc.args)[:300]}`"
                          + ("" if proc is event.process else f" (its ancestor {who(proc)})"),
                          90, [event])
            return


def reverse_shell(event, ctx: Context) -> Iterator[Finding]:
    if not _outbound(event):
        return
    for proc in ctx.lineage(event.process):
        why = argv.shell_argv(proc.args, proc.executable)
        if why:
            yield Finding(rules.REVERSE_SHELL, (proc.pid,),
                          f"{who(event.process)} in episode {event.episode.id} connected to {where(event)} as a "
                          f"reverse shell: {why} in `{' '.join(proc.args)[:300]}`", 99, [event])
            return


def crypto_mining(event, ctx: Context) -> Iterator[Finding]:
    if isinstance(event, ProcessEvent) and event.action == "process_started":
        why = argv.miner_argv(event.process.args, event.process.executable)
        if why:
            yield Finding(rules.CRYPTO_MINING, (event.process.pid,),
                          f"{who(event.process)} in episode {event.episode.id} started a crypto miner: {why} in "
                          f"`{' '.join(event.process.args)[:300]}`", 80)


DETECTORS = (reverse_tunnel, reverse_shell, crypto_mining)

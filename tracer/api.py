"""eptrace for orchestrators, from Python (as root, in the orchestrator's process).

    from tracer.api import run_episode, trace_cgroup

    verdict = run_episode("ep-42", ["python3", "agent.py"], outputs=["file:/var/log/ep-42.ndjson"])
    if not verdict.clean:           # an alert, or a record with gaps (lost records, unread argv)
        reward = 0

    with trace_cgroup("ep-43", "/sys/fs/cgroup/unified/sandboxes/ep-43") as trace:
        ...                                 # the sandbox runs
    print(trace.verdict.human())

Both return a tracer.verdict.Verdict: connections, destinations, bytes, alerts, and whether the
record is complete (`complete`, `incomplete_reasons`, `losses`); `clean` is no alert and complete.

daemon="auto" (the default, or the environment's EPTRACE_DAEMON) traces through the eptrace daemon when its socket answers (without
loading the probes in this process), "never" in this process, "require" raises
tracer.control.NoDaemon without one. A config goes through the daemon when its tracer settings are the
daemon's (its [output] is this process's own), else it traces in this process ("require": ValueError naming
the keys); a tracer.policy.Policy object, or a config with a [policy] (rather than the [policy] table as a
dict), traces in this process.
The outputs are the given specs, else the config's [output] specs (with its spool_mb), else stdout.
"""
from __future__ import annotations

import os
from pathlib import Path

from . import control, session
from .config import Config
from .kernel import cgroups
from .outputs import open_outputs
from .policy import Policy
from .policy import parse as parse_policy
from .registry import validate_id
from .verdict import Verdict


def _connection(daemon: str | None, config: Config | None, policy) -> control.Connection | None:
    daemon = daemon or os.environ.get("EPTRACE_DAEMON") or "auto"
    if daemon not in ("auto", "never", "require"):
        raise ValueError(f"daemon must be auto, never or require, not {daemon!r}")
    if isinstance(policy, Policy) or config is not None and config.policy is not None:
        if daemon == "require":
            raise ValueError("a Policy object (or a config with a [policy]) cannot be used through the daemon "
                             "(pass the [policy] table as a dict, or daemon='never')")
        return None
    conn = control.connect_if_running(daemon)
    if conn is None or config is None:
        return conn
    from .client import config_differences
    differs = config_differences(conn, config)
    if not differs:
        return conn
    conn.close()
    if daemon == "require":
        raise ValueError(f"the config differs from the daemon's in {', '.join(differs)} (use daemon='never')")
    return None


def run_episode(episode_id: str, argv: list[str], *, outputs: list[str] | None = None,
                config: Config | None = None, labels: dict[str, str] | None = None,
                grace_s: float = 10.0, policy: Policy | dict | None = None, daemon: str | None = None) -> Verdict:
    """Run argv as a traced episode in a fresh cgroup, like `eptrace run`; blocks until it is over.
    policy: a tracer.policy.Policy, or the [policy] table as a dict (checked: ConfigError)."""
    validate_id(episode_id)
    table = policy if isinstance(policy, dict) else None
    if table is not None:
        policy = parse_policy(table)
    conn = _connection(daemon, config, None if table is not None else policy)
    fanout = open_outputs(list(outputs or []), config)
    if conn is not None:
        from . import client
        try:
            return client.run_episode(conn, episode_id, list(argv), fanout, labels=labels, grace_s=grace_s,
                                      policy=table)
        finally:
            fanout.close()
    return session.run_episode(episode_id, list(argv), fanout, labels=labels, grace_s=grace_s, config=config,
                               policy=policy)


class trace_cgroup:
    """Trace an existing cgroup as an episode for the duration of a with-block."""

    def __init__(self, episode_id: str, cgroup: str | Path, *, outputs: list[str] | None = None,
                 config: Config | None = None, labels: dict[str, str] | None = None,
                 policy: Policy | dict | None = None, daemon: str | None = None):
        self.episode_id = validate_id(episode_id)
        self.cgroup = cgroups.resolve(cgroup)
        self._table = policy if isinstance(policy, dict) else None
        self._policy = parse_policy(policy) if isinstance(policy, dict) else policy
        self._specs, self._config, self._labels, self._daemon = list(outputs or []), config, labels, daemon
        self.verdict: Verdict | None = None

    def __enter__(self) -> trace_cgroup:
        conn = _connection(self._daemon, self._config, None if self._table is not None else self._policy)
        self._outputs = open_outputs(self._specs, self._config)
        try:
            if conn is not None:
                from . import client
                self._episode = client.Episode(conn, self._outputs, self.episode_id, self._labels, self._table,
                                               cgroup=str(self.cgroup))
                self._trace = None
            else:
                self._trace = session.CgroupTrace(self.episode_id, self.cgroup, self._outputs, self._config,
                                                  self._labels, self._policy)
        except BaseException:
            self._outputs.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.verdict = self._trace.end() if self._trace is not None else self._episode.end(0.0)
        finally:
            self._outputs.close()

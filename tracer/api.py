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
"""
from __future__ import annotations

import threading
from pathlib import Path

from . import session
from .config import Config
from .kernel import cgroups
from .outputs import Fanout, parse_output_specs
from .policy import Policy
from .policy import parse as parse_policy
from .registry import validate_id
from .verdict import Verdict, VerdictBuilder


def run_episode(episode_id: str, argv: list[str], *, outputs: list[str] | None = None,
                config: Config | None = None, labels: dict[str, str] | None = None,
                grace_s: float = 10.0, policy: Policy | dict | None = None) -> Verdict:
    """Run argv as a traced episode in a fresh cgroup, like `eptrace run`; blocks until it is over.
    policy: a tracer.policy.Policy, or the [policy] table as a dict (checked: ConfigError)."""
    if isinstance(policy, dict):
        policy = parse_policy(policy)
    return session.run_episode(episode_id, list(argv), Fanout(parse_output_specs(list(outputs or []))),
                               labels=labels, grace_s=grace_s, config=config, policy=policy)


class trace_cgroup:
    """Trace an existing cgroup as an episode for the duration of a with-block."""

    def __init__(self, episode_id: str, cgroup: str | Path, *, outputs: list[str] | None = None,
                 config: Config | None = None, labels: dict[str, str] | None = None):
        self.episode_id = validate_id(episode_id)
        self.cgroup = cgroups.resolve(cgroup)
        self._outputs = Fanout(parse_output_specs(list(outputs or [])))
        self._config, self._labels = config, labels
        self._stop = threading.Event()
        self.verdict: Verdict | None = None

    def __enter__(self) -> trace_cgroup:
        self._tracer = session.make_tracer(self._outputs, stats_interval_s=10.0, config=self._config)
        self._builder = VerdictBuilder(self.episode_id)
        self._tracer.observers.append(self._builder.observe)
        self._cgroup_id = self._tracer.add_episode(self.episode_id, self.cgroup, self._labels).cgroup_id
        self._thread = threading.Thread(target=self._loop, name="eptrace", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._tracer.poll()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self._tracer.finish()
            session.account(self._builder.verdict, self._tracer, self._cgroup_id, alone=True)
            self.verdict = self._builder.verdict
        finally:
            self._tracer.probes.close()
            self._outputs.close()

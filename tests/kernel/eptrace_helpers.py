"""Helpers for kernel tests that run the real `eptrace` command: start it, read its NDJSON, pick documents.

eptrace always runs as `[sys.executable, "-m", "tracer", ...]` from the repository root, writing events
with `--output file:PATH`, so that its stdout and stderr stay free for the traced command and diagnostics.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from tracer.detect.rules import REVERSE_SHELL
from tracer.events import Alert, Endpoint, Episode, Metric, NetworkEvent, Process, ProcessEvent
from tracer.kernel.cgroups import cgroup2_mount
from tracer.schema import Document, EcsEncoder

REPO_ROOT = Path(__file__).resolve().parents[2]
EPTRACE = [sys.executable, "-m", "tracer"]

# Probes are compiled at start-up (bcc), which takes a few seconds on the 2-core VMs.
START_TIMEOUT = 60.0
RUN_TIMEOUT = 120.0

# Every document carries these (DESIGN.md, "Event contract").
RFC3339_US = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6,9}(Z|\+00:00)$")
CONNECTION_ACTIONS = ("connection_attempted", "connection_established", "flow_ended")


# ---- running eptrace ----------------------------------------------------------------------------------

# Every NDJSON file an eptrace run wrote or a test read: conftest checks their documents against ECS/OCSF
# (tests/conformance.py) after each test, so a new test's documents are checked without asking.
DOCUMENT_FILES: set[Path] = set()
DOCUMENT_STDOUTS: list[str] = []        # the stdout of run_eptrace, where documents go without --output


def eptrace_argv(*args) -> list[str]:
    argv = [str(a) for a in args]
    for flag, value in zip(argv, argv[1:]):
        if flag == "--output" and value.startswith("file:"):
            DOCUMENT_FILES.add(Path(value[len("file:"):].split("?", 1)[0]))
    return EPTRACE + argv


def eptrace_env(state_dir: Path | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("EPTRACE_STATE_DIR", None)
    if state_dir is not None:
        env["EPTRACE_STATE_DIR"] = str(state_dir)
    env.update(extra)
    return env


def run_eptrace(*args, state_dir: Path | None = None, timeout: float = RUN_TIMEOUT, prefix=(),
                **kwargs) -> subprocess.CompletedProcess:
    """Run eptrace to completion; stdout and stderr captured as text."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    r = subprocess.run(list(prefix) + eptrace_argv(*args), cwd=REPO_ROOT, env=eptrace_env(state_dir),
                       timeout=timeout, **kwargs)
    if isinstance(r.stdout, str):
        DOCUMENT_STDOUTS.append(r.stdout)
    return r


def start_eptrace(*args, state_dir: Path | None = None, prefix=(), **kwargs) -> subprocess.Popen:
    """Start eptrace in the background (its own session, so a test's Ctrl-C does not reach it)."""
    kwargs.setdefault("text", True)
    kwargs.setdefault("start_new_session", True)
    return subprocess.Popen(list(prefix) + eptrace_argv(*args), cwd=REPO_ROOT, env=eptrace_env(state_dir),
                            **kwargs)


class LineReader:
    """Collects the lines of a pipe in a thread (so a full pipe never blocks the process)."""

    def __init__(self, pipe) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe) -> None:
        for line in pipe:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, predicate: Callable[[list[str]], Any], timeout: float, what: str = "output"):
        return wait_until(lambda: predicate(list(self.lines)), timeout, lambda: f"{what}: {self.text()!r}")

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
    """Send sig, wait for the exit status; SIGKILL (and fail) if it does not exit in time."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill(proc)
            raise AssertionError(f"pid {proc.pid} did not exit within {timeout}s of signal {sig}") from None
    return proc.returncode


def kill(proc: subprocess.Popen) -> None:
    """Kill a process we started (and its session, if it leads one) and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


class Watcher:
    """`eptrace watch --output file:EVENTS` with its own state dir, as a context manager.

    Readiness: watch emits a metric document every --stats-interval once its loop runs; `ready()` waits
    for one (optionally one that counts `episodes` traced episodes).
    """

    def __init__(self, events: Path, state_dir: Path, stats_interval: float = 0.25, verbose: bool = True,
                 config: Path | None = None, extra: tuple = ()):
        self.events, self.state_dir = Path(events), Path(state_dir)
        self.stopped_at: float | None = None     # time.time() when SIGTERM was sent
        args = ["-v"] if verbose else []
        args += ["watch", "--output", f"file:{self.events}", "--stats-interval", stats_interval]
        args += ["--config", config] if config else []
        args += list(extra)                         # more watch options (--on-alert ...)
        self.proc = start_eptrace(*args, state_dir=self.state_dir, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        self.stdout, self.stderr = LineReader(self.proc.stdout), LineReader(self.proc.stderr)

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc) -> None:
        kill(self.proc)

    def docs(self) -> list[dict]:
        return read_docs(self.events)

    def ready(self, episodes: int | None = None, timeout: float = START_TIMEOUT) -> list[dict]:
        def check():
            if self.proc.poll() is not None:
                raise AssertionError(f"eptrace watch exited with {self.proc.returncode}: {self.stderr.text()}")
            metrics = [d for d in self.docs() if get(d, "event.kind") == "metric"]
            if episodes is None:
                return metrics
            return [d for d in metrics if get(d, "eptrace.stats.episodes") == episodes]
        return wait_until(check, timeout, lambda: f"watch not ready ({episodes} episodes); stderr:\n"
                                                  f"{self.stderr.text()}")

    def stop(self, timeout: float = 30.0) -> int:
        self.stopped_at = time.time()
        rc = stop(self.proc, signal.SIGTERM, timeout)
        self.stdout.join()
        self.stderr.join()
        return rc


# ---- reading documents --------------------------------------------------------------------------------

def read_docs(path: Path) -> list[dict]:
    """Every complete JSON line of an NDJSON file (a line still being written is left for the next read)."""
    DOCUMENT_FILES.add(Path(path))
    try:
        data = Path(path).read_text()
    except FileNotFoundError:
        return []
    docs = []
    lines = data.split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            docs.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:       # the last, unterminated line: being written
                break
            raise AssertionError(f"{path}: line {i + 1} is not JSON: {line[:300]!r}") from None
    return docs


def get(doc: dict, dotted: str, default=None):
    """doc["a"]["b"]["c"] for "a.b.c", or default."""
    cur: Any = doc
    for key in dotted.split("."):
        if not isinstance(cur, dict) or key not in cur:
            return default
        cur = cur[key]
    return cur


def mentions_port(doc: dict, port: int) -> bool:
    return port in (get(doc, "source.port"), get(doc, "destination.port"))


def select(docs: Iterable[dict], action: str | Iterable[str] | None = None, port: int | None = None,
           pid: int | None = None, episode: str | None = None, **fields) -> list[dict]:
    """Documents matching all given criteria. fields: dotted names with "__" for "." (source__ip="...")."""
    actions = {action} if isinstance(action, str) else (set(action) if action is not None else None)
    out = []
    for d in docs:
        if actions is not None and get(d, "event.action") not in actions:
            continue
        if port is not None and not mentions_port(d, port):
            continue
        if pid is not None and get(d, "process.pid") != pid:
            continue
        if episode is not None and get(d, "labels.episode_id") != episode:
            continue
        if any(get(d, k.replace("__", ".")) != v for k, v in fields.items()):
            continue
        out.append(d)
    return out


def alerts(docs: Iterable[dict], rule: str | None = None) -> list[dict]:
    """The alert documents (event.kind "alert"), of one rule.name if given."""
    return [d for d in docs if get(d, "event.kind") == "alert" and (rule is None or get(d, "rule.name") == rule)]


def one(docs: list[dict], what: str, all_docs: list[dict] | None = None) -> dict:
    assert len(docs) == 1, f"expected exactly one {what}, got {len(docs)}:\n{dump(docs or all_docs or [])}"
    return docs[0]


def dump(docs: Iterable[dict], limit: int = 60) -> str:
    """A readable summary of documents for assertion messages."""
    lines = []
    for d in list(docs)[:limit]:
        lines.append(" ".join(str(x) for x in (
            get(d, "event.sequence"), get(d, "event.action"), get(d, "event.outcome"),
            get(d, "labels.episode_id"), f"pid={get(d, 'process.pid')}", get(d, "process.name"),
            f"{get(d, 'source.ip')}:{get(d, 'source.port')}", "->",
            f"{get(d, 'destination.ip')}:{get(d, 'destination.port')}",
            f"bytes={get(d, 'source.bytes')}/{get(d, 'destination.bytes')}",
            get(d, "eptrace.cgroup.path"))))
    return "\n".join(lines) or "(no documents)"


def wait_until(check: Callable[[], Any], timeout: float, message: Callable[[], str] | str = "condition",
               interval: float = 0.05):
    """Poll check() until it returns something truthy (returned); AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: "
                                 f"{message() if callable(message) else message}")
        time.sleep(interval)


def wait_for_docs(path: Path, predicate: Callable[[list[dict]], Any], timeout: float = 15.0,
                  what: str = "documents"):
    """Poll the NDJSON file until predicate(docs) is truthy; returns that value."""
    return wait_until(lambda: predicate(read_docs(path)), timeout,
                      lambda: f"{what}; documents so far:\n{dump(read_docs(path), 200)}")


def assert_contract(docs: list[dict]) -> None:
    """Fields every document must carry; event.id unique; event.sequence strictly increasing."""
    assert docs, "no documents at all"
    seen_ids = set()
    last_seq = 0
    for d in docs:
        ts = d.get("@timestamp")
        assert isinstance(ts, str) and RFC3339_US.match(ts), f"bad @timestamp {ts!r} in {d}"
        assert get(d, "ecs.version"), f"no ecs.version in {d}"
        assert get(d, "agent.name") == "eptrace", d
        assert get(d, "agent.version"), d
        assert get(d, "host.name"), d
        assert get(d, "event.kind"), d
        eid = get(d, "event.id")
        assert eid and eid not in seen_ids, f"event.id {eid!r} missing or repeated"
        seen_ids.add(eid)
        seq = get(d, "event.sequence")
        assert isinstance(seq, int) and seq > last_seq, f"event.sequence {seq} after {last_seq}"
        last_seq = seq


def parse_timestamp(ts: str) -> float:
    """@timestamp (RFC 3339 UTC) -> seconds since the epoch."""
    whole, _, frac = ts.rstrip("Z").replace("+00:00", "").partition(".")
    seconds = datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc).timestamp()
    return seconds + (float("0." + frac) if frac else 0.0)


def output_stats(metric: dict, prefix: str) -> dict | None:
    """The eptrace.stats.outputs entry of the output whose spec starts with prefix, in a metric document."""
    outputs = get(metric, "eptrace.stats.outputs") or []
    return next((o for o in outputs if o["output"].startswith(prefix)), None)


def final_metric(docs: list[dict]) -> dict:
    metrics = [d for d in docs if get(d, "event.kind") == "metric"]
    assert metrics, f"no metric document:\n{dump(docs)}"
    assert docs[-1] is metrics[-1], f"the last document is not a metric:\n{dump(docs[-5:])}"
    return metrics[-1]


# ---- cgroup / registry snapshots ----------------------------------------------------------------------

def run_cgroups() -> set[str]:
    """Names of the cgroups `eptrace run` made under <cgroup2>/eptrace/."""
    parent = cgroup2_mount() / "eptrace"
    if not parent.is_dir():
        return set()
    return {p.name for p in parent.iterdir() if p.is_dir()}


def registrations(state_dir: Path) -> dict[str, str]:
    """Every file of the state dir (recursively), relative path -> content."""
    root = Path(state_dir)
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def new_run_cgroups(before: set[str]) -> set[str]:
    """Cgroups under <cgroup2>/eptrace/ made since `before` and not owned by a live process.

    `eptrace run` names them ID@PID[.N]: one whose PID is still alive belongs to another eptrace that runs
    now (a concurrent session, a bench), not to anything a finished test left behind.
    """
    def live_owner(name: str) -> bool:
        pid = name.rpartition("@")[2].split(".")[0]
        return pid.isdigit() and Path(f"/proc/{pid}").exists()
    return {name for name in run_cgroups() - before if not live_owner(name)}


def assert_one_line_error(r: subprocess.CompletedProcess, status: int) -> str:
    """Exit status `status`, exactly one line on stderr starting "eptrace: error:", no traceback."""
    assert r.returncode == status, f"exit {r.returncode}, want {status}; stderr: {r.stderr!r}"
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, f"want one line on stderr, got {len(lines)}: {r.stderr!r}"
    assert lines[0].startswith("eptrace: error: "), lines[0]
    return lines[0]


# ---- documents for the output tests --------------------------------------------------------------------

DOCS_TS = 1_795_820_445_123_456_789


def make_docs(n: int, episode_id: str = "ep-out") -> list[Document]:
    """Documents for the output tests, real encoder output: network and process events, metrics, alerts; unicode; every 50th has 10 KB."""
    enc = EcsEncoder("host-ü", "0.1")
    episode = Episode(id=episode_id, cgroup_path=f"/eptrace/{episode_id}", cgroup_id=7,
                      labels={"team": "rouge ✓ — ünïcode", "quote": 'a "b" \\ c'})
    docs = []
    for i in range(n):
        proc = Process(pid=1000 + i, name="curl", executable="/usr/bin/curl",
                       args=["curl", "https://例え.jp/" + ("x" * 10_000 if i % 50 == 7 else str(i))])
        ts = DOCS_TS + i * 1_000_000
        if i % 100 == 3:
            doc = enc.encode_document(Metric(timestamp_ns=ts, stats={"events": i, "lost": 0}))
        elif i % 100 == 5:
            doc = enc.encode_document(Alert(rule=REVERSE_SHELL, timestamp_ns=ts, episode=episode, cgroup_id=7,
                                            cgroup_path=episode.cgroup_path, process=proc,
                                            message=f"shell {i} → 198.51.100.1:4444", risk_score=90.0))
        elif i % 10 == 1:
            doc = enc.encode_document(ProcessEvent(action="process_started", timestamp_ns=ts, episode=episode,
                                                   cgroup_id=7, cgroup_path=episode.cgroup_path, process=proc))
        else:
            doc = enc.encode_document(NetworkEvent(
                action="connection_established", timestamp_ns=ts, episode=episode, cgroup_id=7,
                cgroup_path=episode.cgroup_path, process=proc, cookie=i + 1, network_type="ipv4", transport="tcp",
                direction="egress", source=Endpoint("10.0.0.2", 40000 + i % 20000),
                destination=Endpoint("198.51.100.1", 443)))
        docs.append(doc)
    return docs


# Connects from the test host to the sandbox (198.51.100.2) on port argv[1], says "from-host", prints its
# local address and the answer.
HOST_CLIENT = r'''
import socket, sys
with socket.create_connection(("198.51.100.2", int(sys.argv[1])), timeout=10) as s:
    print("local", *s.getsockname(), flush=True)
    s.sendall(b"from-host")
    print(s.recv(100).decode(), flush=True)
'''

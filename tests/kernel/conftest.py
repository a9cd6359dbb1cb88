"""Fixtures for kernel tests (root, real BPF, real namespaces and cgroups). See harness.py."""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

KERNEL_DIR = Path(__file__).resolve().parent
REPO_ROOT = KERNEL_DIR.parents[1]
for p in (str(REPO_ROOT), str(KERNEL_DIR), str(KERNEL_DIR.parent)):  # tracer, harness, conformance
    if p not in sys.path:
        sys.path.insert(0, p)

import conformance  # noqa: E402
import eptrace_helpers  # noqa: E402
import harness  # noqa: E402
from support import require  # noqa: E402

_TRIVIAL_PROG = b"TRACEPOINT_PROBE(sched, sched_process_fork) { return 0; }"


def pytest_configure(config):
    config.addinivalue_line("markers", "kernel: needs root and a kernel that loads BPF programs")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if KERNEL_DIR in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.kernel)


def _kernel_unavailable() -> str | None:
    """Why kernel tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "kernel tests need root"
    try:
        from bcc import BPF
    except ImportError as e:
        return f"cannot import bcc ({e}): apt-get install python3-bpfcc, run with /usr/bin/python3"
    try:
        BPF(text=_TRIVIAL_PROG).cleanup()
    except Exception as e:
        return f"cannot load a BPF tracepoint program ({type(e).__name__}: {e}); did `make setup` run?"
    return None


@pytest.fixture(scope="session", autouse=True)
def require_kernel():
    """Kernel tests FAIL under CI (CI=true, 1, yes…) when BPF is unavailable (never skip there); elsewhere they skip."""
    reason = _kernel_unavailable()
    if reason:
        require(False, reason)


@pytest.fixture(scope="session", autouse=True)
def _cleanup_stale(require_kernel):
    harness.cleanup_stale()
    yield


@pytest.fixture(scope="session", autouse=True)
def _pin_dir_of_this_session(require_kernel):
    """The eptrace runs of the tests pin their probes in a directory of this session's own: never in the
    host's /sys/fs/bpf/eptrace (a production eptrace may use it), nor in a concurrent session's."""
    with harness.session_pin_dir() as path:
        os.environ["EPTRACE_PIN_DIR"] = str(path)
        yield path


@pytest.fixture(autouse=True)
def _no_pinned_watch_left_to_the_next_test(_pin_dir_of_this_session):
    """A watch stopped cleanly keeps its registered episodes' probes pinned for the next one: each test starts
    without what an earlier test's watch left (its tracers are gone by then)."""
    yield
    shutil.rmtree(_pin_dir_of_this_session / "watch", ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _probe_cache_of_this_session():
    """The tracers of the tests share a probe cache of this session's own (tracer/kernel/probecache.py):
    the first compiles, the others start from the cache; removed at the end, so nothing is left behind."""
    path = Path(tempfile.mkdtemp(prefix=f"eptrace-probe-cache-{os.getpid()}-"))
    os.environ["EPTRACE_CACHE_DIR"] = str(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _no_daemon_unless_asked(tmp_path_factory):
    """eptrace runs of the tests trace in-process (--daemon never) unless a test asks for a daemon, and a
    daemon started by a test (watch is one) listens on this session's own socket, never the host's."""
    os.environ["EPTRACE_DAEMON"] = "never"
    os.environ["EPTRACE_SOCKET"] = str(tmp_path_factory.mktemp("eptrace-socket") / "eptrace.sock")
    yield


@pytest.fixture
def net():
    with harness.TestNetwork() as n:
        yield n


@pytest.fixture
def episode_cgroup():
    """Factory: episode_cgroup(name) -> Path of a fresh cgroup, removed (processes killed) after the test."""
    with contextlib.ExitStack() as stack:
        yield lambda name: stack.enter_context(harness.episode_cgroup(name))


@pytest.fixture(scope="session")
def uring_helper(tmp_path_factory):
    try:
        return harness.build_uring_helper(tmp_path_factory.mktemp("uring"))
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def uring_socket_helper(tmp_path_factory):
    try:
        return harness.build_uring_helper(tmp_path_factory.mktemp("uring"), "uring_socket")
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(autouse=True)
def documents_conform(tmp_path):
    """After each kernel test: every document its eptrace runs wrote (or it read, or left as NDJSON in its
    tmp_path) conforms to ECS or OCSF. A document that does not fails the test, naming the field and the
    rule (tests/conformance.py)."""
    eptrace_helpers.DOCUMENT_FILES.clear()
    eptrace_helpers.DOCUMENT_STDOUTS.clear()
    yield
    files = [p for p in eptrace_helpers.DOCUMENT_FILES | set(tmp_path.rglob("*.ndjson"))
             if p.is_file() and p.suffix != ".capture"]
    report = conformance.check_files(files, eptrace_helpers.DOCUMENT_STDOUTS)
    eptrace_helpers.DOCUMENT_FILES.clear()
    eptrace_helpers.DOCUMENT_STDOUTS.clear()
    if report:
        pytest.fail(f"documents that ECS/OCSF do not accept:\n{report}", pytrace=False)

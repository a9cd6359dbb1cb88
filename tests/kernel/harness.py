"""Test harness for kernel tests: episode cgroups and the io_uring helper, plus the test network and
its peers from tracer.testbed, re-exported so that tests import one module.

Network safety: sandbox workloads run in a namespace whose only link is a veth to a "test host"
namespace. Neither namespace has a link to the root namespace, so nothing can leave the machine.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

from tracer.kernel import cgroups
from tracer.testbed import (  # noqa: F401  (re-exported for the tests)
    HOST_IP, HOST_IP6, METADATA_IP, METADATA_IP6, PYTHON, SANDBOX_IP, SANDBOX_IP6, HttpServer, Peer, Sshd,
    TestNetwork, _claim, _cleanups, _owned_by_live_session, _release, cleanup_stale_namespaces, http_server,
    python_server, sshd, tcp_echo_server, udp_echo_server)

CGROUP_PARENT = "eptrace-test"
HELPERS_DIR = Path(__file__).parent / "helpers"


PIN_PARENT = Path("/sys/fs/bpf")


@contextlib.contextmanager
def session_pin_dir():
    """/sys/fs/bpf/eptrace-test-<pid>, removed at the end (with those of dead sessions)."""
    for stale in PIN_PARENT.glob("eptrace-test-*"):
        owner = stale.name.rpartition("-")[2]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    path = PIN_PARENT / f"eptrace-test-{os.getpid()}"
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def cleanup_stale() -> None:
    """Remove ept-* namespaces and eptrace-test cgroups left by a crashed earlier run."""
    cleanup_stale_namespaces()
    parent = cgroups.cgroup2_mount() / CGROUP_PARENT
    if parent.is_dir():
        for cg in parent.iterdir():
            if cg.is_dir() and not _owned_by_live_session("cg-" + cg.name):
                cgroups.kill_and_remove(cg)
                _release("cg-" + cg.name)
        with contextlib.suppress(OSError):  # still used by a live session
            parent.rmdir()


# ---- peers --------------------------------------------------------------------------------------------

# ---- io_uring helper ----------------------------------------------------------------------------------

_uring_helpers: dict[str, Path] = {}


def build_uring_helper(tmpdir, name: str = "uring_connect") -> Path:
    """Compile helpers/<name>.c with liburing (once per session). RuntimeError with the reason if it can't."""
    disabled = Path("/proc/sys/kernel/io_uring_disabled")
    if disabled.exists() and disabled.read_text().strip() == "2":
        raise RuntimeError("io_uring is disabled (kernel.io_uring_disabled=2): "
                           "sysctl -w kernel.io_uring_disabled=0")
    if name not in _uring_helpers or not _uring_helpers[name].exists():
        out = Path(tmpdir) / name
        cmd = ["gcc", "-O2", "-Wall", "-o", str(out), str(HELPERS_DIR / f"{name}.c"), "-luring"]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        except FileNotFoundError:
            raise RuntimeError("gcc missing: apt-get install -y gcc liburing-dev") from None
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"cannot build the io_uring helper {name} (apt-get install -y liburing-dev?):\n"
                               f"{e.stderr}") from None
        _uring_helpers[name] = out
    return _uring_helpers[name]


_built: dict[str, Path] = {}


def build_helper(name: str, tmpdir) -> Path:
    """Compile helpers/<name>.c with no library (once per session). RuntimeError with the reason if it can't."""
    if name not in _built or not _built[name].exists():
        out = Path(tmpdir) / name
        try:
            subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(HELPERS_DIR / f"{name}.c")],
                           check=True, capture_output=True, text=True)
        except FileNotFoundError:
            raise RuntimeError("gcc missing: apt-get install -y gcc") from None
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"cannot build helpers/{name}.c:\n{e.stderr}") from None
        _built[name] = out
    return _built[name]


# ---- episode cgroups ----------------------------------------------------------------------------------

@contextlib.contextmanager
def episode_cgroup(name: str):
    """A cgroup at <cgroup2>/eptrace-test/<name>; everything in it is killed and it is removed at exit."""
    parent = cgroups.cgroup2_mount() / CGROUP_PARENT
    parent.mkdir(exist_ok=True)
    path = parent / name
    _claim("cg-" + name)
    cleanup = lambda: (cgroups.kill_and_remove(path), _release("cg-" + name))  # noqa: E731
    _cleanups["cg-" + name] = cleanup
    try:
        cgroups.kill_and_remove(path)  # a leftover of a crashed run with the same name
        cgroups.create(path)
        yield path
    finally:
        cleanup()
        _cleanups.pop("cg-" + name, None)
        with contextlib.suppress(OSError):  # busy while another test or session uses it
            parent.rmdir()


def spawn_in_cgroup(cgroup_path, argv, **popen_kwargs) -> subprocess.Popen:
    """Start argv directly inside the cgroup: it (and all it forks) is there from its first instruction.

    A shell joins the cgroup and then execs argv (same pid). This avoids preexec_fn, which is unsafe
    when the harness has threads (output readers).
    """
    procs = Path(cgroup_path) / "cgroup.procs"
    join = 'echo $$ > "$0" && exec "$@"'
    return subprocess.Popen(["/bin/sh", "-c", join, str(procs), *map(str, argv)], **popen_kwargs)

"""Bad input gives a clear one-line error with a distinct exit status, and leaves nothing behind: no cgroup
under <cgroup2>/eptrace/, no change to the registrations, no command started, no probe loaded."""
from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import require

from eptrace_helpers import (assert_one_line_error, cgroup2_mount, new_run_cgroups, registrations,
                             run_cgroups, run_eptrace)

BAD_IDS = ["", "x" * 129, "a/b", "a b"]
NOT_ROOT = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def env(tmp_path, episode_cgroup):
    """A state dir holding one real registration; checks after the test that nothing changed or was left."""
    state = tmp_path / "state"
    token = secrets.token_hex(3)
    registered = episode_cgroup(f"cli-{token}-registered")
    spare = episode_cgroup(f"cli-{token}-spare")
    r = run_eptrace("episode", "add", "--id", "ep-registered", "--cgroup", registered, state_dir=state)
    assert r.returncode == 0, r.stderr
    regs, cgs = registrations(state), run_cgroups()
    assert any("ep-registered" in name for name in regs), regs
    marker = tmp_path / "command-ran"

    class Env:
        pass
    e = Env()
    e.state, e.registered, e.spare, e.marker, e.tmp = state, registered, spare, marker, tmp_path
    yield e
    assert registrations(state) == regs, "the registrations changed"
    assert not new_run_cgroups(cgs), f"cgroups left under {cgroup2_mount() / 'eptrace'}: {new_run_cgroups(cgs)}"
    assert not marker.exists(), "the command ran"


# ---- episode ids -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad_id", BAD_IDS, ids=["empty", "129-chars", "slash", "space"])
def test_run_rejects_bad_episode_id(env, bad_id):
    r = run_eptrace("run", "--episode", bad_id, "--", "touch", env.marker, state_dir=env.state)
    line = assert_one_line_error(r, 2)
    assert "episode id" in line, line


@pytest.mark.parametrize("bad_id", BAD_IDS, ids=["empty", "129-chars", "slash", "space"])
def test_episode_add_rejects_bad_episode_id(env, bad_id):
    r = run_eptrace("episode", "add", "--id", bad_id, "--cgroup", env.spare, state_dir=env.state)
    line = assert_one_line_error(r, 2)
    assert "episode id" in line, line


def test_longest_and_odd_but_valid_ids_are_accepted(env):
    """The boundary the bad ids sit on: 128 characters of the whole alphabet are fine."""
    good = ("aZ09._:-" * 16)[:128]
    r = run_eptrace("episode", "add", "--id", good, "--cgroup", env.spare, state_dir=env.state)
    assert r.returncode == 0, r.stderr
    r = run_eptrace("episode", "ls", state_dir=env.state)
    assert f"{good}\t{env.spare}" in r.stdout.splitlines(), r.stdout
    r = run_eptrace("episode", "rm", "--id", good, state_dir=env.state)
    assert r.returncode == 0, r.stderr


# ---- cgroups -----------------------------------------------------------------------------------------------

def _v1_hierarchy() -> Path | None:
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup":
            return Path(fields[1])
    return None


def test_episode_add_rejects_missing_cgroup(env):
    missing = cgroup2_mount() / "eptrace-test" / f"missing-{secrets.token_hex(4)}"
    r = run_eptrace("episode", "add", "--id", "ep-missing", "--cgroup", missing, state_dir=env.state)
    line = assert_one_line_error(r, 2)
    assert str(missing) in line, line
    assert not missing.exists()


def test_episode_add_rejects_relative_missing_cgroup(env):
    r = run_eptrace("episode", "add", "--id", "ep-missing", "--cgroup", f"no/such-{secrets.token_hex(4)}",
                    state_dir=env.state)
    assert_one_line_error(r, 2)


def test_episode_add_rejects_a_plain_directory(env):
    r = run_eptrace("episode", "add", "--id", "ep-tmp", "--cgroup", "/tmp", state_dir=env.state)
    line = assert_one_line_error(r, 2)
    assert "/tmp" in line, line


@pytest.fixture
def cgroup_v1(tmp_path):
    """A cgroup v1 directory: a mounted v1 hierarchy, or a named one (no controller) mounted for the test."""
    v1 = _v1_hierarchy()
    if v1 is not None:
        yield v1
        return
    mnt = tmp_path / "cgroup-v1"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "cgroup", "-o", "none,name=eptrace-test", "cgroup", str(mnt)],
                       capture_output=True, text=True)
    require(r.returncode == 0, f"no cgroup v1 hierarchy is mounted and none can be: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_episode_add_rejects_cgroup_v1(env, cgroup_v1):
    v1 = cgroup_v1
    assert (v1 / "cgroup.procs").exists(), f"{v1} does not look like a cgroup v1 directory"
    r = run_eptrace("episode", "add", "--id", "ep-v1", "--cgroup", v1, state_dir=env.state)
    line = assert_one_line_error(r, 2)
    assert "v2" in line or "cgroup2" in line, line


def test_episode_add_rejects_registered_id(env):
    r = run_eptrace("episode", "add", "--id", "ep-registered", "--cgroup", env.spare, state_dir=env.state)
    line = assert_one_line_error(r, 2)
    assert "already registered" in line, line


def test_episode_add_rejects_registered_cgroup(env):
    r = run_eptrace("episode", "add", "--id", "ep-other", "--cgroup", env.registered, state_dir=env.state)
    line = assert_one_line_error(r, 2)
    assert "already registered" in line, line


def test_episode_rm_rejects_unknown_id(env):
    r = run_eptrace("episode", "rm", "--id", "ep-never-added", state_dir=env.state)
    line = assert_one_line_error(r, 2)
    assert "ep-never-added" in line, line


# ---- not root ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["run", "--episode", "ep-x", "--", "touch", "{marker}"],
    ["watch"],
    ["episode", "add", "--id", "ep-x", "--cgroup", "{spare}"],
    ["episode", "rm", "--id", "ep-registered"],
], ids=["run", "watch", "episode-add", "episode-rm"])
def test_not_root_is_one_line_exit_4(env, args):
    args = [a.format(marker=env.marker, spare=env.spare) for a in args]
    r = run_eptrace(*args, state_dir=env.state, prefix=NOT_ROOT, timeout=60)
    line = assert_one_line_error(r, 4)
    assert "root" in line or "sudo" in line, line


def test_not_root_with_runuser(env):
    require(shutil.which("runuser"), "runuser is not installed (util-linux)")
    r = run_eptrace("run", "--episode", "ep-x", "--", "touch", env.marker, state_dir=env.state,
                    prefix=["runuser", "-u", "nobody", "--"], timeout=60)
    line = assert_one_line_error(r, 4)
    assert "root" in line or "sudo" in line, line


# ---- outputs -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["bogus", "file:", "file:{tmp}/x.ndjson?max_mb=zero"],
                         ids=["unknown", "no-path", "bad-option"])
@pytest.mark.parametrize("command", ["run", "watch"])
def test_bad_output_fails_before_any_probe_loads(env, spec, command):
    spec = spec.format(tmp=env.tmp)
    args = ["run", "--episode", "ep-out", "--output", spec, "--", "touch", env.marker] if command == "run" \
        else ["watch", "--output", spec]
    strace = shutil.which("strace")
    require(strace, "strace is not installed (make setup)")
    log = env.tmp / "strace.log"
    prefix = [strace, "-f", "-qq", "-e", "trace=bpf", "-o", str(log)]
    r = run_eptrace(*args, state_dir=env.state, prefix=prefix, timeout=60)
    line = assert_one_line_error(r, 2)
    assert "output" in line, line
    calls = [c for c in log.read_text().splitlines() if "bpf(" in c]
    assert not calls, "bpf() was called before the error:\n" + "\n".join(calls[:5])


def test_strace_sees_bpf_when_probes_do_load(env):
    """The bpf() check above can fail: a good run under the same strace shows bpf() calls."""
    strace = shutil.which("strace")
    require(strace, "strace is not installed (make setup)")
    log = env.tmp / "strace.log"
    r = run_eptrace("run", "--episode", "ep-out", "--output", f"file:{env.tmp}/ok.ndjson", "--", "true",
                    state_dir=env.state, prefix=[strace, "-f", "-qq", "-e", "trace=bpf", "-o", str(log)], timeout=120)
    assert r.returncode == 0, r.stderr
    assert any("bpf(" in c for c in log.read_text().splitlines())



# ---- the command line of run -------------------------------------------------------------------------------

def _bpf_calls(log: Path) -> list[str]:
    return [c for c in log.read_text().splitlines() if "bpf(" in c]


def test_run_rejects_a_mistyped_option_before_the_command(env):
    """Click's own usage error and exit 2, before any cgroup is made or probe loaded; never run as CMD."""
    strace = shutil.which("strace")
    log = env.tmp / "strace.log"
    prefix = [strace, "-f", "-qq", "-e", "trace=bpf", "-o", str(log)] if strace else []
    r = run_eptrace("run", "--episode", "ep-typo", "--outptu", f"file:{env.tmp}/x.ndjson", "--", "touch",
                    env.marker, state_dir=env.state, prefix=prefix, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "Error: No such option: --outptu" in r.stderr, r.stderr
    assert "--output" in r.stderr.splitlines()[-1], r.stderr     # click names the option meant
    assert not (env.tmp / "x.ndjson").exists()
    if strace:
        assert not _bpf_calls(log), "bpf() was called before the error"


@pytest.mark.parametrize("dashdash", [True, False], ids=["after-dashdash", "without-dashdash"])
def test_run_passes_option_like_arguments_to_the_command(env, dashdash):
    """After '--', or after the first argument that is no option, '--outptu' belongs to the command."""
    out = env.tmp / "argv.txt"
    script = "import sys; open(sys.argv[1], 'w').write(repr(sys.argv[2:]))"
    command = [sys.executable, "-c", script, out, "--outptu", "-x"]
    args = ["run", "--episode", "ep-argv", "--output", f"file:{env.tmp}/ev.ndjson"] + (["--"] if dashdash else [])
    r = run_eptrace(*args, *command, state_dir=env.state, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == repr(["--outptu", "-x"])

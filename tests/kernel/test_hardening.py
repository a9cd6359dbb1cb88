"""Issue 9's attacks on eptrace's files, terminal and input, through the real command as root.

Files: every path eptrace writes (file output, --verdict, --capture on run and watch, replay --all's output,
the spool, the registrations) refuses a symbolic link and a file another user owns in a 1777 directory, and
leaves the victim unchanged; modes are 0600/0700 (the file output 0640); no secret is on eptrace's command
line (read from inside the episode, the way an agent would) or in an error.
Text: an argv with an ANSI escape and a newline reaches the summary escaped.
Input: each bad input is a one-line error, exit 2, that leaves no spool directory, file or cgroup behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from eptrace_helpers import (REPO_ROOT, assert_one_line_error, cgroup2_mount, new_run_cgroups, read_docs,
                             run_cgroups, run_eptrace)

NOBODY = 65534
SECRET = "hunter2-" + secrets.token_hex(4)
FIXTURE_CAPTURE = REPO_ROOT / "tests" / "fixtures" / "metadata_and_raw_socket.capture"


@pytest.fixture
def trap(tmp_path):
    """A 1777 directory (as /tmp is) with a link to a victim file and a file that nobody owns, plus a state dir;
    after the test: the victim and nobody's file unchanged, the command never run, no run cgroup left."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    victim = tmp_path / "victim"
    victim.write_text("victim\n")
    (shared / "link").symlink_to(victim)
    theirs = shared / "theirs"
    theirs.write_text("theirs\n")
    os.chown(theirs, NOBODY, NOBODY)
    marker = tmp_path / "command-ran"
    before = run_cgroups()

    class Trap:
        pass
    t = Trap()
    t.shared, t.victim, t.theirs, t.marker, t.state, t.tmp = shared, victim, theirs, marker, tmp_path / "state", tmp_path
    yield t
    assert victim.read_text() == "victim\n" and victim.stat().st_nlink == 1
    assert theirs.read_text() == "theirs\n" and theirs.stat().st_uid == NOBODY
    assert sorted(p.name for p in shared.iterdir()) == ["link", "theirs"], "a file was made in the trap"
    assert not marker.exists(), "the command ran"
    assert not new_run_cgroups(before)


def _run(trap, *options):
    return ["run", "--episode", "ep-trap", *options, "--", "touch", trap.marker]


WRITTEN_PATHS = {
    "file-output": lambda t, p: _run(t, "--output", f"file:{p}"),
    "verdict": lambda t, p: _run(t, "--output", f"file:{t.tmp}/ok.ndjson", "--verdict", p),
    "run-capture": lambda t, p: _run(t, "--output", f"file:{t.tmp}/ok.ndjson", "--capture", p),
    "watch-capture": lambda t, p: ["watch", "--output", f"file:{t.tmp}/ok.ndjson", "--capture", p],
    "replay-output": lambda t, p: ["replay", FIXTURE_CAPTURE, "--all", "--output", f"file:{p}"],
}


@pytest.mark.parametrize("target", ["link", "theirs"])
@pytest.mark.parametrize("written", list(WRITTEN_PATHS))
def test_written_paths_refuse_links_and_files_others_own(trap, written, target):
    r = run_eptrace(*WRITTEN_PATHS[written](trap, trap.shared / target), state_dir=trap.state, timeout=60)
    line = assert_one_line_error(r, 2)
    assert ("symbolic link" if target == "link" else "owned by uid 65534") in line, line
    assert not (trap.tmp / "ok.ndjson").exists(), "an output was made before the error"


def test_a_directory_others_can_write_without_the_sticky_bit_is_refused(trap):
    open_dir = trap.tmp / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    r = run_eptrace(*_run(trap, "--output", f"file:{open_dir}/e.ndjson"), state_dir=trap.state, timeout=60)
    line = assert_one_line_error(r, 2)
    assert "writable by others" in line, line
    assert not list(open_dir.iterdir())


def test_spool_and_registrations_refuse_a_link_in_the_state_dir(trap, episode_cgroup):
    """The state dir's spool/ and episodes/ as links to a directory of the victim's: nothing is made there."""
    elsewhere = trap.tmp / "elsewhere"
    elsewhere.mkdir()
    trap.state.mkdir(mode=0o700)
    (trap.state / "spool").symlink_to(elsewhere)
    (trap.state / "episodes").symlink_to(elsewhere)
    r = run_eptrace(*_run(trap, "--output", "syslog+udp://127.0.0.1:9"), state_dir=trap.state, timeout=60)
    line = assert_one_line_error(r, 2)
    assert "spool" in line and "not a directory" in line, line
    cgroup = episode_cgroup(f"trap-{secrets.token_hex(3)}")
    r = run_eptrace("episode", "add", "--id", "ep-trap", "--cgroup", cgroup, state_dir=trap.state, timeout=60)
    line = assert_one_line_error(r, 2)
    assert "not a directory" in line, line
    assert not list(elsewhere.iterdir())


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_modes_of_what_eptrace_writes(tmp_path, episode_cgroup):
    """State and spool directories 0700; registration, verdict, capture, spool files 0600; the file output 0640
    with the group given; and no secret on eptrace's command line, read from inside the episode."""
    state = tmp_path / "state"
    token = tmp_path / "hec.token"
    token.write_text(SECRET + "\n")
    os.chmod(token, 0o600)
    cmdline = tmp_path / "cmdline"
    # The episode reads its tracer's argv the way an agent would; the HEC receiver is down, so the
    # events are spooled to disk at exit.
    steal = f"import os; open({str(cmdline)!r}, 'wb').write(open(f'/proc/{{os.getppid()}}/cmdline', 'rb').read())"
    r = run_eptrace("run", "--episode", "ep-modes", "--grace", "1",
                    "--output", f"file:{tmp_path}/events.ndjson?group=0",
                    "--output", f"hec://127.0.0.1:9?token_file={token}",
                    "--verdict", tmp_path / "verdict.json", "--capture", tmp_path / "ep.capture",
                    "--", sys.executable, "-c", steal, state_dir=state, timeout=120)
    assert r.returncode == 0, r.stderr
    stolen = cmdline.read_bytes().decode()
    assert "token_file=" in stolen and SECRET not in stolen, stolen
    assert SECRET not in r.stderr + r.stdout
    assert _mode(tmp_path / "events.ndjson") == 0o640 and os.stat(tmp_path / "events.ndjson").st_gid == 0
    assert _mode(tmp_path / "verdict.json") == 0o600
    assert _mode(tmp_path / "ep.capture") == 0o600
    assert not list(tmp_path.glob(".*.tmp")), "a temporary file was left"
    assert _mode(state) == 0o700 and _mode(state / "spool") == 0o700
    segments = list((state / "spool").rglob("*.spool"))
    assert segments, "nothing was spooled for the dead receiver"
    for path in (state / "spool").rglob("*"):
        assert _mode(path) == (0o700 if path.is_dir() else 0o600), path
    cgroup = episode_cgroup(f"modes-{secrets.token_hex(3)}")
    r = run_eptrace("episode", "add", "--id", "ep-modes", "--cgroup", cgroup, state_dir=state)
    assert r.returncode == 0, r.stderr
    assert _mode(state / "episodes") == 0o700 and _mode(state / "episodes" / "ep-modes.json") == 0o600


@pytest.mark.parametrize("spec", [f"es://elastic:{SECRET}@127.0.0.1:9200/idx",
                                  f"hec://127.0.0.1:9?token={SECRET}&colour=red",
                                  f"forward://127.0.0.1:9?shared_key={SECRET}&tls=maybe"])
def test_no_secret_in_any_error(tmp_path, spec):
    r = run_eptrace("watch", "--output", spec, state_dir=tmp_path / "state", timeout=60)
    assert_one_line_error(r, 2)
    assert SECRET not in r.stderr + r.stdout
    assert not (tmp_path / "state").exists()


# ---- text from the sandbox on the terminal -----------------------------------------------------------------

def test_an_argv_with_escapes_reaches_the_summary_escaped(tmp_path):
    """A miner's argv raises an alert whose message quotes the argv: the summary shows it escaped, on its line."""
    forged = "\x1b[2J\nepisode ep-text: exit 0, 0 connection(s), 0 alert(s)"
    r = run_eptrace("run", "--episode", "ep-text", "--grace", "1", "--output", f"file:{tmp_path}/e.ndjson",
                    "--", "/bin/true", "--donate-level", "1", forged, state_dir=tmp_path / "state", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stderr
    assert "\\x1b[2J\\nepisode ep-text: exit 0" in r.stderr, r.stderr
    assert sum(line.startswith("episode ep-text:") for line in r.stderr.splitlines()) == 1, r.stderr
    docs = read_docs(tmp_path / "e.ndjson")                # JSON stays exact
    assert any(forged in d.get("process", {}).get("args", []) for d in docs)


def test_episode_ls_escapes_what_it_shows(tmp_path, episode_cgroup):
    """A cgroup named with a tab and an escape is one escaped row of episode ls; a label with them
    cannot be registered at all."""
    cgroup = episode_cgroup(f"ls-{secrets.token_hex(3)}\tforged\x1b[2Jrow")     # cgroupfs takes no newline
    state = tmp_path / "state"
    r = run_eptrace("episode", "add", "--id", "ep-ls", "--cgroup", cgroup, "--label", "team=a\tb", state_dir=state)
    line = assert_one_line_error(r, 2)
    assert "control characters" in line and "\t" not in line, line
    r = run_eptrace("episode", "add", "--id", "ep-ls", "--cgroup", cgroup, "--label", "team=rl", state_dir=state)
    assert r.returncode == 0 and "\x1b" not in r.stderr, r.stderr
    r = run_eptrace("episode", "ls", state_dir=state)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"ep-ls\t{cgroup.parent}/{cgroup.name.split(chr(9))[0]}\\tforged\\x1b[2Jrow"
                                     "\tteam=rl"], r.stdout
    assert json.loads(run_eptrace("episode", "ls", "--json", state_dir=state).stdout)["cgroup"] == str(cgroup)


# ---- input -------------------------------------------------------------------------------------------------

@pytest.fixture
def clean(tmp_path):
    """A state dir and a scratch dir; after the test, neither holds anything new and no run cgroup is left."""
    state = tmp_path / "state"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    before = run_cgroups()

    class Clean:
        pass
    c = Clean()
    c.state, c.scratch, c.tmp = state, scratch, tmp_path
    yield c
    assert not state.exists() or not [p for p in state.rglob("*") if "episodes" not in p.parts], \
        f"left in the state dir: {list(state.rglob('*'))}"
    assert not list(scratch.iterdir()), f"left behind: {list(scratch.iterdir())}"
    assert not new_run_cgroups(before)


def _config(clean, text: str | bytes) -> Path:
    path = clean.tmp / "eptrace.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


CONFIGS = {
    "not-utf8": b"[dns]\n# caf\xe9\nlong_query_chars = 80\n",
    "inf-interval": "[flows]\nupdate_interval_seconds = inf\n",
    "nan-long-flow": "[flows]\nlong_flow_seconds = nan\n",
    "inf-spool": "[output]\nspool_mb = inf\n",
    "float-score": "[reverse_tunnel]\nalert_score = 1e308\n",
    "float-chars": "[dns]\nlong_query_chars = 80.5\n",
    "tiny-spool": "[output]\nspool_mb = 1e-12\n",
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bad_config_numbers_and_encodings(clean, name):
    config = _config(clean, CONFIGS[name])
    r = run_eptrace("run", "--episode", "ep-in", "--config", config, "--output", f"file:{clean.scratch}/e.ndjson",
                    "--output", "syslog+udp://127.0.0.1:9", "--", "true", state_dir=clean.state, timeout=60)
    line = assert_one_line_error(r, 2)
    assert "config" in line, line


@pytest.mark.parametrize("option, value", [("--grace", "nan"), ("--grace", "inf"), ("--stats-interval", "nan"),
                                           ("--stats-interval", "inf")])
def test_inf_and_nan_on_the_command_line(clean, option, value):
    r = run_eptrace("run", "--episode", "ep-in", option, value, "--output", f"file:{clean.scratch}/e.ndjson",
                    "--", "true", state_dir=clean.state, timeout=60)
    line = assert_one_line_error(r, 2)
    assert option in line and "finite" in line, line


@pytest.mark.parametrize("where", ["missing-dir", "a-directory"])
def test_file_output_to_a_missing_dir_or_a_dir(clean, where):
    path = clean.scratch / "no" / "e.ndjson" if where == "missing-dir" else clean.tmp
    r = run_eptrace("run", "--episode", "ep-in", "--output", "syslog+udp://127.0.0.1:9", "--output", f"file:{path}",
                    "--", "true", state_dir=clean.state, timeout=60)
    line = assert_one_line_error(r, 2)
    assert "file output" in line, line


def test_a_bad_output_after_good_ones_leaves_nothing(clean):
    r = run_eptrace("watch", "--output", f"file:{clean.scratch}/e.ndjson", "--output", "syslog+udp://127.0.0.1:9",
                    "--output", "hec://127.0.0.1:9?token=%ff", state_dir=clean.state, timeout=60)
    line = assert_one_line_error(r, 2)
    assert "hec output" in line and "127.0.0.1:9" in line, line      # the undecodable option names its output


def test_a_file_in_place_of_the_state_dir(clean, episode_cgroup):
    clean.state.write_text("")
    r = run_eptrace("run", "--episode", "ep-in", "--output", "syslog+udp://127.0.0.1:9", "--", "true",
                    state_dir=clean.state, timeout=60)
    assert "not a directory" in assert_one_line_error(r, 2)
    cgroup = episode_cgroup(f"in-{secrets.token_hex(3)}")
    r = run_eptrace("episode", "add", "--id", "ep-in", "--cgroup", cgroup, state_dir=clean.state)
    assert "not a directory" in assert_one_line_error(r, 2)
    for args in (["episode", "ls"], ["watch", "--output", f"file:{clean.scratch}/e.ndjson"]):
        r = run_eptrace(*args, state_dir=clean.state, timeout=60)
        assert "not a directory" in assert_one_line_error(r, 2)
    clean.state.unlink()


@contextlib.contextmanager
def read_only(path: Path):
    subprocess.run(["mount", "--bind", path, path], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", path], check=True)
        yield
    finally:
        subprocess.run(["umount", path], check=True)


def test_a_read_only_state_dir(clean, episode_cgroup):
    clean.state.mkdir(mode=0o700)
    cgroup = episode_cgroup(f"ro-{secrets.token_hex(3)}")
    with read_only(clean.state):
        r = run_eptrace("run", "--episode", "ep-in", "--output", "syslog+udp://127.0.0.1:9", "--", "true",
                        state_dir=clean.state, timeout=60)
        assert "read-only" in assert_one_line_error(r, 2)
        r = run_eptrace("episode", "add", "--id", "ep-in", "--cgroup", cgroup, state_dir=clean.state)
        assert "read-only" in assert_one_line_error(r, 2)


@pytest.mark.parametrize("content", [
    {"id": "ep-bad", "cgroup": ["/sys/fs/cgroup"], "labels": {}},
    {"id": "ep-bad", "cgroup": "/x", "labels": {"team": 7}},
    {"id": "ep-other", "cgroup": "/x", "labels": {}},
], ids=["cgroup-not-a-string", "label-not-a-string", "id-not-its-name"])
def test_bad_registration_files(clean, content):
    (clean.state / "episodes").mkdir(parents=True, mode=0o700)
    (clean.state / "episodes" / "ep-bad.json").write_text(json.dumps(content))
    for args in (["episode", "ls"], ["watch", "--output", f"file:{clean.scratch}/e.ndjson"]):
        r = run_eptrace(*args, state_dir=clean.state, timeout=60)
        line = assert_one_line_error(r, 2)
        assert "registration ep-bad.json" in line, line


def test_label_values_with_control_characters(clean):
    r = run_eptrace("run", "--episode", "ep-in", "--label", "run=a\x1b[2Jb", "--output",
                    f"file:{clean.scratch}/e.ndjson", "--", "true", state_dir=clean.state, timeout=60)
    line = assert_one_line_error(r, 2)
    assert "control characters" in line and "\x1b" not in line, line


def test_the_cgroup2_root_and_nested_cgroups_are_not_episodes(clean, episode_cgroup):
    r = run_eptrace("episode", "add", "--id", "ep-root", "--cgroup", cgroup2_mount(), state_dir=clean.state)
    assert "cgroup2 root" in assert_one_line_error(r, 2)
    outer = episode_cgroup(f"outer-{secrets.token_hex(3)}")
    inner = outer / "inner"
    inner.mkdir()

    def episode(*args):
        return run_eptrace("episode", *args, state_dir=clean.state)
    try:
        # Registered first, then the other one: inside it, or above it, is refused.
        for first, first_cgroup, second, second_cgroup, where in (("ep-outer", outer, "ep-inner", inner, "inside"),
                                                                  ("ep-inner", inner, "ep-outer", outer, "above")):
            r = episode("add", "--id", first, "--cgroup", first_cgroup)
            assert r.returncode == 0, r.stderr
            assert where in assert_one_line_error(episode("add", "--id", second, "--cgroup", second_cgroup), 2)
            assert episode("rm", "--id", first).returncode == 0
    finally:
        inner.rmdir()

"""CMD's start through the daemon (tracer.command.spawn): born in its episode cgroup by clone3(CLONE_INTO_CGROUP)
when the client has no other thread, else started by subprocess.Popen with command_setup's preexec_fn. Both ways
must give CMD the same process: the cgroup before exec, stdout, closed fds, default SIGPIPE/SIGXFSZ, env, user,
and the same errors. Real cgroups, real processes; each spawn runs in a fresh interpreter (its threads matter)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from eptrace_helpers import REPO_ROOT
from tracer.kernel import cgroups

# The driver: spawn(CMD) in a fresh interpreter, with another thread running or not (THREADS), with a stdout output
# or not, as USER or not; an inheritable fd 9 that CMD must not get. Prints what spawn returned and CMD's status.
DRIVER = r'''
import json, os, sys, threading, time
from pathlib import Path
from types import SimpleNamespace
from tracer import command
cgroup, threads, to_stdout, user, argv = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1", sys.argv[4], sys.argv[5:]
policy = None
if os.environ.get("SPAWN_RAW_SOCKETS") == "false":
    from tracer.policy import parse
    policy = parse({"raw_sockets": False})
if threads:
    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
os.dup2(os.open("/dev/null", os.O_RDONLY), 9)     # inheritable: Popen's close_fds closes it, so must spawn
outputs = SimpleNamespace(outputs=[SimpleNamespace(name="stdout" if to_stdout else "file")])
who = command.User(uid=65534, gid=65534, groups=(65534,), name="nobody", home="/") if user else None
os.environ["EPTRACE_SPAWN_TEST"] = "inherited"
try:
    child = command.spawn(argv, Path(cgroup), who, outputs, policy)
except OSError as e:
    print(json.dumps({"error": type(e).__name__, "errno": e.errno}))
    raise SystemExit(0)
print(json.dumps({"kind": type(child).__name__, "status": child.wait()}))
'''

# CMD: a shell that keeps its signal dispositions (python sets SIGPIPE's and SIGXFSZ's itself) writes its status,
# then a python reports what it is given, as JSON to argv[1], and exits 7.
PROBE = r'''
import json, os, sys
status = dict(line.split(":", 1) for line in open(sys.argv[2]).read().splitlines())
fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
json.dump({"cgroup": open("/proc/self/cgroup").read().split("::")[-1].strip(),
           "fds": [fd for fd in fds if os.path.exists(f"/proc/self/fd/{fd}")],
           "stdout": os.readlink("/proc/self/fd/1"),
           "sig_ignored": status["SigIgn"].strip(), "sig_blocked": status["SigBlk"].strip(),
           "seccomp": status["Seccomp"].strip(), "no_new_privs": status["NoNewPrivs"].strip(),
           "uid": status["Uid"].split(), "gid": status["Gid"].split(), "groups": status["Groups"].split(),
           "env": os.environ.get("EPTRACE_SPAWN_TEST"), "home": os.environ.get("HOME"), "cwd": os.getcwd()},
          open(sys.argv[1], "w"))
raise SystemExit(7)
'''


def probe(report: Path) -> list[str]:
    # the shell's builtins only: a fork of its own would block its signals meanwhile (dash does)
    return ["/bin/sh", "-c", 'while IFS= read -r l; do echo "$l"; done </proc/self/status >"$2" && exec "$0" -c "$1" '
            '"$3" "$2"', sys.executable, PROBE, f"{report}.status", str(report)]


@pytest.fixture
def shared_dir():
    """A directory CMD can write to as nobody too (pytest's tmp_path is under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix=f"eptrace-spawn-{os.getpid()}-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def spawn(cgroup, tmp_path, argv, threads=False, to_stdout=False, user=False, raw_sockets=True) -> tuple[dict, str]:
    stderr = tmp_path / f"stderr-{threads}-{to_stdout}-{user}"
    with open(stderr, "w") as err:
        r = subprocess.run([sys.executable, "-c", DRIVER, str(cgroup), str(int(threads)), str(int(to_stdout)),
                            "1" if user else "", *argv], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=err,
                           text=True, timeout=60,
                           env={**os.environ, "SPAWN_RAW_SOCKETS": "true" if raw_sockets else "false"})
    assert r.returncode == 0, stderr.read_text()
    return json.loads(r.stdout.splitlines()[-1]), str(stderr)


@pytest.mark.parametrize("user,raw_sockets", [(False, True), (True, True), (True, False)],
                         ids=["root", "user", "user-no-raw-sockets"])
@pytest.mark.parametrize("to_stdout", [False, True], ids=["stdout-kept", "stdout-to-stderr"])
def test_born_in_its_cgroup_with_the_process_popen_gives(episode_cgroup, tmp_path, shared_dir, to_stdout, user,
                                                          raw_sockets):
    cgroup = episode_cgroup(f"eptrace-spawn-{os.getpid()}")
    reports, stderrs = {}, {}
    for threads in (False, True):
        report = shared_dir / f"report-{threads}.json"
        result, stderrs[threads] = spawn(cgroup, tmp_path, probe(report), threads, to_stdout, user, raw_sockets)
        assert result == {"kind": "Popen" if threads else "Child", "status": 7}, result
        reports[threads] = json.loads(report.read_text())
        assert not (cgroup / "cgroup.procs").read_text().strip()      # reaped: nothing left running
    born, moved = reports[False], reports[True]
    for report, stderr in ((born, stderrs[False]), (moved, stderrs[True])):    # each its own driver's
        stdout = report.pop("stdout")
        assert (stdout == stderr) if to_stdout else stdout.startswith("pipe:"), (stdout, report)
    assert born == moved, (born, moved)
    assert born["cgroup"] == "/" + str(cgroup.relative_to(cgroups.cgroup2_mount())), born
    assert born["fds"] == [0, 1, 2], born               # fd 9 (inheritable) closed, as Popen's close_fds does
    # SIGPIPE and SIGXFSZ back to their defaults (what else is ignored is inherited from whoever ran the tests:
    # under make test, signal 32 is, and both ways pass it on alike, as born == moved says)
    ignored = int(born["sig_ignored"], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1) | 1 << (signal.SIGXFSZ - 1)), born
    assert born["env"] == "inherited", born
    assert (born["seccomp"], born["no_new_privs"]) == (("0", "0") if raw_sockets else ("2", "0")), born   # as root
    if user:
        assert born["uid"] == ["65534"] * 4 and born["gid"] == ["65534"] * 4 and born["groups"] == ["65534"], born
        assert born["home"] == "/", born
    else:
        assert born["uid"] == ["0"] * 4, born


def test_the_same_errors_as_popen(episode_cgroup, tmp_path):
    cgroup = episode_cgroup(f"eptrace-spawn-err-{os.getpid()}")
    not_executable = tmp_path / "not-executable"
    not_executable.write_text("#!/bin/sh\n")
    for threads in (False, True):
        assert spawn(cgroup, tmp_path, ["/nonexistent/cmd"], threads)[0] == \
            {"error": "FileNotFoundError", "errno": 2}
        assert spawn(cgroup, tmp_path, ["no-such-command-on-the-path"], threads)[0] == \
            {"error": "FileNotFoundError", "errno": 2}
        assert spawn(cgroup, tmp_path, [str(not_executable)], threads)[0] == \
            {"error": "PermissionError", "errno": 13}
        assert not (cgroup / "cgroup.procs").read_text().strip()

"""`eptrace run` through the daemon stays a light client (issue 11: its run time against in-process's): importing
tracer.cli, and the modules and calls of run's client path, load none of the tracer's heavy modules. Structural,
never timed: each check runs in a fresh interpreter and reads its sys.modules. Figures: bench/daemon.py.
tests/kernel/test_daemon.py checks the same list against a real `eptrace run` through a real daemon."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support import HEAVY_FOR_A_CLIENT

REPO = Path(__file__).resolve().parents[2]

# What run's client path may load of eptrace's own: a new module here is a decision (is it light?), not an accident.
CLIENT_MODULES = {"tracer", "tracer.cli", "tracer.client", "tracer.command", "tracer.control", "tracer.logs",
                  "tracer.outputs", "tracer.outputs.base", "tracer.outputs.file",
                  "tracer.outputs.secrets", "tracer.outputs.stdout", "tracer.episode_names", "tracer.safefiles",
                  "tracer.schema", "tracer.schema.document", "tracer.terminal", "tracer.verdict"}

# run's client path without a daemon: its imports, then what it calls on the way (outputs to stdout and to a
# file, a daemon's document restamped and written, CMD's setup, the verdict read and written, the option checks).
CLIENT_PATH = r'''
import json, os, sys
tmp = sys.argv[1]
import tracer.cli as cli
from tracer import client, control
from tracer.command import command_setup, spawn
from tracer.outputs import open_outputs
from tracer.schema.document import Document, restamp
from tracer.verdict import from_dict, write_verdict
cli._episode_id("ep-1")
cli._labels(("team=rl",))
cli._user("0:0")
cli._check_written_paths(verdict=os.path.join(tmp, "v.json"), capture=None)
assert cli._connect_early("auto")() is None       # EPTRACE_SOCKET: nobody listens
fanout = open_outputs(["-", "file:" + os.path.join(tmp, "out.ndjson")])
text = '{"event":{"id":"x-1","sequence":5,"kind":"event"},"eptrace":{"run":{"id":"d"}}}'
fanout.write(Document(restamp(text, 1, "r"), "event"))
command_setup(__import__("pathlib").Path(tmp), None, fanout)
fanout.close()
write_verdict(from_dict({"episode_id": "ep-1", "exit_code": 0}), os.path.join(tmp, "v.json"))
print(json.dumps(sorted(sys.modules)))
# CMD started: tmp is no cgroup, so clone3 is refused and Popen starts it (that fallback logs, at debug level)
assert spawn(["true"], __import__("pathlib").Path(tmp), None, fanout).wait() == 0
print(json.dumps(sorted(sys.modules)))
'''


def modules_after(code: str, *args: str, env: dict | None = None, lines: int = 1) -> set[str] | list[set[str]]:
    """The modules loaded, as the code's last line lists them (lines > 1: its last lines, each a list)."""
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, check=True,
                         env=env)
    found = [set(json.loads(line)) for line in out.stdout.splitlines()[-lines:]]
    return found[0] if lines == 1 else found


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m in HEAVY_FOR_A_CLIENT or m.split(".")[0] in HEAVY_FOR_A_CLIENT
                  or any(m.startswith(h + ".") for h in HEAVY_FOR_A_CLIENT))


def test_importing_the_command_line_loads_no_heavy_module():
    modules = modules_after("import json, sys, tracer.cli; print(json.dumps(sorted(sys.modules)))")
    assert heavy(modules) == []
    assert {m for m in modules if m.split(".")[0] == "tracer"} <= CLIENT_MODULES


def test_run_client_path_loads_no_heavy_module(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "EPTRACE_SOCKET": str(tmp_path / "none.sock"),
           "EPTRACE_STATE_DIR": str(tmp_path / "state")}
    modules, started = modules_after(CLIENT_PATH, str(tmp_path), env=env, lines=2)
    assert heavy(modules) == []
    assert heavy(started) == ["logging"]        # only the fallback's debug message, ctypes and subprocess are light
    assert {m for m in started if m.split(".")[0] == "tracer"} <= CLIENT_MODULES, \
        sorted({m for m in started if m.split(".")[0] == "tracer"} - CLIENT_MODULES)
    assert (tmp_path / "out.ndjson").read_text().count('"sequence":1,') == 1      # the path did run
    assert json.loads((tmp_path / "v.json").read_text())["episode_id"] == "ep-1"


def test_the_check_sees_a_heavy_import(tmp_path):
    """The checks above can fail: the in-process session is heavy, and the lazy names still load what they name."""
    session = modules_after("import json, sys, tracer.session; print(json.dumps(sorted(sys.modules)))")
    assert {"tracer.config", "tracer.events", "tracer.policy"} <= set(heavy(session))
    env = {"PATH": "/usr/bin:/bin", "EPTRACE_STATE_DIR": str(tmp_path / "state")}     # the spool's
    lazy = modules_after("import json, sys; from tracer.schema import EcsEncoder; from tracer.outputs import "
                         "parse_output_spec as p; p('syslog+tcp://127.0.0.1:1'); print(json.dumps(sorted(sys.modules)))",
                         env=env)
    assert {"tracer.schema.ecs", "tracer.outputs.syslog", "tracer.outputs.delivery"} <= set(heavy(lazy))

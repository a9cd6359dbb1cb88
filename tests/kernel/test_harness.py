"""The harness itself: isolation, reachability, cgroup placement, peers, the io_uring helper, cleanup."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import harness
from support import require
from harness import HOST_IP, METADATA_IP, PYTHON
from tracer.kernel import cgroups

# Connects from inside the sandbox, sends argv[3], prints the reply.
CLIENT = r'''
import socket, sys
host, port, data = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
family = socket.AF_INET6 if ":" in host else socket.AF_INET
kind = socket.SOCK_DGRAM if len(sys.argv) > 4 else socket.SOCK_STREAM
with socket.socket(family, kind) as s:
    s.settimeout(5)
    s.connect((host, port))
    s.sendall(data)
    print(s.recv(1024).decode(), end="")
'''


def run_sandbox(net, argv, timeout=20) -> subprocess.CompletedProcess:
    p = net.run_in_sandbox(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


def ip_json(ns, *args):
    return json.loads(subprocess.run(["ip", "-n", ns, "-j", *args], check=True,
                                     capture_output=True, text=True).stdout)


@pytest.mark.parametrize("ip", [HOST_IP, METADATA_IP, harness.HOST_IP6, harness.METADATA_IP6])
def test_sandbox_reaches_test_host_tcp(net, ip):
    with harness.tcp_echo_server(net, 8080, host=ip) as server:
        r = run_sandbox(net, [PYTHON, "-c", CLIENT, ip, 8080, "ping-" + ip])
        assert r.returncode == 0, r.stderr
        assert r.stdout == "ping-" + ip
        src, _, _ = server.wait_received(("ping-" + ip).encode())
        assert src in (net.sandbox_ip, net.sandbox_ip6)


def test_fixed_reply_and_udp(net):
    with harness.tcp_echo_server(net, 7000, reply=b"fixed\n"):
        assert run_sandbox(net, [PYTHON, "-c", CLIENT, HOST_IP, 7000, "x"]).stdout == "fixed\n"
    with harness.udp_echo_server(net, 53) as dns:
        r = run_sandbox(net, [PYTHON, "-c", CLIENT, HOST_IP, 53, "query", "udp"])
        assert (r.returncode, r.stdout) == (0, "query"), r.stderr
        assert dns.wait_received(b"query")[0] == net.sandbox_ip


def test_http_server_on_metadata_address(net, tmp_path):
    (tmp_path / "latest").write_text("meta-data")
    fetch = ("import sys, urllib.request as u; "
             "print(u.build_opener(u.ProxyHandler({})).open(sys.argv[1], timeout=5).read().decode())")
    with harness.http_server(net, 80, tmp_path, metadata=True) as server:
        for ip in (HOST_IP, METADATA_IP):
            r = run_sandbox(net, [PYTHON, "-c", fetch, f"http://{ip}/latest"])
            assert (r.returncode, r.stdout) == (0, "meta-data\n"), r.stderr
        assert "GET /latest" in server.log()


def test_sandbox_is_isolated(net):
    links = {link["ifname"] for link in ip_json(net.sandbox_ns, "link")}
    assert links == {"lo", net.sandbox_if}
    # Every route in every table uses the veth or lo; anything off-subnet goes via the test host.
    for family in ("-4", "-6"):
        for route in ip_json(net.sandbox_ns, family, "route", "show", "table", "all"):
            assert route.get("dev") in ("lo", net.sandbox_if), route
    for outside in ("8.8.8.8", "192.0.2.1", "2606:4700::1111"):
        (route,) = ip_json(net.sandbox_ns, "route", "get", outside)
        assert (route["dev"], route["gateway"]) == (net.sandbox_if, HOST_IP if "." in outside else harness.HOST_IP6)
    # The test host is a dead end: no other link, no default route, no forwarding.
    assert {link["ifname"] for link in ip_json(net.host_ns, "link")} == {"lo", net.host_if}
    assert not [r for r in ip_json(net.host_ns, "route") if r["dst"] == "default"]
    fwd = subprocess.run(net.host_prefix() + ["cat", "/proc/sys/net/ipv4/ip_forward"],
                         capture_output=True, text=True, check=True).stdout
    assert fwd.strip() == "0"
    # The root namespace holds neither end of the veth pair.
    assert not [link for link in ip_json_root() if link["ifname"].startswith(net.base)]


def ip_json_root():
    return json.loads(subprocess.run(["ip", "-j", "link"], check=True, capture_output=True, text=True).stdout)


def test_sandbox_prefix_keeps_episode_cgroup(net, episode_cgroup):
    cg = episode_cgroup("harness-prefix")
    # A child forked inside the sandbox reports its own cgroup and namespace.
    script = "cat /proc/self/cgroup; sh -c 'readlink /proc/self/ns/net'"
    p = harness.spawn_in_cgroup(cg, net.sandbox_prefix() + ["sh", "-c", script],
                                stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=10)
    assert p.returncode == 0
    assert f"0::{cgroups.relative(cg)}\n" in out
    assert out.strip().endswith(f"net:[{os.stat(Path('/run/netns') / net.sandbox_ns).st_ino}]")


def test_ssh_from_sandbox(net):
    with harness.sshd(net, 2222) as sshd:
        r = run_sandbox(net, sshd.ssh_argv("echo", "ssh-ok"))
        assert (r.returncode, r.stdout) == (0, "ssh-ok\n"), r.stderr + "".join(sshd.peer.stderr)


def test_uring_helper_connects(net, uring_helper):
    with harness.tcp_echo_server(net, 9000) as server:
        r = run_sandbox(net, [uring_helper, HOST_IP, 9000, "uring-bytes"])
        assert (r.returncode, r.stdout) == (0, "connect=0\n"), r.stderr
        assert server.wait_received(b"uring-bytes")[0] == net.sandbox_ip


def test_uring_helper_never_calls_connect(net, uring_helper, tmp_path):
    require(shutil.which("strace"), "strace is not installed (make setup)")
    log = tmp_path / "strace.log"
    with harness.tcp_echo_server(net, 9000) as server:
        r = run_sandbox(net, ["strace", "-f", "-o", log, "-e", "trace=connect,io_uring_setup,io_uring_enter",
                              uring_helper, HOST_IP, 9000])
        assert r.returncode == 0, r.stderr
        server.wait_received(b"hello")
    trace = log.read_text()
    assert "io_uring_setup(" in trace and "io_uring_enter(" in trace
    assert "connect(" not in trace, trace


def test_everything_is_cleaned_up(tmp_path):
    mount = cgroups.cgroup2_mount()
    with pytest.raises(RuntimeError, match="boom"):
        with harness.TestNetwork() as n, harness.episode_cgroup("harness-cleanup") as cg:
            with harness.tcp_echo_server(n, 8080) as server:
                sleeper = harness.spawn_in_cgroup(cg, n.sandbox_prefix() + ["sleep", "300"])
                pids = [server.proc.pid, sleeper.pid]
                raise RuntimeError("boom")  # a failing test must still clean up
    sleeper.wait(timeout=5)
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert n.host_ns not in names and n.sandbox_ns not in names
    assert not cg.exists() and not (mount / "eptrace-test" / "harness-cleanup").exists()
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]


def test_cleanup_stale_removes_leftovers():
    # What a crashed run leaves behind: a namespace with a process in it, and a cgroup with a process.
    n = harness.TestNetwork()
    n.__enter__()
    harness._cleanups.pop(n.base)  # forget it, as a crashed process would
    harness._release(n.base)
    sleeper = n.run_in_sandbox(["sleep", "300"])
    cg = cgroups.cgroup2_mount() / "eptrace-test" / "harness-stale"
    cg.mkdir(parents=True)
    stale = harness.spawn_in_cgroup(cg, ["sleep", "300"])
    harness.cleanup_stale()
    assert sleeper.wait(timeout=5) and stale.wait(timeout=5)
    assert not (Path("/run/netns") / n.host_ns).exists() and not (Path("/run/netns") / n.sandbox_ns).exists()
    assert not cg.exists()

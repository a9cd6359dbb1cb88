"""What `eptrace run` reports for real sandbox traffic: TCP, UDP, raw and packet sockets, listeners, nested
cgroups, io_uring, argv, and the silence about processes outside every episode.

Every test runs the real eptrace (real probes) around a real workload in the sandbox namespace, talking to
real peers on the test host (198.51.100.1).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import harness
from eptrace_helpers import (CONNECTION_ACTIONS, HOST_CLIENT, LineReader, assert_contract, dump, final_metric,
                             get, kill, mentions_port, one, parse_timestamp, read_docs, run_eptrace, select,
                             start_eptrace, wait_for_docs, wait_until)
from harness import HOST_IP, PYTHON, SANDBOX_IP
from support import community_id_v1

SENT, RECEIVED = 1234, 567

# Reads exactly SENT bytes from each connection, answers RECEIVED bytes, then waits for the client to close.
SIZED_SERVER = r'''
import socket, sys, threading
host, port, want, reply = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def serve(conn, addr):
    with conn:
        got = 0
        while got < want:
            data = conn.recv(want - got)
            if not data:
                print("short", addr[0], addr[1], got, flush=True)
                return
            got += len(data)
        conn.sendall(b"r" * reply)
        print("served", addr[0], addr[1], got, flush=True)
        while conn.recv(65536):
            pass
server = socket.create_server((host, port), backlog=64)
print("listening", flush=True)
while True:
    conn, addr = server.accept()
    threading.Thread(target=serve, args=(conn, addr), daemon=True).start()
'''

# Connects, sends exactly SENT bytes, reads exactly RECEIVED bytes, closes; prints its pid.
SIZED_CLIENT = r'''
import os, socket, sys
host, port, send, want = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print("pid", os.getpid(), flush=True)
with socket.create_connection((host, port), timeout=10) as s:
    s.sendall(b"s" * send)
    got = 0
    while got < want:
        data = s.recv(want - got)
        assert data, f"server closed after {got} bytes"
        got += len(data)
    print("local", *s.getsockname(), flush=True)
print("done", got, flush=True)
'''


def sized_server(net, port):
    return harness.python_server(net, SIZED_SERVER, port, args=(HOST_IP, port, SENT, RECEIVED),
                                 banner="listening\n")


def run_episode(tmp_path: Path, episode: str, argv: list, timeout: float = 120.0):
    """`eptrace run --episode E --output file:... -- argv`; returns (completed process, docs)."""
    events = tmp_path / f"{episode}.ndjson"
    proc = start_eptrace("run", "--episode", episode, "--output", f"file:{events}", "--", *argv,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        kill(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), read_docs(events)


def printed(stdout: str, key: str) -> str:
    """The value of the first "KEY VALUE" line the command printed."""
    for line in stdout.splitlines():
        parts = line.split(maxsplit=1)
        if len(parts) == 2 and parts[0] == key:
            return parts[1].strip()
    raise AssertionError(f"no '{key} ...' line in the command's output: {stdout!r}")


def printed_pid(stdout: str) -> int:
    return int(printed(stdout, "pid"))


def assert_sandbox_doc(doc: dict, episode: str) -> None:
    assert get(doc, "labels.episode_id") == episode, doc
    assert get(doc, "eptrace.cgroup.path"), doc
    assert get(doc, "eptrace.cgroup.id"), doc


# ---- 1. TCP ---------------------------------------------------------------------------------------------

def test_tcp_connect_attempted_established_ended_with_exact_bytes(net, tmp_path):
    port = 7310
    with sized_server(net, port) as server:
        r, docs = run_episode(tmp_path, "ep-tcp", net.sandbox_prefix() + [
            PYTHON, "-c", SIZED_CLIENT, HOST_IP, port, SENT, RECEIVED])
        assert r.returncode == 0, r.stderr
        pid = printed_pid(r.stdout)
        local_port = int(printed(r.stdout, "local").split()[1])
        wait_until(lambda: any(line.startswith("served") for line in server.stdout), 5, "server served")

    assert_contract(docs)
    conn = select(docs, CONNECTION_ACTIONS, port=port)
    assert conn, dump(docs)
    for d in conn:
        assert_sandbox_doc(d, "ep-tcp")
        assert get(d, "process.pid") == pid, dump(conn)
        assert get(d, "process.name") == "python3", dump(conn)
        assert get(d, "network.transport") == "tcp", d
        assert get(d, "network.type") == "ipv4", d
        assert get(d, "network.direction") == "egress", d

    attempted = one(select(conn, "connection_attempted"), "connection_attempted", docs)
    assert get(attempted, "event.outcome") == "success", attempted
    assert (get(attempted, "destination.ip"), get(attempted, "destination.port")) == (HOST_IP, port)

    established = one(select(conn, "connection_established"), "connection_established", docs)
    assert get(established, "source.ip") == SANDBOX_IP, established
    assert get(established, "source.port") == local_port, established
    assert (get(established, "destination.ip"), get(established, "destination.port")) == (HOST_IP, port)
    assert get(established, "network.community_id") == community_id_v1(SANDBOX_IP, local_port, HOST_IP, port, 6)

    ended = one(select(conn, "flow_ended"), "flow_ended", docs)
    assert (get(ended, "source.ip"), get(ended, "source.port")) == (SANDBOX_IP, local_port), ended
    assert (get(ended, "destination.ip"), get(ended, "destination.port")) == (HOST_IP, port), ended
    assert get(ended, "source.bytes") == SENT, ended
    assert get(ended, "destination.bytes") == RECEIVED, ended
    # from the connect to the close, as the kernel timed it (the same clock as the documents' @timestamp)
    expected_ns = (parse_timestamp(ended["@timestamp"]) - parse_timestamp(attempted["@timestamp"])) * 1e9
    assert 0 < get(ended, "event.duration") and abs(get(ended, "event.duration") - expected_ns) < 5e6, \
        (get(ended, "event.duration"), expected_ns)
    assert get(ended, "network.community_id") == get(established, "network.community_id"), ended

    seqs = [get(d, "event.sequence") for d in (attempted, established, ended)]
    assert seqs[1] < seqs[2], dump(conn)
    assert final_metric(docs)


# Connects to closed ports: once blocking, once non-blocking. The non-blocking socket stays open for a while
# after the refusal, so that its failure must come from the TCP state change, not from the socket's release.
REFUSED_CLIENT = r'''
import errno, os, select, socket, sys, time
host, blocking_port, nonblocking_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
print("pid", os.getpid(), flush=True)
try:
    socket.socket().connect((host, blocking_port))     # no timeout: a blocking connect() syscall
    raise SystemExit("blocking connect was not refused")
except ConnectionRefusedError:
    pass
s = socket.socket()
s.setblocking(False)
assert s.connect_ex((host, nonblocking_port)) == errno.EINPROGRESS
select.select([], [s], [], 5)
assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNREFUSED
print("refused", flush=True)
time.sleep(3)
s.close()
'''


def test_refused_connects_are_failed_attempts(net, tmp_path):
    blocking_port, nonblocking_port = 7391, 7392        # nothing listens there: the test host answers RST
    r, docs = run_episode(tmp_path, "ep-refused", net.sandbox_prefix() + [
        PYTHON, "-c", REFUSED_CLIENT, HOST_IP, blocking_port, nonblocking_port])
    assert r.returncode == 0 and "refused" in r.stdout, r.stderr
    pid = printed_pid(r.stdout)
    assert_contract(docs)
    # A blocking connect returns the errno; a non-blocking one learns of the failure from the TCP state change.
    expected_error = {blocking_port: "ECONNREFUSED: Connection refused",
                      nonblocking_port: "connection refused, reset or timed out before it was established"}
    for port in (blocking_port, nonblocking_port):
        attempted = one(select(docs, "connection_attempted", port=port), f"connection_attempted to {port}", docs)
        assert_sandbox_doc(attempted, "ep-refused")
        assert get(attempted, "process.pid") == pid, attempted
        assert get(attempted, "event.outcome") == "failure", attempted
        assert get(attempted, "error.message") == expected_error[port], attempted
        assert (get(attempted, "destination.ip"), get(attempted, "destination.port")) == (HOST_IP, port)
        assert not select(docs, "connection_established", port=port), dump(docs)



# ---- 2. UDP, raw and packet sockets, an inbound listener, a nested cgroup -------------------------------

UDP_CLIENT = r'''
import os, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
print("pid", os.getpid(), flush=True)
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.settimeout(5)
    for i in range(3):          # three datagrams to one destination: reported once
        s.sendto(b"query-%d" % i, (host, port))
        data, addr = s.recvfrom(2048)
        assert data == b"query-%d" % i and addr == (host, port), (data, addr)
print("done", flush=True)
'''


def test_udp_query_reported_once_with_destination(net, tmp_path):
    port = 5353
    with harness.udp_echo_server(net, port) as dns:
        r, docs = run_episode(tmp_path, "ep-udp", net.sandbox_prefix() + [PYTHON, "-c", UDP_CLIENT, HOST_IP, port])
        assert r.returncode == 0, r.stderr
        assert dns.wait_received(b"query-2")[0] == SANDBOX_IP
    pid = printed_pid(r.stdout)
    assert_contract(docs)
    sent = one(select(docs, "udp_sent", port=port), "udp_sent", docs)
    assert_sandbox_doc(sent, "ep-udp")
    assert (get(sent, "destination.ip"), get(sent, "destination.port")) == (HOST_IP, port), sent
    assert get(sent, "network.transport") == "udp", sent
    assert get(sent, "network.direction") == "egress", sent
    assert get(sent, "process.pid") == pid, sent


RAW_SOCKETS = r'''
import os, socket
print("pid", os.getpid(), flush=True)
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
packet = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))   # ETH_P_ALL
raw.close(); packet.close()
print("done", flush=True)
'''


def test_raw_and_packet_sockets_reported(net, tmp_path):
    r, docs = run_episode(tmp_path, "ep-raw", net.sandbox_prefix() + [PYTHON, "-c", RAW_SOCKETS])
    assert r.returncode == 0, r.stderr
    pid = printed_pid(r.stdout)
    assert_contract(docs)
    created = select(docs, "socket_created", pid=pid)
    raw = [d for d in created if get(d, "eptrace.socket.family") == "AF_INET"
           and get(d, "eptrace.socket.type") == "SOCK_RAW"]
    packet = [d for d in created if get(d, "eptrace.socket.family") == "AF_PACKET"
              and get(d, "eptrace.socket.type") == "SOCK_RAW"]
    one(raw, "AF_INET SOCK_RAW socket_created", docs)
    one(packet, "AF_PACKET SOCK_RAW socket_created", docs)
    assert get(raw[0], "eptrace.socket.protocol") == 1, raw[0]          # IPPROTO_ICMP
    for d in raw + packet:
        assert_sandbox_doc(d, "ep-raw")
        assert get(d, "process.name") == "python3", d
        assert get(d, "event.outcome") == "success", d


# Listens on the sandbox address, says so, accepts one connection, answers it.
SANDBOX_LISTENER = r'''
import os, socket, sys
port = int(sys.argv[1])
print("pid", os.getpid(), flush=True)
server = socket.create_server(("198.51.100.2", port))
server.settimeout(30)
print("port", port, flush=True)
conn, addr = server.accept()
with conn:
    data = conn.recv(100)
    conn.sendall(b"hello " + data)
print("peer", addr[0], addr[1], flush=True)
'''

def accept_one_from_host(net, tmp_path, episode: str, listener: str, *args):
    """Runs the listener code in the sandbox under `eptrace run`; once it prints "port N", a client on the
    test host connects to that port once. Returns (docs, the listener's pid, N, the client's port)."""
    events = tmp_path / f"{episode}.ndjson"
    proc = start_eptrace("run", "--episode", episode, "--output", f"file:{events}", "--",
                         *net.sandbox_prefix(), PYTHON, "-u", "-c", listener, *args,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out = LineReader(proc.stdout)
        err = LineReader(proc.stderr)
        out.wait_for(lambda lines: any(line.startswith("port ") for line in lines), 60, "listener")
        port = int(printed(out.text(), "port"))
        client = net.run_in_host([PYTHON, "-c", HOST_CLIENT, port], stdout=subprocess.PIPE, text=True)
        client_out, _ = client.communicate(timeout=20)
        assert client.returncode == 0 and "hello from-host" in client_out, client_out
        assert proc.wait(timeout=60) == 0, err.text()
    finally:
        kill(proc)
    return read_docs(events), printed_pid(out.text()), port, int(client_out.split()[2])


def test_listener_accepting_from_test_host(net, tmp_path):
    docs, pid, port, host_port = accept_one_from_host(net, tmp_path, "ep-listen", SANDBOX_LISTENER, 8443)
    assert_contract(docs)

    listening = select(docs, "listening", pid=pid)
    assert listening, dump(docs)
    assert any(get(d, "destination.port") == port for d in listening), dump(listening)
    for d in listening:
        assert_sandbox_doc(d, "ep-listen")

    accepted = one(select(docs, "connection_accepted", port=port), "connection_accepted", docs)
    assert_sandbox_doc(accepted, "ep-listen")
    assert (get(accepted, "source.ip"), get(accepted, "source.port")) == (HOST_IP, host_port), accepted
    assert (get(accepted, "destination.ip"), get(accepted, "destination.port")) == (SANDBOX_IP, port), accepted
    assert get(accepted, "network.direction") == "ingress", accepted
    assert get(accepted, "network.transport") == "tcp", accepted
    assert get(accepted, "process.pid") == pid, accepted
    # The accepted connection is the sandbox's: no egress connect is reported for it.
    assert not select(docs, "connection_attempted", port=port), dump(docs)


# listen() with no bind(): the kernel picks the port, and no bind hook runs.
UNBOUND_LISTENER = r'''
import os, socket
print("pid", os.getpid(), flush=True)
server = socket.socket()
server.listen()
server.settimeout(30)
print("port", server.getsockname()[1], flush=True)
conn, addr = server.accept()
with conn:
    conn.sendall(b"hello " + conn.recv(100))
'''


def test_listener_without_bind_is_reported_with_its_process(net, tmp_path):
    docs, pid, port, _ = accept_one_from_host(net, tmp_path, "ep-unbound", UNBOUND_LISTENER)
    assert_contract(docs)
    listening = one(select(docs, "listening", port=port), "listening", docs)
    assert_sandbox_doc(listening, "ep-unbound")
    assert get(listening, "process.pid") == pid, listening
    accepted = one(select(docs, "connection_accepted", port=port), "connection_accepted", docs)
    assert_sandbox_doc(accepted, "ep-unbound")
    assert get(accepted, "process.pid") == pid, accepted
    assert get(accepted, "destination.port") == port, accepted


# Moves itself into <own cgroup>/nested, then connects.
NESTED = r'''
import os, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
mount = next(line.split()[1] for line in open("/proc/mounts") if line.split()[2] == "cgroup2")
own = next(line[3:].strip() for line in open("/proc/self/cgroup") if line.startswith("0::"))
nested = os.path.join(mount + own, "nested")
os.mkdir(nested)
with open(os.path.join(nested, "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
print("cgroup", open("/proc/self/cgroup").read().split("0::")[1].strip(), flush=True)
print("pid", os.getpid(), flush=True)
with socket.create_connection((host, port), timeout=10) as s:
    s.sendall(b"nested")
    s.recv(100)
'''


def test_process_in_nested_cgroup_is_tagged(net, tmp_path):
    port = 7411
    with harness.tcp_echo_server(net, port) as server:
        r, docs = run_episode(tmp_path, "ep-nested", net.sandbox_prefix() + [PYTHON, "-c", NESTED, HOST_IP, port])
        assert r.returncode == 0, r.stderr
        server.wait_received(b"nested")
    pid = printed_pid(r.stdout)
    cgroup = printed(r.stdout, "cgroup")
    assert cgroup.endswith("/nested"), cgroup
    assert_contract(docs)
    conn = select(docs, CONNECTION_ACTIONS, port=port)
    assert {get(d, "event.action") for d in conn} == set(CONNECTION_ACTIONS), dump(docs)
    for d in conn:
        assert get(d, "labels.episode_id") == "ep-nested", d
        assert get(d, "eptrace.cgroup.path") == cgroup, d
        assert get(d, "process.pid") == pid, d


# ---- 3. io_uring ------------------------------------------------------------------------------------------

def test_io_uring_connect_reported(net, tmp_path, uring_helper):
    port = 7520
    # The shell prints its pid, then execs nsenter, which execs the helper: one pid all along.
    argv = ["/bin/sh", "-c", 'echo pid $$; exec "$@"', "sh", *net.sandbox_prefix(), uring_helper, HOST_IP, port,
            "via-io-uring"]
    with harness.tcp_echo_server(net, port) as server:
        r, docs = run_episode(tmp_path, "ep-uring", argv)
        assert r.returncode == 0, r.stderr
        assert "connect=0" in r.stdout, r.stdout
        assert server.wait_received(b"via-io-uring")[0] == SANDBOX_IP
    pid = printed_pid(r.stdout)
    assert_contract(docs)
    started = select(docs, "process_started", pid=pid, process__executable=str(uring_helper))
    assert started, dump(docs)
    conn = select(docs, CONNECTION_ACTIONS, port=port)
    for action in CONNECTION_ACTIONS:
        d = one(select(conn, action), action, docs)
        assert_sandbox_doc(d, "ep-uring")
        assert get(d, "process.pid") == pid, d
        assert get(d, "process.name") == "uring_connect", d
        assert (get(d, "destination.ip"), get(d, "destination.port")) == (HOST_IP, port), d
        assert get(d, "network.transport") == "tcp", d
    attempted = one(select(conn, "connection_attempted"), "connection_attempted")
    assert get(attempted, "event.outcome") == "success", attempted     # the handshake completed
    ended = one(select(conn, "flow_ended"), "flow_ended")
    assert get(ended, "source.bytes") == len(b"via-io-uring"), ended


# ---- 4. argv ----------------------------------------------------------------------------------------------

def test_process_started_carries_real_argv(tmp_path):
    script = 'exec /usr/bin/env true "two words" --flag=x'
    r, docs = run_episode(tmp_path, "ep-argv", ["/bin/sh", "-c", script])
    assert r.returncode == 0, r.stderr
    assert_contract(docs)
    started = select(docs, "process_started")
    assert len({get(d, "process.pid") for d in started}) == 1, dump(started)   # exec, exec, exec: one pid
    # The path as exec'd (/bin is a link to /usr/bin on merged-/usr systems): compare the files.
    got = [(os.path.realpath(get(d, "process.executable") or "?"), get(d, "process.args")) for d in started]
    assert got == [
        (os.path.realpath("/bin/sh"), ["/bin/sh", "-c", script]),
        ("/usr/bin/env", ["/usr/bin/env", "true", "two words", "--flag=x"]),
        ("/usr/bin/true", ["/usr/bin/true", "two words", "--flag=x"]),    # ECS: args[0] is the executable
    ], got
    assert get(started[2], "process.title") == "true two words --flag=x"      # argv as the process got it
    for d in started:
        assert_sandbox_doc(d, "ep-argv")
        assert get(d, "process.args_count") == len(get(d, "process.args")), d
    names = [get(d, "process.name") for d in started]
    assert names == ["sh", "env", "true"], names


# ---- 5. processes outside every episode -------------------------------------------------------------------

# The episode: connect to A, print "first", wait for the test's go-file, connect to A again.
EPISODE_WORKLOAD = r'''
import os, socket, sys, time
host, port, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
print("pid", os.getpid(), flush=True)
def hit(tag):
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(tag)
        s.recv(100)
hit(b"episode-first")
print("first", flush=True)
deadline = time.monotonic() + 60
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.05)
hit(b"episode-second")
print("second", flush=True)
'''

OUTSIDER = r'''
import os, socket, sys
print("pid", os.getpid(), flush=True)
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as s:
    s.sendall(b"outsider")
    s.recv(100)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.sendto(b"outsider-udp", (sys.argv[1], int(sys.argv[2])))
u.close()
'''


def test_process_outside_every_episode_is_silent(net, tmp_path):
    episode_port, outside_port = 7601, 7602
    events, go = tmp_path / "ep-inside.ndjson", tmp_path / "go"
    with harness.tcp_echo_server(net, episode_port), harness.tcp_echo_server(net, outside_port) as outside_server:
        proc = start_eptrace("run", "--episode", "ep-inside", "--output", f"file:{events}", "--",
                             *net.sandbox_prefix(), PYTHON, "-u", "-c", EPISODE_WORKLOAD, HOST_IP, episode_port, go,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = LineReader(proc.stdout), LineReader(proc.stderr)
            out.wait_for(lambda lines: "first\n" in lines, 60, "episode workload")
            # The probes are live: the episode's first connection has been reported.
            wait_for_docs(events, lambda docs: select(docs, "connection_established", port=episode_port), 15,
                          "the episode's first connection")
            # Same sandbox namespace, same peer host, but the test's own cgroup: not an episode.
            outsider = net.run_in_sandbox([PYTHON, "-u", "-c", OUTSIDER, HOST_IP, outside_port],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            o_out, o_err = outsider.communicate(timeout=20)
            assert outsider.returncode == 0, o_err
            outside_server.wait_received(b"outsider")
            outsider_pid = printed_pid(o_out)
            go.touch()
            assert proc.wait(timeout=60) == 0, err.text()
        finally:
            kill(proc)
    docs = read_docs(events)
    assert_contract(docs)
    episode_pid = printed_pid(out.text())
    # Both of the episode's connections are there, so the tracer was watching before and after the outsider.
    established = select(docs, "connection_established", port=episode_port, pid=episode_pid, episode="ep-inside")
    assert len(established) == 2, dump(docs)
    leaked = [d for d in docs if mentions_port(d, outside_port) or get(d, "process.pid") == outsider_pid
              or get(d, "process.parent.pid") == outsider_pid]
    assert not leaked, dump(leaked)
    stats = get(final_metric(docs), "eptrace.stats")
    assert stats["records_without_episode"] == 0, stats


# ---- 6. first bytes name the protocol: network.protocol ------------------------------------------------

# A TLS ClientHello with SNI (the server answers garbage: the handshake fails, the hello went out), an HTTP
# GET, and a DNS query for a name, one after the other from one process.
PROTOCOL_CLIENT = r'''
import os, socket, ssl, struct, sys, urllib.request
host, tls_port, http_port, dns_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print("pid", os.getpid(), flush=True)
ctx = ssl.create_default_context()
with socket.create_connection((host, tls_port), timeout=10) as raw:
    try:
        ctx.wrap_socket(raw, server_hostname="sni.example.test")
    except (ssl.SSLError, OSError):
        pass
urllib.request.urlopen(f"http://{host}:{http_port}/", timeout=10).read()
q = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + b"\x03www\x07example\x04test\x00" + struct.pack("!HH", 1, 1)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(5)
u.sendto(q, (host, dns_port))
u.recvfrom(512)
u.close()
print("done", flush=True)
'''


@pytest.mark.parametrize("schema", ["ecs", "ocsf"])
def test_first_bytes_name_the_protocol_in_the_flow_documents(net, tmp_path, schema):
    """network.protocol on the real flows' documents: ssh, tls (with tls.client.server_name), http, and dns
    (with dns.question.name); under --schema ocsf, app_protocol_name (SNI and question in unmapped)."""
    tls_port, http_port, dns_port = 8443, 8080, 53
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "index.html").write_text("hello")
    events = tmp_path / "ep-proto.ndjson"
    with harness.sshd(net) as sshd, harness.http_server(net, http_port, tmp_path / "www"), \
            harness.tcp_echo_server(net, tls_port, reply=b"not tls\n"), harness.udp_echo_server(net, dns_port):
        script = " && ".join([" ".join(f"'{a}'" for a in sshd.ssh_argv("true")),
                              f"{PYTHON} -c \"$CLIENT\" {HOST_IP} {tls_port} {http_port} {dns_port}"])
        argv = net.sandbox_prefix() + ["/usr/bin/env", f"CLIENT={PROTOCOL_CLIENT}", "/bin/sh", "-c", script]
        r = run_eptrace("run", "--schema", schema, "--episode", "ep-proto", "--output", f"file:{events}",
                        "--", *argv)
        assert r.returncode == 0, r.stderr + r.stdout
    docs = read_docs(events)

    if schema == "ocsf":
        closed = [d for d in docs if d.get("class_uid") == 4001 and d.get("activity_id") == 2]
        by_port = {get(d, "dst_endpoint.port"): d for d in closed}
        assert {p: get(by_port.get(p, {}), "app_protocol_name") for p in (sshd.port, tls_port, http_port,
                                                                            dns_port)} == \
            {sshd.port: "ssh", tls_port: "tls", http_port: "http", dns_port: "dns"}, dump(docs)
        assert get(by_port[tls_port], "unmapped.tls.client.server_name") == "sni.example.test"
        assert get(by_port[dns_port], "unmapped.dns.question.name") == "www.example.test"
        return
    assert_contract(docs)

    def ended(port, transport="tcp"):
        flows = [d for d in select(docs, "flow_ended") if get(d, "destination.port") == port
                 and get(d, "network.transport") == transport]
        return one(flows, f"{transport} flow_ended to port {port}", docs)

    assert get(ended(sshd.port), "network.protocol") == "ssh", dump(docs)
    tls = ended(tls_port)
    assert get(tls, "network.protocol") == "tls" and get(tls, "tls.client.server_name") == "sni.example.test", tls
    assert get(ended(http_port), "network.protocol") == "http"
    dns = ended(dns_port, "udp")
    assert get(dns, "network.protocol") == "dns" and get(dns, "dns.question.name") == "www.example.test", dns

"""Test harness for kernel tests: the test network (tracer.testbed), peers, episode cgroups, the
io_uring helper.

Network safety: sandbox workloads run in a namespace whose only link is a veth to a "test host"
namespace. Neither namespace has a link to the root namespace, so nothing can leave the machine.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tracer.kernel import cgroups
from tracer.testbed import (HOST_IP, HOST_IP6, METADATA_IP, METADATA_IP6, PYTHON, SANDBOX_IP,  # noqa: F401
                            SANDBOX_IP6, TestNetwork, _claim, _cleanups, _owned_by_live_session, _release,
                            cleanup_stale_namespaces)

CGROUP_PARENT = "eptrace-test"
HELPERS_DIR = Path(__file__).parent / "helpers"


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

class Peer:
    """A process started in the test host namespace; its output is collected line by line."""

    def __init__(self, proc: subprocess.Popen, what: str) -> None:
        self.proc, self.what = proc, what
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(pipe, lines), daemon=True)
                         for pipe, lines in ((proc.stdout, self.stdout), (proc.stderr, self.stderr)) if pipe]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(pipe, lines: list[str]) -> None:
        for line in pipe:
            lines.append(line)

    def received(self) -> list[tuple[str, int, bytes]]:
        """What the echo servers logged: (peer ip, peer port, bytes) per chunk."""
        out = []
        for line in list(self.stdout):
            parts = line.split()
            if len(parts) == 4 and parts[0] == "recv":
                out.append((parts[1], int(parts[2]), bytes.fromhex(parts[3])))
        return out

    def wait_received(self, data: bytes, timeout: float = 5.0) -> tuple[str, int, bytes]:
        """The first logged chunk containing data; fails after timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for item in self.received():
                if data in item[2]:
                    return item
            time.sleep(0.02)
        raise AssertionError(f"{self.what} did not receive {data!r}; got {self.received()}")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        for t in self._readers:
            t.join(timeout=2)


@contextlib.contextmanager
def _peer(net: TestNetwork, argv: list, what: str, ready, timeout: float = 10.0):
    """Start argv in the host namespace; yield a Peer once ready(peer) is true; kill it at exit."""
    peer = Peer(net.run_in_host(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), what)
    try:
        deadline = time.monotonic() + timeout
        while not ready(peer):
            rc = peer.proc.poll()
            if rc is not None or time.monotonic() > deadline:
                peer.stop()
                state = f"exited with {rc}" if rc is not None else f"not ready after {timeout}s"
                raise RuntimeError(f"{what} {state}; stderr:\n{''.join(peer.stderr)}")
            time.sleep(0.05)
        yield peer
    finally:
        peer.stop()


def _tcp_ready(net: TestNetwork, ip: str, port: int, banner: str | None = None):
    """Ready when (ip, port) accepts a TCP connect from the host namespace and, if given, the process
    printed banner: without it, another listener on a taken port would pass for this server."""
    return lambda peer: ((banner is None or banner in "".join(peer.stdout + peer.stderr))
                         and net.can_connect("host", ip, port))


def python_server(net: TestNetwork, code: str, port: int, host: str = HOST_IP, args=(),
                  banner: str | None = None):
    """Run `python3 -c code *args` in the host namespace; ready once (host, port) accepts TCP (and the
    code printed banner, if given)."""
    return _peer(net, [PYTHON, "-u", "-c", code, *args], f"python server on {host}:{port}",
                 _tcp_ready(net, host, port, banner))


# Logs every chunk as "recv IP PORT HEX"; answers REPLY, or echoes the chunk when REPLY is empty.
_TCP_SERVER = r'''
import socket, sys, threading
host, port, reply = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
def serve(conn, addr):
    with conn:
        while data := conn.recv(65536):
            print("recv", addr[0], addr[1], data.hex(), flush=True)
            conn.sendall(reply or data)
family = socket.AF_INET6 if ":" in host else socket.AF_INET
server = socket.create_server((host, port), family=family, backlog=64)
print("listening", flush=True)
while True:
    conn, addr = server.accept()
    threading.Thread(target=serve, args=(conn, addr), daemon=True).start()
'''

_UDP_SERVER = r'''
import socket, sys
host, port, reply = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((host, port))
print("ready", flush=True)
while True:
    data, addr = s.recvfrom(65536)
    print("recv", addr[0], addr[1], data.hex(), flush=True)
    s.sendto(reply or data, addr)
'''


def tcp_echo_server(net: TestNetwork, port: int, host: str = HOST_IP, reply: bytes = b""):
    """TCP server in the host namespace: echoes each chunk (or answers `reply`); Peer.received() lists them."""
    return python_server(net, _TCP_SERVER, port, host, args=(host, port, reply.hex()), banner="listening\n")


def udp_echo_server(net: TestNetwork, port: int, host: str = HOST_IP, reply: bytes = b""):
    """UDP server (DNS-like queries): echoes each datagram (or answers `reply`)."""
    return _peer(net, [PYTHON, "-u", "-c", _UDP_SERVER, host, port, reply.hex()],
                 f"udp server on {host}:{port}", lambda peer: "ready\n" in peer.stdout)


@dataclass
class HttpServer:
    port: int
    root: Path
    peers: list[Peer] = field(default_factory=list)

    def log(self) -> str:
        """http.server's request log (it writes to stderr)."""
        return "".join(line for p in self.peers for line in p.stderr)


@contextlib.contextmanager
def http_server(net: TestNetwork, port: int, root_dir, metadata: bool = False):
    """python3 -m http.server on 198.51.100.1:port, and on 169.254.169.254:port too if metadata."""
    server = HttpServer(port, Path(root_dir))
    with contextlib.ExitStack() as stack:
        for ip in [HOST_IP] + ([METADATA_IP] if metadata else []):
            argv = [PYTHON, "-u", "-m", "http.server", "--bind", ip, "--directory", root_dir, port]
            server.peers.append(stack.enter_context(
                _peer(net, argv, f"http.server on {ip}:{port}", _tcp_ready(net, ip, port, "Serving HTTP"))))
        yield server


@dataclass
class Sshd:
    port: int
    client_key: Path
    peer: Peer

    def ssh_argv(self, *extra) -> list[str]:
        return ["ssh", "-F", "/dev/null", "-i", str(self.client_key), "-o", "IdentitiesOnly=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-p", str(self.port),
                f"root@{HOST_IP}", *map(str, extra)]


@contextlib.contextmanager
def sshd(net: TestNetwork, port: int = 2222):
    """A real OpenSSH sshd in the host namespace with its own keys and config (not the system service)."""
    if not Path("/usr/sbin/sshd").exists():
        raise RuntimeError("/usr/sbin/sshd missing: apt-get install -y openssh-server")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir sshd insists on
    with tempfile.TemporaryDirectory(prefix="ept-sshd-") as tmp:
        tmp = Path(tmp)
        for key in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", tmp / key], check=True)
        (tmp / "authorized_keys").write_text((tmp / "client_key.pub").read_text())
        (tmp / "sshd_config").write_text(f"""\
Port {port}
ListenAddress {HOST_IP}
HostKey {tmp / "host_key"}
PidFile {tmp / "sshd.pid"}
AuthorizedKeysFile {tmp / "authorized_keys"}
UsePAM no
StrictModes no
PermitRootLogin yes
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AllowTcpForwarding yes
GatewayPorts no
""")
        argv = ["/usr/sbin/sshd", "-D", "-e", "-f", tmp / "sshd_config"]
        with _peer(net, argv, f"sshd on {HOST_IP}:{port}", _tcp_ready(net, HOST_IP, port, "Server listening")) as peer:
            yield Sshd(port, tmp / "client_key", peer)


# ---- io_uring helper ----------------------------------------------------------------------------------

_uring_helper: Path | None = None


def build_uring_helper(tmpdir) -> Path:
    """Compile helpers/uring_connect.c (once per session). Raises RuntimeError with the reason if it can't."""
    global _uring_helper
    disabled = Path("/proc/sys/kernel/io_uring_disabled")
    if disabled.exists() and disabled.read_text().strip() == "2":
        raise RuntimeError("io_uring is disabled (kernel.io_uring_disabled=2): "
                           "sysctl -w kernel.io_uring_disabled=0")
    if _uring_helper is None or not _uring_helper.exists():
        out = Path(tmpdir) / "uring_connect"
        cmd = ["gcc", "-O2", "-Wall", "-o", str(out), str(HELPERS_DIR / "uring_connect.c"), "-luring"]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        except FileNotFoundError:
            raise RuntimeError("gcc missing: apt-get install -y gcc liburing-dev") from None
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"cannot build the io_uring helper (apt-get install -y liburing-dev?):\n"
                               f"{e.stderr}") from None
        _uring_helper = out
    return _uring_helper


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

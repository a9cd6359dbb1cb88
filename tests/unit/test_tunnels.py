"""The tunnel score and relay correlation on fakes: no kernel, no capture (tracer/detect/tunnels.py)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from tracer.config import Config, ReverseTunnel
from tracer.detect import Context
from tracer.detect.tunnels import FlowFacts, Tunnels, score, sizes_match
from tracer.events import Burst, Endpoint, Episode, Process

EPISODE = Episode("ep", "/eptrace/ep", 1)
RELAY, CURL = Process(pid=10, name="worker.py"), Process(pid=20, name="curl")
OUTSIDE, SANDBOX = Endpoint("198.51.100.1", 7443), Endpoint("198.51.100.2", 40000)
MS = 1_000_000


@dataclass
class FakeFlow:
    """A FlowView: what the detectors read of a flow."""
    cookie: int
    start_ns: int
    remote: Endpoint
    local: Endpoint
    process: Process
    initiated: bool = True
    transport: str = "tcp"
    episode: Episode = field(default_factory=lambda: EPISODE)
    sightings: list = field(default_factory=list)
    latest: object = None

    @property
    def is_local(self) -> bool:
        return self.remote.ip.startswith("127.")

    def saw(self, protocol: str, **details) -> bool:
        return False


@dataclass
class FakeFlows:
    flows: dict = field(default_factory=dict)
    outbound_by_pid: dict = field(default_factory=dict)

    def wall_ns(self, mono_ns: int) -> int:
        return mono_ns

    def local_flows_since(self, pid: int, since_ns: int) -> int:
        return 0


class Relay:
    """Drives the detector with bursts, as the flow table would."""

    def __init__(self, config: Config | None = None):
        self.flows = FakeFlows()
        self.ctx = Context(config or Config(), parent_of=lambda p: None, flows=self.flows)
        self.detector = Tunnels()
        self.findings = []

    def flow(self, cookie: int, at_ms: float, remote: Endpoint, process: Process, initiated: bool = True) -> FakeFlow:
        local = Endpoint("127.0.0.1", 50000 + cookie) if remote.ip.startswith("127.") else SANDBOX
        flow = self.flows.flows[cookie] = FakeFlow(cookie, int(at_ms * MS), remote, local, process, initiated)
        return flow

    def burst(self, flow: FakeFlow, at_ms: float, egress: bool, size: int) -> None:
        src, dst = (flow.local, flow.remote) if egress else (flow.remote, flow.local)
        event = Burst(int(at_ms * MS), EPISODE, 1, "/eptrace/ep", flow.process, flow.cookie, flow.transport, egress,
                      size, src, dst)
        self.findings += list(self.detector(event, self.ctx))


def relayed_use(r: Relay, outside: FakeFlow, cookie: int, at_ms: float, request: int = 19, answer: int = 26,
                framing: int = 0, delay_ms: float = 1.0) -> None:
    """The remote sends a request; the relay connects locally, passes it on, and sends the answer back."""
    r.burst(outside, at_ms, egress=False, size=request + framing)
    local = r.flow(cookie, at_ms + delay_ms, Endpoint("127.0.0.1", 8000), RELAY)
    r.burst(local, at_ms + delay_ms, egress=True, size=request)
    r.burst(local, at_ms + 2 * delay_ms, egress=False, size=answer)
    r.burst(outside, at_ms + 3 * delay_ms, egress=True, size=answer + framing)


def test_two_mirrored_exchanges_alert_at_the_second_with_the_evidence():
    r = Relay()
    outside = r.flow(1, 0, OUTSIDE, RELAY)
    relayed_use(r, outside, 2, 1000)
    assert r.findings == []           # one exchange: 35 points, below 70
    relayed_use(r, outside, 3, 3000, framing=22)       # TLS: a record adds 22 bytes
    assert len(r.findings) == 1
    finding = r.findings[0]
    assert finding.rule.name == "reverse_tunnel" and finding.key == ("pid", RELAY.pid)
    assert "2 exchanges started by the remote were mirrored" in finding.message
    assert "127.0.0.1:8000" in finding.message and "198.51.100.1:7443/tcp" in finding.message
    assert [e.cookie for e in finding.evidence] == [1, 3]
    assert finding.evidence[0].timestamp_ns == 3003 * MS       # the second answer going out


def test_a_forward_proxy_never_counts():
    """The local client connects and speaks first; the proxy connects out after it, again and again."""
    r = Relay()
    for i in range(5):
        t = 1000 + i * 100
        client = r.flow(100 + i, t, Endpoint("127.0.0.1", 3128), CURL)
        accepted = r.flow(200 + i, t, Endpoint("127.0.0.1", 50000), RELAY, initiated=False)
        r.burst(client, t + 1, egress=True, size=80)
        r.burst(accepted, t + 1, egress=False, size=80)
        upstream = r.flow(300 + i, t + 2, OUTSIDE, RELAY)
        r.burst(upstream, t + 3, egress=True, size=80)
        r.burst(upstream, t + 10, egress=False, size=500)
        r.burst(accepted, t + 11, egress=True, size=500)
        r.burst(client, t + 11, egress=False, size=500)
    assert r.findings == []
    assert all(not p.reverse for p in r.detector.relays["ep"].pairs.values())


def test_bursts_further_apart_than_mirror_ms_are_not_mirrored():
    r = Relay()
    outside = r.flow(1, 0, OUTSIDE, RELAY)
    relayed_use(r, outside, 2, 1000, delay_ms=250)
    relayed_use(r, outside, 3, 3000, delay_ms=250)
    assert r.findings == []
    slow = Relay(dataclasses.replace(Config(), reverse_tunnel=ReverseTunnel(mirror_ms=1000)))
    outside = slow.flow(1, 0, OUTSIDE, RELAY)
    relayed_use(slow, outside, 2, 1000, delay_ms=250)
    relayed_use(slow, outside, 3, 3000, delay_ms=250)
    assert len(slow.findings) == 1


def test_sizes_match_within_the_framing_of_a_tunnel():
    cfg = ReverseTunnel()
    assert sizes_match(26, 26, cfg) and sizes_match(26 + 22, 26, cfg) and sizes_match(26 + 54, 26, cfg)
    assert not sizes_match(26 + 400, 26, cfg)          # a different message
    assert not sizes_match(100, 140, cfg)              # the outside lost 40 bytes: rewritten, not relayed
    assert sizes_match(1448, 65483, cfg)               # first packets cut to segments on both sides


def test_score_weights_come_from_the_config():
    facts = FlowFacts(age_s=700, remote_port=2222, ssh=True, program="python3", mirrored_exchanges=1)
    cfg = ReverseTunnel()
    signals = score(facts, cfg, long_flow_s=600)
    assert sum(p for p, _ in signals) == 30 + 15 + 15 + 35
    assert any("1 exchange(s) mirrored" in why for _, why in signals)
    heavier = dataclasses.replace(cfg, long_flow_points=50, mirrored_exchange_points=1)
    assert sum(p for p, _ in score(facts, heavier, long_flow_s=600)) == 50 + 15 + 15 + 1
    # the plain local relay is the weak form of a mirrored exchange: the two never add up
    both = dataclasses.replace(facts, local_relays=3)
    assert sum(p for p, _ in score(both, cfg, 600)) == sum(p for p, _ in signals)
    assert sum(p for p, _ in score(dataclasses.replace(both, mirrored_exchanges=0), cfg, 600)) == 30 + 15 + 15 + 30


def test_score_of_a_quiet_flow_is_empty():
    assert score(FlowFacts(age_s=5, remote_port=443, first_out_protocol="tls"), ReverseTunnel(), 600) == []


def test_reverse_tunnel_keys_load_from_the_config(tmp_path):
    from tracer import config as config_module
    path = tmp_path / "c.toml"
    path.write_text("[reverse_tunnel]\nmirror_ms = 50\nexchanges_to_alert = 3\nlong_flow_points = 40\n")
    cfg = config_module.load(path).reverse_tunnel
    assert (cfg.mirror_ms, cfg.exchanges_to_alert, cfg.long_flow_points, cfg.alert_score) == (50.0, 3, 40, 70)
    path.write_text("[reverse_tunnel]\nmirror_millis = 50\n")
    try:
        config_module.load(path)
    except config_module.ConfigError as e:
        assert "reverse_tunnel.mirror_millis" in str(e)
    else:
        raise AssertionError("an unknown key was accepted")

"""dns_tunnel and icmp_tunnel without the kernel: label scoring, the information estimate, and the captured
scenarios of tests/kernel/test_detection_dns_icmp.py replayed (tests/fixtures/dns_*, icmp_*, ping.capture);
per-rule allowlists."""
from __future__ import annotations

import base64
import random
from pathlib import Path

import pytest

from tracer import config as config_module
from tracer.config import ConfigError
from tracer.detect.dns import Window, randomness

from test_replay import alerts as replay_alerts

READABLE = ["numpy", "scikit-learn", "requests", "docs", "opencv-python", "pytorch-lightning", "sphinx",
            "beautifulsoup", "charset-normalizer", "huggingface", "transformers", "prometheus-client", "api",
            "www", "mail", "static", "login", "download", "mirrors", "packages"]


def random_labels(n: int, alphabet: str, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(40, 50))) for _ in range(n)]


BASE32 = random_labels(150, "abcdefghijklmnopqrstuvwxyz234567")
HEX = random_labels(150, "0123456789abcdef", seed=2)


def alerts(capture: str, config_text: str | None = None, tmp_path: Path | None = None) -> list[dict]:
    config = None
    if config_text is not None:
        path = tmp_path / "eptrace.toml"
        path.write_text(config_text)
        config = config_module.load(path)
    return replay_alerts(capture, config)


def rules(docs: list[dict]) -> list[str]:
    return sorted(d["rule"]["name"] for d in docs)


# ---- label scoring ------------------------------------------------------------------------------------------

def test_random_labels_look_random():
    for label in BASE32 + HEX + [base64.b32encode(bytes(range(30))).decode()]:
        assert randomness(label) >= 0.6, label
    assert sum(map(randomness, BASE32)) / len(BASE32) > 0.9


def test_readable_names_look_readable():
    scores = {name: randomness(name) for name in READABLE}
    assert all(score <= 0.34 for score in scores.values()), scores
    assert sum(scores.values()) / len(scores) < 0.1, scores


def test_random_labels_carry_far_more_information_than_readable_names():
    def information(names):
        window = Window(0)
        for name in names:
            window.add(name, readable_weight=0.1)
        return window.information
    tunnel = information(BASE32)
    crawler = information([f"{a}-{b}" for a in READABLE for b in READABLE if a != b][:250])
    assert tunnel > 10 * crawler, (tunnel, crawler)
    assert tunnel > 2000 > crawler      # the default [dns] information_bytes sits between them


def test_a_repeated_name_adds_nothing():
    window = Window(0)
    assert window.add(BASE32[0], 0.1) and not window.add(BASE32[0], 0.1)
    assert len(window.names) == 1


# ---- replayed scenarios -------------------------------------------------------------------------------------

def test_random_label_dns_tunnel_alerts():
    # 150 unique random base32 labels of 40-50 characters under exfil-test.example, 20 queries a second
    docs = alerts("dns_tunnel.capture")
    assert rules(docs) == ["dns_tunnel"]
    assert "exfil-test.example" in docs[0]["message"] and "bytes of information" in docs[0]["message"]
    # the query is the evidence: the DNS server it went to, and the flow's Community ID
    assert docs[0]["destination"] == {"ip": "198.51.100.1", "port": 53} and docs[0]["network"]["community_id"]


def test_crawler_of_readable_names_is_silent_yet_counted(tmp_path):
    # 250 readable project names under readthedocs.example: silent by default, seen (a low budget alerts)
    assert alerts("dns_crawler.capture") == []
    low = alerts("dns_crawler.capture", "[dns]\ninformation_bytes = 100\n", tmp_path)
    assert rules(low) == ["dns_tunnel"] and "readthedocs.example" in low[0]["message"]


def test_the_window_runs_on_event_time(tmp_path):
    # the whole tunnel took 7.5 s: a 1-second window never holds enough of it, however fast the replay
    assert alerts("dns_tunnel.capture", "[dns]\nwindow_seconds = 1\n", tmp_path) == []
    def seen(docs):
        return [(d["@timestamp"], d["rule"]["name"], d["message"]) for d in docs]
    assert seen(alerts("dns_tunnel.capture")) == seen(alerts("dns_tunnel.capture"))


@pytest.mark.parametrize("capture, socket_kind, host, others", [
    ("icmp_ping_socket.capture", "ping socket", "198.51.100.1", []),
    ("icmp_ping6_socket.capture", "ping socket", "2001:db8::1", []),
    ("icmp_raw_socket.capture", "raw socket", "198.51.100.1", ["raw_socket"])])
def test_file_in_echo_payloads_alerts(capture, socket_kind, host, others):
    # 20 kB of random data in 1,000-byte echo payloads to the test host: alerted at the 5th (4096 bytes)
    docs = alerts(capture)
    assert rules(docs) == sorted(["icmp_tunnel", *others])
    icmp = next(d for d in docs if d["rule"]["name"] == "icmp_tunnel")
    assert socket_kind in icmp["message"] and icmp["destination"]["ip"] == host
    assert "sent 5 ICMP echo requests carrying data (5000 payload bytes" in icmp["message"]
    assert icmp["rule"]["id"] == "EPT-0006" and icmp["threat"]["technique"]["id"] == ["T1095"]


def test_data_in_ping_sized_echoes_alerts_by_count(tmp_path):
    # 56-byte echoes, 16 bytes of data where ping keeps its send time: 16 changed payloads raise it
    assert "16 ICMP echo requests carrying data (896" in alerts("icmp_ping_sized.capture")[0]["message"]
    assert alerts("icmp_ping_sized.capture", "[icmp]\ndata_echoes = 100\n", tmp_path) == []


def test_ordinary_ping_is_silent_yet_seen(tmp_path):
    # `ping -c 5`, then `ping -s 1000 -c 5`: the large one's first echo counts as data (1000 bytes), no more
    assert alerts("ping.capture") == []
    low = alerts("ping.capture", "[icmp]\ndata_bytes = 900\n", tmp_path)
    assert rules(low) == ["icmp_tunnel"] and "1 ICMP echo requests carrying data (1000 payload bytes" \
        in low[0]["message"]


# ---- per-rule allowlists ------------------------------------------------------------------------------------

def test_a_rule_allowlist_excepts_only_its_rule(tmp_path):
    own = '[allowlist.rules.dns_tunnel]\ndomains = ["exfil-test.example"]\n'
    assert alerts("dns_tunnel.capture", own, tmp_path) == []
    other = '[allowlist.rules.icmp_tunnel]\ndomains = ["exfil-test.example"]\n'
    assert rules(alerts("dns_tunnel.capture", other, tmp_path)) == ["dns_tunnel"]


def test_a_rule_allowlist_by_destination_leaves_other_rules(tmp_path):
    text = '[allowlist.rules.icmp_tunnel]\ncidrs = ["198.51.100.0/24"]\n'
    assert rules(alerts("icmp_raw_socket.capture", text, tmp_path)) == ["raw_socket"]
    text = '[allowlist.rules.raw_socket]\nexecutables = ["/usr/bin/python3"]\n'
    assert rules(alerts("icmp_raw_socket.capture", text, tmp_path)) == ["icmp_tunnel"]


def test_the_global_allowlist_still_covers_every_rule(tmp_path):
    assert alerts("icmp_raw_socket.capture", '[allowlist]\nexecutables = ["/usr/bin/python3"]\n', tmp_path) == []


@pytest.mark.parametrize("text, words", [
    ("[allowlist.rules.dns_tunel]\n", "unknown rule allowlist.rules.dns_tunel"),
    ("[allowlist.rules.dns_tunnel]\nhosts = []\n", "unknown config key allowlist.rules.dns_tunnel.hosts"),
    ("[allowlist.rules.icmp_tunnel]\ncidrs = [\"x\"]\n", "not an IP address or CIDR"),
    ("[allowlist]\nrules = 3\n", "allowlist.rules must be a table"),
    ("[dns]\nreadable_weight = 1.5\n", "dns.readable_weight must be at most 1"),
    ("[dns]\nunique_subdomains = 200\n", "unknown config key dns.unique_subdomains"),
    ("[icmp]\ndata_echoes = 0\n", "icmp.data_echoes must be between 1 and"),
])
def test_bad_rule_settings_name_the_key(tmp_path, text, words):
    path = tmp_path / "eptrace.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        config_module.load(path)
    assert words in str(e.value) and "\n" not in str(e.value)


# ---- the detector on its own: data spread over domains, bounded tables ------------------------------------------

def lookups(names: list[str], episode: str = "ep", start_ns: int = 0, step_ns: int = 50_000_000) -> list:
    from tracer.events import Endpoint, Episode, PayloadSeen
    ep = Episode(episode, "/sys/fs/cgroup/x", 1)
    return [PayloadSeen(start_ns + i * step_ns, ep, 1, "/x", None, 7, "udp", True, Endpoint("198.51.100.2", 5353),
                        Endpoint("198.51.100.1", 53), b"", "dns", {"qname": name}) for i, name in enumerate(names)]


def findings(detector, events) -> list:
    from tracer.config import Config
    from tracer.detect import Context
    context = Context(Config(), parent_of=lambda p: None)
    return [f for event in events for f in detector(event, context)]


def test_data_spread_over_domains_adds_up_per_episode():
    from tracer.detect.dns import DnsTunnel
    # 400 random labels over 10 domains: each domain stays under its 2000 bytes, the episode passes 8000
    labels = random_labels(400, "abcdefghijklmnopqrstuvwxyz234567")
    found = findings(DnsTunnel(), lookups([f"{label}.d{i % 10}.example" for i, label in enumerate(labels)]))
    assert {f.key for f in found} == {("episode information",)}, found[0].message
    assert "under 10 domains" in found[0].message


def test_bounded_windows_count_what_they_forget(monkeypatch):
    from tracer.detect import dns
    monkeypatch.setattr(dns, "MAX_DOMAINS", 3)
    detector = dns.DnsTunnel()
    findings(detector, lookups([f"www.site{i}.example" for i in range(10)]))
    assert detector.evicted == 7 and len(detector._windows) == 3


def echoes(destinations: int, per_destination: int, size: int = 1000) -> list:
    """The reports the kernel sends for data echoes to several destinations, interleaved."""
    from tracer.events import Endpoint, Episode, IcmpEchoes
    ep = Episode("ep", "/sys/fs/cgroup/x", 1)
    return [IcmpEchoes(n * 1000 + d, ep, 1, "/x", None, 7, "icmp", "SOCK_DGRAM", Endpoint("198.51.100.2", 0),
                       Endpoint(f"198.51.100.{10 + d}", 0), 0, n, n, n * size, size)
            for n in range(1, per_destination + 1) for d in range(destinations)]


def test_icmp_data_spread_over_destinations_adds_up_per_episode():
    from tracer.detect.icmp import IcmpTunnel
    # 3 data echoes of 1000 bytes to each of 10 destinations: each under its 16 echoes and 4096 bytes
    found = findings(IcmpTunnel(), echoes(10, 3))
    assert {f.key for f in found} == {("episode",)}, found[0].message
    assert "17000 payload bytes in ICMP echo requests carrying data to 10 destinations" in found[0].message
    assert findings(IcmpTunnel(), echoes(5, 3)) == []


def test_registered_domains_and_their_names():
    from tracer.detect.dns import DnsTunnel, base_domain
    assert base_domain("www.bbc.co.uk") == "bbc.co.uk" and base_domain("a.b.example.com") == "example.com"
    assert base_domain("k7x2q9.abc.io") == "abc.io"      # not a registered domain of its own
    # random registered domains under one TLD add up too: their own label is what they say
    found = findings(DnsTunnel(), lookups([f"{label}.io" for label in BASE32]))
    assert {f.key for f in found} == {("information", "io")}

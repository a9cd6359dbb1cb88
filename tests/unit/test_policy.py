"""tracer/policy.py: the [policy] table, checked, and compiled so that one longest-prefix match decides."""
from __future__ import annotations

import ipaddress

import pytest

from tracer.config import ConfigError, load
from tracer.policy import POLICY_RULES, compile_rules, load_file, name_hash, parse, parse_entry


def decide(policy, ip: str, port: int, protocol: int) -> bool:
    """What the kernel does (probes/common.h policy_refuses): the longest prefix's rules, in order."""
    addr = ipaddress.ip_address(ip)
    rules = compile_rules(policy)
    best = max((p for p in rules if p.version == addr.version and addr in p), key=lambda p: p.prefixlen,
               default=None)
    for rule in rules.get(best, []):
        if rule.protocol and rule.protocol != protocol:
            continue
        if rule.port_hi and not rule.port_lo <= port <= rule.port_hi:
            continue
        return rule.deny
    return policy.default_deny


@pytest.mark.parametrize("text, lo, hi, proto, net", [
    ("198.51.100.0/24:443", 443, 443, 0, "198.51.100.0/24"),
    ("10.20.0.0/16", 0, 0, 0, "10.20.0.0/16"),
    ("53/udp", 53, 53, 17, None),
    ("8000-8080/tcp", 8000, 8080, 6, None),
    ("[2001:db8::1]:80-81/tcp", 80, 81, 6, "2001:db8::1/128"),
    ("2001:db8::/32", 0, 0, 0, "2001:db8::/32"),
    ("198.51.100.1", 0, 0, 0, "198.51.100.1/32"),
])
def test_entries(text, lo, hi, proto, net):
    e = parse_entry(text, "policy.allow")
    assert (e.port_lo, e.port_hi, e.protocol) == (lo, hi, proto)
    assert (str(e.network) if e.network else None) == net


@pytest.mark.parametrize("table, message", [
    ({"allowed": []}, "unknown key policy.allowed"),
    ({"allow": ["198.51.100.300/24"]}, "not an IP address"),
    ({"allow": ["198.51.100.1:0"]}, "ports must be 1-65535"),
    ({"allow": ["0"]}, "ports must be 1-65535"),
    ({"allow": ["9-8"]}, "low to high"),
    ({"deny": ["pypi.org"]}, "host names can only be allowed"),
    ({"allow": ["-bad_.x:99999"]}, "ports must be 1-65535"),
    ({"allow": ["exa mple.org"]}, "not an address, CIDR, host name or port"),
    ({"on_alert": "explode"}, "policy.on_alert must be one of"),
    ({"on_alert": {"reverse_tunel": "kill"}}, "unknown rule policy.on_alert.reverse_tunel"),
    ({"listen": "sometimes"}, "policy.listen"),
    ({"raw_sockets": "no"}, "true or false"),
    ({"default": "maybe"}, "policy.default"),
    ({"allow": [f"198.51.100.1:{port}" for port in range(1, POLICY_RULES + 2)]}, "at most"),
])
def test_bad_policies(table, message):
    with pytest.raises(ConfigError, match=message):
        parse(table)


def test_deny_wins_and_the_longest_prefix_carries_every_covering_rule():
    p = parse({"default": "deny", "allow": ["198.51.100.0/24:443", "53/udp", "198.51.100.0/24:9000"],
               "deny": ["198.51.100.9/32", "198.51.100.1:9000"]})
    assert not decide(p, "198.51.100.1", 443, 6)         # allowed by the /24
    assert decide(p, "198.51.100.1", 9000, 6)             # the deny on the /32 wins over the /24 allow
    assert not decide(p, "198.51.100.2", 9000, 6)
    assert decide(p, "198.51.100.9", 443, 6)              # denied whole
    assert not decide(p, "203.0.113.5", 53, 17) and decide(p, "203.0.113.5", 53, 6)
    assert decide(p, "2001:db8::1", 443, 6)               # default deny
    assert not decide(p, "2001:db8::1", 53, 17)           # a bare port covers IPv6 too
    assert p.describe(0) == "deny '198.51.100.9/32'" and p.describe(-1) == "default deny"


def test_on_alert_by_rule():
    p = parse({"on_alert": {"default": "freeze", "reverse_tunnel": "deny_network"}})
    assert p.action_for("reverse_tunnel") == "deny_network" and p.action_for("crypto_mining") == "freeze"
    assert parse({}).action_for("reverse_tunnel") == "none" and not parse({}).restricts


def test_policy_in_config_and_file(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[policy]\ndefault = "deny"\nallow = ["198.51.100.1:80"]\n')
    assert load(cfg).policy.default_deny
    f = tmp_path / "p.toml"
    f.write_text('[policy]\nraw_sockets = false\n[flows]\nlong_flow_seconds = 1.0\n')
    with pytest.raises(ConfigError, match="exactly one"):
        load_file(f)


@pytest.mark.parametrize("text, name, wildcard, lo, proto", [
    ("pypi.org", "pypi.org", False, 0, 0),
    ("*.PythonHosted.org:443", "pythonhosted.org", True, 443, 0),
    ("cafe.be:443/tcp", "cafe.be", False, 443, 6),      # hex letters and a colon, yet a name
])
def test_host_name_entries(text, name, wildcard, lo, proto):
    e = parse_entry(text, "policy.allow")
    assert (e.name, e.wildcard, e.port_lo, e.protocol, e.network) == (name, wildcard, lo, proto, None)
    assert compile_rules(parse({"allow": [text]})) == {}       # names go to the kernel through DNS answers


def test_name_hash_is_over_the_wire_format_lowercased():
    assert name_hash("Pypi.ORG") == name_hash("pypi.org") != name_hash("pypi.org.evil")
    # sum of byte * P^i over b"\x04pypi\x03org"
    wire, h, p = b"\x04pypi\x03org", 0, 1
    for byte in wire:
        h, p = (h + byte * p) % 2 ** 64, p * 0x100000001B3 % 2 ** 64
    assert name_hash("pypi.org") == h


def test_cut_is_an_action_and_refusals_name_their_reason():
    from tracer.policy import DENIED_CUT, DENIED_LISTEN
    policy = parse({"listen": "local", "on_alert": {"reverse_tunnel": "cut", "default": "kill"}})
    assert policy.action_for("reverse_tunnel") == "cut" and policy.action_for("crypto_mining") == "kill"
    assert policy.describe(DENIED_LISTEN) == "listen = 'local'"
    assert policy.describe(DENIED_CUT) == "cut (on_alert)"


def test_a_refused_inbound_connection_is_ingress_denied_once_per_source_and_listener():
    from tracer.config import Config
    from tracer.detect import Engine
    from tracer.events import Endpoint, Episode, NetworkEvent, Process

    engine = Engine(Config(), parent_of=lambda p: None)
    episode = Episode("ep", "/ep", 7)

    def refused(src: str, port: int) -> NetworkEvent:
        return NetworkEvent("connection_accepted", 1, episode, 7, "/ep", Process(42, "python3"), 9, "ipv4", "tcp",
                            "ingress", Endpoint(src, 40000), Endpoint("198.51.100.2", port), outcome="failure",
                            denied_by="listen = 'local'")

    fired = [a.rule.name for src, port in [("198.51.100.1", 7540), ("198.51.100.1", 7540), ("198.51.100.9", 7540),
                                           ("198.51.100.1", 7541)] for a in engine.observe(refused(src, port))]
    assert fired == ["ingress_denied"] * 3          # no inbound_listener: nothing was accepted

"""Community ID v1 against the spec's baseline vectors (corelight/community-id-spec)."""
import pytest

from tracer.schema.community_id import community_id

# (src_ip, src_port, dst_ip, dst_port, proto, seed) -> id; ICMP passes type/code as ports.
VECTORS = [
    (("128.232.110.120", 34855, "66.35.250.204", 80, 6, 0), "1:LQU9qZlK+B5F3KDmev6m5PMibrg="),
    (("128.232.110.120", 34855, "66.35.250.204", 80, 6, 1), "1:3V71V58M3Ksw/yuFALMcW0LAHvc="),
    (("8.8.8.8", 53, "192.168.1.52", 54585, 17, 0), "1:d/FP5EW3wiY1vCndhwleRRKHowQ="),
    (("192.168.1.52", 54585, "8.8.8.8", 53, 17, 1), "1:Q9We8WO3piVF8yEQBNJF4uiSVrI="),
    (("10.0.0.1", 10, "10.0.0.2", 20, 6, 0), "1:9j2Dzwrw7T9E+IZi4b4IVT66HBI="),
    (("2001:470:e5bf:dead:4957:2174:e82c:4887", 63943, "2607:f8b0:400c:c03::1a", 25, 6, 0),
     "1:/qFaeAR+gFe1KYjMzVDsMv+wgU4="),
    (("192.168.0.89", 8, "192.168.0.1", 0, 1, 0), "1:X0snYXpgwiv9TZtqg64sgzUn6Dk="),
    (("192.168.0.89", 8, "192.168.0.1", 0, 1, 1), "1:03g6IloqVBdcZlPyX8r0hgoE7kA="),
    (("fe80::200:86ff:fe05:80da", 135, "fe80::260:97ff:fe07:69ea", 0, 58, 0),
     "1:dGHyGvjMfljg6Bppwm3bg0LO8TY="),
]


@pytest.mark.parametrize("args,expected", VECTORS)
def test_spec_vectors(args, expected):
    src_ip, sport, dst_ip, dport, proto, seed = args
    assert community_id(src_ip, sport, dst_ip, dport, proto, seed=seed) == expected


@pytest.mark.parametrize("proto", [6, 17, 132])
@pytest.mark.parametrize("a,b", [
    (("198.51.100.2", 41234), ("198.51.100.1", 80)),
    (("198.51.100.1", 5000), ("198.51.100.1", 80)),            # same address: ports decide
    (("2001:db8::2", 443), ("2001:db8::1", 55000)),
])
def test_both_directions_give_the_same_id(proto, a, b):
    forward = community_id(a[0], a[1], b[0], b[1], proto)
    assert forward == community_id(b[0], b[1], a[0], a[1], proto)
    assert forward.startswith("1:") and len(forward) == 30


def test_icmp_request_and_reply_match():
    request = community_id("192.168.0.89", 8, "192.168.0.1", 0, 1)
    reply = community_id("192.168.0.1", 0, "192.168.0.89", 0, 1)
    assert request == reply == "1:X0snYXpgwiv9TZtqg64sgzUn6Dk="


def test_protocol_and_seed_change_the_id():
    tcp = community_id("198.51.100.2", 1000, "198.51.100.1", 80, 6)
    assert tcp != community_id("198.51.100.2", 1000, "198.51.100.1", 80, 17)
    assert tcp != community_id("198.51.100.2", 1000, "198.51.100.1", 80, 132)
    assert tcp != community_id("198.51.100.2", 1000, "198.51.100.1", 80, 6, seed=1)


def test_portless_protocol_ignores_ports_and_is_symmetric():
    gre = community_id("198.51.100.2", None, "198.51.100.1", None, 47)
    assert gre == community_id("198.51.100.1", None, "198.51.100.2", None, 47)
    assert gre == community_id("198.51.100.2", 1, "198.51.100.1", 2, 47)


@pytest.mark.parametrize("args", [
    ("198.51.100.2", 1, "2001:db8::1", 2, 6),   # mixed families
    ("not-an-ip", 1, "198.51.100.1", 2, 6),
    ("198.51.100.2", 70000, "198.51.100.1", 2, 6),
    ("198.51.100.2", 1, "198.51.100.1", 2, 256),
])
def test_bad_input_raises(args):
    with pytest.raises(ValueError):
        community_id(*args)

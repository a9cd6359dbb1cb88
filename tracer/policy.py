"""Containment policies: the [policy] table (of the config, or of a --policy file), checked and compiled
into the kernel's maps (probes/common.h: policies, policy4, policy6).

    [policy]
    default = "deny"                  # or "allow"
    allow = ["198.51.100.0/24:443", "10.20.0.0/16", "53/udp", "[2001:db8::1]:8000-8080/tcp"]
    deny = ["169.254.169.254/32"]     # deny entries win
    raw_sockets = false
    listen = "local"                  # "any" | "local" | "none"
    on_alert = "kill"                 # "none" | "deny_network" | "cut" | "kill" | "freeze", or a table by rule name

A bad policy is a ConfigError (one line, exit 2) before anything is traced.
"""
from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError
from .episode_names import ACTIONS
LISTEN = ("any", "local", "none")
KEYS = ("default", "allow", "deny", "raw_sockets", "listen", "on_alert")
PROTOCOLS = {"tcp": 6, "udp": 17}
# A denial's "entry" when no entry decided (records.h POLICY_DEFAULT, POLICY_CONTAINED, POLICY_LISTEN,
# POLICY_CUT; DENIED_RAW_SOCKET is ours)
DENIED_DEFAULT, DENIED_CONTAINED, DENIED_RAW_SOCKET, DENIED_LISTEN, DENIED_CUT = -1, -2, -3, -4, -5
POLICY_RULES = 16                   # rules per prefix in the kernel (POLICY_RULES in common.h)
# A bare port: "53", "53/udp", "8000-8080/tcp"; an address or CIDR with an optional ":port" or ":lo-hi"
# (IPv6 with a port in brackets: "[2001:db8::1]:443").
_PORTS = r"(?P<lo>\d+)(?:-(?P<hi>\d+))?"
_PROTO = r"(?:/(?P<proto>tcp|udp))?"
BARE_PORT = re.compile(rf"{_PORTS}{_PROTO}")
BRACKETED = re.compile(rf"\[(?P<net>[0-9A-Fa-f:.]+(?:/\d+)?)\](?::{_PORTS})?{_PROTO}")
NAME = re.compile(rf"(?P<wildcard>\*\.)?(?P<name>[A-Za-z0-9_-]{{1,63}}(?:\.[A-Za-z0-9_-]{{1,63}})*)\.?(?::{_PORTS})?{_PROTO}")
PLAIN = re.compile(rf"(?P<net>[0-9.]+(?:/\d+)?|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(?:/\d+)?)(?::{_PORTS})?{_PROTO}")


@dataclass(frozen=True)
class Entry:
    text: str
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None    # None: every address (a bare port)
    port_lo: int = 0                # 0-0: every port
    port_hi: int = 0
    protocol: int = 0               # 0: tcp and udp
    name: str | None = None         # a host name (lowercase): allows what the episode's DNS answers give for it
    wildcard: bool = False          # "*.name": its strict subdomains

    def matches(self, ip: str, port: int, protocol: int) -> bool:
        """The same test the kernel makes (for tests and for describing an alert)."""
        addr = ipaddress.ip_address(ip)
        in_net = self.network is None or (addr.version == self.network.version and addr in self.network)
        return in_net and (not self.protocol or self.protocol == protocol) and \
            (not self.port_hi or self.port_lo <= port <= self.port_hi)


@dataclass(frozen=True)
class Policy:
    default_deny: bool = False
    allow: tuple[Entry, ...] = ()
    deny: tuple[Entry, ...] = ()
    raw_sockets: bool = True
    listen: str = "any"
    on_alert: str = "none"                              # for every rule not in on_alert_rules
    on_alert_rules: tuple[tuple[str, str], ...] = field(default=())

    @property
    def entries(self) -> tuple[Entry, ...]:
        """Deny entries, then allow entries: an alert's entry index points into this."""
        return self.deny + self.allow

    def describe(self, index: int) -> str:
        """The entry (or reason) a FLOW_DENIED record's index names."""
        if index == DENIED_CONTAINED:
            return "contained (deny_network)"
        if index == DENIED_RAW_SOCKET:
            return "raw_sockets = false"
        if index == DENIED_LISTEN:
            return f"listen = {self.listen!r}"
        if index == DENIED_CUT:
            return "cut (on_alert)"
        if 0 <= index < len(self.entries):
            entry = self.entries[index]
            return f"{'deny' if index < len(self.deny) else 'allow'} {entry.text!r}"
        return "default deny"

    def action_for(self, rule: str) -> str:
        return dict(self.on_alert_rules).get(rule, self.on_alert)

    @property
    def restricts(self) -> bool:
        """Anything for the kernel to enforce (else the episode pays nothing on its connects)."""
        return self.default_deny or bool(self.deny) or not self.raw_sockets or self.listen != "any"

    @property
    def names(self) -> list[tuple[int, Entry]]:
        """The host-name entries, with their index in entries."""
        return [(i, e) for i, e in enumerate(self.entries) if e.name]


def parse_entry(text, where: str) -> Entry:
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{where}: {text!r} must be a non-empty string")
    m = BARE_PORT.fullmatch(text) or BRACKETED.fullmatch(text) or PLAIN.fullmatch(text)
    network = name = None
    if m is not None and m.groupdict().get("net"):
        try:
            network = ipaddress.ip_network(m["net"], strict=False)
        except ValueError:
            named = NAME.fullmatch(text)
            if named is None or not re.search(r"[A-Za-z_-]", named["name"]) or len(named["name"]) > 253:
                raise ConfigError(f"{where}: {text!r}: {m['net']!r} is not an IP address or CIDR") from None
            m = named
    elif m is None:
        m = NAME.fullmatch(text)
        if m is None or not re.search(r"[A-Za-z_-]", m["name"]) or len(m["name"]) > 253:
            raise ConfigError(f"{where}: {text!r} is not an address, CIDR, host name or port "
                              "(e.g. 198.51.100.0/24:443/tcp, *.example.org:443)")
    groups = m.groupdict()
    if groups.get("name"):
        name = groups["name"].lower()
        if where.endswith(".deny"):
            raise ConfigError(f"{where}: {text!r}: host names can only be allowed (deny their addresses)")
    lo = hi = 0
    if groups.get("lo"):
        lo = int(groups["lo"])
        hi = int(groups["hi"]) if groups.get("hi") else lo
        if not 0 < lo <= hi < 65536:
            raise ConfigError(f"{where}: {text!r}: ports must be 1-65535, low to high")
    return Entry(text, network, lo, hi, PROTOCOLS.get(groups.get("proto") or "", 0), name,
                 bool(groups.get("wildcard")))


def _choice(value, choices: tuple[str, ...], where: str) -> str:
    if value not in choices:
        raise ConfigError(f"{where} must be one of {', '.join(choices)}, not {value!r}")
    return value


def parse(table, where: str = "policy") -> Policy:
    """The [policy] table, checked."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise ConfigError(f"unknown key {where}.{unknown[0]} (known: {', '.join(KEYS)})")
    default = _choice(table.get("default", "allow"), ("allow", "deny"), f"{where}.default")
    lists = {}
    for key in ("allow", "deny"):
        items = table.get(key, [])
        if not isinstance(items, list):
            raise ConfigError(f"{where}.{key} must be a list")
        lists[key] = tuple(parse_entry(item, f"{where}.{key}") for item in items)
    raw = table.get("raw_sockets", True)
    if not isinstance(raw, bool):
        raise ConfigError(f"{where}.raw_sockets must be true or false, not {raw!r}")
    listen = _choice(table.get("listen", "any"), LISTEN, f"{where}.listen")
    on_alert, by_rule = parse_on_alert(table.get("on_alert", "none"), f"{where}.on_alert")
    policy = Policy(default == "deny", lists["allow"], lists["deny"], raw, listen, on_alert, by_rule)
    compile_rules(policy, where)       # too many rules on one prefix is an error now, not at attach
    return policy


def parse_on_alert(value, where: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """"ACTION", or a table RULE = ACTION (key "default": every other rule)."""
    if isinstance(value, str):
        return _choice(value, ACTIONS, where), ()
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be an action or a table of actions by rule name")
    from .detect.rules import ALL
    known = {rule.name for rule in ALL}
    by_rule = []
    for rule, action in value.items():
        if rule != "default" and rule not in known:
            raise ConfigError(f"unknown rule {where}.{rule} (rules: {', '.join(sorted(known))})")
        by_rule.append((rule, _choice(action, ACTIONS, f"{where}.{rule}")))
    default = dict(by_rule).pop("default", "none")
    return default, tuple((r, a) for r, a in by_rule if r != "default")


def load_file(path: str | Path) -> Policy:
    """A --policy file: a TOML file with the [policy] table (and nothing else)."""
    try:
        data = tomllib.loads(Path(path).read_bytes().decode("utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read policy {path}: {e.strerror}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"policy {path} is not valid TOML: {e}") from None
    if set(data) != {"policy"}:
        raise ConfigError(f"policy {path} must hold exactly one [policy] table")
    return parse(data["policy"])


DNS_HASH_P = 0x100000001B3        # probes/packets.c DNS_HASH_P
HASH_MOD = 2 ** 64


def name_hash(name: str) -> int:
    """The kernel's hash of a name in DNS wire format (length-prefixed labels, no root), lowercased."""
    wire = b"".join(bytes([len(label)]) + label.encode("ascii") for label in name.lower().split("."))
    h, power = 0, 1
    for byte in wire:
        h = (h + byte * power) % HASH_MOD
        power = power * DNS_HASH_P % HASH_MOD
    return h


@dataclass(frozen=True)
class Rule:
    port_lo: int
    port_hi: int
    protocol: int
    deny: bool
    entry: int


def compile_rules(policy: Policy, where: str = "policy") -> dict[ipaddress.IPv4Network | ipaddress.IPv6Network,
                                                                   list[Rule]]:
    """Prefix -> its rules, each with the rules of every shorter prefix that covers it, deny rules first:
    the kernel's longest-prefix match then finds in one lookup every entry that applies."""
    indexed = list(enumerate(policy.entries))
    n_deny = len(policy.deny)
    prefixes = set()
    indexed = [(i, e) for i, e in indexed if not e.name]
    for _, entry in indexed:
        if entry.network is None:
            prefixes |= {ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")}
        else:
            prefixes.add(entry.network)
    compiled = {}
    for prefix in prefixes:
        rules = [Rule(e.port_lo, e.port_hi, e.protocol, i < n_deny, i) for i, e in indexed
                 if e.network is None or (e.network.version == prefix.version and prefix.subnet_of(e.network))]
        rules.sort(key=lambda r: (not r.deny, r.entry))
        if len(rules) > POLICY_RULES:
            raise ConfigError(f"{where}: {len(rules)} entries apply to {prefix}, at most {POLICY_RULES} may")
        compiled[prefix] = rules
    return compiled

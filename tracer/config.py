"""The tracer's configuration: one TOML file (--config), every key with a default.

An unknown key or a value of the wrong type or range is an error that names the
key, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import functools
import ipaddress
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path


class ConfigError(ValueError):
    """A one-line message naming the bad key."""


@dataclass(frozen=True)
class Flows:
    update_interval_seconds: float = 10.0   # flow_updated for flows open longer than this, this often
    long_flow_seconds: float = 600.0        # an outbound flow open this long is a tunnel signal


@dataclass(frozen=True)
class ReverseTunnel:
    alert_score: int = 70                   # sum of signal points that raises reverse_tunnel (see detect/tunnels.py)


@dataclass(frozen=True)
class Dns:
    long_query_chars: int = 80              # a query name longer than this is a tunnel signal
    information_bytes: int = 2000           # data estimated sent through one domain's names per window, per episode
    episode_information_bytes: int = 8000   # ... through all the names an episode looks up per window
    readable_weight: float = 0.1            # share of a readable name's compressed bytes counted (random ones: all)
    window_seconds: float = 900.0

    def __post_init__(self) -> None:
        if self.readable_weight > 1:
            raise ConfigError(f"config key dns.readable_weight must be at most 1, not {self.readable_weight!r}")


@dataclass(frozen=True)
class Icmp:
    large_payload_bytes: int = 256          # a first echo request to a destination this large carries data
    data_echoes: int = 16                   # echo requests carrying data to one destination that raise icmp_tunnel
    data_bytes: int = 4096                  # ... or their payload bytes, whichever comes first
    episode_data_bytes: int = 16384         # payload bytes of data echoes to all destinations of an episode


@dataclass(frozen=True)
class CloudMetadata:
    addresses: tuple[str, ...] = ("169.254.169.254", "fd00:ec2::254", "169.254.170.2")
    hostnames: tuple[str, ...] = ("metadata.google.internal",)


@dataclass(frozen=True)
class Output:
    """Where documents go when no --output is given, and the network outputs' disk spool."""
    specs: tuple[str, ...] = ()           # --output forms; empty: stdout
    spool_mb: float = 512.0               # per network output, under <state dir>/spool


@dataclass(frozen=True)
class Exceptions:
    """What is never alerted on."""
    cidrs: tuple[str, ...] = ()           # destinations
    ports: tuple[int, ...] = ()           # destination ports
    domains: tuple[str, ...] = ()         # DNS names queried (and their subdomains)
    executables: tuple[str, ...] = ()     # process.executable paths

    def allows_destination(self, ip: str | None, port: int | None) -> bool:
        if port is not None and port in self.ports:
            return True
        if not ip or not self.cidrs:     # the usual case, on every event: no parsing
            return False
        addr = ipaddress.ip_address(ip)
        return any(addr in network for network in self._networks)

    @functools.cached_property
    def _networks(self) -> list:
        return [ipaddress.ip_network(c, strict=False) for c in self.cidrs]

    def allows_executable(self, path: str | None) -> bool:
        return bool(path) and path in self.executables

    def allows_domain(self, name: str) -> bool:
        return bool(name) and any(name == d or name.endswith("." + d) for d in self.domains)


@dataclass(frozen=True)
class Allowlist(Exceptions):
    """Exceptions for every rule, and for one rule each: [allowlist.rules.RULE] with the same keys."""
    rules: tuple[tuple[str, Exceptions], ...] = field(default=(), metadata={"table_of": Exceptions})

    def for_rule(self, name: str) -> Exceptions | None:
        return next((exceptions for rule, exceptions in self.rules if rule == name), None)


@dataclass(frozen=True)
class Config:
    flows: Flows = field(default_factory=Flows)
    reverse_tunnel: ReverseTunnel = field(default_factory=ReverseTunnel)
    dns: Dns = field(default_factory=Dns)
    icmp: Icmp = field(default_factory=Icmp)
    cloud_metadata: CloudMetadata = field(default_factory=CloudMetadata)
    allowlist: Allowlist = field(default_factory=Allowlist)
    output: Output = field(default_factory=Output)

    def allows_destination(self, ip: str | None, port: int | None) -> bool:
        return self.allowlist.allows_destination(ip, port)

    def allows_executable(self, path: str | None) -> bool:
        return self.allowlist.allows_executable(path)


def load(path: str | Path | None) -> Config:
    if path is None:
        return Config()
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path} is not valid TOML: {e}") from None
    config = _build(Config, data, "")
    from .detect.rules import ALL     # here, not at the top: tracer.detect imports this module
    known = {rule.name for rule in ALL}
    for name, _ in config.allowlist.rules:
        if name not in known:
            raise ConfigError(f"unknown rule allowlist.rules.{name} (rules: {', '.join(sorted(known))})")
    return config


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"config key {prefix.rstrip('.') or 'top level'} must be a table")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known here: {', '.join(sorted(known))})")
    values = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        key = prefix + name
        table_of = known[name].metadata.get("table_of")
        if table_of is not None:        # [KEY.NAME] tables of one kind, in file order
            if not isinstance(value, dict):
                raise ConfigError(f"config key {key} must be a table")
            values[name] = tuple((sub, _build(table_of, item, f"{key}.{sub}.")) for sub, item in value.items())
        elif hasattr(default, "__dataclass_fields__"):
            values[name] = _build(type(default), value, key + ".")
        else:
            values[name] = _check(key, default, value)
    return cls(**values)


def _check(key: str, default, value):
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key} must be true or false, not {value!r}")
        return value
    if isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"config key {key} must be a positive number, not {value!r}")
        return type(default)(value) if isinstance(default, float) else value
    if isinstance(default, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"config key {key} must be a list, not {value!r}")
        items = tuple(value)
        for item in items:
            _check_item(key, item)
        return items
    raise ConfigError(f"config key {key} has an unsupported type")


def _check_item(key: str, item) -> None:
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "ports":
        if isinstance(item, bool) or not isinstance(item, int) or not 0 < item < 65536:
            raise ConfigError(f"config key {key}: {item!r} is not a port (1-65535)")
        return
    if not isinstance(item, str) or not item:
        raise ConfigError(f"config key {key}: {item!r} must be a non-empty string")
    if leaf in ("cidrs", "addresses"):
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(f"config key {key}: {item!r} is not an IP address or CIDR") from None

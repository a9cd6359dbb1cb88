"""The tracer's configuration: one TOML file (--config), every key with a default.

An unknown key or a value of the wrong type or range is an error that names the
key, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import functools
import ipaddress
import mmap
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
    unique_subdomains: int = 200            # distinct names under one domain per window, per episode
    window_seconds: float = 900.0


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
class Allowlist:
    """Exceptions that apply to every rule."""
    cidrs: tuple[str, ...] = ()           # destinations never alerted on
    ports: tuple[int, ...] = ()           # destination ports never alerted on
    domains: tuple[str, ...] = ()         # DNS names (and their subdomains) never alerted on
    executables: tuple[str, ...] = ()     # process.executable paths never alerted on


@dataclass(frozen=True)
class Limits:
    """Each episode's budget of low-value records (flow updates, DNS queries after a socket's
    first two, forks and exits, flows to destinations it reached before), so that one episode's
    flood cannot fill the ring buffer all episodes share. Refused records are counted as the
    episode's losses (reason "budget") and make its verdict incomplete."""
    record_budget_per_second: int = 50_000
    record_budget_burst: int = 20_000
    # The ring buffer every episode shares: 32 MiB absorb a burst of ~200k records while
    # userspace catches up (make bench). A power of two, at least one page.
    ringbuf_kb: int = 32768

    @property
    def ringbuf_pages(self) -> int:
        return self.ringbuf_kb * 1024 // mmap.PAGESIZE

    def __post_init__(self) -> None:
        page_kb = mmap.PAGESIZE // 1024
        kb = self.ringbuf_kb
        if not isinstance(kb, int) or kb < page_kb or kb & (kb - 1):
            raise ConfigError(f"config key limits.ringbuf_kb must be a power of two >= {page_kb}, not {kb!r}")


@dataclass(frozen=True)
class Config:
    flows: Flows = field(default_factory=Flows)
    reverse_tunnel: ReverseTunnel = field(default_factory=ReverseTunnel)
    dns: Dns = field(default_factory=Dns)
    cloud_metadata: CloudMetadata = field(default_factory=CloudMetadata)
    allowlist: Allowlist = field(default_factory=Allowlist)
    output: Output = field(default_factory=Output)
    limits: Limits = field(default_factory=Limits)

    def allows_destination(self, ip: str | None, port: int | None) -> bool:
        if port is not None and port in self.allowlist.ports:
            return True
        if not ip or not self.allowlist.cidrs:     # the usual case, on every event: no parsing
            return False
        addr = ipaddress.ip_address(ip)
        return any(addr in network for network in self._networks)

    @functools.cached_property
    def _networks(self) -> list:
        return [ipaddress.ip_network(c, strict=False) for c in self.allowlist.cidrs]

    def allows_executable(self, path: str | None) -> bool:
        return bool(path) and path in self.allowlist.executables


def load(path: str | Path | None) -> Config:
    if path is None:
        return Config()
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path} is not valid TOML: {e}") from None
    return _build(Config, data, "")


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
        if hasattr(default, "__dataclass_fields__"):
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

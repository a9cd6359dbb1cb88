"""The tracer's configuration: one TOML file (--config), every key with a default.

An unknown key or a value of the wrong type or range is an error that names the
key, so a typo never silently falls back to a default. Numbers are checked by the
type of their default, for every key alike: an int key takes only whole numbers,
no number may be inf or nan, and the unit in a key's name (_seconds, _mb) bounds it.
"""
from __future__ import annotations

import dataclasses
import functools
import ipaddress
import math
import mmap
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path


class ConfigError(ValueError):
    """A one-line message naming the bad key."""


MAX_INT = 2 ** 53                 # beyond this an int key is a typo, and floats lose it
# Bounds by the unit a key's name ends with: below them a value makes no sense (a spool of one byte,
# a sweep every nanosecond), above them it is a typo that would overflow a timer.
UNIT_BOUNDS: dict[str, tuple[float, float]] = {
    "_seconds": (0.001, 10 * 365 * 86400.0),
    "_mb": (1.0, 1024.0 * 1024),
    "_percent": (1, 100),
}


@dataclass(frozen=True)
class Flows:
    update_interval_seconds: float = 10.0   # flow_updated for flows open longer than this, this often
    long_flow_seconds: float = 600.0        # an outbound flow open this long is a tunnel signal


@dataclass(frozen=True)
class ReverseTunnel:
    """The tunnel score (detect/tunnels.py): points per signal, and relay correlation."""
    alert_score: int = 70                   # sum of signal points that raises reverse_tunnel
    long_flow_points: int = 30              # open past [flows] long_flow_seconds
    ssh_on_22_points: int = 5               # an SSH banner on port 22
    ssh_off_22_points: int = 15             # ... on another port
    ssh_not_a_client_points: int = 15       # SSH spoken by a binary that is no SSH client
    ssh_in_upgrade_points: int = 30         # SSH inside an HTTP 101 upgrade
    not_tls_on_443_points: int = 20
    local_relay_points: int = 30            # a loopback connect by the process or a descendant while open
    forward_argv_points: int = 25           # a port-forward spec or ssh -N in argv
    keepalive_points: int = 10              # silences of one length
    peer_starts_points: int = 25            # the peer started most exchanges
    mirrored_exchange_points: int = 35      # one relayed exchange (below exchanges_to_alert)
    exchanges_to_alert: int = 2             # mirrored exchanges that alert at once
    mirror_ms: float = 200.0                # a burst relayed within this long mirrors another
    framing_bytes: int = 160                # outside burst minus local burst, at most (TLS, WebSocket, SSH)
    segment_bytes: int = 1000               # bursts both this big match in size (first packets are segments)


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
class Tracing:
    """Fail-closed tracing (README: Fail-closed tracing). run always fails closed."""
    fail_closed: bool = False               # watch: refuse episode connects/sends while no tracer is alive
    liveness_timeout_seconds: float = 2.0   # how long without a live tracer before refusing
    stall_timeout_seconds: float = 10.0     # a main loop that makes no progress this long is no live tracer


@dataclass(frozen=True)
class Limits:
    """Each episode's budget of low-value records (flow updates, DNS queries after a socket's
    first two, forks and exits, flows to destinations it reached before), and its share of the ring
    buffer for every record once the buffer fills up, so that one episode's flood cannot fill the ring
    buffer all episodes share. Refused records are counted as the episode's losses (reasons "budget",
    "ring_share") and make its verdict incomplete."""
    record_budget_per_second: int = 50_000
    record_budget_burst: int = 20_000
    # Fairness for every record, evidence too: once this much of the ring buffer is unread, each
    # episode's records are paid from its share (per second, at once); beyond it they are refused and
    # counted ("ring_share"). The room above the watermark (16 MiB by default) holds a full share of
    # about 13 episodes at once (5,000 records of ~250 bytes); a reader stalled for seconds is the limit.
    ring_share_watermark_percent: int = 50
    ring_share_per_second: int = 5_000
    ring_share_burst: int = 5_000
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
class Metrics:
    """The Prometheus endpoint (--metrics-listen)."""
    per_episode: bool = True      # series labelled by episode; off for fleets with many episodes


@dataclass(frozen=True)
class Config:
    flows: Flows = field(default_factory=Flows)
    reverse_tunnel: ReverseTunnel = field(default_factory=ReverseTunnel)
    dns: Dns = field(default_factory=Dns)
    icmp: Icmp = field(default_factory=Icmp)
    cloud_metadata: CloudMetadata = field(default_factory=CloudMetadata)
    allowlist: Allowlist = field(default_factory=Allowlist)
    output: Output = field(default_factory=Output)
    tracing: Tracing = field(default_factory=Tracing)
    limits: Limits = field(default_factory=Limits)
    metrics: Metrics = field(default_factory=Metrics)
    policy: object = None                   # tracer.policy.Policy: the [policy] table (episodes without their own)
    on_alert: str | None = None             # --on-alert ACTION: every rule, over the policies' on_alert

    def allows_destination(self, ip: str | None, port: int | None) -> bool:
        return self.allowlist.allows_destination(ip, port)

    def allows_executable(self, path: str | None) -> bool:
        return self.allowlist.allows_executable(path)


# What a daemon client's config sets on its own side: its outputs, its metrics endpoint, its episode's policy
# (sent with the episode), and run's fail_closed (a run is fail-closed whatever the config says).
CLIENT_SIDE = frozenset({"output", "metrics", "policy", "on_alert", "tracing.fail_closed"})


def tracer_settings(config: Config) -> dict[str, object]:
    """The config's keys that are the tracer's, as "section.key" -> value (plain JSON values): a daemon
    client's config may differ from the daemon's only outside these (CLIENT_SIDE)."""
    import json
    settings = {}
    for section in fields(config):
        if section.name in CLIENT_SIDE:
            continue
        table = getattr(config, section.name)
        for key in fields(table):
            name = f"{section.name}.{key.name}"
            if name not in CLIENT_SIDE:
                settings[name] = json.loads(json.dumps(getattr(table, key.name), default=dataclasses.asdict))
    return settings


def load(path: str | Path | None) -> Config:
    if path is None:
        return Config()
    try:
        data = tomllib.loads(Path(path).read_bytes().decode("utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {path} is not UTF-8 text (byte {e.start} cannot be decoded)") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path} is not valid TOML: {e}") from None
    policy_table = data.pop("policy", None) if isinstance(data, dict) else None
    config = _build(Config, data, "")
    if policy_table is not None:
        from . import policy         # here: tracer.policy imports this module
        config = dataclasses.replace(config, policy=policy.parse(policy_table))
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
        return _check_number(key, default, value)
    if isinstance(default, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"config key {key} must be a list, not {value!r}")
        items = tuple(value)
        for item in items:
            _check_item(key, item)
        return items
    raise ConfigError(f"config key {key} has an unsupported type")


def _check_number(key: str, default: int | float, value):
    """A number for a key whose default is an int (whole numbers only) or a float (finite), positive,
    and within the bounds of the key's unit."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config key {key} must be a positive number, not {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key {key} must be a finite number, not {value!r}")
    if isinstance(default, int):
        if not isinstance(value, int):
            raise ConfigError(f"config key {key} must be a whole number, not {value!r}")
        if not 0 < value <= MAX_INT:
            raise ConfigError(f"config key {key} must be between 1 and {MAX_INT}, not {value!r}")
    elif value <= 0:
        raise ConfigError(f"config key {key} must be a positive number, not {value!r}")
    for unit, (low, high) in UNIT_BOUNDS.items():
        if key.endswith(unit) and not low <= value <= high:
            raise ConfigError(f"config key {key} must be between {low:g} and {high:g}, not {value!r}")
    return float(value) if isinstance(default, float) else value


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

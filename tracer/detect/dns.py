"""dns_tunnel: DNS query names that carry data, judged by what they say.

Following Paxson et al. ("Practical Comprehensive Bounds on Surreptitious Communication Over DNS",
USENIX Security 2013), what the lookups under one registered domain can carry is bounded by the
compressed size of their distinct names. Per episode and domain, within a window of event time, each new
name adds the bytes it adds to the zlib-compressed names before it, weighted by how random it looks:
readable names (a crawler, a CDN, a package mirror) count a little, base32 or hex labels in full. The
rule alerts when that estimate passes `[dns] information_bytes`, or the sum over all the episode's
domains passes `[dns] episode_information_bytes` (data spread over many domains), or at once for a name
longer than `[dns] long_query_chars`. Event time, not the clock of the tracer: a replay gives the same alerts.
"""
from __future__ import annotations

import functools
import re
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator

from ..events import PayloadSeen
from . import Context, Finding, rules, who
from .rules import DNS_LABELS, RISK, LabelScoring

MAX_DOMAINS = 4096      # (episode, domain) windows remembered; the least recently used go first
MAX_EPISODES = 4096     # episode totals remembered, likewise
MAX_NAMES = 4096        # distinct names remembered per window; beyond, every name counts as new
CONTEXT_BYTES = 1024    # names compressed together: enough for their shared words to count once
SEPARATORS = str.maketrans("", "", ".-_")
# Second levels under which country domains are registered (example.co.uk): not any short label, or
# <data>.abc.io would pass for a registered domain with nothing under it.
SECOND_LEVELS = frozenset("ac co com edu gob gov go ltd me mil ne net nic or org plc sch".split())


def randomness(text: str, scoring: LabelScoring = DNS_LABELS) -> float:
    """0 for readable words, 1 for random-looking data (base32, hex, base64), in between for mixtures."""
    text = text.lower().translate(SEPARATORS)
    if not text:
        return 0.0
    letters = sum(map(str.isalpha, text))
    digits = sum(map(str.isdigit, text))
    tells = [0.0]
    if letters >= scoring.min_letters:
        share = sum(map(text.count, scoring.vowels)) / letters
        tells.append(_ramp(scoring.readable_vowel_share - share,
                           scoring.readable_vowel_share - scoring.random_vowel_share))
    if digits and letters:
        tells.append(_ramp(digits / len(text), scoring.random_digit_share))
    elif digits >= scoring.all_digits_chars:
        tells.append(1.0)
    longest = max(map(len, _consonant_runs(scoring.vowels).findall(text)), default=0)
    tells.append(_ramp(longest - scoring.readable_consonant_run,
                       scoring.random_consonant_run - scoring.readable_consonant_run))
    return max(tells)


@functools.lru_cache(maxsize=4)
def _consonant_runs(vowels: str) -> re.Pattern:
    return re.compile(f"[^{re.escape(vowels)}\\W\\d_]+")


def _ramp(value: float, full: float) -> float:
    return min(1.0, max(0.0, value / full))


@dataclass
class Window:
    """One episode's names under one domain since start_ns."""
    start_ns: int
    names: set[str] = field(default_factory=set)
    context: bytes = b""          # the latest distinct names, joined, at most CONTEXT_BYTES
    compressed: int = 0           # len(zlib.compress(context))
    information: float = 0.0      # estimated bytes carried
    reported: bool = False        # a finding went out: the engine alerts once anyway

    def add(self, sub: str, readable_weight: float) -> bool:
        """Count a name's information if it is new; False when it was seen in this window."""
        if sub in self.names:
            return False
        if len(self.names) < MAX_NAMES:
            self.names.add(sub)
        raw = sub.encode()
        joined = self.context + b"." + raw if self.context else raw
        if len(joined) > CONTEXT_BYTES:       # start a new context: its first name counts in full
            self.context, self.compressed, joined = b"", len(zlib.compress(b"")), raw[-CONTEXT_BYTES:]
        size = len(zlib.compress(joined))
        gain = max(1, size - self.compressed)
        self.context, self.compressed = joined, size
        self.information += gain * (readable_weight + (1 - readable_weight) * randomness(sub))
        return True


@dataclass
class Total:
    """One episode's information over all its domains since start_ns."""
    start_ns: int
    information: float = 0.0
    domains: set[str] = field(default_factory=set)
    reported: bool = False


class DnsTunnel:
    """A name too long, or too much information through one domain's names (or all), per episode."""

    def __init__(self) -> None:
        self._windows: OrderedDict[tuple[str, str], Window] = OrderedDict()
        self._totals: OrderedDict[str, Total] = OrderedDict()
        self.evicted = 0          # windows forgotten for room (tracer stats)

    def __call__(self, event, ctx: Context) -> Iterator[Finding]:
        if not isinstance(event, PayloadSeen) or event.protocol != "dns":
            return
        name = (event.details.get("qname") or "").rstrip(".").lower()
        if not name:
            return
        limits = ctx.config.dns
        domain = base_domain(name)
        if len(name) > limits.long_query_chars:
            yield Finding(rules.DNS_TUNNEL, ("long", domain),
                          f"{who(event.process)} in episode {event.episode.id} queried a {len(name)}-character "
                          f"name under {domain} (limit {limits.long_query_chars}): {name[:120]}",
                          RISK.dns_long_name, [event])
        sub = name[:-len(domain)].rstrip(".")
        if not sub and "." in name:     # a registered domain itself: its own label is what it says
            sub, domain = name.split(".", 1)
        if not sub:
            return
        window = self._current(self._windows, (event.episode.id, domain), event.timestamp_ns,
                               limits.window_seconds, MAX_DOMAINS, Window)
        before = window.information
        if not window.add(sub, limits.readable_weight):
            return
        total = self._current(self._totals, event.episode.id, event.timestamp_ns, limits.window_seconds,
                              MAX_EPISODES, Total)
        total.information += window.information - before
        if len(total.domains) < MAX_NAMES:
            total.domains.add(domain)
        if window.information > limits.information_bytes and not window.reported:
            window.reported = True
            seconds = (event.timestamp_ns - window.start_ns) / 1e9
            yield Finding(rules.DNS_TUNNEL, ("information", domain),
                          f"{who(event.process)} in episode {event.episode.id} sent about "
                          f"{window.information:.0f} bytes of information through {len(window.names)} distinct "
                          f"names under {domain} in {seconds:.1f} s (limit {limits.information_bytes} per "
                          f"{limits.window_seconds:.0f} s), e.g. {name[:120]}", RISK.dns_information, [event])
        if total.information > limits.episode_information_bytes and not total.reported:
            total.reported = True
            seconds = (event.timestamp_ns - total.start_ns) / 1e9
            yield Finding(rules.DNS_TUNNEL, ("episode information",),
                          f"{who(event.process)} in episode {event.episode.id} sent about "
                          f"{total.information:.0f} bytes of information through the names it looked up under "
                          f"{len(total.domains)} domains in {seconds:.1f} s (limit "
                          f"{limits.episode_information_bytes} per {limits.window_seconds:.0f} s), e.g. "
                          f"{name[:120]}", RISK.dns_information, [event])

    def _current(self, table: OrderedDict, key, now_ns: int, window_s: float, most: int, make):
        """The window of key in table, a fresh one (make(now_ns)) if it expired; the most recently used last."""
        window = table.pop(key, None)
        if window is None or now_ns - window.start_ns > window_s * 1e9:
            window = make(now_ns)
        table[key] = window
        if len(table) > most:
            table.popitem(last=False)
            self.evicted += 1
        return window


def base_domain(name: str) -> str:
    """The registrable part of a name, roughly: the last two labels, three under a country's second levels."""
    labels = name.split(".")
    take = 3 if len(labels) >= 3 and labels[-2] in SECOND_LEVELS and len(labels[-1]) == 2 else 2
    return ".".join(labels[-take:])


def detectors() -> tuple:
    return (DnsTunnel(),)

"""The rule catalog: every rule eptrace can raise, as data (DESIGN.md names).

ATT&CK: technique_* is always the parent technique; a rule that names a sub-technique also gives its
id and its own name (threat.technique.subtechnique.* in ECS, attack.sub_technique in OCSF)."""
from __future__ import annotations

from dataclasses import dataclass

from ..events import Rule

REVERSE_TUNNEL = Rule(
    "EPT-0001", "reverse_tunnel",
    "An outbound-initiated flow carries a tunnel back into or out of the sandbox (ssh -R/-L/-D/-w, "
    "autossh, chisel, frpc, ngrok, cloudflared, socat relays, ...)",
    "T1572", "Protocol Tunneling", "TA0011", "Command and Control", 73)
REVERSE_SHELL = Rule(
    "EPT-0002", "reverse_shell",
    "A shell or interpreter is wired to a network socket (nc -e, socat EXEC:, bash /dev/tcp, pty shells)",
    "T1059", "Command and Scripting Interpreter", "TA0002", "Execution", 99, "T1059.004", "Unix Shell")
CRYPTO_MINING = Rule(
    "EPT-0003", "crypto_mining",
    "A miner runs or speaks a mining protocol (stratum+tcp://, xmrig options, Stratum JSON-RPC)",
    "T1496", "Resource Hijacking", "TA0040", "Impact", 73)
CLOUD_METADATA_ACCESS = Rule(
    "EPT-0004", "cloud_metadata_access",
    "The sandbox reached for the cloud instance metadata service, where instance credentials live",
    "T1552", "Unsecured Credentials", "TA0006", "Credential Access", 73, "T1552.005", "Cloud Instance Metadata API")
DNS_TUNNEL = Rule(
    "EPT-0005", "dns_tunnel",
    "DNS queries carry data: a name too long, or more information in one domain's names than lookups need",
    "T1071", "Application Layer Protocol", "TA0011", "Command and Control", 73, "T1071.004", "DNS")
ICMP_TUNNEL = Rule(
    "EPT-0006", "icmp_tunnel",
    "ICMP echo requests carry data: large payloads, or many distinct payloads to one destination",
    "T1095", "Non-Application Layer Protocol", "TA0011", "Command and Control", 73)
RAW_SOCKET = Rule(
    "EPT-0007", "raw_socket",
    "A raw or packet socket was opened: it can forge traffic and bypass socket-level policy",
    "T1095", "Non-Application Layer Protocol", "TA0011", "Command and Control", 47)
INBOUND_LISTENER = Rule(
    "EPT-0008", "inbound_listener",
    "A sandbox listener accepted a connection from a non-local address",
    "T1133", "External Remote Services", "TA0001", "Initial Access", 47)

EGRESS_DENIED = Rule(
    "EPT-0009", "egress_denied",
    "A connect, send or socket that the episode's policy refused in the kernel",
    "T1048", "Exfiltration Over Alternative Protocol", "TA0010", "Exfiltration", 47)

INGRESS_DENIED = Rule(
    "EPT-0010", "ingress_denied",
    "A connection to a listener of the episode that its policy (listen) refused in the kernel",
    "T1133", "External Remote Services", "TA0001", "Initial Access", 47)

ALL = (REVERSE_TUNNEL, REVERSE_SHELL, CRYPTO_MINING, CLOUD_METADATA_ACCESS, DNS_TUNNEL, ICMP_TUNNEL, RAW_SOCKET,
       INBOUND_LISTENER, EGRESS_DENIED, INGRESS_DENIED)

# Not a detection: the document of a containment action (on_alert), event.kind alert.
EPISODE_CONTAINED = Rule(
    "EPT-0100", "episode_contained",
    "eptrace acted on an alert: it cut the episode's network or the alert's flows, killed or froze its processes",
    "T1572", "Protocol Tunneling", "TA0011", "Command and Control", 0)


@dataclass(frozen=True)
class RiskScores:
    """event.risk_score of each conclusive signal (the tunnel score adds up its own points)."""
    tunnel_argv: int = 90          # argv names a tunnel
    shell_argv: int = 99           # argv wires a shell to a socket
    stdio_socket: int = 99         # a network socket on a shell's stdio
    miner_argv: int = 80
    stratum: int = 90              # Stratum JSON-RPC in a flow's first bytes
    dns_long_name: int = 80
    dns_information: int = 80
    icmp_data: int = 80


RISK = RiskScores()


@dataclass(frozen=True)
class LabelScoring:
    """How random a DNS name looks, 0 (readable) to 1 (random), from three tells of encoded data:
    few vowels, digits mixed with letters, long consonant runs. The largest tell counts."""
    vowels: str = "aeiouy"
    readable_vowel_share: float = 0.26   # at or above: no tell (English words: ~0.38, a few 0.25)
    random_vowel_share: float = 0.16     # at or below: full tell (random letters: 6/26, 0.23)
    min_letters: int = 8                 # fewer letters: the vowel share says nothing (docs, smtp)
    random_digit_share: float = 0.12     # digits among letters: full tell at this share (base32: 6/32)
    all_digits_chars: int = 8            # a run of this many digits alone is data
    readable_consonant_run: int = 3      # consonant runs up to this are words (-ngth, -mpf)
    random_consonant_run: int = 6        # ... from this length, full tell


DNS_LABELS = LabelScoring()

"""The rule catalog: every rule eptrace can raise, as data (DESIGN.md names).

ATT&CK: technique_* is always the parent technique; a rule that names a sub-technique also gives its
id and its own name (threat.technique.subtechnique.* in ECS, attack.sub_technique in OCSF)."""
from __future__ import annotations

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
    "DNS queries carry data: names too long, or too many distinct names under one domain",
    "T1071", "Application Layer Protocol", "TA0011", "Command and Control", 73, "T1071.004", "DNS")
RAW_SOCKET = Rule(
    "EPT-0007", "raw_socket",
    "A raw or packet socket was opened: it can forge traffic and bypass socket-level policy",
    "T1095", "Non-Application Layer Protocol", "TA0011", "Command and Control", 47)
INBOUND_LISTENER = Rule(
    "EPT-0008", "inbound_listener",
    "A sandbox listener accepted a connection from a non-local address",
    "T1133", "External Remote Services", "TA0001", "Initial Access", 47)

ALL = (REVERSE_TUNNEL, REVERSE_SHELL, CRYPTO_MINING, CLOUD_METADATA_ACCESS, DNS_TUNNEL, RAW_SOCKET,
       INBOUND_LISTENER)

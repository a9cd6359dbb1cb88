"""What a command line says about tunnels, shells and miners.

Each classifier returns the evidence (a short human phrase) or None. Only
argv that is conclusive on its own is matched here; weaker hints feed scores.
"""
from __future__ import annotations

import functools
import os
import re

# ssh options that take an argument (ssh(1)); the rest are boolean flags that may be combined: -NfR.
_SSH_ARG_OPTIONS = set("BbcDEeFIiJLlmOoPpQRSWw")
_SSH_FORWARD_FLAGS = {"R": "remote forward (-R)", "L": "local forward (-L)", "D": "dynamic SOCKS proxy (-D)",
                      "w": "tun device tunnel (-w)"}
_SSH_FORWARD_OPTIONS = {"remoteforward", "localforward", "dynamicforward", "tunnel", "tunneldevice"}
_TUNNEL_TOOLS = {"autossh", "sshuttle", "chisel", "frpc", "ngrok", "cloudflared", "wstunnel", "iodine",
                 "dnscat", "dnscat2", "hans", "ptunnel", "ptunnel-ng", "gost", "bore", "rathole"}
_MINERS = {"xmrig", "xmr-stak", "minerd", "cpuminer", "ccminer", "ethminer", "t-rex", "nbminer", "lolminer",
           "gminer", "phoenixminer", "nanominer", "srbminer", "teamredminer", "bfgminer", "cgminer"}
_MINER_ARGS = re.compile(r"stratum\+(tcp|ssl|tls)://|--donate-level|--algo[= ](rx/|cn/|randomx|kawpow|ethash)"
                         r"|--coin[= ](monero|xmr)|-a\s+rx/0", re.I)
_SHELLS = {"sh", "bash", "dash", "zsh", "ksh", "ash", "busybox", "fish", "tcsh", "csh"}


def name_of(args: list[str], executable: str = "") -> str:
    return os.path.basename(args[0] if args else executable)


def ssh_forwarding(args: list[str]) -> str | None:
    """ssh -R/-L/-D/-w (combined flags too) or -o RemoteForward/LocalForward/DynamicForward/Tunnel."""
    i, destination_seen = 1, False
    while i < len(args):
        arg = args[i]
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-":
            if destination_seen:
                break   # the remote command: its words are not ssh's options
            destination_seen = True   # OpenSSH goes on parsing options after the destination
            i += 1
            continue
        j = 1
        while j < len(arg):
            flag = arg[j]
            if flag in _SSH_FORWARD_FLAGS:
                return _SSH_FORWARD_FLAGS[flag]
            if flag in _SSH_ARG_OPTIONS:
                value = arg[j + 1:] or (args[i + 1] if i + 1 < len(args) else "")
                if flag == "o" and value.split("=", 1)[0].split(None, 1)[0].lower() in _SSH_FORWARD_OPTIONS:
                    return f"-o {value}"
                if not arg[j + 1:]:
                    i += 1      # the value was the next argument
                break
            j += 1
        i += 1
    return None


def tunnel_argv(args: list[str], executable: str = "") -> str | None:
    return _tunnel_argv(tuple(args), executable)


@functools.lru_cache(maxsize=8192)   # a process connects many times with the same argv
def _tunnel_argv(args: tuple[str, ...], executable: str) -> str | None:
    name = name_of(args, executable)
    if name in ("ssh", "dbclient") and (why := ssh_forwarding(args)):
        return f"ssh {why}"
    if name in _TUNNEL_TOOLS:
        return f"tunnel tool {name}"
    if name == "socat" and _socat_relay(args):
        return "socat listener/relay"
    return None


def _socat_relay(args: list[str]) -> bool:
    addresses = [a.upper() for a in args[1:] if not a.startswith("-")]
    listens = any(a.startswith(("TCP-LISTEN", "TCP4-LISTEN", "TCP6-LISTEN", "UDP-LISTEN", "SOCKS")) for a in addresses)
    connects = any(a.startswith(("TCP:", "TCP4:", "TCP6:", "OPENSSL:", "SOCKS4", "PROXY:")) for a in addresses)
    return len(addresses) >= 2 and (listens or connects) and not _socat_exec(args)


def _socat_exec(args: list[str]) -> bool:
    return any(a.upper().startswith(("EXEC:", "SYSTEM:")) for a in args[1:])


def shell_argv(args: list[str], executable: str = "") -> str | None:
    return _shell_argv(tuple(args), executable)


@functools.lru_cache(maxsize=8192)   # a process connects many times with the same argv
def _shell_argv(args: tuple[str, ...], executable: str) -> str | None:
    """Command lines that wire a shell to the network by themselves."""
    name = name_of(args, executable)
    text = " ".join(args)
    if name in ("nc", "ncat", "netcat", "nc.traditional", "nc.openbsd"):
        for opt in ("--sh-exec", "--lua-exec", "--exec"):
            if any(a == opt or a.startswith(opt + "=") for a in args[1:]):
                return f"{name} {opt}"
        # -e runs a program in every nc that has it; -c runs a shell command in ncat and
        # nc.traditional (in OpenBSD's nc it only means CRLF). getopt allows -nve and -e/bin/sh.
        exec_flags = "ec" if name in ("ncat", "nc.traditional") else "e"
        for a in args[1:]:
            if a.startswith("-") and not a.startswith("--"):
                for flag in a[1:]:
                    if flag in exec_flags:
                        return f"{name} -{flag}"
                    if not flag.isalpha():
                        break
    if name == "socat" and _socat_exec(args):
        return "socat EXEC:/SYSTEM:"
    if "/dev/tcp/" in text or "/dev/udp/" in text:
        return "shell redirection to /dev/tcp"
    if "pty.spawn" in text and "socket" in text:
        return "python pty shell over a socket"
    return None


def miner_argv(args: list[str], executable: str = "") -> str | None:
    return _miner_argv(tuple(args), executable)


@functools.lru_cache(maxsize=8192)   # a process connects many times with the same argv
def _miner_argv(args: tuple[str, ...], executable: str) -> str | None:
    name = name_of(args, executable).lower()
    if name in _MINERS:
        return f"miner {name}"
    m = _MINER_ARGS.search(" ".join(args))
    return f"miner option {m.group(0)}" if m else None


_INTERPRETERS = re.compile(r"^(python[0-9.]*|perl[0-9.]*|ruby[0-9.]*|php[0-9.]*|node|nodejs|lua[0-9.]*|tclsh[0-9.]*"
                           r"|awk|gawk|mawk|irb|pwsh)$")


def is_shell_or_interpreter(args: list[str], executable: str = "") -> bool:
    """What a reverse shell runs: a shell, or an interpreter that can act as one."""
    name = os.path.basename(executable) if executable else name_of(args)
    return name in _SHELLS or bool(_INTERPRETERS.match(name)) or name_of(args) in _SHELLS


# Options after which the program comes from argv, not stdin: sh -c, python -c/-m, perl -e, node -e/-p,
# php -r, ruby -e, lua -e, pwsh -Command/-File. A first operand (a script file) does the same.
_CODE_OPTIONS = {"shell": set("c"), "python": set("cm"), "perl": set("eE"), "ruby": set("e"),
                 "node": set("ep"), "php": set("rfF"), "lua": set("e"), "pwsh": set("cCfF")}
# Options that take a value (so their value is no script operand): sh -o opt, python -W/-X, perl -I/-M, ...
_VALUE_OPTIONS = {"shell": set("oO"), "python": set("WXQ"), "perl": set("IMmx"), "ruby": set("IrCE"),
                  "node": set("r"), "php": set("cdz"), "lua": set("l"), "pwsh": set()}


def _family(name: str) -> str | None:
    if name in _SHELLS:
        return "shell"
    for family in ("python", "perl", "ruby", "node", "php", "lua", "pwsh"):
        if name.startswith(family) and _INTERPRETERS.match(name):
            return family
    return "ruby" if name == "irb" else "node" if name == "nodejs" else "lua" if name == "tclsh" else None


def reads_commands_from_stdin(args: list[str], executable: str = "") -> bool:
    """A shell or interpreter that takes its commands from stdin: no -c/-e program, no script file
    (`sh`, `sh -i`, `bash -s`, `python3 -`, `python3 -i`, `perl`). awk is left out: its stdin is data."""
    name = os.path.basename(executable) if executable else name_of(args)
    if name == "busybox" or (name_of(args) == "busybox" and len(args) > 1):
        args, name = args[1:], name_of(args[1:])
    family = _family(name) or _family(name_of(args))
    if family is None:
        return False
    code, value = _CODE_OPTIONS[family], _VALUE_OPTIONS[family]
    i = 1
    while i < len(args):
        arg = args[i]
        if arg == "-" or (family == "shell" and arg == "--"):
            return True         # "the program is on stdin", or the end of sh's options
        if arg.startswith("--") or (family == "shell" and arg.startswith("+")):
            i += 1              # long options (--norc, --login, ...) and sh's +o: none names a program
            continue
        if not arg.startswith("-"):
            return False        # a script file
        flags = arg[1:]
        if family == "pwsh":
            return flags.lower() in ("noexit", "i", "interactive", "noprofile", "nologo")
        from_stdin = False
        for j, flag in enumerate(flags):
            if flag in code:
                return False    # even with -i: `bash -ic CMD` runs CMD
            from_stdin |= flag == "i" or (family == "shell" and flag == "s")   # interactive, or sh -s
            if flag in value:
                if not flags[j + 1:]:
                    i += 1      # the value is the next argument
                break
        if from_stdin:
            return True
        i += 1
    return True

"""What an ssh client was configured to forward, when its argv does not say: RemoteForward, LocalForward,
DynamicForward or Tunnel set in the config it was given (-F FILE), or else in the user's ~/.ssh/config
and the sandbox's /etc/ssh/ssh_config.

The files belong to the sandbox (the adversary): they are read as the sandbox sees them (under
/proc/<pid>/root, openat2 RESOLVE_IN_ROOT, tracer.procfs), bounded, never blocking on a FIFO. Their
Include lines are inlined the same way. `ssh -G` then resolves them for the same host and -o/-p/-l
options, as ssh itself would (Host and Match blocks, first value wins): it runs as nobody, in a network
namespace of its own, without the sandbox's environment, with a timeout, and never connects. `Match exec`
would run a command even under -G, and `Match localuser`/`localnetwork` would be judged by the tracer's
side: such a Match line is rewritten to `Match all` (its block counts: fail closed).
"""
from __future__ import annotations

import fnmatch
import functools
import logging
import os
import re
import shutil
import subprocess
import tempfile

from . import procfs

log = logging.getLogger(__name__)

MAX_CONFIG_BYTES = 256 * 1024   # all the config text read for one ssh, includes too
MAX_INCLUDE_DEPTH = 4
SSH_G_TIMEOUT_S = 2.0
NOBODY = 65534
_ARG_OPTIONS = set("BbcDEeFIiJLlmOoPpQRSWw")     # ssh(1) options that take a value
_PASSED_OPTIONS = {"o", "p", "l"}                   # those that change what ssh -G resolves (-F is replaced)
_FORWARDS = ("remoteforward", "localforward", "dynamicforward")
# Match criteria that ssh -G would run (exec) or would judge by the tracer's side (localuser: nobody,
# localnetwork: no network): made `Match all`, so their blocks count (fail closed)
_MATCH_UNRESOLVABLE = re.compile(r"^\s*match\b.*\b(exec|localuser|localnetwork)\b", re.I)
_INCLUDE = re.compile(r"^\s*include(\s*=\s*|\s+)(.*)$", re.I)


def ssh_forwarding(pid: int, args: list[str], started_ns: int | None = None) -> str | None:
    """Why this ssh client forwards ("remoteforward 9000 [127.0.0.1]:8000 (config /tmp/cfg)"), or None.
    started_ns, when the ssh was exec'd (wall clock): a config changed since may not be what it read."""
    parsed = _parse_argv(args)
    if parsed is None:
        return None
    config_file, options, destination = parsed
    changed: list[str] = []
    try:
        text, sources = _config_text(pid, config_file, started_ns, changed)
    except OSError as e:
        # ssh was given this file and read it at start; now it is gone, or no regular file (a FIFO or
        # process substitution): what it said cannot be checked. Fail closed.
        return f"its config file -F {config_file} cannot be checked ({e.strerror or e})"
    if changed:     # swapped after ssh read it? What it read cannot be checked: fail closed
        return f"its config {', '.join(changed)} changed after ssh started"
    if not text.strip():
        return None
    resolved = _ssh_g(text, options, destination)
    if resolved is None:        # no ssh here, or it failed: any forwarding line in the text counts
        return _any_forwarding(text, sources)
    found = {}
    for line in resolved.splitlines():
        key, _, value = line.partition(" ")
        if key in _FORWARDS or (key == "tunnel" and value not in ("false", "no")):
            found.setdefault(key, value)
    for key in (*_FORWARDS, "tunnel"):       # the reverse tunnel first
        if key in found:
            return f"{key} {found[key]} (config {', '.join(sources)})"
    return None


def _parse_argv(args: list[str]) -> tuple[str | None, list[str], str] | None:
    """(-F file, the options ssh -G needs, the destination), or None when this ssh does not connect."""
    config_file, options, destination = None, [], None
    i = 1
    while i < len(args):
        arg = args[i]
        if arg == "--":
            destination = destination or (args[i + 1] if i + 1 < len(args) else None)
            break
        if not arg.startswith("-") or arg == "-":
            if destination is not None:
                break           # the remote command
            destination = arg
            i += 1
            continue
        j = 1
        while j < len(arg):
            flag = arg[j]
            if flag in ("G", "V"):
                return None     # prints its config or version: no connection
            if flag in _ARG_OPTIONS:
                value = arg[j + 1:]
                if not value:
                    i += 1
                    value = args[i] if i < len(args) else ""
                if flag == "F":
                    config_file = value
                elif flag in _PASSED_OPTIONS:
                    options += [f"-{flag}", value]
                break
            j += 1
        i += 1
    return (config_file, options, destination) if destination else None


def _config_text(pid: int, config_file: str | None, started_ns: int | None,
                 changed: list[str]) -> tuple[str, list[str]]:
    """The config ssh read, includes inlined, and the files it came from; the files changed since
    started_ns go to `changed`. OSError only for -F FILE."""
    user = procfs.user_of(pid)
    home = user[1] if user else ""
    budget = [MAX_CONFIG_BYTES]
    sources: list[str] = []
    read = functools.partial(_read, pid, home=home, budget=budget, sources=sources, started_ns=started_ns,
                             changed=changed)
    if config_file is not None:
        if config_file == "none":
            return "", []
        path = _expand(config_file, home)
        if path == "/dev/null":
            return "", []
        return read(path, base=os.path.dirname(path), depth=0, strict=True), sources
    parts = []
    if home:
        parts.append(read(f"{home}/.ssh/config", base=f"{home}/.ssh", depth=0))
    parts.append(read("/etc/ssh/ssh_config", base="/etc/ssh", depth=0))
    return "\n".join(parts), sources


def _read(pid: int, path: str, *, home: str, base: str, budget: list[int], sources: list[str],
          started_ns: int | None, changed: list[str], depth: int, strict: bool = False) -> str:
    try:
        data, ctime_ns = procfs.read_in_root(pid, path, budget[0])
    except OSError:
        if strict:
            raise
        return ""
    budget[0] -= len(data)
    sources.append(path)
    if started_ns is not None and ctime_ns > started_ns:
        changed.append(path)
    lines = []
    for line in data.decode(errors="replace").splitlines():
        include = _INCLUDE.match(line)
        if include:
            if depth < MAX_INCLUDE_DEPTH:
                for pattern in include.group(2).split():
                    for included in _glob(pid, _expand(pattern, home, base)):
                        if budget[0] > 0:
                            lines.append(_read(pid, included, home=home, base=base, budget=budget,
                                               sources=sources, started_ns=started_ns, changed=changed,
                                               depth=depth + 1))
            continue
        lines.append("Match all" if _MATCH_UNRESOLVABLE.match(line) else line)
    return "\n".join(lines)


def _expand(path: str, home: str, base: str = "") -> str:
    if path.startswith("~/") and home:
        path = home + path[1:]
    if not path.startswith("/") and base:
        path = os.path.join(base, path)
    return path


def _glob(pid: int, pattern: str) -> list[str]:
    """Include's wildcards, in the last path component only (enough for ssh_config.d/*.conf)."""
    directory, name = os.path.split(pattern)
    if not any(c in name for c in "*?["):
        return [pattern]
    try:
        return sorted(os.path.join(directory, n) for n in procfs.list_in_root(pid, directory)
                      if fnmatch.fnmatch(n, name))[:64]
    except OSError:
        return []


def _ssh_g(text: str, options: list[str], destination: str) -> str | None:
    """`ssh -G` on the config text for this destination: what ssh resolved, or None if it cannot say."""
    ssh = shutil.which("ssh")
    if ssh is None:
        return None
    with tempfile.TemporaryDirectory(prefix="eptrace-ssh-") as tmp:
        os.chmod(tmp, 0o755)      # ssh runs as nobody
        config = os.path.join(tmp, "config")
        with open(config, "w") as f:
            f.write(text + "\n")
        os.chmod(config, 0o644)
        # CanonicalizeHostname would look the (adversary's) name up in DNS: off, and it comes first, so it wins
        argv = [ssh, "-G", "-o", "CanonicalizeHostname=no", "-F", config, *options, "--", destination]
        try:
            done = subprocess.run(_isolated(argv), env={"PATH": "/usr/bin:/bin"}, cwd="/", stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=SSH_G_TIMEOUT_S, text=True, errors="replace")
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("ssh -G failed: %s", e)
            return None
    if done.returncode != 0:
        log.warning("ssh -G exited %d: %s", done.returncode, done.stderr.strip()[:200])
        return None
    return done.stdout.lower()


def _isolated(argv: list[str]) -> list[str]:
    """When the tracer runs as root (it does): in a network namespace of its own (no network at all) and
    as nobody, since the config is the adversary's."""
    unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
    if os.geteuid() != 0 or not unshare or not setpriv:
        return argv
    return [unshare, "--net", "--", setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--", *argv]


def _any_forwarding(text: str, sources: list[str]) -> str | None:
    for line in text.splitlines():
        words = line.replace("=", " ").split()
        if words and (words[0].lower() in _FORWARDS or (words[0].lower() == "tunnel" and len(words) > 1
                                                         and words[1].lower() not in ("no", "false"))):
            return f"{' '.join(words)[:120]} (config {', '.join(sources)}, not resolved by ssh -G)"
    return None

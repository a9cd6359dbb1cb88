"""deploy/: the service unit (systemd-analyze verify), the DaemonSet (the Kubernetes schema, through
kubernetes-validate's bundled schemas) and `make install` / `make uninstall` into temporary roots.

No root needed: everything is installed under a temporary directory (PREFIX or DESTDIR).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from support import require

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SYSTEM_PYTHON = "/usr/bin/python3"


def make(*args: str, **env: str) -> subprocess.CompletedProcess:
    require(shutil.which("make"), "make is not installed")
    return subprocess.run(["make", "-s", "-C", str(REPO), *args, *(f"{k}={v}" for k, v in env.items())],
                          capture_output=True, text=True, timeout=300)


def installed_under(root: Path) -> dict[str, str]:
    """PREFIX-style paths for an install without DESTDIR: everything under root."""
    return {"PREFIX": str(root / "usr"), "SYSCONFDIR": str(root / "etc")}


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def unit_capabilities(text: str) -> set[str]:
    (line,) = re.findall(r"^CapabilityBoundingSet=(.*)$", text, re.M)
    return set(line.split())


# ---- the service unit -----------------------------------------------------------------------------------

def verify(unit: Path) -> subprocess.CompletedProcess:
    analyze = shutil.which("systemd-analyze")
    require(analyze, "systemd-analyze is not installed (apt-get install systemd)")
    return subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=120)


def test_the_installed_unit_verifies_without_a_warning(tmp_path):
    r = make("install", **installed_under(tmp_path))
    assert r.returncode == 0, r.stderr
    unit = tmp_path / "usr/lib/systemd/system/eptrace.service"
    text = unit.read_text()
    assert f"ExecStart={tmp_path}/usr/bin/eptrace daemon --config {tmp_path}/etc/eptrace/eptrace.toml" in text
    assert "@" not in text.replace("Description=", ""), "a placeholder was left unfilled"
    r = verify(unit)
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stdout + r.stderr

    # verify sees what it is meant to: a misspelt key, and an ExecStartPre that is not there.
    bad = tmp_path / "bad" / "eptrace.service"
    bad.parent.mkdir()
    bad.write_text(text.replace("NoNewPrivileges=yes", "NoNewPrivilege=yes"))
    assert "Unknown key 'NoNewPrivilege'" in verify(bad).stderr
    (tmp_path / "usr/lib/eptrace/prepare-host").unlink()
    r = verify(unit)
    assert r.returncode != 0 and "prepare-host" in r.stderr, r.stderr


def test_the_unit_is_hardened_as_documented():
    text = (DEPLOY / "eptrace.service.in").read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", text, re.M))
    assert unit_capabilities(text) == {"CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_KILL", "CAP_SYS_PTRACE",
                                       "CAP_DAC_READ_SEARCH", "CAP_CHOWN"}
    for cap in unit_capabilities(text):      # each one justified in a comment
        assert re.search(rf"^#\s+{cap}\s+\S", text, re.M), cap
    assert settings["ProtectSystem"] == "strict" and settings["NoNewPrivileges"] == "yes"
    assert settings["RuntimeDirectory"] == "eptrace" and settings["RuntimeDirectoryMode"] == "0700"
    assert settings["LimitMEMLOCK"] == "infinity" and settings["Restart"] == "on-failure"
    assert settings["RestrictAddressFamilies"].split() == ["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"]
    assert set(settings["ReadWritePaths"].split()) >= {"/var/lib/eptrace", "/var/log/eptrace", "/sys/fs/bpf"}


# ---- the DaemonSet --------------------------------------------------------------------------------------

def manifests() -> list[dict]:
    try:
        import yaml
    except ImportError:
        yaml = None
    require(yaml, "PyYAML is not installed (python3-yaml)")
    return [d for d in yaml.safe_load_all((DEPLOY / "daemonset.yaml").read_text()) if d]


def kubernetes_validate():
    try:
        import kubernetes_validate as kv
    except ImportError:
        kv = None
    require(kv, "kubernetes-validate is not installed (make setup installs tests/requirements.txt)")
    return kv


def test_the_daemonset_validates_against_the_kubernetes_schema():
    kv = kubernetes_validate()
    docs = manifests()
    assert [d["kind"] for d in docs] == ["Namespace", "ConfigMap", "DaemonSet"]
    for doc in docs:
        kv.validate(doc, kv.latest_version(), strict=True)     # raises on any error
    # The validator sees what it is meant to: a wrong type, and an unknown field (strict).
    daemonset = docs[-1]
    spec = daemonset["spec"]["template"]["spec"]
    with pytest.raises(kv.ValidationError):
        kv.validate({**daemonset, "spec": {**daemonset["spec"], "template": {
            **daemonset["spec"]["template"], "spec": {**spec, "hostPID": "yes"}}}}, kv.latest_version(), strict=True)
    with pytest.raises(kv.ValidationError):
        kv.validate({**daemonset, "spec": {**daemonset["spec"], "template": {
            **daemonset["spec"]["template"], "spec": {**spec, "hostPIDs": True}}}}, kv.latest_version(), strict=True)


def test_the_daemonset_has_the_units_capabilities_and_the_host_mounts():
    docs = manifests()
    spec = docs[-1]["spec"]["template"]["spec"]
    assert spec["hostPID"] is True
    (container,) = spec["containers"]
    caps = container["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"] and not container["securityContext"]["privileged"]
    assert {"CAP_" + c for c in caps["add"]} == unit_capabilities((DEPLOY / "eptrace.service.in").read_text())
    host_paths = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    mounted = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    for path in ("/sys/fs/bpf", "/sys/fs/cgroup", "/lib/modules", "/usr/src", "/sys/kernel/tracing",
                 "/var/lib/eptrace", "/run/eptrace"):
        (name,) = [n for n, p in host_paths.items() if p == path]
        assert mounted[name] == path, (name, path)
    assert container["resources"]["limits"]["memory"] and spec["tolerations"]
    # The ConfigMap is a config eptrace accepts.
    from tracer.config import load
    config = docs[1]["data"]["eptrace.toml"]
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"eptrace-daemonset-{os.getpid()}.toml"
    try:
        path.write_text(config)
        assert load(path).metrics.per_episode is False
    finally:
        path.unlink(missing_ok=True)


def test_the_default_config_loads():
    from tracer.config import load
    config = load(DEPLOY / "eptrace.toml")
    assert config.output.specs == ("file:/var/log/eptrace/events.ndjson",) and config.tracing.fail_closed


# ---- make install / make uninstall ----------------------------------------------------------------------

def test_install_into_a_destdir_and_uninstall_leave_nothing(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    r = make("install", DESTDIR=str(root))
    assert r.returncode == 0, r.stderr
    files = tree(root)
    for want in ("usr/local/bin/eptrace", "usr/local/lib/systemd/system/eptrace.service",
                 "etc/eptrace/eptrace.toml", "usr/local/lib/eptrace/tracer/cli.py",
                 "usr/local/lib/eptrace/probes/common.h", "usr/local/lib/eptrace/prepare-host"):
        assert want in files, want
    assert not [f for f in files if ".venv" in f or "tests" in f.split("/")]
    wrapper = (root / "usr/local/bin/eptrace").read_text()
    assert wrapper.startswith(f"#!{SYSTEM_PYTHON} -sE\n") and '"/usr/local/lib/eptrace"' in wrapper
    assert str(root) not in wrapper + (root / "usr/local/lib/systemd/system/eptrace.service").read_text()
    assert (root / "etc/eptrace").stat().st_mode & 0o777 == 0o700
    assert (root / "etc/eptrace/eptrace.toml").stat().st_mode & 0o777 == 0o600

    r = make("install", DESTDIR=str(root))          # again: an upgrade, the same files
    assert r.returncode == 0 and tree(root) == files, r.stderr
    r = make("uninstall", DESTDIR=str(root))
    assert r.returncode == 0, r.stderr
    assert tree(root) == [], tree(root)
    r = make("uninstall", DESTDIR=str(root))         # nothing installed: a clear error
    assert r.returncode == 2 and "no eptrace install" in r.stderr, r.stderr


def test_uninstall_keeps_what_was_not_installed_or_was_edited(tmp_path):
    root = tmp_path / "root"
    (root / "usr/local/bin").mkdir(parents=True)
    (root / "usr/local/bin/other-tool").write_text("#!/bin/sh\n")
    r = make("install", DESTDIR=str(root))
    assert r.returncode == 0, r.stderr
    config = root / "etc/eptrace/eptrace.toml"
    config.write_text(config.read_text() + "\n[limits]\nringbuf_kb = 4096\n")
    r = make("uninstall", DESTDIR=str(root))
    assert r.returncode == 0 and "keeping the edited /etc/eptrace/eptrace.toml" in r.stderr, r.stderr
    assert tree(root) == ["etc", "etc/eptrace", "etc/eptrace/eptrace.toml", "usr", "usr/local", "usr/local/bin",
                          "usr/local/bin/other-tool"]


def test_install_refuses_a_directory_that_is_not_its_own(tmp_path):
    root = tmp_path / "root"
    (root / "usr/local/lib/eptrace").mkdir(parents=True)
    (root / "usr/local/lib/eptrace/precious").write_text("x")
    r = make("install", DESTDIR=str(root))
    assert r.returncode != 0 and "is not an eptrace install" in r.stderr, r.stderr
    assert tree(root) == ["usr", "usr/local", "usr/local/lib", "usr/local/lib/eptrace",
                          "usr/local/lib/eptrace/precious"]


def test_the_installed_command_runs_from_its_own_copy(tmp_path):
    """Installed under a prefix (no DESTDIR), the wrapper runs the installed tracer, not this checkout,
    whatever PYTHONPATH says, and the loader finds the installed probes."""
    require(Path(SYSTEM_PYTHON).exists(), f"{SYSTEM_PYTHON} is missing")
    r = make("install", **installed_under(tmp_path))
    assert r.returncode == 0, r.stderr
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([str(tmp_path / "usr/bin/eptrace"), "--version"], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("eptrace, version"), r.stdout + r.stderr
    lib = tmp_path / "usr/lib/eptrace"
    r = subprocess.run([SYSTEM_PYTHON, "-sE", "-c", f"import sys; sys.path.insert(0, {str(lib)!r}); "
                        "import tracer.kernel.loader as l, tracer; print(tracer.__file__); print(l.PROBES_DIR)"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(lib / "tracer/__init__.py"), str(lib / "probes")], r.stdout
    r = make("uninstall", **installed_under(tmp_path))
    assert r.returncode == 0 and tree(tmp_path) == [], tree(tmp_path)


def test_the_image_installs_the_same_way():
    """deploy/Dockerfile runs scripts/install.sh and starts the daemon as the unit does (it is not built here:
    README, "What was not tested")."""
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM debian:bookworm", text, re.M)
    assert "python3-bpfcc" in text and "python3-prometheus-client" in text
    assert "scripts/install.sh install" in text
    assert 'CMD ["daemon", "--config", "/etc/eptrace/eptrace.toml"]' in text

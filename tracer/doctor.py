"""The checks behind `eptrace doctor`: can this host run eptrace, and if not, what to do about it.

Every check is concrete (a file, a mount, a real BPF program load) and carries the command that fixes it.
Nothing here raises: any failure becomes a failed Check.
"""
from __future__ import annotations

import os
import platform
import re
import sys
import tempfile
from dataclasses import dataclass
from typing import List, Optional, Tuple

MIN_KERNEL = (5, 15)
TRACEFS = "/sys/kernel/tracing"
BTF_VMLINUX = "/sys/kernel/btf/vmlinux"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True  # False: informational, a failure does not stop eptrace


def run_checks() -> List[Check]:
    """All checks, in report order. Never raises."""
    checks: List[Check] = []
    for fn in (_check_root, _check_kernel, _check_btf):
        checks.append(_guard(fn))
    bcc_check = _guard(_check_bcc)
    checks.append(bcc_check)
    for fn in (_check_headers, _check_tracefs, _check_cgroup2, _check_bpffs, _check_pins, _check_probe_cache):
        checks.append(_guard(fn))
    root_ok = checks[0].ok
    try:
        checks.extend(_check_bpf(root_ok, bcc_check.ok))
    except Exception as e:  # noqa: BLE001 - the doctor never tracebacks
        checks.append(Check("BPF program loading", False, f"unexpected error: {_one_line(e)}",
                            "report this with the output of 'eptrace doctor'"))
    return checks


def can_run(checks) -> bool:
    """False when eptrace cannot run: any required check failed."""
    return all(c.ok for c in checks if getattr(c, "required", True))


def format_report(checks) -> str:
    """One line per check, plus an indented fix line under each failure."""
    lines = []
    for c in checks:
        if c.ok:
            lines.append(f"ok   {c.name}: {c.detail}")
            continue
        tag = "FAIL" if getattr(c, "required", True) else "warn"
        lines.append(f"{tag} {c.name}: {c.detail}")
        if c.fix:
            lines.append(f"     fix: {c.fix}")
    return "\n".join(lines)


# --- the checks ---------------------------------------------------------------------------------------

def _guard(fn) -> Check:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        name = fn.__name__.replace("_check_", "")
        return Check(name, False, f"check crashed: {_one_line(e)}", "report this with 'eptrace doctor' output")


def _check_root() -> Check:
    euid = os.geteuid()
    if euid == 0:
        return Check("root", True, "running as root (euid 0)")
    return Check("root", False, f"running as euid {euid}; loading BPF programs needs root",
                 "run with sudo: sudo eptrace doctor")


def _parse_release(release: str) -> Optional[Tuple[int, int]]:
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _check_kernel() -> Check:
    release = platform.release()
    ver = _parse_release(release)
    want = "%d.%d" % MIN_KERNEL
    if ver is None:
        return Check("kernel version", False, f"cannot parse kernel release {release!r}",
                     f"boot a Linux kernel >= {want}")
    if ver >= MIN_KERNEL:
        return Check("kernel version", True, f"Linux {release} (>= {want})")
    return Check("kernel version", False, f"Linux {release} is older than {want}",
                 f"upgrade to a kernel >= {want} (Debian 12: apt-get install -t bookworm-backports linux-image-amd64)")


def _check_btf() -> Check:
    if os.path.exists(BTF_VMLINUX):
        return Check("BTF", True, f"{BTF_VMLINUX} present", required=False)
    return Check("BTF", False, f"{BTF_VMLINUX} missing (informational: eptrace does not need it)",
                 "none needed; a kernel built with CONFIG_DEBUG_INFO_BTF=y provides it", required=False)


def _check_bcc() -> Check:
    fix = ("sudo make setup (or: apt-get install python3-bpfcc); note the PyPI package 'bcc' is an "
           "unrelated project: pip uninstall bcc if it is installed")
    try:
        import bcc  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return Check("bcc", False, f"cannot import bcc: {_one_line(e)}", fix)
    where = getattr(bcc, "__file__", "?")
    try:
        from bcc import BPF, BPFAttachType  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return Check("bcc", False, f"the 'bcc' module at {where} is not BPF Compiler Collection "
                                   f"({_one_line(e)})", fix)
    version = getattr(bcc, "__version__", "unknown version")
    return Check("bcc", True, f"bcc {version} ({os.path.dirname(where)})")


def _check_headers() -> Check:
    release = platform.release()
    build = f"/lib/modules/{release}/build"
    if os.path.isdir(build):
        target = os.path.realpath(build)
        detail = f"{build} -> {target}" if target != build else build
        if release not in os.path.basename(target):
            detail += " (generic headers stand in; probes read only UAPI contexts)"
        return Check("kernel headers", True, detail)
    state = "a broken link" if os.path.islink(build) else "missing"
    return Check("kernel headers", False, f"{build} is {state}; bcc compiles the probes against it",
                 "sudo make setup")


def _mounts() -> List[Tuple[str, str, str]]:
    """(source, mount point, fstype) for each line of /proc/mounts."""
    out = []
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3:
                out.append(tuple(_unescape(x) for x in fields[:3]))
    return out


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def _check_tracefs() -> Check:
    for _src, point, fstype in _mounts():
        if point == TRACEFS and fstype == "tracefs":
            return Check("tracefs", True, f"mounted at {TRACEFS}")
    return Check("tracefs", False, f"tracefs is not mounted at {TRACEFS}; tracepoint programs need it",
                 f"mount -t tracefs nodev {TRACEFS}")


def _check_cgroup2() -> Check:
    mounts = _mounts()
    points = [point for _src, point, fstype in mounts if fstype == "cgroup2"]
    if not points:
        return Check("cgroup v2", False, "no cgroup2 filesystem in /proc/mounts; episodes are cgroup v2 groups",
                     "mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none /sys/fs/cgroup/unified")
    hybrid = any(fstype == "cgroup" for _src, _point, fstype in mounts)
    layout = "hybrid layout, v1 controllers beside it" if hybrid else "unified layout"
    return Check("cgroup v2", True, f"cgroup2 at {points[0]} ({layout})")


def _check_bpffs() -> Check:
    for _src, point, fstype in _mounts():
        if fstype == "bpf":
            return Check("bpffs", True, f"mounted at {point} (pinned probes outlive a dead tracer)", required=False)
    return Check("bpffs", False, "no bpf filesystem is mounted; eptrace mounts one on /sys/fs/bpf when it starts",
                 "mount -t bpf bpf /sys/fs/bpf", required=False)


def _check_pins() -> Check:
    """The pinned state (README: Pinned state): what stays attached if a tracer dies."""
    from .kernel import pins
    states = pins.list_state()
    if not states:
        return Check("pinned state", True, f"none under {pins.root()}", required=False)
    parts = [f"{s.path} ({'watch' if s.owner == 'watch' else 'run of pid ' + s.owner}, "
             f"{'in use' if s.alive else 'NO live eptrace'}: {s.maps} maps, {s.links} links)" for s in states]
    stale = [s for s in states if not s.alive]
    return Check("pinned state", not stale, "; ".join(parts),
                 "eptrace unpin (detaches the probes it names; a restarted watch resumes its own instead)"
                 if stale else "", required=False)


def _check_probe_cache() -> Check:
    """The probe cache (README: Start-up): whether the next start compiles the probes."""
    from .kernel import loader, probecache
    from .kernel.compile import CGROUP_PROGRAMS
    d = probecache.directory()
    source, cflags = loader.probe_build(loader.RINGBUF_PAGES)
    try:
        cached = probecache.read(probecache.key(source, cflags, CGROUP_PROGRAMS, loader.PROBES_DIR))
    except probecache.CacheError as e:
        return Check("probe cache", False, f"{_one_line(e)}: each start compiles the probes (about 3 s)",
                     f"rm -r {d} (it is written again, root's own, at the next start)", required=False)
    entries = len(list(d.glob("*.json"))) if d.is_dir() else 0
    state = ("holds these probes for this kernel (with the default ring buffer): a start skips clang and bcc"
             if cached else "does not hold these probes for this kernel yet: the next start compiles and caches them")
    return Check("probe cache", True, f"{d} ({entries} entries) {state}", required=False)


# --- BPF program loading --------------------------------------------------------------------------------

# (a) a tracepoint program; TRACEPOINT_PROBE also attaches it when the BPF object is made.
_TRACEPOINT_SRC = r"""
TRACEPOINT_PROBE(sched, sched_process_exec)
{
    return 0;
}
"""

# (b) cgroup/connect4 and (c) sock_ops programs that use no maps.
_CGROUP_SRC = r"""
#include <uapi/linux/bpf.h>

int doctor_connect4(struct bpf_sock_addr *ctx)
{
    __u32 port = ctx->user_port;   /* a UAPI context read, as the probes do */
    return port ? 1 : 1;
}

int doctor_sockops(struct bpf_sock_ops *skops)
{
    if (skops->op == BPF_SOCK_OPS_TCP_CONNECT_CB)
        bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
    return 1;
}
"""

# (d) a ring buffer and socket-local storage, used from a connect4 program. The map calls must be in
# the main text (bcc rewrites them only there).
_MAPS_SRC = r"""
#include <uapi/linux/bpf.h>

struct doctor_rec {
    u32 pid;
    u32 port;
};
BPF_RINGBUF_OUTPUT(doctor_events, 1);
BPF_SK_STORAGE(doctor_owner, u32);

int doctor_maps_connect4(struct bpf_sock_addr *ctx)
{
    struct doctor_rec r = {};
    r.pid = bpf_get_current_pid_tgid() >> 32;
    r.port = ctx->user_port;
    struct bpf_sock *sk = ctx->sk;
    if (sk) {
        u32 *owner = doctor_owner.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
        if (owner)
            *owner = r.pid;
    }
    doctor_events.ringbuf_output(&r, sizeof(r), 0);
    return 1;
}
"""

_NAMES = {
    "tracepoint": "BPF tracepoint program",
    "connect4": "BPF cgroup/connect4 program",
    "sockops": "BPF sock_ops program",
    "maps": "BPF ring buffer + socket storage",
}

_FIXES = {
    "tracepoint": f"needs tracefs (mount -t tracefs nodev {TRACEFS}) and a kernel with CONFIG_BPF_EVENTS=y",
    "connect4": "boot a kernel with CONFIG_CGROUP_BPF=y (Linux >= 5.15)",
    "sockops": "boot a kernel with CONFIG_CGROUP_BPF=y and bpf_sock_ops_cb_flags_set (Linux >= 5.15)",
    "maps": "boot a kernel >= 5.15 with BPF ring buffers and socket-local storage (CONFIG_BPF_SYSCALL=y)",
}


def _check_bpf(root_ok: bool, bcc_ok: bool) -> List[Check]:
    if not (root_ok and bcc_ok):
        why = "needs root" if not root_ok else "needs bcc"
        fix = "run with sudo: sudo eptrace doctor" if not root_ok else "sudo make setup"
        return [Check(_NAMES[k], False, f"not tried: {why}", fix) for k in _NAMES]

    from bcc import BPF, BPFAttachType

    def load_tracepoint() -> str:
        b = _compile(BPF, _TRACEPOINT_SRC)
        try:
            return "loaded and attached to sched:sched_process_exec"
        finally:
            b.cleanup()

    def load_cgroup() -> Tuple[Check, Check]:
        try:
            b = _compile(BPF, _CGROUP_SRC)
        except Exception as e:  # noqa: BLE001
            msg = f"compile failed: {_one_line(e)}"
            return (Check(_NAMES["connect4"], False, msg, _FIXES["connect4"]),
                    Check(_NAMES["sockops"], False, msg, _FIXES["sockops"]))
        try:
            c4 = _try(_NAMES["connect4"], _FIXES["connect4"], lambda: _load(
                b, "doctor_connect4", BPF.CGROUP_SOCK_ADDR, attach_type=BPFAttachType.CGROUP_INET4_CONNECT)
                or "cgroup_sock_addr program (attach type inet4_connect) loaded")
            so = _try(_NAMES["sockops"], _FIXES["sockops"], lambda: _load(
                b, "doctor_sockops", BPF.SOCK_OPS) or "sock_ops program with bpf_sock_ops_cb_flags_set loaded")
            return c4, so
        finally:
            b.cleanup()

    def load_maps() -> str:
        b = _compile(BPF, _MAPS_SRC)
        try:
            _load(b, "doctor_maps_connect4", BPF.CGROUP_SOCK_ADDR,
                  attach_type=BPFAttachType.CGROUP_INET4_CONNECT)
            return "ring buffer and sk_storage maps created, used from a connect4 program"
        finally:
            b.cleanup()

    checks = [_try(_NAMES["tracepoint"], _FIXES["tracepoint"], load_tracepoint)]
    try:
        checks.extend(load_cgroup())
    except Exception as e:  # noqa: BLE001
        checks.extend(Check(_NAMES[k], False, _one_line(e), _FIXES[k]) for k in ("connect4", "sockops"))
    checks.append(_try(_NAMES["maps"], _FIXES["maps"], load_maps))
    return checks


def _try(name: str, fix: str, fn) -> Check:
    try:
        return Check(name, True, fn())
    except Exception as e:  # noqa: BLE001
        return Check(name, False, _one_line(e), fix)


class _BPFError(Exception):
    pass


def _compile(BPF, text: str):
    """BPF(text=...) with bcc's compiler chatter captured; on failure its last lines go in the error."""
    return _quietly(lambda: BPF(text=text.encode()))


def _load(b, func: str, prog_type: int, **kw) -> None:
    """Load one function (no attach); the verifier log, if any, goes in the error."""
    _quietly(lambda: b.load_func(func.encode(), prog_type, **kw))


def _quietly(fn):
    """Run fn with fd 2 (where bcc, clang and libbpf write from C) sent to a temp file."""
    try:
        tmp = tempfile.TemporaryFile(mode="w+b")
        saved = os.dup(2)
    except OSError:
        return fn()
    error = None
    try:
        try:
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
        os.dup2(tmp.fileno(), 2)
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            error = e
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        if error is not None:
            tmp.seek(0)
            log = tmp.read().decode(errors="replace")
        tmp.close()
    raise _BPFError(f"{_one_line(error)}{_log_tail(log)}") from None


def _log_tail(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return ""
    errors = [ln for ln in lines if "error" in ln.lower() or "invalid" in ln.lower()]
    tail = (errors or lines)[-2:]
    return " | " + " | ".join(t[:160] for t in tail)


def _one_line(e: BaseException) -> str:
    s = " ".join(str(e).split()) or type(e).__name__
    return s if len(s) <= 300 else s[:297] + "..."

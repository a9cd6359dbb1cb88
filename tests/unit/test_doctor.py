"""tracer.doctor: report shape, can_run logic, and a real run that never raises."""
import os

from tracer.doctor import Check, can_run, format_report, run_checks


def test_format_report_ok_and_fail_lines():
    checks = [
        Check("root", True, "running as root (euid 0)"),
        Check("tracefs", False, "not mounted at /sys/kernel/tracing",
              "mount -t tracefs nodev /sys/kernel/tracing"),
        Check("bcc", False, "cannot import bcc"),
    ]
    assert format_report(checks).splitlines() == [
        "ok   root: running as root (euid 0)",
        "FAIL tracefs: not mounted at /sys/kernel/tracing",
        "     fix: mount -t tracefs nodev /sys/kernel/tracing",
        "FAIL bcc: cannot import bcc",
    ]


def test_format_report_informational_failure_is_a_warning():
    report = format_report([Check("BTF", False, "missing", "none needed", required=False)])
    assert report.splitlines() == ["warn BTF: missing", "     fix: none needed"]


def test_format_report_empty():
    assert format_report([]) == ""


def test_can_run():
    ok = Check("a", True, "fine")
    bad = Check("b", False, "broken", "fix it")
    info = Check("BTF", False, "missing", required=False)
    assert can_run([])
    assert can_run([ok, ok])
    assert not can_run([ok, bad])
    assert not can_run([bad])
    assert can_run([ok, info])
    assert not can_run([info, bad])


def test_run_checks_never_raises_and_reports_every_check():
    checks = run_checks()
    assert isinstance(checks, list)
    assert all(isinstance(c, Check) for c in checks)
    names = [c.name for c in checks]
    assert names[:7] == ["root", "kernel version", "BTF", "bcc", "kernel headers", "tracefs", "cgroup v2"]
    assert [n for n in names if n.startswith("BPF ")] == [
        "BPF tracepoint program",
        "BPF cgroup/connect4 program",
        "BPF sock_ops program",
        "BPF ring buffer + socket storage",
    ]
    for c in checks:
        assert c.detail, c
        if not c.ok and c.required:
            assert c.fix, c
    report = format_report(checks)
    assert len([ln for ln in report.splitlines() if not ln.startswith("     fix: ")]) == len(checks)
    if os.geteuid() == 0:
        failed = [c for c in checks if c.required and not c.ok]
        assert not failed, format_report(failed)
        assert can_run(checks)
    else:
        assert not can_run(checks)  # the root check fails

#!/usr/bin/env bash
# Sets up eptrace on a Debian 12 / Ubuntu 22.04+ host: packages (bcc from the distro), kernel headers,
# tracefs, the venv at <repo>/.venv and /usr/local/bin/eptrace. Run as root (`sudo make setup`).
# Idempotent and fast when everything is already there; needs no stdin (CI).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
VENV="$REPO/.venv"
SYSTEM_PYTHON=/usr/bin/python3   # never the pyenv/other python3 that may come first on PATH

say()  { printf 'setup: %s\n' "$*" >&2; }
warn() { printf 'setup: warning: %s\n' "$*" >&2; }
die()  { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root: use 'sudo make setup'"

export DEBIAN_FRONTEND=noninteractive NEEDRESTART_MODE=a NEEDRESTART_SUSPEND=1
APT_OPTS=(-o DPkg::Lock::Timeout=300 -o Dpkg::Use-Pty=0)

# Packages. bcc comes from the distro (python3-bpfcc); the PyPI package "bcc" is unrelated.
PACKAGES=(
    python3-bpfcc bpfcc-tools
    python3-venv python3-pip python3-setuptools
    python3-click python3-pyroute2 python3-msgpack python3-pytest
    iproute2
    gcc libc6-dev liburing-dev make
    socat openssh-server openssh-client rsyslog rsyslog-gnutls rsyslog-relp curl git
    kcat
    strace openssl
    netcat-openbsd
    python3-paramiko    # tests: an SSH library's reverse forward (tests/kernel/test_detection_relay.py)
    iputils-ping
    python3-prometheus-client   # --metrics-listen's exposition (tracer/metrics_http.py)
    systemd                     # tests: systemd-analyze verify of deploy/eptrace.service
)

is_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

APT_UPDATED=0
apt_update_once() {
    [ "$APT_UPDATED" -eq 1 ] && return 0
    command -v apt-get >/dev/null || die "apt-get not found: eptrace's setup supports Debian 12 and Ubuntu 22.04+"
    say "apt-get update"
    apt-get "${APT_OPTS[@]}" update -qq >&2 || die "apt-get update failed"
    APT_UPDATED=1
}

apt_install() {
    apt_update_once
    say "installing: $*"
    apt-get "${APT_OPTS[@]}" install -y -qq --no-install-recommends "$@" >/dev/null \
        || die "apt-get install failed for: $*"
}

# A package that apt can install (has a candidate version) after the update.
apt_has() {
    local cand
    cand="$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2; exit}')"
    [ -n "$cand" ] && [ "$cand" != "(none)" ]
}

missing=()
for p in "${PACKAGES[@]}"; do
    is_installed "$p" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
else
    say "packages: all installed"
fi

# Kernel headers: bcc compiles the probes at run time against /lib/modules/$(uname -r)/build.
KVER="$(uname -r)"
MODDIR="/lib/modules/$KVER"
if [ -d "$MODDIR/build" ]; then
    say "kernel headers: $MODDIR/build present"
else
    if [ -e "$MODDIR/build" ] && [ ! -L "$MODDIR/build" ]; then
        die "$MODDIR/build exists but is not a directory: fix or remove it by hand"
    fi
    apt_update_once
    if apt_has "linux-headers-$KVER"; then
        apt_install "linux-headers-$KVER"
    fi
    if [ ! -d "$MODDIR/build" ]; then
        # No headers package for the running kernel: the distro's generic headers stand in.
        . /etc/os-release
        if [ "${ID:-}" = ubuntu ] || [[ " ${ID_LIKE:-} " == *" ubuntu "* ]]; then
            meta=linux-headers-generic flavour=generic
        else
            flavour="$(dpkg --print-architecture)"   # amd64, arm64, ...
            meta="linux-headers-$flavour"
        fi
        is_installed "$meta" || apt_install "$meta"
        hdr="$(ls -d /usr/src/linux-headers-*-"$flavour" 2>/dev/null | sort -V | tail -n 1 || true)"
        [ -n "$hdr" ] && [ -d "$hdr" ] || die "no /usr/src/linux-headers-*-$flavour after installing $meta"
        mkdir -p "$MODDIR"
        ln -sfn "$hdr" "$MODDIR/build"
        base="${hdr%-"$flavour"}"
        for common in "$base-common" "$base"; do     # Debian: *-common; Ubuntu: the bare version
            if [ -d "$common" ] && [ "$common" != "$hdr" ]; then
                [ -e "$MODDIR/source" ] || ln -sfn "$common" "$MODDIR/source"
                break
            fi
        done
        warn "kernel $KVER has no headers package; generic headers $(basename "$hdr") stand in (probes read only UAPI contexts, so this is safe)"
    fi
fi

# mount_once NAME FSTYPE POINT: mount FSTYPE on POINT unless something is mounted there.
mount_once() {
    if mountpoint -q "$3"; then
        say "$1: mounted"
    elif mount -t "$2" "$2" "$3" 2>/dev/null; then
        say "$1: mounted at $3"
    else
        warn "could not mount $1 at $3; 'eptrace doctor' will report it"
    fi
}
# tracefs (tracepoint programs attach through it). debugfs is not needed.
mount_once tracefs tracefs /sys/kernel/tracing
# bpffs: eptrace pins its probes there so that they outlive a tracer that dies (README: Fail-closed tracing).
mount_once bpffs bpf /sys/fs/bpf

# The venv: the system python with system site packages, so that Debian's bcc (and the apt-installed
# click, pyroute2, msgpack, pytest) import. Made again when missing or not built from the system python.
venv_ok() {
    [ -x "$VENV/bin/python" ] && [ -x "$VENV/bin/pip" ] || return 1
    grep -qi '^include-system-site-packages *= *true' "$VENV/pyvenv.cfg" 2>/dev/null || return 1
    local want have
    want="$("$SYSTEM_PYTHON" -c 'import sys; print(sys.prefix, sys.version_info[:2])')"
    have="$("$VENV/bin/python" -c 'import sys; print(sys.base_prefix, sys.version_info[:2])' 2>/dev/null)" || return 1
    [ "$want" = "$have" ]
}
if venv_ok; then
    say "venv: $VENV present"
else
    say "venv: creating $VENV from $SYSTEM_PYTHON"
    rm -rf "$VENV"
    "$SYSTEM_PYTHON" -m venv --system-site-packages "$VENV" >&2 || die "could not create the venv at $VENV"
fi

# eptrace into the venv, editable (the loader finds the probes at <repo>/probes). Dependencies come from
# apt, so this needs no package index. setuptools older than 64 (Ubuntu 22.04) has no editable wheels
# for a pyproject-only project: there a .pth file and a console script do the same job.
# Skipped when the same pyproject.toml was already installed from this repo into this venv.
STAMP="$VENV/.eptrace-installed"
want_stamp="$REPO $(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)"
if [ -x "$VENV/bin/eptrace" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want_stamp" ]; then
    say "venv: eptrace installed (editable)"
else
    say "venv: installing eptrace (editable)"
    rm -f "$STAMP"
    if "$VENV/bin/python" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 64)' 2>/dev/null; then
        (cd "$REPO" && PIP_NO_INPUT=1 "$VENV/bin/pip" install -q --disable-pip-version-check --no-index \
            --no-build-isolation --no-deps -e "$REPO" >&2) || die "pip install -e $REPO failed"
    else
        site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
        printf '%s\n' "$REPO" >"$site/eptrace-dev.pth"
        cat >"$VENV/bin/eptrace" <<SCRIPT
#!$VENV/bin/python
import sys
from tracer.cli import main
sys.exit(main())
SCRIPT
        chmod 755 "$VENV/bin/eptrace"
    fi
    printf '%s\n' "$want_stamp" >"$STAMP"
fi

# confluent-kafka (librdkafka's maintained binding, librdkafka bundled in the wheel) for the kafka://
# output, pinned, from the package index: Debian 12's python3-confluent-kafka is too old (1.7).
CONFLUENT_KAFKA_VERSION=2.16.1
if [ "$("$VENV/bin/python" -c 'import confluent_kafka; print(confluent_kafka.version()[0])' 2>/dev/null)" \
        = "$CONFLUENT_KAFKA_VERSION" ]; then
    say "venv: confluent-kafka $CONFLUENT_KAFKA_VERSION present"
else
    say "venv: installing confluent-kafka $CONFLUENT_KAFKA_VERSION"
    PIP_NO_INPUT=1 "$VENV/bin/pip" install -q --disable-pip-version-check \
        "confluent-kafka==$CONFLUENT_KAFKA_VERSION" >&2 \
        || warn "pip install confluent-kafka failed: the kafka:// output is unavailable (its tests fail under CI)"
fi

(cd / && "$VENV/bin/python" -c "import bcc, click, pyroute2, msgpack, tracer") \
    || die "the venv cannot import bcc, click, pyroute2, msgpack and tracer (see above)"

# Test-only Python packages (the conformance checker's OCSF schema and Community ID reference), pinned by
# tests/requirements.txt; installed again only when that file changed.
TEST_STAMP="$VENV/.eptrace-test-requirements"
want_test="$(sha256sum "$REPO/tests/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$TEST_STAMP" 2>/dev/null)" = "$want_test" ]; then
    say "venv: test requirements installed"
else
    say "venv: installing tests/requirements.txt"
    PIP_NO_INPUT=1 "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REPO/tests/requirements.txt" >&2 \
        || die "pip install -r tests/requirements.txt failed"
    printf '%s\n' "$want_test" >"$TEST_STAMP"
fi

# Test helpers from npm: @fluent-org/logger's FluentServer for tests/kernel/test_forward.py, and Elastic's
# @elastic/ecs (the ECS field set) for the conformance checker (tests/conformance.py), pinned by
# tests/kernel/helpers/package.json and package-lock.json into tests/kernel/helpers/node_modules (git-ignored).
# Installed again only when missing or not the pinned version. Node.js and npm come from the distro when
# the host has none (the tests fail under CI without them, rather than skip).
HELPERS="$REPO/tests/kernel/helpers"
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    apt_update_once
    say "installing: nodejs npm"
    apt-get "${APT_OPTS[@]}" install -y -qq --no-install-recommends nodejs npm >/dev/null \
        || warn "apt-get install nodejs npm failed: the Fluent Forward tests will fail"
fi
npm_pkg_version() {   # the "version" (installed package.json) or the pinned dependency (our package.json)
    "$VENV/bin/python" -c 'import json, sys
d = json.load(open(sys.argv[1]))
print(d["dependencies"][sys.argv[2]] if len(sys.argv) > 2 else d["version"])' "$@" 2>/dev/null || true
}
want_fluent="$(npm_pkg_version "$HELPERS/package.json" @fluent-org/logger)"
have_fluent="$(npm_pkg_version "$HELPERS/node_modules/@fluent-org/logger/package.json")"
want_ecs="$(npm_pkg_version "$HELPERS/package.json" @elastic/ecs)"
have_ecs="$(npm_pkg_version "$HELPERS/node_modules/@elastic/ecs/package.json")"
if [ -n "$want_fluent" ] && [ "$have_fluent" = "$want_fluent" ] && [ "$have_ecs" = "$want_ecs" ]; then
    say "test helpers: @fluent-org/logger $have_fluent and @elastic/ecs $have_ecs present"
elif command -v node >/dev/null && command -v npm >/dev/null; then
    say "test helpers: npm ci in $HELPERS (@fluent-org/logger $want_fluent, @elastic/ecs $want_ecs)"
    (cd "$HELPERS" && npm ci --no-audit --no-fund --loglevel=error >&2) \
        || warn "npm ci failed in $HELPERS: the Fluent Forward tests and the ECS conformance checks will fail"
else
    warn "node or npm not found: the Fluent Forward tests and the ECS conformance checks will fail (install Node.js >= 12 and npm)"
fi

ln -sfn "$VENV/bin/eptrace" /usr/local/bin/eptrace

echo "eptrace set up: run 'eptrace doctor' to check the kernel" >&2

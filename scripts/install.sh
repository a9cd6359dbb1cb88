#!/usr/bin/env bash
# `make install` / `make uninstall`: eptrace system-wide, for the daemon's service unit (deploy/).
#
#   LIBDIR/        tracer/ (with its .pyc) beside probes/, where the loader looks; prepare-host; the default
#                  config; installed-files, the manifest of everything outside LIBDIR that install made
#   BINDIR/eptrace a wrapper: INSTALL_PYTHON -sE (no user site, no PYTHON* variables, so root's command is
#                  not steered by the environment) with LIBDIR on its path
#   UNITDIR/eptrace.service   deploy/eptrace.service.in with the paths filled in
#   SYSCONFDIR/eptrace/eptrace.toml   deploy/eptrace.toml, only when there is none (kept by uninstall
#                  when it was edited)
# The system python is enough: eptrace's dependencies are Debian packages (scripts/setup.sh's list). A venv's
# python (made with --system-site-packages, for confluent-kafka) can be named by INSTALL_PYTHON.
# Every path is under DESTDIR (a staging root) when it is set. Directories install made are removed again.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
: "${DESTDIR:=}" "${BINDIR:=/usr/local/bin}" "${LIBDIR:=/usr/local/lib/eptrace}"
: "${UNITDIR:=/usr/local/lib/systemd/system}" "${SYSCONFDIR:=/etc}" "${INSTALL_PYTHON:=/usr/bin/python3}"
MANIFEST="$DESTDIR$LIBDIR/installed-files"
CONFIG="$SYSCONFDIR/eptrace/eptrace.toml"

die() { printf 'make %s: %s\n' "$ACTION" "$*" >&2; exit 2; }

# made_dirs PATH...: create each missing directory (parents first), printing those it made.
made_dirs() {
    local dir missing
    for dir in "$@"; do
        missing=()
        while [ ! -e "$DESTDIR$dir" ]; do missing=("$dir" "${missing[@]}"); dir="$(dirname "$dir")"; done
        for dir in "${missing[@]}"; do
            mkdir -m 755 "$DESTDIR$dir"
            printf 'dir %s\n' "$dir"
        done
    done
}

install_eptrace() {
    [ -x "$INSTALL_PYTHON" ] || die "no python at $INSTALL_PYTHON (set INSTALL_PYTHON)"
    "$INSTALL_PYTHON" -c 'import bcc, click, pyroute2, msgpack, prometheus_client' 2>/dev/null \
        || echo "make install: warning: $INSTALL_PYTHON cannot import bcc, click, pyroute2, msgpack and" \
                "prometheus_client: run 'sudo make setup' (or apt-get install their python3- packages)" >&2
    if [ -f "$MANIFEST" ]; then
        uninstall_eptrace quiet          # an upgrade: what the last install made goes first
    elif [ -e "$DESTDIR$LIBDIR" ]; then
        die "$DESTDIR$LIBDIR exists and is not an eptrace install: not touching it"
    fi
    local made
    made="$(made_dirs "$(dirname "$LIBDIR")" "$BINDIR" "$UNITDIR")"
    mkdir -m 755 "$DESTDIR$LIBDIR"
    {
        [ -z "$made" ] || printf '%s\n' "$made"
        (cd "$REPO" && find tracer -name '*.py' -exec install -D -m 644 {} "$DESTDIR$LIBDIR/{}" \;)
        install -d -m 755 "$DESTDIR$LIBDIR/probes"
        install -m 644 "$REPO"/probes/*.c "$REPO"/probes/*.h "$DESTDIR$LIBDIR/probes/"
        install -m 755 "$REPO/deploy/prepare-host" "$DESTDIR$LIBDIR/prepare-host"
        install -m 644 "$REPO/deploy/eptrace.toml" "$DESTDIR$LIBDIR/eptrace.toml.default"
        "$INSTALL_PYTHON" -m compileall -q -d "$LIBDIR/tracer" "$DESTDIR$LIBDIR/tracer" >/dev/null

        [ ! -e "$DESTDIR$BINDIR/eptrace" ] || [ -L "$DESTDIR$BINDIR/eptrace" ] \
            || die "$DESTDIR$BINDIR/eptrace exists and is not eptrace's: remove it first"
        rm -f "$DESTDIR$BINDIR/eptrace"      # make setup's link to a checkout's venv, if any
        printf '#!%s -sE\nimport sys\nsys.path.insert(0, "%s")\nfrom tracer.cli import main\nsys.exit(main())\n' \
            "$INSTALL_PYTHON" "$LIBDIR" > "$DESTDIR$BINDIR/eptrace"
        chmod 755 "$DESTDIR$BINDIR/eptrace"
        printf 'file %s\n' "$BINDIR/eptrace"

        sed -e "s|@BINDIR@|$BINDIR|g" -e "s|@LIBDIR@|$LIBDIR|g" -e "s|@SYSCONFDIR@|$SYSCONFDIR|g" \
            "$REPO/deploy/eptrace.service.in" > "$DESTDIR$UNITDIR/eptrace.service"
        chmod 644 "$DESTDIR$UNITDIR/eptrace.service"
        printf 'file %s\n' "$UNITDIR/eptrace.service"

        if [ -e "$DESTDIR$CONFIG" ]; then
            echo "make install: keeping the existing $CONFIG" >&2
        else
            made_dirs "$SYSCONFDIR"
            [ -d "$DESTDIR$SYSCONFDIR/eptrace" ] || { install -d -m 700 "$DESTDIR$SYSCONFDIR/eptrace";
                                                       printf 'dir %s\n' "$SYSCONFDIR/eptrace"; }
            install -m 600 "$REPO/deploy/eptrace.toml" "$DESTDIR$CONFIG"
            printf 'config %s\n' "$CONFIG"
        fi
    } > "$MANIFEST.new"
    mv "$MANIFEST.new" "$MANIFEST"
    echo "installed eptrace: $DESTDIR$BINDIR/eptrace and $DESTDIR$UNITDIR/eptrace.service;" \
         "then: systemctl daemon-reload && systemctl enable --now eptrace" >&2
}

uninstall_eptrace() {
    [ -f "$MANIFEST" ] || die "no eptrace install at $DESTDIR$LIBDIR (no $MANIFEST)"
    local kind path
    while read -r kind path; do
        case "$kind" in
            file) rm -f "$DESTDIR$path" ;;
            config) if cmp -s "$DESTDIR$path" "$DESTDIR$LIBDIR/eptrace.toml.default"; then rm -f "$DESTDIR$path"
                    else echo "make uninstall: keeping the edited $path" >&2; fi ;;
        esac
    done < "$MANIFEST"
    local dirs
    dirs="$(awk '$1 == "dir" { print $2 }' "$MANIFEST" | sort -r)"    # children before their parents
    rm -rf "$DESTDIR$LIBDIR" "$DESTDIR/var/cache/eptrace/probes"    # the probe cache (tracer/kernel/probecache.py)
    rmdir "$DESTDIR/var/cache/eptrace" 2>/dev/null || true
    for path in $dirs; do
        rmdir "$DESTDIR$path" 2>/dev/null || true        # kept when something else is in it now
    done
    [ "${1:-}" = quiet ] || echo "uninstalled eptrace from $DESTDIR$LIBDIR" >&2
}

ACTION="${1:-}"
case "$ACTION" in
    install) install_eptrace ;;
    uninstall) uninstall_eptrace ;;
    *) echo "usage: $0 install|uninstall (DESTDIR, BINDIR, LIBDIR, UNITDIR, SYSCONFDIR, INSTALL_PYTHON)" >&2; exit 2 ;;
esac

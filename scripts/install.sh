#!/usr/bin/env bash
# Installs npu-supervisor: binaries, configuration, systemd units, documentation. `make install` runs it after a
# release build. Variables (all optional):
#   PREFIX=/usr/local      binaries in $PREFIX/bin, docs in $PREFIX/share/doc/npu-supervisor
#   DESTDIR=               staging root for packaging (nothing outside it is touched; no systemctl call)
#   SYSCONFDIR=/etc        the configuration goes to $SYSCONFDIR/npu-supervisor/config.toml, never over an
#                          existing one (the shipped example is always installed next to it as config.toml.example)
#   UNITDIR=               default $PREFIX/lib/systemd/system for PREFIX /usr or /usr/local (systemd looks there),
#                          else /etc/systemd/system
#   BUILD_DIR=.build/release   where the built executables are
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX=${PREFIX:-/usr/local}
PREFIX=${PREFIX%/}
DESTDIR=${DESTDIR:-}
SYSCONFDIR=${SYSCONFDIR:-/etc}
BUILD_DIR=${BUILD_DIR:-.build/release}
if [ -z "${UNITDIR:-}" ]; then
    case "$PREFIX" in
        /usr|/usr/local) UNITDIR=$PREFIX/lib/systemd/system ;;
        *) UNITDIR=/etc/systemd/system ;;
    esac
fi
BINDIR=$PREFIX/bin
DOCDIR=$PREFIX/share/doc/npu-supervisor
CONFDIR=$SYSCONFDIR/npu-supervisor

for exe in npu-supervisord npu-supervisorctl npu-worker; do
    [ -x "$BUILD_DIR/$exe" ] || { echo "install.sh: $BUILD_DIR/$exe is missing: build first (make release)" >&2; exit 1; }
done

say() { echo "install: $*"; }

install -d "$DESTDIR$BINDIR" "$DESTDIR$CONFDIR" "$DESTDIR$UNITDIR" "$DESTDIR$DOCDIR"
for exe in npu-supervisord npu-supervisorctl npu-worker; do
    install -m 0755 "$BUILD_DIR/$exe" "$DESTDIR$BINDIR/$exe"
done
# npu-cgroup-exec (per-worker memory cgroups) must sit next to npu-supervisord.
[ -x "$BUILD_DIR/npu-cgroup-exec" ] && install -m 0755 "$BUILD_DIR/npu-cgroup-exec" "$DESTDIR$BINDIR/npu-cgroup-exec"
say "binaries in $DESTDIR$BINDIR"

# The example runs simulated devices out of the box; installed, its sockets go where the socket units put them.
example=$(mktemp)
trap 'rm -f "$example"' EXIT
sed -E 's|^run_dir = .*|run_dir = "/run/npu-supervisor"   # where systemd/npu-supervisord*.socket listen|' \
    config/example.toml >"$example"
install -m 0644 "$example" "$DESTDIR$CONFDIR/config.toml.example"
if [ -e "$DESTDIR$CONFDIR/config.toml" ]; then
    say "kept the existing $DESTDIR$CONFDIR/config.toml (the shipped one is config.toml.example)"
else
    install -m 0644 "$example" "$DESTDIR$CONFDIR/config.toml"
    say "configuration in $DESTDIR$CONFDIR/config.toml"
fi

for unit in systemd/*.service systemd/*.socket; do
    sed -e "s|/usr/local/bin/|$BINDIR/|g" \
        -e "s|/etc/npu-supervisor/|$CONFDIR/|g" \
        -e "s|/usr/local/share/doc/npu-supervisor/|$DOCDIR/|g" \
        "$unit" >"$example"
    install -m 0644 "$example" "$DESTDIR$UNITDIR/$(basename "$unit")"
done
say "systemd units in $DESTDIR$UNITDIR"

install -m 0644 README.md "$DESTDIR$DOCDIR/README.md"
[ -f docs/PROTOCOL.md ] && install -m 0644 docs/PROTOCOL.md "$DESTDIR$DOCDIR/PROTOCOL.md"

# Tell a running systemd, when the units went where it looks (not for staging or test installs).
case "$UNITDIR" in
    /etc/systemd/system|/usr/lib/systemd/system|/usr/local/lib/systemd/system|/lib/systemd/system) live=yes ;;
    *) live=no ;;
esac
if [ -z "$DESTDIR" ] && [ "$live" = yes ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    say "enable and start with: systemctl enable --now npu-supervisord.socket npu-supervisord-status.socket" \
        "npu-supervisord-control.socket npu-supervisord.service"
fi

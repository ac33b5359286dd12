#!/usr/bin/env bash
# Checks the packages in DIST (default dist/) built by deploy/packaging/package.sh:
#   1. contents: the .deb, the .rpm and the tarball carry the binaries, units, configuration (a conffile /
#      %config(noreplace)) and docs; the .rpm requires libsystemd; the .deb depends on libsystemd0.
#   2. with SMOKE=1 (default): each package is unpacked as an installation would lay it out (dpkg -x, rpm2cpio,
#      tar) into a scratch root, and there, inside a mount namespace where the Swift toolchain's folder is hidden
#      by an empty tmpfs, the installed npu-supervisord starts with simulated devices, answers an inference on
#      requests.sock (npu-supervisorctl infer) and on the HTTP front (curl), reports status, and stops (exit 0).
#      A control binary that needs the toolchain (DYNAMIC_PROBE, e.g. a debug build) must fail to start there:
#      proof that the toolchain really is hidden.
# ALLOW_DYNAMIC=1: packages of a debug build (the test of the scripts), whose rpm requires libswift*.
# Needs root (unshare -m). Prints "ok: ..." lines; exits non-zero at the first failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
DIST=${DIST:-dist}
SMOKE=${SMOKE:-1}
fail() { echo "FAIL: $*" >&2; exit 1; }
ok() { echo "ok: $*"; }

deb=$(ls "$DIST"/npu-supervisor_*.deb 2>/dev/null | head -1)
rpm=$(ls "$DIST"/npu-supervisor-*.rpm 2>/dev/null | head -1)
tgz=$(ls "$DIST"/npu-supervisor-*-linux-*.tar.gz 2>/dev/null | head -1)
[ -n "$deb" ] && [ -n "$rpm" ] && [ -n "$tgz" ] || fail "no packages in $DIST (make package)"

expected=(
    usr/bin/npu-supervisord usr/bin/npu-supervisorctl usr/bin/npu-worker usr/bin/npu-cgroup-exec
    usr/lib/systemd/system/npu-supervisord.service usr/lib/systemd/system/npu-supervisord.socket
    usr/lib/systemd/system/npu-supervisord-status.socket usr/lib/systemd/system/npu-supervisord-control.socket
    usr/lib/systemd/system/npu-supervisord-http.socket
    etc/npu-supervisor/config.toml etc/npu-supervisor/config.toml.example
    usr/share/doc/npu-supervisor/README.md usr/share/doc/npu-supervisor/PROTOCOL.md
    usr/share/doc/npu-supervisor/LICENSE-tomlplusplus
)
contains() {  # listing, label
    for f in "${expected[@]}"; do grep -qE "(^|[ /.])$f\$" <<<"$1" || fail "$2 lacks $f"; done
}
contains "$(dpkg-deb -c "$deb" | awk '{print $NF}')" "$deb"
[ "$(dpkg-deb -f "$deb" Package)" = npu-supervisor ] || fail "deb Package field"
dpkg-deb -f "$deb" Depends | grep -q libsystemd0 || fail "deb does not depend on libsystemd0"
dpkg-deb --ctrl-tarfile "$deb" | tar -xOf - ./conffiles | grep -qx /etc/npu-supervisor/config.toml \
    || fail "config.toml is not a conffile in the deb"
ok "deb contents: ${#expected[@]} files, conffile, Depends: $(dpkg-deb -f "$deb" Depends)"
contains "$(rpm -qlp "$rpm" 2>/dev/null)" "$rpm"
rpm -qp --requires "$rpm" 2>/dev/null | grep -q 'libsystemd.so.0' || fail "rpm does not require libsystemd.so.0"
if [ "${ALLOW_DYNAMIC:-0}" != 1 ] && rpm -qp --requires "$rpm" 2>/dev/null | grep -q 'libswift'; then
    fail "rpm requires a Swift runtime library"
fi
rpm -qcp "$rpm" 2>/dev/null | grep -qx /etc/npu-supervisor/config.toml || fail "config.toml is not %config in the rpm"
ok "rpm contents: ${#expected[@]} files, %config, requires libsystemd.so.0 and no libswift"
contains "$(tar -tzf "$tgz")" "$tgz"
ok "tarball contents"

[ "$SMOKE" = 1 ] || exit 0
[ "$(id -u)" -eq 0 ] || fail "the smoke test needs root (unshare -m)"
swift_bin=$(command -v swift 2>/dev/null || true)
toolchain=""
if [ -n "$swift_bin" ]; then
    toolchain=$(dirname "$(dirname "$(dirname "$(readlink -f "$swift_bin")")")")
    case "$toolchain" in /|/usr|/usr/local) fail "the Swift toolchain is in $toolchain: it cannot be hidden" ;; esac
fi

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/deb" "$scratch/rpm" "$scratch/tgz"
dpkg -x "$deb" "$scratch/deb"
(cd "$scratch/rpm" && rpm2cpio "$(cd - >/dev/null && readlink -f "$rpm")" | cpio -idm --quiet)
tar -C "$scratch/tgz" -xzf "$tgz"

# Runs inside the namespace: $1 = unpacked root, $2 = scratch folder for the run.
cat >"$scratch/smoke.sh" <<'SMOKE'
set -euo pipefail
root=$1; run=$2; probe=${3:-}
bin=$root/usr/bin
if [ -n "$probe" ]; then
    if "$probe" --help >/dev/null 2>&1; then echo "FAIL: $probe (needs the toolchain) still starts" >&2; exit 1; fi
fi
if ldd "$bin/npu-supervisord" | grep -q 'not found'; then ldd "$bin/npu-supervisord" >&2; exit 1; fi
mkdir -p "$run"
cat >"$run/config.toml" <<CONF
[supervisor]
run_dir = "$run/run"
shutdown_timeout = "5s"
[http]
listen = "127.0.0.1:0"
[defaults]
command = ["npu-worker", "--load-ms", "50"]
kind = "cpu"
inference_probe = { enabled = false }
[[device]]
id = "0"
[[device]]
id = "1"
CONF
"$bin/npu-supervisord" --config "$run/config.toml" >"$run/daemon.log" 2>&1 &
daemon=$!
trap 'kill -9 $daemon 2>/dev/null || true' EXIT
ctl() { "$bin/npu-supervisorctl" --socket "$run/run/control.sock" "$@"; }
for _ in $(seq 1 200); do  # up to 20 s for both workers
    ctl status 2>/dev/null | grep -c ' ready ' | grep -qx 2 && break
    sleep 0.1
done
ctl status | grep -c ' ready ' | grep -qx 2 || { cat "$run/daemon.log" >&2; echo "FAIL: workers not ready" >&2; exit 1; }
answer=$(ctl infer '{"prompt": "Hi", "max_new_tokens": 5}')
grep -q '"text":"npu npu quickly tokens workers"' <<<"$answer" || { echo "FAIL: infer: $answer" >&2; exit 1; }
http=$(ctl status --json | sed -nE 's/.*"http" *: *"([^"]+)".*/\1/p' | head -1)
answer=$(curl -s -m 10 -X POST --data '{"prompt": "Hi", "max_new_tokens": 5}' "http://$http/v1/infer")
grep -q '"text":"npu npu quickly tokens workers"' <<<"$answer" || { echo "FAIL: HTTP infer: $answer" >&2; exit 1; }
ctl shutdown >/dev/null
wait $daemon || { echo "FAIL: daemon exit status $?" >&2; exit 1; }
trap - EXIT
echo "version $("$bin/npu-supervisord" --version 2>&1 | head -1)"
SMOKE

probe=${DYNAMIC_PROBE:-}
for kind in deb rpm tgz; do
    hide=""
    [ -n "$toolchain" ] && hide="mount -t tmpfs -o ro,size=4k none '$toolchain' && "
    out=$(unshare -m --propagation private -- bash -c "${hide}bash '$scratch/smoke.sh' '$scratch/$kind' '$scratch/run-$kind' '$probe'" 2>&1) \
        || fail "smoke test of the $kind install: $out"
    ok "$kind installed: start, infer (socket and HTTP), status, shutdown with ${toolchain:-no toolchain} hidden ($out)"
done

#!/usr/bin/env bash
# Installs what building and testing npu-supervisor needs on a Debian/Ubuntu machine, only when missing.
# libsystemd-dev + pkg-config: the CSystemd system-library target links libsystemd.
# socat, curl: used by the README's examples and some tests. systemd, util-linux: the real-systemd tests.
set -euo pipefail
need=()
optional=()
pkg-config --exists libsystemd 2>/dev/null || need+=(libsystemd-dev pkg-config)
command -v socat >/dev/null 2>&1 || need+=(socat)
command -v curl >/dev/null 2>&1 || need+=(curl)
[ -x /lib/systemd/systemd ] || need+=(systemd)
command -v unshare >/dev/null 2>&1 || need+=(util-linux)
# The systemd tests (scripts/systemd-sandbox.sh) also need nsenter (util-linux), script (bsdutils), mount.
command -v nsenter >/dev/null 2>&1 || need+=(util-linux)
command -v script >/dev/null 2>&1 || need+=(bsdutils)
command -v mount >/dev/null 2>&1 || need+=(mount)
# Monitoring tests: promtool checks and unit-tests the shipped alert rules; a real Prometheus scrapes the daemon.
# Best effort (the tests skip with the reason where it cannot be installed): installed apart from the rest below.
command -v promtool >/dev/null 2>&1 || optional+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
    echo "install-deps: installing ${need[*]}" >&2
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ ${#optional[@]} -gt 0 ]; then
    echo "install-deps: installing ${optional[*]} (optional: the monitoring tests skip without it)" >&2
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
    export DEBIAN_FRONTEND=noninteractive
    { [ ${#need[@]} -gt 0 ] || $SUDO apt-get update -qq; } && $SUDO apt-get install -y -qq --no-install-recommends "${optional[@]}" >/dev/null \
        || echo "install-deps: could not install ${optional[*]}; the Prometheus tests will say so and skip" >&2
    # The package starts a Prometheus service where systemd runs; the tests start their own.
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true; fi
fi

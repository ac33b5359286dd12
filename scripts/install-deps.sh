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
# rpm (rpmbuild, rpm2cpio) and cpio: `make package` and the packaging tests.
command -v rpmbuild >/dev/null 2>&1 || need+=(rpm)
command -v cpio >/dev/null 2>&1 || need+=(cpio)
# kubectl (Debian: kubernetes-client; any kubectl with `kustomize` will do) and haproxy: the deployment tests.
command -v kubectl >/dev/null 2>&1 || need+=(kubernetes-client)
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
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
# kubernetes-validate (PyPI; bundles the Kubernetes API schemas): the manifests' offline validation.
if ! command -v kubernetes-validate >/dev/null 2>&1; then
    echo "install-deps: installing kubernetes-validate (pip)" >&2
    python3 -m pip install --quiet kubernetes-validate==1.37.0 2>/dev/null \
        || python3 -m pip install --quiet --break-system-packages kubernetes-validate==1.37.0
fi
# PyTorch + transformers: python/examples/torch_worker.py and its tests (python/tests/test_torch_worker.py, which
# skip with the reason where these are missing). Best effort, like Prometheus above. The CPU build of torch
# (`+cpu`, about 190 MB) comes from a configured find-links folder or extra index of CPU wheels; the default
# index would pull the CUDA build and its multi-GB nvidia-* wheels, which CI does not need. Measured: about 160 s on 2 CPUs from a local wheel.
# (find_spec, not import: importing torch and transformers takes ~10 s.)
if ! python3 -c 'import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ("torch", "transformers", "tokenizers", "safetensors")))'; then
    echo "install-deps: installing torch (CPU), transformers, tokenizers, safetensors (pip; optional)" >&2
    torch_pkgs=("torch==2.13.0+cpu" "transformers==5.24.0" "tokenizers==0.23.3" "safetensors==0.8.0")
    python3 -m pip install --quiet "${torch_pkgs[@]}" 2>/dev/null \
        || python3 -m pip install --quiet --break-system-packages "${torch_pkgs[@]}" \
        || echo "install-deps: could not install torch/transformers; the torch_worker tests will say so and skip" >&2
fi

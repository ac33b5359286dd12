#!/usr/bin/env python3
"""Validates deploy/kubernetes offline: `kubectl kustomize` of the base and of each overlay, every resource
against the Kubernetes API schemas with `kubernetes-validate --strict` (PyPI; it bundles the schemas), then the
rules the manifests exist for (probes, drain, grace period, /dev/shm, scrape annotations, device resources),
and each overlay's config.toml with `npu-supervisord --check-config` (argument: the npu-supervisord to use).
Prints one "ok:" line per check; exits 1 at the first failure."""
import os, re, shutil, subprocess, sys, tempfile, tomllib
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
BUILDS = {"base": "base", "ascend": "overlays/ascend", "nvidia": "overlays/nvidia"}
DEVICE_RESOURCE = {"ascend": "huawei.com/Ascend910", "nvidia": "nvidia.com/gpu"}


def fail(message):
    print("FAIL: " + message, file=sys.stderr)
    sys.exit(1)


def duration(text):
    m = re.fullmatch(r"(\d+)(ms|s|m)", text)
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[m.group(2)]


def check(name, path, supervisord, scratch):
    kubectl = shutil.which("kubectl") or fail("kubectl not found (Debian: kubernetes-client)")
    built = subprocess.run([kubectl, "kustomize", os.path.join(HERE, path)], capture_output=True, text=True)
    if built.returncode != 0:
        fail("kubectl kustomize %s: %s" % (path, built.stderr))
    out = os.path.join(scratch, name + ".yaml")
    with open(out, "w") as f:
        f.write(built.stdout)
    validate = shutil.which("kubernetes-validate") or fail("kubernetes-validate not found (pip install kubernetes-validate)")
    v = subprocess.run([validate, "--strict", "--quiet", out], capture_output=True, text=True)
    if v.returncode != 0:
        fail("kubernetes-validate --strict %s:\n%s%s" % (path, v.stdout, v.stderr))
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    kinds = sorted(d["kind"] for d in docs)
    if kinds != ["ConfigMap", "DaemonSet", "Namespace", "Service"]:
        fail("%s: resources %s" % (path, kinds))
    for d in docs:
        if d["kind"] != "Namespace" and d["metadata"].get("namespace") != "npu-supervisor":
            fail("%s: %s %s is not in namespace npu-supervisor" % (path, d["kind"], d["metadata"]["name"]))
    print("ok: %s: kubectl kustomize, kubernetes-validate --strict (%s)" % (name, ", ".join(kinds)))

    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    pod = ds["spec"]["template"]
    spec = pod["spec"]
    c = spec["containers"][0]
    config = cm["data"]["config.toml"]
    probes = {k: c[k]["httpGet"]["path"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    if probes != {"startupProbe": "/readyz", "livenessProbe": "/livez", "readinessProbe": "/readyz"}:
        fail("%s: probes %s" % (name, probes))
    startup = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
    toml = tomllib.loads(config)
    start_timeout = duration(toml["defaults"].get("start_timeout", "300s"))
    if startup < start_timeout:
        fail("%s: the startup probe allows %ss, less than start_timeout (%ss)" % (name, startup, start_timeout))
    shutdown = duration(toml["supervisor"].get("shutdown_timeout", "30s"))
    stop = duration(toml["defaults"].get("stop_timeout", "15s"))
    grace = spec["terminationGracePeriodSeconds"]
    if grace <= shutdown + stop:
        fail("%s: terminationGracePeriodSeconds %s <= drain %ss + stop_timeout %ss" % (name, grace, shutdown, stop))
    pre = c["lifecycle"]["preStop"]["exec"]["command"]
    if pre[0] != "npu-supervisorctl" or pre[-1] != "shutdown":
        fail("%s: preStop %s" % (name, pre))
    shm = [v for v in spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
    if not shm or not any(m["mountPath"] == "/dev/shm" and m["name"] == shm[0]["name"] for m in c["volumeMounts"]):
        fail("%s: no memory-backed /dev/shm" % name)
    ann = pod["metadata"]["annotations"]
    if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/path") != "/metrics":
        fail("%s: scrape annotations %s" % (name, ann))
    if name in DEVICE_RESOURCE and DEVICE_RESOURCE[name] not in c["resources"]["limits"]:
        fail("%s: no %s limit" % (name, DEVICE_RESOURCE[name]))
    devices = len(toml["device"])
    limit = c["resources"]["limits"].get(DEVICE_RESOURCE.get(name, ""), devices)
    if limit != devices:
        fail("%s: %s devices in config.toml but a limit of %s" % (name, devices, limit))
    print("ok: %s: startup %ss >= start_timeout %ss, liveness /livez, readiness /readyz, preStop drain, grace %ss > %ss + %ss, /dev/shm, scrape annotations, %s device(s)"
          % (name, startup, start_timeout, grace, shutdown, stop, devices))

    if supervisord:
        # The config as the daemon would read it in the pod: token and device tools in a scratch folder.
        token = os.path.join(scratch, "token")
        with open(token, "w") as f:
            f.write("t0ken\n")
        bindir = os.path.join(scratch, "bin")
        os.makedirs(bindir, exist_ok=True)
        for tool in ("npu-smi", "nvidia-smi"):
            with open(os.path.join(bindir, tool), "w") as f:
                f.write("#!/bin/sh\nexit 0\n")
            os.chmod(os.path.join(bindir, tool), 0o755)
        conf = os.path.join(scratch, name + ".toml")
        with open(conf, "w") as f:
            f.write(config.replace("/etc/npu-supervisor/token/token", token))
        env = dict(os.environ, PATH=bindir + ":" + os.environ.get("PATH", ""))
        r = subprocess.run([supervisord, "--config", conf, "--check-config"], capture_output=True, text=True, env=env)
        if r.returncode != 0:
            fail("%s: npu-supervisord --check-config: %s" % (name, r.stderr))
        print("ok: %s: config.toml passes npu-supervisord --check-config" % name)


def main():
    supervisord = sys.argv[1] if len(sys.argv) > 1 else None
    with tempfile.TemporaryDirectory() as scratch:
        for name, path in BUILDS.items():
            check(name, path, supervisord, scratch)


if __name__ == "__main__":
    main()

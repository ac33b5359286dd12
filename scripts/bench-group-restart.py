#!/usr/bin/env python3
"""Kill -> serving again: a tensor-parallel group of N ranks side by side with a single device, in one run.

One npu-supervisord serves a single device ("0") and a group ("tp0", devices 1..N) with the same worker binary
(the reference npu-worker; with WORLD_SIZE > 1 it does a real TCP rendezvous among the ranks before it says
ready). The two are killed in alternation: SIGKILL of the single device's worker, or of the group's last rank (a
follower: the whole group must be stopped and restarted). Right after each kill, a request pinned to the victim
is sent; it waits in the queue until the victim serves again, so its latency is kill -> serving again (plus the
few milliseconds of the request itself, measured alone first and reported); an answer from the old process
(the group's leader before its follower's death was noticed) does not count: requests are sent until a new
process answers.

Usage: scripts/bench-group-restart.py [--ranks 2] [--kills 20] [--load-ms 0] [--bin .build/release]
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from npu_supervisor.client import Client, status as read_status  # noqa: E402


def status(run_dir):
    return read_status(os.path.join(run_dir, "status.sock"))


def wait(predicate, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if predicate():
                return True
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    return False


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--load-ms", type=int, default=0)
    parser.add_argument("--bin", default=".build/release")
    parser.add_argument("--cgroups", default="off", choices=["auto", "off"])
    args = parser.parse_args()
    binary = os.path.abspath(args.bin)
    folder = tempfile.mkdtemp(prefix="npu-group-bench-")
    run_dir = os.path.join(folder, "run")
    devices = ", ".join(f'"{i}"' for i in range(1, args.ranks + 1))
    config = f"""
[supervisor]
run_dir = "{run_dir}"
[http]
listen = ""
[cgroups]
mode = "{args.cgroups}"
[requests]
retries = 1
[defaults]
command = ["{binary}/npu-worker", "--load-ms", "{args.load_ms}", "--token-ms", "0"]
inference_probe = {{ enabled = false }}
heartbeat_interval = "100ms"
heartbeat_timeout = "2s"
backoff_initial = "10ms"
backoff_reset_after = "200ms"
restart_limit = 1000000
restart_window = "1s"
stop_timeout = "2s"
[[device]]
id = "0"
[[group]]
id = "tp0"
devices = [{devices}]
"""
    path = os.path.join(folder, "bench.toml")
    with open(path, "w") as f:
        f.write(config)
    log = open(os.path.join(folder, "daemon.log"), "w")
    daemon = subprocess.Popen([binary + "/npu-supervisord", "--config", path], stdout=log, stderr=log)
    try:
        if not wait(lambda: all(w["state"] == "ready" for w in status(run_dir)["workers"])):
            sys.exit("workers not ready; see " + log.name)
        client = Client(os.path.join(run_dir, "requests.sock"))
        payload = {"prompt": "x", "max_new_tokens": 1}
        alone = {}
        for target in ("0", "tp0"):
            samples = []
            for _ in range(50):
                t = time.perf_counter()
                client.infer(payload, device=target, deadline_ms=10000)
                samples.append((time.perf_counter() - t) * 1000)
            alone[target] = statistics.median(samples)
        results = {"0": [], "tp0": []}
        victim_device = {"0": "0", "tp0": str(args.ranks)}
        for i in range(args.kills * 2):
            target = "0" if i % 2 == 0 else "tp0"
            doc = status(run_dir)
            worker = next(w for w in doc["workers"] if w["device"] == victim_device[target])
            # The process that answers for the target: the device's worker, or the group's leader.
            answering = next(w for w in doc["workers"] if w["device"] == ("0" if target == "0" else "1"))["pid"]
            # Each kill after the victim has served for backoff_reset_after: restarted at once, no backoff.
            time.sleep(0.25)
            t = time.perf_counter()
            os.kill(worker["pid"], signal.SIGKILL)
            # Serving again = an answer from a new process (an answer from the old leader before the kill of its
            # follower was noticed does not count).
            while json.loads(client.infer(payload, device=target, deadline_ms=30000))["pid"] == answering:
                pass
            results[target].append((time.perf_counter() - t) * 1000)
            wait(lambda: all(w["state"] == "ready" for w in status(run_dir)["workers"]))
        single = statistics.median(results["0"])
        group = statistics.median(results["tp0"])
        print(f"kill -> serving again, median of {args.kills} kills each (ms), load {args.load_ms} ms, "
              f"cgroups {args.cgroups}:")
        print(f"  single device      {single:8.1f}   (p90 {sorted(results['0'])[int(0.9 * args.kills)]:.1f}; "
              f"a request alone {alone['0']:.2f})")
        print(f"  group of {args.ranks} ranks   {group:8.1f}   (p90 {sorted(results['tp0'])[int(0.9 * args.kills)]:.1f}; "
              f"a request alone {alone['tp0']:.2f})")
        print(f"  ratio group/single {group / single:8.2f}")
        restarts = next(g for g in status(run_dir)["groups"] if g["id"] == "tp0")["restarts"]
        print(f"  group restarts seen by the supervisor: {restarts}")
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(20)
        except subprocess.TimeoutExpired:
            daemon.kill()


if __name__ == "__main__":
    main()

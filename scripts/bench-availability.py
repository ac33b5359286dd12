#!/usr/bin/env python3
"""Availability account and /metrics figures for BENCHMARKS.md (issue 12).

Starts a release npu-supervisord with 4 reference workers (echo payloads, backoff 100 ms), then:
  1. chaos: `npu-bench load` for DURATION seconds with a random worker SIGKILLed every KILL_EVERY seconds,
     and compares npu-bench's client-side counts (ok, each error code) with the supervisor's availability
     account (status document) and with inference_requests_total in /metrics;
  2. scrape cost: GET /metrics N times (after the traffic above), median / p90 wall time and body size.
Usage: scripts/bench-availability.py [--duration 10] [--kill-every 1] [--clients 8] [--depth 4] [--scrapes 200] [--retries 1]
"""
import argparse, json, os, shutil, signal, socket, statistics, subprocess, sys, tempfile, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, ".build", "release")
ap = argparse.ArgumentParser()
ap.add_argument("--duration", type=float, default=10)
ap.add_argument("--kill-every", type=float, default=1)
ap.add_argument("--clients", type=int, default=8)
ap.add_argument("--depth", type=int, default=4)
ap.add_argument("--scrapes", type=int, default=200)
ap.add_argument("--retries", type=int, default=1)
a = ap.parse_args()

tmp = tempfile.mkdtemp(prefix="npu-avail-")
conf = os.path.join(tmp, "c.toml")
with open(conf, "w") as f:
    f.write(f"""[supervisor]
run_dir = "run"
[http]
listen = "127.0.0.1:0"
[requests]
retries = {a.retries}
[availability]
objective = 0.999
window = "10m"
[defaults]
command = ["{BIN}/npu-worker", "--load-ms", "0"]
backoff_initial = "100ms"
restart_limit = 1000
inference_probe = {{ enabled = false }}
""" + "".join(f'[[device]]\nid = "{i}"\n' for i in range(4)))
daemon = subprocess.Popen([f"{BIN}/npu-supervisord", "--config", conf], stdout=subprocess.DEVNULL,
                          stderr=open(os.path.join(tmp, "log"), "w"))
status_sock = os.path.join(tmp, "run", "status.sock")


def status():
    s = socket.socket(socket.AF_UNIX)
    s.connect(status_sock)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    return json.loads(data)


try:
    deadline = time.monotonic() + 20
    while True:
        try:
            doc = status()
            if all(w["state"] == "ready" for w in doc["workers"]):
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit("bench: workers not ready")
        time.sleep(0.05)
    http = doc["supervisor"]["http"]
    out = subprocess.run([f"{BIN}/npu-bench", "load", "--socket", os.path.join(tmp, "run", "requests.sock"),
                          "--clients", str(a.clients), "--depth", str(a.depth), "--duration", str(a.duration),
                          "--kill-every", str(a.kill_every), "--status", status_sock, "--machine"],
                         capture_output=True, text=True, check=True).stdout
    load = json.loads(out.strip().splitlines()[-1])
    doc = status()
    acc = doc["availability"]["since_start"]
    metrics = urllib.request.urlopen(f"http://{http}/metrics").read().decode()
    scraped = {}
    for line in metrics.splitlines():
        if line.startswith("inference_requests_total{"):
            code = line.split('status="')[1].split('"')[0]
            scraped[code] = scraped.get(code, 0) + int(float(line.split()[-1]))
    scraped = {k: v for k, v in scraped.items() if v}
    times = []
    for _ in range(a.scrapes):
        t = time.perf_counter()
        body = urllib.request.urlopen(f"http://{http}/metrics").read()
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    print(json.dumps({"load": load, "account": {k: acc[k] for k in ("received", "accepted", "refused", "answered",
                      "abandoned", "succeeded", "failed", "availability", "error_budget_remaining",
                      "capacity_lost_seconds", "capacity_availability", "seconds")},
                      "metrics_by_status": scraped, "restarts": sum(w["restarts"] for w in doc["workers"]),
                      "scrape_ms_median": round(statistics.median(times), 3),
                      "scrape_ms_p90": round(times[int(len(times) * 0.9)], 3), "scrape_bytes": len(body)}, indent=1))
finally:
    daemon.send_signal(signal.SIGTERM)
    try:
        daemon.wait(20)
    except subprocess.TimeoutExpired:
        daemon.kill()
    shutil.rmtree(tmp, ignore_errors=True)

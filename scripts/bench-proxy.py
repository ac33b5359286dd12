#!/usr/bin/env python3
"""Side-by-side proxy benchmark for BENCHMARKS.md (issue: "as fast as a C proxy").

Runs, in one invocation and interleaved round by round (so machine noise hits all three alike):
  direct      clients talk to echoing workers' own Unix sockets (npu-worker --listen), no proxy
  supervisor  clients -> npu-supervisord requests.sock -> the same echo workers (over fd 3)
  haproxy     clients -> HAProxy (mode tcp, Unix socket front and back, balance leastconn, nbthread 2 = its
              default on this 2-CPU machine) -> echo workers
  haproxy-1t  the same HAProxy limited to one thread (npu-supervisord runs its request path on one thread)
  with --floors, two bare byte forwarders (a backend connection per client, as HAProxy; no decoding):
  nio-floor   `npu-bench forward`: SwiftNIO, one event loop: what NIO's loop and pipeline cost before any work of ours
  epoll-floor `npu-bench forward --raw`: Swift on a plain epoll set, one thread: what Swift itself costs
for 1, 8 and 64 clients, 64 B and 4 KiB payloads; latency with one request in flight per client (depth 1),
throughput pipelined (depth 16). Reports medians over the rounds and the supervisor/HAProxy ratios.
Usage: scripts/bench-proxy.py [--rounds 3] [--seconds 2] [--workers 2] [--burst-affinity N] [--floors]
       [--case SIZE:CLIENTS:DEPTH ...]
(--burst-affinity sets the supervisor's [requests] burst_affinity, 0 = the default: every request to the
least-loaded worker.)
"""
import argparse, json, os, shutil, signal, socket, subprocess, sys, tempfile, time, statistics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, ".build", "release")


from benchlib import start_echo_workers, start_haproxy, stop_all, wait_ready, wait_socket


def load(sockets, clients, depth, size, seconds, status=None):
    cmd = [os.path.join(BIN, "npu-bench"), "load", "--clients", str(clients), "--depth", str(depth),
           "--size", str(size), "--duration", str(seconds), "--machine"]
    for s in sockets:
        cmd += ["--socket", s]
    if status:
        cmd += ["--status", status]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds * 10 + 60)
    if out.returncode != 0:
        raise SystemExit(f"bench: load failed: {out.stdout}\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--burst-affinity", type=int, default=0)
    ap.add_argument("--floors", action="store_true",
                    help="also run the bare forwarders (npu-bench forward, with and without NIO)")
    ap.add_argument("--case", action="append", default=[], metavar="SIZE:CLIENTS:DEPTH",
                    help="run only these rows (repeatable), e.g. --case 64:1:16")
    args = ap.parse_args()
    if not shutil.which("haproxy"):
        raise SystemExit("bench: haproxy not installed (apt-get install haproxy)")
    tmp = tempfile.mkdtemp(prefix="npu-proxy-bench-")
    procs = []
    try:
        worker_socks = start_echo_workers(os.path.join(BIN, "npu-worker"), tmp, args.workers, procs)
        front, _ = start_haproxy(tmp, worker_socks, 2, procs)
        front1, _ = start_haproxy(tmp, worker_socks, 1, procs, name="haproxy1")
        floors = {}
        if args.floors:
            for name, extra in (("nio-floor", []), ("epoll-floor", ["--raw"])):
                floors[name] = os.path.join(tmp, f"{name}.sock")
                cmd = [os.path.join(BIN, "npu-bench"), "forward", "--listen", floors[name]] + extra
                for b in worker_socks:
                    cmd += ["--backend", b]
                procs.append(subprocess.Popen(cmd, stderr=subprocess.DEVNULL))
                wait_socket(floors[name])
        conf = os.path.join(tmp, "supervisor.toml")
        with open(conf, "w") as f:
            f.write('[supervisor]\nrun_dir = "run"\nlog_level = "warning"\n[requests]\nmax_queue = 65536\n'
                    f'max_inflight_per_connection = 1024\nburst_affinity = {args.burst_affinity}\n[http]\nlisten = ""\n'
                    f'[defaults]\ncommand = ["{os.path.join(BIN, "npu-worker")}"]\nmax_inflight = 1024\n'
                    'inference_probe = { enabled = false }\n')
            for i in range(args.workers):
                f.write(f'[[device]]\nid = "{i}"\n')
        procs.append(subprocess.Popen([os.path.join(BIN, "npu-supervisord"), "--config", conf],
                                      stderr=subprocess.DEVNULL))
        status = os.path.join(tmp, "run", "status.sock")
        wait_ready(status, args.workers)
        targets = {"direct": (worker_socks, None), "supervisor": ([os.path.join(tmp, "run", "requests.sock")], status),
                   "haproxy": ([front], None), "haproxy-1t": ([front1], None)}
        for name, path in floors.items():
            targets[name] = ([path], None)
        results = {}
        cases = [(size, clients, depth) for size in (64, 4096) for clients in (1, 8, 64) for depth in (1, 16)]
        if args.case:
            cases = [tuple(int(x) for x in c.split(":")) for c in args.case]
        for r in range(args.rounds):
            for case in cases:
                for name, (socks, st) in targets.items():
                    res = load(socks, case[1], case[2], case[0], args.seconds, st)
                    assert res["never_answered"] == 0 and not res["errors"], res
                    results.setdefault((name,) + case, []).append(res)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        print(f"median of {args.rounds} rounds, {args.seconds} s each, {args.workers} echo workers, "
              f"{os.cpu_count()} CPUs, supervisor burst_affinity = {args.burst_affinity}")
        print("| payload | clients | depth | direct req/s | supervisor req/s | haproxy req/s | haproxy-1t req/s "
              "| sup/haproxy | sup/haproxy-1t | direct p50/p99 ms | supervisor p50/p99 ms | haproxy p50/p99 ms "
              "| haproxy-1t p50/p99 ms | supervisor RSS max |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for case in cases:
            row = {}
            for name in targets:
                rs = results[(name,) + case]
                row[name] = (statistics.median(x["rps"] for x in rs), statistics.median(x["p50_ms"] for x in rs),
                             statistics.median(x["p99_ms"] for x in rs), max(x["rss_max_kb"] for x in rs))
            ratio = row["supervisor"][0] / row["haproxy"][0] if row["haproxy"][0] else float("nan")
            ratio1 = row["supervisor"][0] / row["haproxy-1t"][0] if row["haproxy-1t"][0] else float("nan")
            pl = lambda n: f"{row[n][1]:.3f}/{row[n][2]:.3f}"
            print(f"| {case[0]} B | {case[1]} | {case[2]} | {row['direct'][0]:.0f} | {row['supervisor'][0]:.0f} | "
                  f"{row['haproxy'][0]:.0f} | {row['haproxy-1t'][0]:.0f} | {ratio:.2f} | {ratio1:.2f} | {pl('direct')} | "
                  f"{pl('supervisor')} | {pl('haproxy')} | {pl('haproxy-1t')} | {row['supervisor'][3] / 1024:.1f} MB |")
        if floors:
            print("\nThe bare forwarders in the same rounds (nio = npu-bench forward, epoll = npu-bench forward --raw):")
            print("| payload | clients | depth | nio req/s | epoll req/s | nio/haproxy | nio/haproxy-1t | epoll/haproxy "
                  "| epoll/haproxy-1t | supervisor/nio | nio p50 ms | epoll p50 ms |")
            print("|---|---|---|---|---|---|---|---|---|---|---|---|")
            for case in cases:
                med = lambda n, k: statistics.median(x[k] for x in results[(n,) + case])
                f, e = med("nio-floor", "rps"), med("epoll-floor", "rps")
                h, h1 = med("haproxy", "rps"), med("haproxy-1t", "rps")
                print(f"| {case[0]} B | {case[1]} | {case[2]} | {f:.0f} | {e:.0f} | {f / h:.2f} | {f / h1:.2f} | "
                      f"{e / h:.2f} | {e / h1:.2f} | {med('supervisor', 'rps') / f:.2f} | "
                      f"{med('nio-floor', 'p50_ms'):.3f} | {med('epoll-floor', 'p50_ms'):.3f} |")
    finally:
        stop_all(procs)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

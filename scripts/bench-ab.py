#!/usr/bin/env python3
"""A/B benchmark of two npu-supervisord builds on the request path, with HAProxy beside them (BENCHMARKS.md).

Starts supervisor A (OLD_BIN/npu-supervisord) and supervisor B (NEW_BIN/npu-supervisord), each with two echoing
`npu-worker`s of OLD_BIN, and HAProxy 2.6 (mode tcp, 2 threads, balance leastconn) in front of two
`npu-worker --listen` of OLD_BIN; then runs the same `npu-bench load` (of OLD_BIN) against each in turn, case by
case, round by round, reversing the order every other round so that machine noise hits all alike. For each
target it also reads the CPU time (user and system, from /proc/PID/stat) and the context switches the proxy
process spent during the load, and reports them per request: the cost of a request to the proxy, which is what
decides throughput when the machine is saturated; and the idle CPU of the whole machine during the load
(/proc/stat), which says whether it was.

Usage: scripts/bench-ab.py OLD_BIN NEW_BIN [--rounds 3] [--seconds 1] [--cases SIZE:CLIENTS:DEPTH,...]
                           [--no-haproxy] [--haproxy-nice N] [--a-requests TOML] [--b-requests TOML]
                           [--a-supervisor TOML] [--b-supervisor TOML]
OLD_BIN and NEW_BIN are folders holding npu-supervisord, npu-worker and npu-bench (e.g. copies of .build/release);
the same folder twice is an A/A run (the noise floor). --a-requests / --b-requests add keys to that supervisor's
[requests] table (e.g. --b-requests 'burst_affinity = 8': the same build with a setting on and off), and
--a-supervisor / --b-supervisor to its [supervisor] table (e.g. --a-supervisor 'loop_nice = 0').
"""
import argparse, json, os, shutil, signal, socket, subprocess, sys, tempfile, time, statistics

CLK = os.sysconf("SC_CLK_TCK")


from benchlib import start_echo_workers, start_haproxy, stop_all, wait_ready


def machine_idle():
    """(idle, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    return fields[3] + fields[4], sum(fields)


def cost(pids):
    """CPU seconds (user, system) and context switches of these processes, threads included."""
    user = system = switches = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        user += int(fields[11]) / CLK
        system += int(fields[12]) / CLK
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/status") as f:
                    for line in f:
                        if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                            switches += int(line.split()[1])
            except FileNotFoundError:
                pass
    return user, system, switches


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1)
    ap.add_argument("--cases", default="64:1:1,64:1:16,64:8:1,64:8:16,64:64:1,64:64:16,"
                                        "4096:1:1,4096:1:16,4096:8:1,4096:8:16,4096:64:1,4096:64:16")
    ap.add_argument("--no-haproxy", action="store_true")
    ap.add_argument("--haproxy-nice", type=int, default=None,
                    help="give HAProxy's threads this nice value (the supervisor's loop runs at loop_nice, -10 by "
                         "default): the same scheduling advantage for both")
    ap.add_argument("--a-requests", default="", help="extra [requests] keys for supervisor A")
    ap.add_argument("--b-requests", default="", help="extra [requests] keys for supervisor B")
    ap.add_argument("--a-supervisor", default="", help="extra [supervisor] keys for supervisor A")
    ap.add_argument("--b-supervisor", default="", help="extra [supervisor] keys for supervisor B")
    a = ap.parse_args()
    old, new = os.path.abspath(a.old), os.path.abspath(a.new)
    if not a.no_haproxy and not shutil.which("haproxy"):
        raise SystemExit("bench-ab: haproxy not installed (apt-get install haproxy), or pass --no-haproxy")
    tmp = tempfile.mkdtemp(prefix="npu-bench-ab-")
    procs = []
    try:
        targets, pids = {}, {}
        for name, bindir in (("A", old), ("B", new)):
            d = os.path.join(tmp, name)
            os.makedirs(d)
            conf = os.path.join(d, "supervisor.toml")
            with open(conf, "w") as f:
                extra = (a.a_requests if name == "A" else a.b_requests).replace(";", "\n")
                extra_sup = (a.a_supervisor if name == "A" else a.b_supervisor).replace(";", "\n")
                f.write(f'[supervisor]\nrun_dir = "{d}/run"\nlog_level = "warning"\n{extra_sup}\n[requests]\nmax_queue = 65536\n'
                        f'max_inflight_per_connection = 1024\n{extra}\n[http]\nlisten = ""\n'
                        f'[defaults]\ncommand = ["{old}/npu-worker"]\nmax_inflight = 1024\n'
                        'inference_probe = { enabled = false }\n[[device]]\nid = "0"\n[[device]]\nid = "1"\n')
            procs.append(subprocess.Popen([f"{bindir}/npu-supervisord", "--config", conf], stderr=subprocess.DEVNULL))
            pids[name] = [wait_ready(f"{d}/run/status.sock", 2)["supervisor"]["pid"]]
            targets[name] = f"{d}/run/requests.sock"
        if not a.no_haproxy:
            backends = start_echo_workers(f"{old}/npu-worker", tmp, 2, procs)
            front, haproxy = start_haproxy(tmp, backends, 2, procs)
            if a.haproxy_nice is not None:
                for tid in os.listdir(f"/proc/{haproxy.pid}/task"):
                    os.setpriority(os.PRIO_PROCESS, int(tid), a.haproxy_nice)
            targets["H"] = front
            pids["H"] = [haproxy.pid]
        cases = [tuple(int(x) for x in c.split(":")) for c in a.cases.split(",")]
        results = {}
        for r in range(a.rounds):
            for case in cases:
                names = list(targets) if r % 2 == 0 else list(reversed(targets))
                for name in names:
                    before, idle_before = cost(pids[name]), machine_idle()
                    out = subprocess.run([f"{old}/npu-bench", "load", "--clients", str(case[1]), "--depth",
                                          str(case[2]), "--size", str(case[0]), "--duration", str(a.seconds),
                                          "--machine", "--socket", targets[name]], capture_output=True, text=True)
                    after, idle_after = cost(pids[name]), machine_idle()
                    d = json.loads(out.stdout)
                    assert d["never_answered"] == 0 and not d["errors"], d
                    n = max(1, d["ok"])
                    d["user_us"] = (after[0] - before[0]) * 1e6 / n
                    d["sys_us"] = (after[1] - before[1]) * 1e6 / n
                    d["switches"] = (after[2] - before[2]) / n
                    d["idle_pct"] = 100 * (idle_after[0] - idle_before[0]) / max(1, idle_after[1] - idle_before[1])
                    results.setdefault((name,) + case, []).append(d)
            print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)
        med = lambda n, c, k: statistics.median(x[k] for x in results[(n,) + c]) if (n,) + c in results else float("nan")
        print(f"A = {old}, B = {new}; median of {a.rounds} rounds of {a.seconds} s; {os.cpu_count()} CPUs"
              + (f"; HAProxy's threads at nice {a.haproxy_nice}" if a.haproxy_nice is not None else "")
              + (f"; A's [requests] + {a.a_requests!r}" if a.a_requests else "")
              + (f"; B's [requests] + {a.b_requests!r}" if a.b_requests else "")
              + (f"; A's [supervisor] + {a.a_supervisor!r}" if a.a_supervisor else "")
              + (f"; B's [supervisor] + {a.b_supervisor!r}" if a.b_supervisor else ""))
        print("| payload | clients × depth | A req/s | B req/s | B/A | HAProxy req/s | B/HAProxy | p50 ms A / B / HAProxy "
              "| proxy CPU µs per request, user+sys: A / B / HAProxy | context switches per request: B / HAProxy "
              "| machine idle %: B / HAProxy |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for c in cases:
            A, B, H = med("A", c, "rps"), med("B", c, "rps"), med("H", c, "rps")
            cpu = lambda n: f"{med(n, c, 'user_us'):.2f}+{med(n, c, 'sys_us'):.2f}"
            print(f"| {c[0]} B | {c[1]} × {c[2]} | {A:.0f} | {B:.0f} | {B / A:.2f} | {H:.0f} | {B / H:.2f} | "
                  f"{med('A', c, 'p50_ms'):.3f} / {med('B', c, 'p50_ms'):.3f} / {med('H', c, 'p50_ms'):.3f} | "
                  f"{cpu('A')} / {cpu('B')} / {cpu('H')} | {med('B', c, 'switches'):.3f} / {med('H', c, 'switches'):.3f} | "
                  f"{med('B', c, 'idle_pct'):.0f} / {med('H', c, 'idle_pct'):.0f} |")
    finally:
        stop_all(procs)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

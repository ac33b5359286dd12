#!/usr/bin/env bash
# Before/after comparison of two builds of npu-supervisor, in ONE invocation, for BENCHMARKS.md.
#
#   scripts/bench-compare.sh [--quick] [options] BEFORE_DIR AFTER_DIR
#
# Each DIR is a checkout whose .build/release holds a release build (`swift build -c release`) and, optionally,
# whose .build-static/release holds a `swift build -c release --static-swift-stdlib --scratch-path .build-static`
# build (only used for the binary sizes). The machines are noisy, so everything is interleaved: rounds alternate
# before/after (ABBA order), the status timing alternates single invocations, and medians plus after/before
# ratios are reported. Measured:
#   - scripts/bench-proxy.py (supervisor vs HAProxy vs direct), one round per invocation, alternating builds
#   - kill -> replacement spawned / ready (`npu-bench restart`, backoff 10 ms, cgroups auto and off)
#   - `npu-supervisorctl status` wall time against an idle supervisor with 4 workers (both daemons up at once)
#   - that supervisor's idle RSS / RssAnon / threads / fds (as `npu-bench idle --workers 4`: 3 s settle)
#   - stripped sizes of the --static-swift-stdlib binaries
# The measuring harness (bench-proxy.py and the npu-bench load generator / restart driver) is BEFORE_DIR's by
# default, so both builds are measured by the same code (--harness own: each build's own harness). The product
# binaries (npu-supervisord, npu-supervisorctl, npu-worker, npu-cgroup-exec) are always each build's own.
# Output: a markdown report on stdout (progress on stderr). Default run ~4-5 min on 2 vCPUs; --quick ~1.5 min (its
# proxy figures are too short to mean much: a smoke test).
# Needs: python3, haproxy (apt-get install haproxy), strip (binutils).
set -euo pipefail
exec python3 - "$@" <<'PY'
import argparse, json, math, os, shutil, signal, socket, statistics, subprocess, sys, tempfile, time

ap = argparse.ArgumentParser(prog="scripts/bench-compare.sh", description="Before/after benchmark comparison.")
ap.add_argument("before", help="checkout with the 'before' build (.build/release, optionally .build-static/release)")
ap.add_argument("after", help="checkout with the 'after' build")
ap.add_argument("--quick", action="store_true", help="short run (self-check): fewer/shorter rounds")
ap.add_argument("--rounds", type=int, help="rounds per build for restart/status/RSS (default 2)")
ap.add_argument("--proxy-rounds", type=int, help="bench-proxy.py invocations per build (default 2)")
ap.add_argument("--proxy-seconds", type=float, help="seconds per bench-proxy case (default 1, quick 0.3)")
ap.add_argument("--restart-reps", type=int, help="SIGKILLs per npu-bench restart run (default 40, quick 20)")
ap.add_argument("--status-runs", type=int, help="npu-supervisorctl status runs per build and round (default 100 "
                "x 2 rounds = 200; quick 50)")
ap.add_argument("--harness", choices=["before", "own"], default="before",
                help="whose bench-proxy.py / npu-bench measure both builds (default: BEFORE_DIR's)")
ap.add_argument("--skip", action="append", default=[], choices=["proxy", "restart", "status", "sizes"])
ap.add_argument("--label-before"); ap.add_argument("--label-after")
a = ap.parse_args()
Q = a.quick
ROUNDS = a.rounds or 2
PROXY_ROUNDS = a.proxy_rounds or 2
PROXY_SECONDS = a.proxy_seconds or (0.3 if Q else 1.0)
RESTART_REPS = a.restart_reps or (20 if Q else 40)
STATUS_RUNS = a.status_runs or (50 if Q else 100)
SETTLE = 3.0
WORKERS = 4
PRODUCT = ["npu-supervisord", "npu-supervisorctl", "npu-worker", "npu-cgroup-exec"]
STATIC = PRODUCT + ["npu-bench"]
T0 = time.monotonic()


def log(*m):
    print(f"[bench-compare {time.monotonic() - T0:6.1f}s]", *m, file=sys.stderr, flush=True)


def die(m):
    log("error:", m)
    sys.exit(1)


def sh(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, **kw)


def label(d):
    r = sh(["git", "-C", d, "rev-parse", "--short", "HEAD"])
    if r.returncode != 0:
        return os.path.basename(d)
    dirty = sh(["git", "-C", d, "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
    return r.stdout.strip() + ("+changes" if dirty else "")


SIDES = ["before", "after"]
DIR = {"before": os.path.abspath(a.before), "after": os.path.abspath(a.after)}
BIN = {s: os.path.join(DIR[s], ".build", "release") for s in SIDES}
LABEL = {"before": a.label_before or label(DIR["before"]), "after": a.label_after or label(DIR["after"])}
if LABEL["before"] == LABEL["after"]:
    LABEL = {s: f"{s} {LABEL[s]}" for s in SIDES}
for s in SIDES:
    for b in PRODUCT + ["npu-bench"]:
        if not os.access(os.path.join(BIN[s], b), os.X_OK):
            die(f"{BIN[s]}/{b} missing: run `swift build -c release` in {DIR[s]}")
HARNESS_DIR = {s: DIR["before"] if a.harness == "before" else DIR[s] for s in SIDES}
BENCH = {s: os.path.join(HARNESS_DIR[s], ".build", "release", "npu-bench") for s in SIDES}
if "proxy" not in a.skip and not shutil.which("haproxy"):
    die("haproxy not installed (apt-get install haproxy), or pass --skip proxy")


def order(r):
    return SIDES if r % 2 == 0 else SIDES[::-1]


def med(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.median(xs) if xs else float("nan")


def ratio(after, before):
    return after / before if before else float("nan")


def gmean(xs):
    xs = [x for x in xs if x > 0 and not math.isnan(x)]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


tmp = tempfile.mkdtemp(prefix="npu-bench-compare-")
daemons = []
try:
    # ---------------------------------------------------------------- machine
    def first_line(cmd):
        try:
            return sh(cmd).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_gib = int(f.readline().split()[1]) / 1024 / 1024
    osname = "?"
    if os.path.exists("/etc/os-release"):
        for line in open("/etc/os-release"):
            if line.startswith("PRETTY_NAME="):
                osname = line.split("=", 1)[1].strip().strip('"')
    machine = (f"{first_line(['nproc'])} CPUs ({cpu}), {mem_gib:.0f} GiB, {osname}, kernel {first_line(['uname', '-r'])}, "
               f"{first_line(['swift', '--version'])}, {' '.join(first_line(['haproxy', '-v']).split()[:3]) if shutil.which('haproxy') else 'no haproxy'}; "
               f"load average at start {os.getloadavg()[0]:.2f}")
    log(machine)

    # ---------------------------------------------------------------- sizes (no running needed)
    sizes = {}
    if "sizes" not in a.skip:
        for s in SIDES:
            for b in STATIC:
                p = os.path.join(DIR[s], ".build-static", "release", b)
                if not os.path.exists(p):
                    sizes[(s, b)] = None
                    continue
                out = os.path.join(tmp, f"{b}.{s}.stripped")
                r = sh(["strip", "-o", out, p])
                sizes[(s, b)] = os.path.getsize(out) if r.returncode == 0 else None

    # ---------------------------------------------------------------- restart latency
    restart = {}  # (side, cgroups) -> list of (spawn_med, spawn_p90, ready_med, ready_p90) ms
    def parse_restart(text):
        vals = {}
        for line in text.splitlines():
            line = line.strip()
            for key in ("spawned", "ready"):
                if line.startswith(f"kill -> replacement {key}:"):
                    parts = line.replace("ms", "").split()
                    vals[key] = (float(parts[parts.index("median") + 1]), float(parts[parts.index("p90") + 1]))
        return vals["spawned"] + vals["ready"]
    if "restart" not in a.skip:
        for r in range(ROUNDS):
            for cg in ("auto", "off"):
                for s in order(r):
                    log(f"restart round {r + 1}/{ROUNDS} cgroups={cg} {s}")
                    res = sh([BENCH[s], "restart", "--repetitions", str(RESTART_REPS), "--cgroups", cg,
                              "--bin", BIN[s]], timeout=300)
                    if res.returncode != 0:
                        die(f"npu-bench restart failed for {s}:\n{res.stdout}\n{res.stderr}")
                    restart.setdefault((s, cg), []).append(parse_restart(res.stdout))

    # ---------------------------------------------------------------- idle RSS + ctl status wall time
    def start_daemon(s, r):
        d = os.path.join(tmp, f"daemon-{s}-{r}")
        os.makedirs(d)
        worker = os.path.join(BIN[s], "npu-worker")
        toml = ('[supervisor]\nrun_dir = "run"\nlog_level = "warning"\n[http]\nlisten = ""\n[cgroups]\nmode = "auto"\n'
                f'[requests]\n[defaults]\ncommand = ["{worker}", "--load-ms", "0"]\nheartbeat_interval = "1s"\n'
                'inference_probe = { enabled = false }\n')
        for i in range(WORKERS):
            toml += f'[[device]]\nid = "{i}"\n'
        with open(os.path.join(d, "config.toml"), "w") as f:
            f.write(toml)
        logf = open(os.path.join(d, "daemon.log"), "w")
        p = subprocess.Popen([os.path.join(BIN[s], "npu-supervisord"), "--config", "config.toml"], cwd=d,
                             stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
        daemons.append(p)
        return p, d

    def wait_ready(d, n, timeout=60):
        path = os.path.join(d, "run", "status.sock")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                c = socket.socket(socket.AF_UNIX)
                c.connect(path)
                data = b""
                while chunk := c.recv(65536):
                    data += chunk
                c.close()
                ws = json.loads(data)["workers"]
                if len(ws) == n and all(w["state"] == "ready" for w in ws):
                    return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.02)
        die(f"supervisor in {d} not ready; its log:\n" + open(os.path.join(d, "daemon.log")).read()[-4000:])

    def memory(pid):
        st = {}
        for line in open(f"/proc/{pid}/status"):
            k, _, v = line.partition(":")
            st[k] = v.split()
        return {"rss": int(st["VmRSS"][0]), "anon": int(st["RssAnon"][0]), "threads": int(st["Threads"][0]),
                "fds": len(os.listdir(f"/proc/{pid}/fd"))}

    def stop(p):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    idle = {}    # side -> list of memory dicts
    status = {}  # side -> list of wall times (s)
    if "status" not in a.skip:
        for r in range(ROUNDS):
            log(f"idle RSS + ctl status round {r + 1}/{ROUNDS} (both daemons up, {WORKERS} workers each)")
            started = {s: start_daemon(s, r) for s in order(r)}
            for s, (p, d) in started.items():
                wait_ready(d, WORKERS)
            time.sleep(SETTLE)
            for s, (p, d) in started.items():
                if p.poll() is not None:
                    die(f"{s} supervisor exited; its log:\n" + open(os.path.join(d, "daemon.log")).read()[-4000:])
                idle.setdefault(s, []).append(memory(p.pid))
            argv = {s: [os.path.join(BIN[s], "npu-supervisorctl"), "--socket",
                        os.path.join(d, "run", "control.sock"), "status"] for s, (p, d) in started.items()}
            for s in order(r):  # check once, then warm up
                res = sh(argv[s])
                if res.returncode != 0 or not res.stdout.strip():
                    die(f"{s}: `{' '.join(argv[s])}` failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
                for _ in range(4):
                    sh(argv[s])
            for i in range(STATUS_RUNS):
                for s in (order(r) if i % 2 == 0 else order(r)[::-1]):
                    t = time.perf_counter()
                    rc = subprocess.call(argv[s], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
                    status.setdefault(s, []).append(time.perf_counter() - t)
                    if rc != 0:
                        die(f"{s}: npu-supervisorctl status exited {rc}")
            for s, (p, d) in started.items():
                stop(p)

    # ---------------------------------------------------------------- proxy benchmark
    proxy = {}  # (side, case) -> list of row dicts
    proxy_cases = []
    def farm(s):
        """A folder that looks like a checkout to bench-proxy.py: the harness's script and npu-bench, the side's
        product binaries (bench-proxy.py runs ROOT/.build/release/*, ROOT = the folder above its script)."""
        root = os.path.join(tmp, f"proxy-{s}")
        os.makedirs(os.path.join(root, "scripts"))
        os.makedirs(os.path.join(root, ".build", "release"))
        shutil.copy(os.path.join(HARNESS_DIR[s], "scripts", "bench-proxy.py"), os.path.join(root, "scripts"))
        for b in PRODUCT:
            os.symlink(os.path.join(BIN[s], b), os.path.join(root, ".build", "release", b))
        os.symlink(BENCH[s], os.path.join(root, ".build", "release", "npu-bench"))
        return os.path.join(root, "scripts", "bench-proxy.py")

    def parse_table(text):
        header, rows = None, []
        for line in text.splitlines():
            if not line.startswith("|") or line.startswith("|---"):
                continue
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            else:
                rows.append(dict(zip(header, cells)))
        return rows

    if "proxy" not in a.skip:
        scripts = {s: farm(s) for s in SIDES}
        for r in range(PROXY_ROUNDS):
            for s in order(r):
                log(f"bench-proxy.py round {r + 1}/{PROXY_ROUNDS} {s} (--rounds 1 --seconds {PROXY_SECONDS:g})")
                res = sh(["python3", scripts[s], "--rounds", "1", "--seconds", f"{PROXY_SECONDS:g}"], timeout=1800)
                if res.returncode != 0:
                    die(f"bench-proxy.py failed for {s}:\n{res.stdout}\n{res.stderr}")
                for row in parse_table(res.stdout):
                    case = (row["payload"], row["clients"], row["depth"])
                    if case not in proxy_cases:
                        proxy_cases.append(case)
                    proxy.setdefault((s, case), []).append(row)

    # ---------------------------------------------------------------- report
    B, A = LABEL["before"], LABEL["after"]
    print(f"### Before/after: `{B}` vs `{A}`\n")
    print(f"Machine: {machine}.  ")
    print(f"`scripts/bench-compare.sh{' --quick' if Q else ''} {a.before} {a.after}` "
          f"(harness: {a.harness}'s bench-proxy.py and npu-bench), {time.monotonic() - T0:.0f} s; "
          f"builds alternated round by round (ABBA), medians over rounds.\n")
    print(f"| what | before `{B}` | after `{A}` | after/before |")
    print("|---|---|---|---|")
    for cg, name in (("auto", "per-worker memory cgroup"), ("off", "cgroups off")):
        if (SIDES[0], cg) not in restart:
            continue
        v = {s: [med(x[i] for x in restart[(s, cg)]) for i in range(4)] for s in SIDES}
        n = len(restart[("before", cg)])
        print(f"| kill → replacement ready, {name} (median / p90; {n}×{RESTART_REPS} kills, backoff 10 ms) | "
              f"{v['before'][2]:.1f} / {v['before'][3]:.1f} ms | {v['after'][2]:.1f} / {v['after'][3]:.1f} ms | "
              f"{ratio(v['after'][2], v['before'][2]):.2f} |")
        print(f"| kill → replacement spawned, {name} (median / p90) | "
              f"{v['before'][0]:.1f} / {v['before'][1]:.1f} ms | {v['after'][0]:.1f} / {v['after'][1]:.1f} ms | "
              f"{ratio(v['after'][0], v['before'][0]):.2f} |")
    if status:
        def q(xs, p):
            xs = sorted(xs)
            return xs[min(len(xs) - 1, max(0, math.ceil(p / 100 * len(xs)) - 1))]
        st = {s: (statistics.median(status[s]) * 1e3, q(status[s], 90) * 1e3) for s in SIDES}
        print(f"| `npu-supervisorctl status` wall time (median / p90 of {len(status['before'])}, 4 workers) | "
              f"{st['before'][0]:.2f} / {st['before'][1]:.2f} ms | {st['after'][0]:.2f} / {st['after'][1]:.2f} ms | "
              f"{ratio(st['after'][0], st['before'][0]):.2f} |")
        m = {s: {k: med(x[k] for x in idle[s]) for k in ("rss", "anon", "threads", "fds")} for s in SIDES}
        print(f"| idle supervisor RSS, 4 workers (of which anonymous) | {m['before']['rss'] / 1024:.1f} MB "
              f"({m['before']['anon'] / 1024:.1f} MB) | {m['after']['rss'] / 1024:.1f} MB ({m['after']['anon'] / 1024:.1f} MB) | "
              f"{ratio(m['after']['rss'], m['before']['rss']):.2f} ({ratio(m['after']['anon'], m['before']['anon']):.2f}) |")
        print(f"| idle supervisor threads / fds, 4 workers | {m['before']['threads']:.0f} / {m['before']['fds']:.0f} | "
              f"{m['after']['threads']:.0f} / {m['after']['fds']:.0f} | |")
    if sizes:
        for b in STATIC:
            sb, sa = sizes[("before", b)], sizes[("after", b)]
            fmt = lambda x: f"{x / 1048576:.1f} MiB" if x else "n/a"
            print(f"| `{b}` stripped, `--static-swift-stdlib` | {fmt(sb)} | {fmt(sa)} | "
                  f"{ratio(sa, sb):.2f} |" if sa and sb else f"| `{b}` stripped, `--static-swift-stdlib` | {fmt(sb)} | {fmt(sa)} | |")
    if proxy_cases:
        def col(s, case, key):
            return [float(x[key]) for x in proxy[(s, case)]]
        def pcol(s, case, key, i):
            return [float(x[key].split("/")[i]) for x in proxy[(s, case)]]
        rps_r = [ratio(med(col("after", c, "supervisor req/s")), med(col("before", c, "supervisor req/s"))) for c in proxy_cases]
        p50_r = [ratio(med(pcol("after", c, "supervisor p50/p99 ms", 0)), med(pcol("before", c, "supervisor p50/p99 ms", 0)))
                 for c in proxy_cases]
        shr = {s: gmean([ratio(med(col(s, c, "supervisor req/s")), med(col(s, c, "haproxy req/s"))) for c in proxy_cases])
               for s in SIDES}
        print(f"| proxy: supervisor req/s, geometric mean of after/before over the {len(proxy_cases)} cases below | | | "
              f"{gmean(rps_r):.2f} (range {min(rps_r):.2f}–{max(rps_r):.2f}) |")
        print(f"| proxy: supervisor p50 latency, geometric mean of after/before | | | {gmean(p50_r):.2f} |")
        print(f"| proxy: supervisor/HAProxy req/s, geometric mean over the cases | {shr['before']:.2f} | "
              f"{shr['after']:.2f} | {ratio(shr['after'], shr['before']):.2f} |")
        n = len(proxy[("before", proxy_cases[0])])
        print(f"\n`scripts/bench-proxy.py --rounds 1 --seconds {PROXY_SECONDS:g}`, {n} invocation(s) per build, "
              "alternated; medians. HAProxy (2 threads) runs against the same build's echo workers in each invocation.\n")
        print(f"| payload | clients | depth | supervisor req/s before | after | after/before | supervisor p50/p99 ms "
              "before | after | haproxy req/s | sup/haproxy before | after | supervisor RSS max before / after |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for c, rr in zip(proxy_cases, rps_r):
            rps = {s: med(col(s, c, "supervisor req/s")) for s in SIDES}
            hap = {s: med(col(s, c, "haproxy req/s")) for s in SIDES}
            lat = {s: f"{med(pcol(s, c, 'supervisor p50/p99 ms', 0)):.3f}/{med(pcol(s, c, 'supervisor p50/p99 ms', 1)):.3f}"
                   for s in SIDES}
            rss = {s: max(float(x.get("supervisor RSS max", "nan MB").split()[0]) for x in proxy[(s, c)]) for s in SIDES}
            print(f"| {c[0]} | {c[1]} | {c[2]} | {rps['before']:.0f} | {rps['after']:.0f} | {rr:.2f} | {lat['before']} | "
                  f"{lat['after']} | {med(list(hap.values())):.0f} | {ratio(rps['before'], hap['before']):.2f} | "
                  f"{ratio(rps['after'], hap['after']):.2f} | {rss['before']:.1f} / {rss['after']:.1f} MB |")
    log(f"done in {time.monotonic() - T0:.0f} s")
finally:
    for p in daemons:
        if p.poll() is None:
            p.kill()
            p.wait()
    shutil.rmtree(tmp, ignore_errors=True)
PY

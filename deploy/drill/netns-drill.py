#!/usr/bin/env python3
"""Three-host failover drill in network namespaces (issue 13): three "hosts" (each its own namespace running an
npu-supervisord with simulated devices and the HTTP request front), HAProxy (deploy/haproxy/haproxy.cfg) in a
fourth namespace with the closed-loop clients, all on a bridge inside a fifth "switch" namespace. Nothing is
added to the namespace this script runs in: every address (10.213.0.0/24) and link lives in the namespaces it
creates, and they are deleted at the end, also on failure or Ctrl-C.

Scenarios, each under continuous load: a worker crash on one host; a host's supervisor SIGKILLed and
restarted; one host's devices all failing (/readyz 503, out of rotation, back); a host drained for
maintenance (npu-supervisorctl shutdown, then started again); all hosts upgraded one after the other (drain,
restart). For each: requests answered, succeeded, failed (by status), and the time from the event until full
capacity (every host's workers ready and the affected host serving clients again).

Usage (root): netns-drill.py [--bin DIR] [--clients 8] [--json]   (DIR: the built executables)
Exit 0 when the targets hold: 0 failed requests in every scenario (crashes included: what HAProxy cannot retry
would show here). Prints a Markdown table (or JSON)."""
import argparse, http.client, json, os, shutil, signal, socket, subprocess, sys, tempfile, threading, time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TAG = os.environ.get("NPU_DRILL_TAG") or "nd%d" % (os.getpid() % 100000)
NS = {name: "%s-%s" % (TAG, name) for name in ("sw", "h1", "h2", "h3", "lb")}
ADDR = {"h1": "10.213.0.1", "h2": "10.213.0.2", "h3": "10.213.0.3", "lb": "10.213.0.10"}
TOKEN = "drill-token-0123456789"
BODY = b'{"prompt": "Hi", "max_new_tokens": 8}'


def sh(*args, check=True):
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


def ns(name, *args, check=True):
    return sh("ip", "netns", "exec", NS[name], *args, check=check)


class Drill:
    def __init__(self, bindir, clients):
        self.bindir = os.path.abspath(bindir)
        self.clients = clients
        self.dir = tempfile.mkdtemp(prefix="npu-drill-")
        self.daemons = {}
        self.haproxy = None

    # ---- set-up and tear-down ----
    def network(self):
        for name in NS.values():
            sh("ip", "netns", "add", name)
        ns("sw", "ip", "link", "add", "br0", "type", "bridge")
        ns("sw", "ip", "link", "set", "br0", "up")
        for i, host in enumerate(("h1", "h2", "h3", "lb")):
            # The veth pair is created inside the switch namespace and one end moved to the host's.
            ns("sw", "ip", "link", "add", "p%d" % i, "type", "veth", "peer", "name", "eth0", "netns", NS[host])
            ns("sw", "ip", "link", "set", "p%d" % i, "master", "br0", "up")
            ns(host, "ip", "addr", "add", ADDR[host] + "/24", "dev", "eth0")
            ns(host, "ip", "link", "set", "eth0", "up")
            ns(host, "ip", "link", "set", "lo", "up")

    def teardown(self):
        for proc in list(self.daemons.values()) + [self.haproxy]:
            if proc and proc.poll() is None:
                proc.kill()
                proc.wait()
        for host in ("h1", "h2", "h3"):
            # Workers of a SIGKILLed supervisor exit on EOF; anything left in the namespace goes too.
            out = sh("ip", "netns", "pids", NS[host], check=False).stdout.split()
            for pid in out:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for name in NS.values():
            sh("ip", "netns", "del", name, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    def config(self, host):
        path = os.path.join(self.dir, host + ".toml")
        with open(os.path.join(self.dir, "token"), "w") as f:
            f.write(TOKEN + "\n")
        with open(path, "w") as f:
            f.write("""[supervisor]
run_dir = "%(dir)s/%(host)s"
shutdown_timeout = "10s"
[http]
listen = "%(addr)s:8087"
token_file = "%(dir)s/token"
agent_check = "%(addr)s:8088"
[defaults]
kind = "cpu"
command = ["%(bin)s/npu-worker", "--token-ms", "5", "--load-ms", "300"]
inference_probe = { enabled = false }
heartbeat_interval = "200ms"
heartbeat_timeout = "2s"
backoff_initial = "100ms"
stop_timeout = "3s"
[[device]]
id = "0"
[[device]]
id = "1"
""" % {"dir": self.dir, "host": host, "addr": ADDR[host], "bin": self.bindir})
        return path

    def start(self, host):
        log = open(os.path.join(self.dir, host + ".log"), "a")
        self.daemons[host] = subprocess.Popen(
            ["ip", "netns", "exec", NS[host], self.bindir + "/npu-supervisord", "--config", self.config(host)],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    def start_haproxy(self):
        with open(os.path.join(ROOT, "deploy/haproxy/haproxy.cfg")) as f:
            cfg = f.read()
        cfg = cfg.replace("bind :8080", "bind 127.0.0.1:8080").replace("frontend stats", "frontend stats_unused")
        cfg = cfg.replace("    default_backend npu_supervisors\n",
                          "    default_backend npu_supervisors\n    http-response set-header X-Server %s\n", 1)
        path = os.path.join(self.dir, "haproxy.cfg")
        with open(path, "w") as f:
            f.write(cfg)
        env = dict(os.environ, NPU_SUPERVISOR_TOKEN=TOKEN, NPU_HOST1=ADDR["h1"] + ":8087",
                   NPU_HOST2=ADDR["h2"] + ":8087", NPU_HOST3=ADDR["h3"] + ":8087")
        log = open(os.path.join(self.dir, "haproxy.log"), "a")
        self.haproxy = subprocess.Popen(["ip", "netns", "exec", NS["lb"], "haproxy", "-db", "-f", path],
                                        stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env)

    # ---- observing ----
    def status(self, host):
        try:
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(2)
            s.connect(os.path.join(self.dir, host, "status.sock"))
            data = b""
            while True:
                part = s.recv(65536)
                if not part:
                    break
                data += part
            s.close()
            return json.loads(data)
        except (OSError, ValueError):
            return None

    def all_ready(self, host):
        doc = self.status(host)
        return bool(doc) and all(w["state"] == "ready" for w in doc["workers"])

    def ctl(self, host, *args):
        return sh(self.bindir + "/npu-supervisorctl", "--socket", os.path.join(self.dir, host, "control.sock"), *args,
                  check=False)

    def wait(self, condition, timeout=30, what="condition"):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if condition():
                return True
            time.sleep(0.05)
        raise RuntimeError("timed out waiting for " + what)

    # ---- load ----
    def load(self, seconds, event, affected):
        """Closed-loop clients through HAProxy (run in the lb namespace by a child process); event() runs at 1 s."""
        out = os.path.join(self.dir, "records.jsonl")
        client = subprocess.Popen(["ip", "netns", "exec", NS["lb"], sys.executable, os.path.abspath(__file__),
                                   "--client", str(seconds), "--clients", str(self.clients), "--out", out])
        time.sleep(1)
        t0 = time.monotonic()
        wall0 = time.time()
        event()
        # Full capacity: every host's workers ready, and the affected hosts serving clients again.
        self.wait(lambda: all(self.all_ready(h) for h in ("h1", "h2", "h3")), timeout=60, what="all workers ready")
        ready_at = time.monotonic() - t0
        client.wait(timeout=seconds + 60)
        records = [json.loads(line) for line in open(out)]
        os.remove(out)
        back = 0.0
        for host in affected:
            # The affected host's first answer to a client once every worker is ready again.
            served = [r["t"] - wall0 for r in records if r["server"] == "host" + host[1:] and r["t"] - wall0 >= ready_at - 0.001]
            back = max(back, min(served)) if served and back is not None else None  # None: never served again
        failed = [r for r in records if r["status"] != 200]
        return {"answered": len(records), "succeeded": len(records) - len(failed), "failed": len(failed),
                "failures": sorted({"%s %s" % (r["status"], r.get("error", "")) for r in failed}),
                "full_capacity_s": None if back is None else round(max(ready_at, back), 2)}


def client_main(seconds, clients, out):
    stop = time.monotonic() + seconds
    lock = threading.Lock()
    records = []

    def loop():
        conn = None
        while time.monotonic() < stop:
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", 8080, timeout=30)
                conn.request("POST", "/v1/infer", body=BODY)
                r = conn.getresponse()
                r.read()
                rec = {"t": time.time(), "status": r.status, "server": r.getheader("X-Server", ""),
                       "error": r.getheader("X-NPU-Error", "")}
                if r.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                rec = {"t": time.time(), "status": 0, "server": "", "error": type(e).__name__}
                if conn:
                    conn.close()
                conn = None
            with lock:
                records.append(rec)

    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with open(out, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, ".build/debug"))
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--client", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client is not None:
        return client_main(args.client, args.clients, args.out)
    if os.geteuid() != 0 or not shutil.which("haproxy") or not shutil.which("ip"):
        print("SKIP: needs root, ip (iproute2) and haproxy", file=sys.stderr)
        return 77
    drill = Drill(args.bin, args.clients)
    def terminated(*_):
        raise KeyboardInterrupt("SIGTERM")
    signal.signal(signal.SIGTERM, terminated)  # tear down on SIGTERM too
    results = {}
    try:
        try:
            drill.network()
        except subprocess.CalledProcessError as e:
            print("SKIP: cannot create network namespaces: %s" % e.stderr.strip(), file=sys.stderr)
            return 77
        for host in ("h1", "h2", "h3"):
            drill.start(host)
        drill.start_haproxy()
        drill.wait(lambda: all(drill.all_ready(h) for h in ("h1", "h2", "h3")), what="hosts ready")
        time.sleep(2.5)  # HAProxy's rise (2 checks, 1 s apart)

        def crash():
            pid = drill.status("h1")["workers"][0]["pid"]
            os.kill(pid, signal.SIGKILL)
            drill.wait(lambda: (drill.status("h1") or {"workers": [{"pid": pid}]})["workers"][0]["pid"] != pid,
                       what="the crash noticed")
        results["worker crash (SIGKILL, host 1)"] = drill.load(5, crash, ["h1"])

        def host_kill():
            drill.daemons["h1"].kill()  # `ip netns exec` execs: this is the supervisor itself
            drill.daemons["h1"].wait()
            time.sleep(2)
            drill.start("h1")
        results["host supervisor SIGKILLed, restarted after 2 s (host 1)"] = drill.load(12, host_kill, ["h1"])

        def devices_fail():
            drill.ctl("h2", "stop", "all")
            time.sleep(3)
            drill.ctl("h2", "start", "all")
        results["all devices of host 2 failing for 3 s"] = drill.load(14, devices_fail, ["h2"])

        def drain():
            drill.ctl("h3", "shutdown")
            drill.daemons["h3"].wait(timeout=30)
            drill.start("h3")
        results["host 3 drained, then started again"] = drill.load(12, drain, ["h3"])

        def upgrade():
            for host in ("h1", "h2", "h3"):
                drill.ctl(host, "shutdown")
                drill.daemons[host].wait(timeout=30)
                drill.start(host)
                drill.wait(lambda: drill.all_ready(host), what=host + " ready")
                time.sleep(2.5)  # back in HAProxy's rotation before the next host goes
        results["rolling upgrade of hosts 1, 2, 3"] = drill.load(28, upgrade, ["h1", "h2", "h3"])
    finally:
        drill.teardown()
    if args.json:
        print(json.dumps(results))
    else:
        print("| scenario | answered | succeeded | failed | full capacity after |")
        print("|---|---|---|---|---|")
        for name, r in results.items():
            print("| %s | %d | %d | %d%s | %s |" % (name, r["answered"], r["succeeded"], r["failed"],
                  " (%s)" % ", ".join(r["failures"]) if r["failures"] else "",
                  "never" if r["full_capacity_s"] is None else "%.2f s" % r["full_capacity_s"]))
    return 0 if all(r["failed"] == 0 and r["full_capacity_s"] is not None for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Helpers shared by the proxy benchmarks (bench-proxy.py, bench-ab.py): waiting for sockets and for a
supervisor's workers."""
import json, os, signal, socket, subprocess, time


def wait_socket(path, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.close()
            return
        except OSError:
            time.sleep(0.02)
    raise SystemExit(f"bench: {path} did not come up")


def wait_ready(status_path, n, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(status_path)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            doc = json.loads(data)
            if sum(w["state"] == "ready" for w in doc["workers"]) == n:
                return doc
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    raise SystemExit("bench: supervisor workers not ready")


def start_echo_workers(worker, folder, count, procs):
    """`count` echoing `npu-worker --listen` processes (HAProxy's backends, and the direct baseline); their sockets."""
    paths = []
    for i in range(count):
        path = os.path.join(folder, f"w{i}.sock")
        procs.append(subprocess.Popen([worker, "--listen", path], stderr=subprocess.DEVNULL))
        paths.append(path)
    for path in paths:
        wait_socket(path)
    return paths


def start_haproxy(folder, backends, threads, procs, name="haproxy"):
    """HAProxy in mode tcp, Unix socket front and back, `balance leastconn`, `nbthread threads`; (front socket,
    process)."""
    front, cfg = os.path.join(folder, f"{name}.sock"), os.path.join(folder, f"{name}.cfg")
    with open(cfg, "w") as f:
        f.write(f"global\n  maxconn 4000\n  nbthread {threads}\n"
                "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n"
                f"frontend fe\n  bind unix@{front}\n  default_backend be\nbackend be\n  balance leastconn\n")
        for i, path in enumerate(backends):
            f.write(f"  server w{i} unix@{path}\n")
    process = subprocess.Popen(["haproxy", "-f", cfg, "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(process)
    wait_socket(front)
    return front, process


def stop_all(procs):
    """SIGTERM to every process, then waits (SIGKILL after 10 s)."""
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()

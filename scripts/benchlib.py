"""Helpers shared by the proxy benchmarks (bench-proxy.py, bench-ab.py): waiting for sockets and for a
supervisor's workers."""
import json, socket, time


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

"""The Python worker and client against the real npu-supervisord, with real processes.

The daemon is ``$NPU_SUPERVISOR_BIN/npu-supervisord`` or ``<repo>/.build/debug/npu-supervisord`` (build it with
``swift build``); without it these tests are skipped, saying so. Each daemon gets a temporary folder with its
config and sockets, and is always torn down (SIGKILL of the daemon and of every worker it reported).
Every wait polls a real condition with a deadline; nothing sleeps and hopes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import uuid

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(PYTHON_DIR)
sys.path.insert(0, PYTHON_DIR)

from npu_supervisor import (  # noqa: E402
    Client, ConnectionClosed, NPUSupervisorError, RequestError, control, status,
)

ECHO_WORKER = os.path.join(PYTHON_DIR, "examples", "echo_worker.py")
BIN_DIR = os.environ.get("NPU_SUPERVISOR_BIN") or os.path.join(REPO, ".build", "debug")
DAEMON = os.path.join(BIN_DIR, "npu-supervisord")
READY_TIMEOUT = 30.0


def _load_generate():
    import importlib.util
    spec = importlib.util.spec_from_file_location("echo_worker_for_integration", ECHO_WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.generate


generate = _load_generate()


def expected_pieces(prompt, count):
    return [w if i == 0 else " " + w for i, w in enumerate(generate(prompt, count))]


def setUpModule():
    if not os.access(DAEMON, os.X_OK):
        raise unittest.SkipTest("npu-supervisord not found at %s: run `swift build` in %s or set NPU_SUPERVISOR_BIN"
                                % (DAEMON, REPO))


def eventually(condition, timeout=10.0, interval=0.02, what="condition"):
    """Polls ``condition`` until it returns something truthy (returned) or ``timeout`` passes (AssertionError)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            value = condition()
            if value:
                return value
            last = value
        except (NPUSupervisorError, OSError, TimeoutError) as error:
            last = error
        if time.monotonic() >= deadline:
            raise AssertionError("%s did not happen within %.1fs (last: %r)" % (what, timeout, last))
        time.sleep(interval)


def process_alive(pid):
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def is_our_worker(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return ECHO_WORKER.encode() in f.read()
    except OSError:
        return False


class Daemon:
    """One npu-supervisord with its own temporary folder, config and sockets."""

    def __init__(self, devices=("0", "1"), worker_args=(), defaults="", extra=""):
        self.directory = tempfile.mkdtemp(prefix="npu-py-")
        self.config_path = os.path.join(self.directory, "config.toml")
        self.log_path = os.path.join(self.directory, "daemon.log")
        self.devices = list(devices)
        self.seen_pids = set()
        command = [sys.executable, ECHO_WORKER] + list(worker_args)
        # Test-friendly defaults; a test's own `defaults` lines win (TOML forbids a key twice).
        base = ['start_timeout = "20s"', 'stop_timeout = "3s"', 'backoff_initial = "100ms"', 'backoff_max = "1s"',
                'heartbeat_interval = "100ms"', 'heartbeat_timeout = "2s"', "max_inflight = 4"]
        overridden = {line.split("=")[0].strip() for line in defaults.splitlines() if "=" in line}
        lines = [
            "[supervisor]",
            'run_dir = "run"',  # relative to this config file
            'shutdown_timeout = "5s"',
            "",
            "[defaults]",
            "command = [%s]" % ", ".join(json.dumps(part) for part in command),
        ]
        lines += [line for line in base if line.split("=")[0].strip() not in overridden]
        lines.append(defaults)
        for device in self.devices:
            lines += ["", "[[device]]", 'id = "%s"' % device]
        lines += ["", extra, ""]
        with open(self.config_path, "w") as f:
            f.write("\n".join(lines))
        self.log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen([DAEMON, "--config", self.config_path], stdin=subprocess.DEVNULL,
                                        stdout=self.log_file, stderr=subprocess.STDOUT)

    @property
    def run_dir(self):
        return os.path.join(self.directory, "run")

    @property
    def requests_socket(self):
        return os.path.join(self.run_dir, "requests.sock")

    @property
    def status_socket(self):
        return os.path.join(self.run_dir, "status.sock")

    @property
    def control_socket(self):
        return os.path.join(self.run_dir, "control.sock")

    @property
    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def status(self):
        document = status(self.status_socket, timeout=5)
        for worker in document["workers"]:
            if worker.get("pid"):
                self.seen_pids.add(worker["pid"])
        return document

    def worker(self, device):
        return next(w for w in self.status()["workers"] if w["device"] == device)

    def wait(self, predicate, timeout=READY_TIMEOUT, what="status condition"):
        """Polls status.sock until ``predicate(document)``; fails early (with the log) if the daemon died."""
        def check():
            if self.process.poll() is not None:
                raise AssertionError("npu-supervisord exited with %s while waiting for %s; log:\n%s"
                                     % (self.process.returncode, what, self.log))
            document = self.status()
            return document if predicate(document) else None
        try:
            return eventually(check, timeout=timeout, what=what)
        except AssertionError as error:
            raise AssertionError("%s\ndaemon log:\n%s" % (error, self.log[-6000:])) from None

    def wait_all_ready(self, timeout=READY_TIMEOUT):
        return self.wait(lambda d: len(d["workers"]) == len(self.devices)
                         and all(w["state"] == "ready" for w in d["workers"]), timeout, "all workers ready")

    def worker_output(self, device, lines=500):
        return control(self.control_socket, "tail", devices=[device], lines=lines)["lines"]

    def terminate(self, timeout=20.0):
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError("npu-supervisord did not exit within %.0fs of SIGTERM; log:\n%s"
                                 % (timeout, self.log[-6000:])) from None

    def cleanup(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        for pid in self.seen_pids:
            if process_alive(pid) and is_our_worker(pid):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
        self.log_file.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class ServingTests(unittest.TestCase):
    """One daemon, two devices, shared by these tests; each test first waits for both workers to be ready."""

    @classmethod
    def setUpClass(cls):
        cls.daemon = Daemon(devices=("0", "1"))
        try:
            cls.daemon.wait_all_ready()
        except BaseException:
            cls.daemon.cleanup()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.daemon.cleanup()

    def setUp(self):
        self.daemon.wait_all_ready()

    def client(self):
        client = Client(self.daemon.requests_socket)
        self.addCleanup(client.close)
        return client

    def test_workers_say_hello_and_ready(self):
        document = self.daemon.status()
        self.assertEqual(document["state"], "ok")
        for worker in document["workers"]:
            self.assertTrue(is_our_worker(worker["pid"]), worker)
        self.assertIn("worker hello: version echo_worker 0.1.0", self.daemon.log)

    def test_concurrent_pipelined_requests(self):
        failures = []
        devices_seen = set()
        lock = threading.Lock()

        def pipelined(thread_index):
            # Each thread pipelines on its own connection: send all, then collect, answers in any order.
            try:
                with Client(self.daemon.requests_socket) as client:
                    sent = []
                    for i in range(25):
                        if i % 3 == 0:
                            payload = ("raw-%d-%d" % (thread_index, i)).encode() + bytes([0, 255, i])
                            sent.append((client.submit(payload), "echo", payload))
                        else:
                            prompt = "prompt %d/%d" % (thread_index, i)
                            body = {"prompt": prompt, "max_new_tokens": 1 + i % 7, "stream": i % 2 == 0}
                            sent.append((client.submit(body), "json", body))
                    for pending, kind, expected in sent:
                        answer = pending.result(timeout=30)
                        if kind == "echo":
                            if answer != expected:
                                failures.append("echo %r != %r" % (answer, expected))
                            continue
                        doc = json.loads(answer)
                        pieces = expected_pieces(expected["prompt"], expected["max_new_tokens"])
                        if doc["text"] != "".join(pieces) or doc["tokens"] != len(pieces):
                            failures.append("wrong answer %r for %r" % (doc, expected))
                        streamed = [c.decode() for c in pending.chunks]
                        if streamed != (pieces if expected["stream"] else []):
                            failures.append("chunks %r for %r" % (streamed, expected))
                        with lock:
                            devices_seen.add(doc["device"])
            except Exception as error:  # noqa: BLE001 - reported below
                failures.append("thread %d: %r" % (thread_index, error))

        shared = self.client()

        def shared_connection(thread_index):
            # Several threads calling infer() at once on ONE connection.
            try:
                for i in range(15):
                    prompt = "shared %d %d" % (thread_index, i)
                    doc = json.loads(shared.infer({"prompt": prompt, "max_new_tokens": 4}, timeout=30))
                    if doc["text"] != " ".join(generate(prompt, 4)):
                        failures.append("shared: wrong answer %r for %r" % (doc, prompt))
            except Exception as error:  # noqa: BLE001
                failures.append("shared thread %d: %r" % (thread_index, error))

        threads = [threading.Thread(target=pipelined, args=(t,)) for t in range(6)]
        threads += [threading.Thread(target=shared_connection, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
            self.assertFalse(thread.is_alive(), "a client thread is still waiting after 60 s")
        self.assertEqual(failures, [])
        self.assertEqual(devices_seen, {"0", "1"}, "both workers should have served")
        self.assertEqual(shared.in_flight, 0)

    def test_streaming_order(self):
        client = self.client()
        chunks = []
        prompt = "stream %s" % uuid.uuid4()
        answer = json.loads(client.infer({"prompt": prompt, "max_new_tokens": 40, "stream": True, "token_ms": 2},
                                         on_chunk=chunks.append, timeout=30))
        pieces = expected_pieces(prompt, 40)
        self.assertEqual([c.decode() for c in chunks], pieces)
        self.assertEqual(answer["text"], "".join(pieces))

        # Three streams interleaved on one connection: each keeps its own order.
        pendings = [(client.submit({"prompt": "s%d" % i, "max_new_tokens": 20, "stream": True, "token_ms": 1}), i)
                    for i in range(3)]
        for pending, i in pendings:
            got = [c.decode() for c in pending.iter_chunks(timeout=30)]
            self.assertEqual(got, expected_pieces("s%d" % i, 20))
            self.assertEqual(json.loads(pending.result(timeout=30))["text"], "".join(got))

    def test_error_answers(self):
        client = self.client()
        with self.assertRaises(RequestError) as caught:
            client.infer(b"x", device="9")
        self.assertEqual((caught.exception.code, caught.exception.retryable), ("bad_request", False))
        self.assertIn("unknown device", caught.exception.message)

        with self.assertRaises(RequestError) as caught:
            client.infer({"fault": "error", "message": "engine on fire"}, timeout=30)
        self.assertEqual((caught.exception.code, caught.exception.message), ("worker_error", "engine on fire"))

        with self.assertRaises(RequestError) as caught:
            client.infer({"prompt": "slow", "max_new_tokens": 1000, "token_ms": 20}, deadline_ms=200, timeout=30)
        self.assertEqual(caught.exception.code, "deadline_exceeded")

        # Pinned to a device: served there.
        for device in ("0", "1"):
            self.assertEqual(json.loads(client.infer({"prompt": "pin"}, device=device, timeout=30))["device"], device)

    def test_client_cancel(self):
        client = self.client()
        prompt = "cancel-%s" % uuid.uuid4()
        pending = client.submit({"prompt": prompt, "max_new_tokens": 1000, "stream": True, "token_ms": 20})
        first = next(pending.iter_chunks(timeout=30))
        self.assertEqual(first.decode(), generate(prompt, 1)[0])
        pending.cancel()
        with self.assertRaises(RequestError) as caught:
            pending.result(timeout=10)
        self.assertEqual(caught.exception.code, "cancelled")
        self.wait_for_worker_line("cancelled request", prompt)

    def test_client_disconnect_mid_request(self):
        client = Client(self.daemon.requests_socket)
        prompt = "disconnect-%s" % uuid.uuid4()
        pending = client.submit({"prompt": prompt, "max_new_tokens": 1000, "stream": True, "token_ms": 20})
        next(pending.iter_chunks(timeout=30))  # the worker is generating now
        client.close()  # hang up with the request in flight (1000 tokens would take 20 s)
        with self.assertRaises(ConnectionClosed):
            pending.result(timeout=10)
        # The supervisor cancels it on the worker, which stops generating...
        self.wait_for_worker_line("cancelled request", prompt)
        # ...and frees its place at once; the service goes on.
        self.daemon.wait(lambda d: all(w["inflight"] == 0 for w in d["workers"]), 10, "inflight back to 0")
        self.assertEqual(self.client().infer(b"still serving", timeout=30), b"still serving")

    def test_stray_stdout_from_a_worker_is_harmless(self):
        client = self.client()
        for device in ("0", "1"):
            answer = json.loads(client.infer({"fault": "stdout_noise", "prompt": "noise", "max_new_tokens": 3},
                                             device=device, timeout=30))
            self.assertEqual(answer["text"], " ".join(generate("noise", 3)))
            eventually(lambda: any("stray print from request" in line for line in self.daemon.worker_output(device)),
                       what="the stray print in the worker's log")
        self.assertEqual(self.daemon.status()["state"], "ok")
        self.assertNotIn("protocol_error", json.dumps(self.daemon.status()))

    def test_device_oom_restarts_the_worker(self):
        before = self.daemon.worker("1")
        client = self.client()
        with self.assertRaises(RequestError) as caught:
            client.infer({"fault": "device_oom"}, device="1", timeout=30)
        self.assertEqual(caught.exception.code, "device_oom")
        self.assertIn("out of memory", caught.exception.message)
        after = self.daemon.wait(
            lambda d: any(w["device"] == "1" and w["last_exit"] == "device_oom" and w["state"] == "ready"
                          and w["pid"] not in (None, before["pid"]) for w in d["workers"]),
            what="device 1 restarted after device_oom")
        worker = next(w for w in after["workers"] if w["device"] == "1")
        self.assertEqual(worker["restarts"], before["restarts"] + 1)
        self.assertGreaterEqual(worker["exits"].get("device_oom", 0), 1)
        self.assertFalse(process_alive(before["pid"]))
        # Device 0 was not touched; device 1 serves again with its new process.
        self.assertEqual(self.daemon.worker("0")["pid"], next(w for w in after["workers"] if w["device"] == "0")["pid"])
        answer = json.loads(client.infer({"prompt": "again"}, device="1", timeout=30))
        self.assertEqual(answer["pid"], worker["pid"])

    def test_ping_and_control(self):
        client = self.client()
        self.assertLess(client.ping(timeout=5), 5)
        pid = control(self.daemon.control_socket, "pid", devices=["0"])["pid"]
        self.assertEqual(pid, self.daemon.worker("0")["pid"])
        health = control(self.daemon.control_socket, "health")
        self.assertEqual(health["state"], "ok")
        with self.assertRaises(RequestError) as caught:
            control(self.daemon.control_socket, "fly")
        self.assertEqual(caught.exception.code, "bad_request")

    def wait_for_worker_line(self, *needles):
        def found():
            return any(all(n in line for n in needles)
                       for device in self.daemon.devices for line in self.daemon.worker_output(device))
        eventually(found, timeout=10, what="a worker output line with %r" % (needles,))


class LifecycleTests(unittest.TestCase):
    def start(self, **kwargs):
        daemon = Daemon(**kwargs)
        self.addCleanup(daemon.cleanup)
        return daemon

    def test_sigterm_stops_the_daemon_and_every_worker(self):
        daemon = self.start()
        document = daemon.wait_all_ready()
        pids = [w["pid"] for w in document["workers"]]
        self.assertTrue(all(process_alive(p) for p in pids))
        with Client(daemon.requests_socket) as client:
            self.assertEqual(client.infer(b"before stop", timeout=30), b"before stop")
        self.assertEqual(daemon.terminate(), 0, daemon.log[-4000:])
        for pid in daemon.seen_pids:
            self.assertFalse(process_alive(pid), "worker %d still runs after the daemon exited" % pid)
        self.assertFalse(os.path.exists(daemon.requests_socket))
        self.assertIn("stopped; no worker left", daemon.log)

    def test_sigterm_waits_for_requests_in_flight(self):
        daemon = self.start()
        daemon.wait_all_ready()
        client = Client(daemon.requests_socket)
        self.addCleanup(client.close)
        pending = client.submit({"prompt": "drain", "max_new_tokens": 25, "stream": True, "token_ms": 20})
        next(pending.iter_chunks(timeout=30))
        daemon.process.send_signal(signal.SIGTERM)
        answer = json.loads(pending.result(timeout=30))
        self.assertEqual(answer["text"], " ".join(generate("drain", 25)))
        self.assertEqual(daemon.process.wait(20), 0)
        for pid in daemon.seen_pids:
            self.assertFalse(process_alive(pid))

    def test_workers_exit_when_the_daemon_is_killed(self):
        # SIGKILL leaves the daemon no chance to stop anything: the workers must notice EOF on fd 3 by
        # themselves, or they would hold their devices forever.
        daemon = self.start()
        pids = [w["pid"] for w in daemon.wait_all_ready()["workers"]]
        daemon.process.kill()
        daemon.process.wait(10)
        eventually(lambda: not any(process_alive(p) for p in pids), timeout=10,
                   what="workers exiting after the daemon was killed")


if __name__ == "__main__":
    unittest.main()

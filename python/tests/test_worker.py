"""The worker library against a fake supervisor: the example worker runs as a real process whose channel is one
end of a socketpair held by the test. No daemon needed; every wait has a deadline."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import unittest

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, PYTHON_DIR)

from npu_supervisor.protocol import (  # noqa: E402
    Frame, FrameReader, FrameWriter, MessageType, ProtocolError, json_bytes, parse_error_payload,
)

ECHO_WORKER = os.path.join(PYTHON_DIR, "examples", "echo_worker.py")
TIMEOUT = 15.0


def _load_generate():
    import importlib.util
    spec = importlib.util.spec_from_file_location("echo_worker_for_tests", ECHO_WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.generate


generate = _load_generate()


class Output:
    """Collects a pipe's lines on a thread; ``wait_for`` waits (with a deadline) for a line containing text."""

    def __init__(self, pipe):
        self.lines = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._pump, args=(pipe,), daemon=True)
        self._thread.start()

    def _pump(self, pipe):
        for raw in iter(pipe.readline, b""):
            with self._changed:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._changed.notify_all()
        pipe.close()

    @property
    def text(self):
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, needle, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        with self._changed:
            while not any(needle in line for line in self.lines):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError("no output line containing %r within %.0fs; got:\n%s"
                                         % (needle, timeout, "\n".join(self.lines)))
                self._changed.wait(remaining)


class FakeSupervisor:
    """Spawns the example worker (or ``command``) with its channel on a socketpair, like npu-supervisord does."""

    def __init__(self, args=(), env=None, hello=True, heartbeat_ms=50, protocol=1, close_on_eof=True, command=None,
                 device="7"):
        self.close_on_eof = close_on_eof
        self.sock, child = socket.socketpair()
        environment = dict(os.environ)
        environment.update({"NPU_SUPERVISOR_FD": str(child.fileno()), "NPU_DEVICE_ID": device})
        environment.update(env or {})
        self.process = subprocess.Popen(
            list(command or [sys.executable, ECHO_WORKER]) + list(args), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(child.fileno(),), env=environment)
        child.close()
        self.stdout = Output(self.process.stdout)
        self.stderr = Output(self.process.stderr)
        self.writer = FrameWriter(self.sock)
        self.frames = queue.Queue()
        self.health = queue.Queue()
        self.heartbeats = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if hello:
            self.send(MessageType.HELLO, 0, json_bytes({
                "protocol": protocol, "device": device, "heartbeat_interval_ms": heartbeat_ms,
                "max_frame_bytes": 1 << 20}))

    def _read(self):
        try:
            for frame in FrameReader(self.sock):
                if frame.type == MessageType.HEARTBEAT:
                    self.heartbeats += 1
                    self.frames.put(frame)  # also queued, so a test may wait for them
                    continue
                if frame.type == MessageType.HEALTH:
                    # Periodic, like heartbeats, but never in answer to anything: kept apart from the answers.
                    self.health.put(frame)
                    continue
                self.frames.put(frame)
        except (OSError, ProtocolError) as error:
            self.frames.put(error)
        else:
            # Like npu-supervisord (NIO without half-closure): the worker's EOF closes our end too.
            if self.close_on_eof:
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.frames.put(None)

    def send(self, type_, request_id=0, payload=b""):
        self.writer.write(type_, request_id, payload)

    def expect(self, predicate=lambda f: True, timeout=TIMEOUT, skip_heartbeats=True):
        """The next frame satisfying ``predicate`` (others, except heartbeats, are an error)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("no expected frame within %.0fs; worker stderr:\n%s"
                                     % (timeout, self.stderr.text))
            try:
                frame = self.frames.get(timeout=remaining)
            except queue.Empty:
                continue
            if isinstance(frame, Frame) and skip_heartbeats and frame.type == MessageType.HEARTBEAT:
                continue
            if frame is None or isinstance(frame, Exception):
                raise AssertionError("channel ended (%r) while waiting; worker stderr:\n%s" % (frame, self.stderr.text))
            if predicate(frame):
                return frame
            raise AssertionError("unexpected frame %r" % (frame,))

    def handshake(self):
        hello = self.expect(lambda f: f.type == MessageType.HELLO)
        ready = self.expect(lambda f: f.type == MessageType.READY)
        return hello, ready

    def answer(self, request_id, timeout=TIMEOUT):
        """(chunks, final frame) of one request; frames of other requests are not expected meanwhile."""
        chunks = []
        while True:
            frame = self.expect(lambda f: f.request_id == request_id, timeout)
            if frame.type == MessageType.CHUNK:
                chunks.append(frame.payload)
                continue
            self.assertFinal(frame)
            return chunks, frame

    @staticmethod
    def assertFinal(frame):
        if frame.type not in (MessageType.RESPONSE, MessageType.ERROR):
            raise AssertionError("expected a final answer, got %r" % (frame,))

    def wait_exit(self, timeout=TIMEOUT):
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError("worker did not exit within %.0fs; stderr:\n%s" % (timeout, self.stderr.text))

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(TIMEOUT)


class WorkerProtocolTests(unittest.TestCase):
    def start(self, *args, **kwargs):
        sup = FakeSupervisor(*args, **kwargs)
        self.addCleanup(sup.close)
        return sup

    def test_handshake_and_heartbeats(self):
        sup = self.start(args=["--model", "tiny-llm"])
        hello, ready = sup.handshake()
        body = hello.json()
        self.assertEqual(body["protocol"], 1)
        self.assertEqual(body["pid"], sup.process.pid)
        self.assertEqual(body["device"], "7")
        self.assertEqual(body["model"], "tiny-llm")
        self.assertTrue(body["worker_version"].startswith("echo_worker"))
        self.assertEqual(hello.request_id, 0)
        self.assertEqual(ready.request_id, 0)
        # Heartbeats at the supervisor's interval (50 ms): a few arrive well within the deadline.
        for _ in range(3):
            sup.expect(lambda f: f.type == MessageType.HEARTBEAT, skip_heartbeats=False)

    def test_echo_generation_and_streaming_order(self):
        sup = self.start()
        sup.handshake()
        sup.send(MessageType.REQUEST, 1, b"\x00\xffraw bytes")
        chunks, final = sup.answer(1)
        self.assertEqual((chunks, final.type, final.payload), ([], MessageType.RESPONSE, b"\x00\xffraw bytes"))

        sup.send(MessageType.REQUEST, 2, json_bytes({"prompt": "Hi", "max_new_tokens": 5}))
        chunks, final = sup.answer(2)
        self.assertEqual(chunks, [])
        answer = final.json()
        self.assertEqual(answer["text"], " ".join(generate("Hi", 5)))
        self.assertEqual((answer["tokens"], answer["device"], answer["pid"]), (5, "7", sup.process.pid))

        sup.send(MessageType.REQUEST, 3, json_bytes({"prompt": "stream me", "max_new_tokens": 12, "stream": True}))
        chunks, final = sup.answer(3)
        words = generate("stream me", 12)
        self.assertEqual(chunks, [w.encode() if i == 0 else b" " + w.encode() for i, w in enumerate(words)])
        self.assertEqual(final.json()["text"], "".join(c.decode() for c in chunks))

    def test_pipelined_requests_get_exactly_one_answer_each(self):
        sup = self.start(args=["--threads", "4", "--token-ms", "1"])
        sup.handshake()
        ids = list(range(100, 140))
        for i in ids:
            sup.send(MessageType.REQUEST, i, json_bytes({"prompt": "p%d" % i, "max_new_tokens": 3,
                                                         "stream": i % 2 == 0}))
        finals = {}
        chunks = {i: [] for i in ids}
        while len(finals) < len(ids):
            frame = sup.expect(lambda f: f.request_id in chunks)
            self.assertNotIn(frame.request_id, finals, "a frame after the final answer of %d" % frame.request_id)
            if frame.type == MessageType.CHUNK:
                chunks[frame.request_id].append(frame.payload)
            else:
                self.assertEqual(frame.type, MessageType.RESPONSE)
                finals[frame.request_id] = frame.json()
        for i in ids:
            self.assertEqual(finals[i]["text"], " ".join(generate("p%d" % i, 3)))
            self.assertEqual(len(chunks[i]), 3 if i % 2 == 0 else 0)

    def test_errors_are_answers(self):
        sup = self.start()
        sup.handshake()
        sup.send(MessageType.REQUEST, 1, b"{not json")
        _, final = sup.answer(1)
        self.assertEqual((final.type, parse_error_payload(final.payload)["code"]), (MessageType.ERROR, "bad_request"))
        sup.send(MessageType.REQUEST, 2, json_bytes({"fault": "error", "message": "engine on fire"}))
        _, final = sup.answer(2)
        self.assertEqual(parse_error_payload(final.payload),
                         {"code": "worker_error", "message": "engine on fire", "retryable": False})

    def test_cancel_stops_a_streaming_request(self):
        sup = self.start()
        sup.handshake()
        sup.send(MessageType.REQUEST, 5, json_bytes({"prompt": "long", "max_new_tokens": 1000, "stream": True,
                                                     "token_ms": 20}))
        sup.expect(lambda f: f.request_id == 5 and f.type == MessageType.CHUNK)
        sup.send(MessageType.CANCEL, 5)
        while True:
            frame = sup.expect(lambda f: f.request_id == 5, timeout=5)  # 1000 tokens would take 20 s
            if frame.type != MessageType.CHUNK:
                break
        self.assertEqual(frame.type, MessageType.ERROR)
        self.assertEqual(parse_error_payload(frame.payload)["code"], "cancelled")
        sup.stderr.wait_for("cancelled request 5")

    def test_cancel_of_a_blocking_request(self):
        sup = self.start()
        sup.handshake()
        sup.send(MessageType.REQUEST, 6, json_bytes({"prompt": "x", "max_new_tokens": 1000, "token_ms": 20}))
        sup.send(MessageType.CANCEL, 6)
        _, final = sup.answer(6, timeout=5)
        self.assertEqual(parse_error_payload(final.payload)["code"], "cancelled")

    def test_stray_stdout_does_not_touch_the_channel(self):
        sup = self.start()
        sup.handshake()
        sup.send(MessageType.REQUEST, 1, json_bytes({"fault": "stdout_noise", "prompt": "after noise",
                                                     "max_new_tokens": 2}))
        _, final = sup.answer(1)
        self.assertEqual(final.json()["text"], " ".join(generate("after noise", 2)))
        sup.stdout.wait_for("stray print from request 1")
        sup.send(MessageType.REQUEST, 2, b"still fine")
        self.assertEqual(sup.answer(2)[1].payload, b"still fine")

    def test_device_oom_reports_and_exits_1(self):
        sup = self.start()
        sup.handshake()
        sup.send(MessageType.REQUEST, 9, json_bytes({"fault": "device_oom"}))
        _, final = sup.answer(9)
        self.assertEqual(final.type, MessageType.ERROR)
        self.assertEqual(parse_error_payload(final.payload)["code"], "device_oom")
        report = sup.expect(lambda f: f.type == MessageType.ERROR and f.request_id == 0)
        error = parse_error_payload(report.payload)
        self.assertEqual(error["code"], "device_oom")
        self.assertIn("out of memory", error["message"])
        # Before exiting, the worker half-closes the channel so that everything it sent is read first.
        self.assertIsNone(sup.frames.get(timeout=TIMEOUT), "expected EOF from the worker after its report")
        self.assertEqual(sup.wait_exit(), 1)

    def test_exit_flush_is_bounded_when_the_supervisor_does_not_close(self):
        sup = self.start(close_on_eof=False)
        sup.handshake()
        sup.send(MessageType.REQUEST, 9, json_bytes({"fault": "device_oom"}))
        sup.answer(9)
        self.assertEqual(sup.wait_exit(timeout=10), 1)  # waited at most flush_timeout (2 s) for us

    def test_exits_0_when_the_channel_reaches_eof(self):
        sup = self.start(args=["--token-ms", "50"])
        sup.handshake()
        sup.send(MessageType.REQUEST, 1, json_bytes({"prompt": "busy", "max_new_tokens": 1000}))
        sup.sock.shutdown(socket.SHUT_RDWR)  # the supervisor is gone, even with a request in flight
        self.assertEqual(sup.wait_exit(timeout=5), 0)
        sup.stderr.wait_for("supervisor channel closed")

    def test_exits_on_eof_while_loading_the_model(self):
        sup = self.start(args=["--load-ms", "60000"])
        sup.expect(lambda f: f.type == MessageType.HELLO)
        sup.stderr.wait_for("loading model")
        sup.sock.shutdown(socket.SHUT_RDWR)
        self.assertEqual(sup.wait_exit(timeout=5), 0)

    def test_shutdown_finishes_requests_in_flight_then_exits_0(self):
        sup = self.start()
        sup.handshake()
        sup.send(MessageType.REQUEST, 1, json_bytes({"prompt": "finish me", "max_new_tokens": 10, "token_ms": 30}))
        sup.send(MessageType.SHUTDOWN)
        _, final = sup.answer(1)
        self.assertEqual(final.json()["text"], " ".join(generate("finish me", 10)))
        self.assertEqual(sup.wait_exit(), 0)

    def test_drain_refuses_new_requests(self):
        sup = self.start()
        sup.handshake()
        sup.send(MessageType.DRAIN)
        sup.send(MessageType.REQUEST, 4, b"late")
        _, final = sup.answer(4)
        error = parse_error_payload(final.payload)
        self.assertEqual((error["code"], error["retryable"]), ("shutting_down", True))

    def test_sigterm_finishes_in_flight_and_exits_0(self):
        sup = self.start()
        sup.handshake()
        sup.send(MessageType.REQUEST, 1, json_bytes({"prompt": "term", "max_new_tokens": 10, "token_ms": 30,
                                                     "stream": True}))
        sup.expect(lambda f: f.request_id == 1 and f.type == MessageType.CHUNK)
        sup.process.send_signal(signal.SIGTERM)
        chunks, final = sup.answer(1)
        self.assertEqual(final.type, MessageType.RESPONSE)
        self.assertEqual(sup.wait_exit(), 0)

    def test_sigterm_abandons_what_outlives_the_grace_period(self):
        sup = self.start(args=["--term-grace-ms", "200"])
        sup.handshake()
        sup.send(MessageType.REQUEST, 1, json_bytes({"prompt": "endless", "max_new_tokens": 4000, "token_ms": 20,
                                                     "stream": True}))
        sup.expect(lambda f: f.request_id == 1 and f.type == MessageType.CHUNK)
        sup.process.send_signal(signal.SIGTERM)
        # No final answer: the request is left to the supervisor to re-dispatch (or answer worker_lost).
        while True:
            frame = sup.frames.get(timeout=TIMEOUT)
            if frame is None:
                break
            if isinstance(frame, Frame) and frame.request_id == 1:
                self.assertEqual(frame.type, MessageType.CHUNK, "a final answer for an abandoned request")
        self.assertEqual(sup.wait_exit(), 0)

    def test_oversized_frame_from_the_supervisor_ends_the_worker(self):
        sup = self.start()
        sup.handshake()
        sup.sock.sendall(struct.pack(">I", (1 << 20) + 1))  # above the hello's max_frame_bytes
        self.assertEqual(sup.wait_exit(), 1)
        sup.stderr.wait_for("exceeds the maximum")

    def test_protocol_mismatch_is_a_configuration_error(self):
        sup = self.start(protocol=2)
        self.assertEqual(sup.wait_exit(), 78)
        sup.stderr.wait_for("protocol 2")

    def test_not_started_by_the_supervisor(self):
        environment = {k: v for k, v in os.environ.items() if k != "NPU_SUPERVISOR_FD"}
        result = subprocess.run([sys.executable, ECHO_WORKER], env=environment, stdin=subprocess.DEVNULL,
                                capture_output=True, timeout=TIMEOUT)
        self.assertEqual(result.returncode, 78)
        self.assertIn(b"NPU_SUPERVISOR_FD is not set", result.stderr)

    def test_stdout_as_channel_is_refused(self):
        result = subprocess.run([sys.executable, ECHO_WORKER], env=dict(os.environ, NPU_SUPERVISOR_FD="1"),
                                stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT)
        self.assertEqual(result.returncode, 78)
        self.assertIn(b"stdin/stdout/stderr", result.stderr)


if __name__ == "__main__":
    unittest.main()

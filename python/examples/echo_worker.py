#!/usr/bin/env python3
"""An npu-supervisor worker in Python: the template for a torch_npu / vLLM-Ascend / MindIE worker.

Run by npu-supervisord (never by hand: its channel is fd 3), e.g. in the config::

    [defaults]
    command = ["python3", "/opt/npu-supervisor/python/examples/echo_worker.py", "--token-ms", "20"]

What it does with a request payload:

* not JSON (does not start with ``{``): echoed back unchanged;
* ``{"prompt": "Hi", "max_new_tokens": 5, "stream": true}``: deterministic "tokens" generated from the prompt
  (the same words the Swift reference worker npu-worker produces), streamed as ``chunk`` frames when
  ``stream`` is true; the final response is ``{"device", "pid", "text", "tokens"}``. ``token_ms`` overrides
  the per-token delay of ``--token-ms`` for one request;
* ``"fault"`` drills: ``device_oom`` (fails the request with ``device_oom``, reports it, exits 1: status then
  shows ``last_exit: "device_oom"`` and the worker is restarted), ``exit`` (``exit_code``), ``crash``
  (SIGSEGV), ``error`` (a ``worker_error`` answer), ``sleep`` (``sleep_ms``), ``stop_heartbeat``,
  ``stdout_noise`` (writes frame-like bytes to stdout: harmless, frames only travel on fd 3).

To adapt it to a real engine, replace ``load_model`` and ``Engine.tokens`` and map the engine's out-of-memory
exception to ``worker.device_oom(...)``, e.g. ``except torch.npu.OutOfMemoryError as e:``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any, Dict, Iterator, List

try:
    import npu_supervisor  # noqa: F401 - installed, or on PYTHONPATH
except ImportError:  # running from a checkout: python/examples/echo_worker.py -> python/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from npu_supervisor import ErrorCode, Request, RequestFailed, Worker, WorkerError  # noqa: E402

VERSION = "echo_worker 0.1.0"

VOCABULARY = [
    "the", "model", "answers", "quickly", "on", "device", "npu", "tokens", "flow", "steadily", "and",
    "serving", "stays", "up", "while", "workers", "restart", "hello", "world", "ascend",
]
_MASK = (1 << 64) - 1


def generate(prompt: str, count: int) -> List[str]:
    """Deterministic tokens: the same prompt gives the same words everywhere (and as npu-worker does)."""
    h = 1469598103934665603
    for byte in prompt.encode("utf-8"):
        h = ((h ^ byte) * 1099511628211) & _MASK
    words = []
    for i in range(count):
        h = (h * 6364136223846793005 + 1442695040888963407 + i) & _MASK
        words.append(VOCABULARY[(h >> 33) % len(VOCABULARY)])
    return words


def log(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


class Engine:
    """The simulated device. A real worker holds the model here (``torch.npu.set_device``, weights, KV cache)."""

    def __init__(self, worker: Worker, token_delay: float):
        self.worker = worker
        self.device = worker.device
        self.token_delay = token_delay

    def tokens(self, request: Request, prompt: str, count: int, delay: float) -> Iterator[str]:
        """Pieces of text, one per token; stops early when the request is cancelled."""
        for i, word in enumerate(generate(prompt, count)):
            if delay > 0 and request.wait_cancelled(delay):
                return
            if request.cancelled:
                return
            yield word if i == 0 else " " + word

    def answer(self, pieces: List[str]) -> Dict[str, Any]:
        return {"text": "".join(pieces), "tokens": len(pieces), "device": self.device, "pid": os.getpid()}

    def handle(self, request: Request) -> Any:
        payload = request.payload
        if not payload.startswith(b"{"):
            return payload  # echo: the benchmark path
        body = request.json()  # raises RequestFailed(bad_request) for invalid JSON
        if not isinstance(body, dict):
            raise RequestFailed(ErrorCode.BAD_REQUEST, "the payload must be a JSON object")
        fault = body.get("fault")
        if fault is not None:
            self.fault(request, body, str(fault))
        prompt = str(body.get("prompt", ""))
        count = max(0, min(int(body.get("max_new_tokens", 16)), 4096))
        delay = float(body.get("token_ms", self.token_delay * 1000)) / 1000.0
        if body.get("stream"):
            return self.streamed(request, prompt, count, delay)
        pieces = list(self.tokens(request, prompt, count, delay))
        if request.cancelled:
            log("cancelled request %d (prompt %r) after %d/%d tokens" % (request.id, prompt, len(pieces), count))
            raise RequestFailed(ErrorCode.CANCELLED, "cancelled")
        return self.answer(pieces)

    def streamed(self, request: Request, prompt: str, count: int, delay: float) -> Iterator[str]:
        """A generator handler: the library sends every yielded piece as a chunk and the return value as the
        final response; it stops pulling (and closes the generator) once the request is cancelled."""
        pieces: List[str] = []
        try:
            for piece in self.tokens(request, prompt, count, delay):
                pieces.append(piece)
                yield piece
        except GeneratorExit:
            log("cancelled request %d (prompt %r) after %d/%d tokens" % (request.id, prompt, len(pieces), count))
            raise
        if request.cancelled:
            log("cancelled request %d (prompt %r) after %d/%d tokens" % (request.id, prompt, len(pieces), count))
            raise RequestFailed(ErrorCode.CANCELLED, "cancelled")
        return self.answer(pieces)

    def fault(self, request: Request, body: Dict[str, Any], fault: str) -> None:
        if fault == "device_oom":
            # What torch_npu raises as torch.npu.OutOfMemoryError. The device context is now suspect: answer
            # the request, tell the supervisor why we are going, exit; the supervisor starts a fresh worker.
            message = ("NPU out of memory. Tried to allocate 2.00 GiB (NPU %s; 30.00 GiB total capacity)"
                       % self.device)
            log("RuntimeError: %s" % message)
            self.worker.device_oom(message, request, exit_code=1)
        elif fault == "exit":
            log("exiting with code %s as asked" % body.get("exit_code", 1))
            self.worker.exit(int(body.get("exit_code", 1)))
        elif fault == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        elif fault == "error":
            raise RequestFailed(ErrorCode.WORKER_ERROR, str(body.get("message", "the engine failed")))
        elif fault == "sleep":
            request.wait_cancelled(int(body.get("sleep_ms", 1000)) / 1000.0)
        elif fault == "stop_heartbeat":
            self.worker.stop_heartbeats()
        elif fault == "stdout_noise":
            # A stray print, and even bytes that look like a frame header: they go to the supervisor's log,
            # never into the protocol (frames only travel on the channel fd).
            print("stray print from request %d" % request.id)
            sys.stdout.flush()
            sys.stdout.buffer.write(b"\x00\x00\x00\x0e\x04\x00" + b"\x00" * 8 + b"oops\n")
            sys.stdout.flush()
        else:
            raise RequestFailed(ErrorCode.BAD_REQUEST, "unknown fault %r" % fault)


def load_model(model: str, load_ms: int) -> None:
    """Stand-in for the real model load (``torch.npu.set_device(0)`` - the device is pinned by
    ASCEND_RT_VISIBLE_DEVICES - then weights to the device). Heartbeats keep flowing meanwhile."""
    if load_ms > 0:
        time.sleep(load_ms / 1000.0)


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.environ.get("MODEL_NAME", "echo-sim"), help="model name for hello")
    parser.add_argument("--load-ms", type=int, default=0, help="simulated model-load time")
    parser.add_argument("--token-ms", type=int, default=0, help="simulated time per generated token")
    parser.add_argument("--threads", type=int, default=8, help="requests handled at once (>= max_inflight)")
    parser.add_argument("--term-grace-ms", type=int, default=5000,
                        help="on SIGTERM, wait this long for requests in flight before exiting 0")
    args = parser.parse_args(argv)

    try:
        worker = Worker(model=args.model, worker_version=VERSION, max_threads=args.threads,
                        term_grace=args.term_grace_ms / 1000.0)
        worker.connect()
    except WorkerError as error:
        log("echo_worker: %s" % error)
        return 78  # EX_CONFIG: the supervisor does not restart a worker that cannot work at all
    log("echo_worker[%s]: pid %d loading model %s (%d ms)" % (worker.device, os.getpid(), args.model, args.load_ms))
    load_model(args.model, args.load_ms)
    engine = Engine(worker, args.token_ms / 1000.0)
    worker.handler(engine.handle)
    worker.run()  # says ready; exits the process when the supervisor closes fd 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

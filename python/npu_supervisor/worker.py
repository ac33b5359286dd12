"""The worker side of the npu-supervisor protocol, for Python inference engines (torch_npu, vLLM-Ascend, MindIE).

A worker is started by npu-supervisord with its end of a socketpair as fd 3 (``NPU_SUPERVISOR_FD``) and its
device in ``NPU_DEVICE_ID``. What this module does for you:

* the handshake: reads the supervisor's ``hello`` (heartbeat interval, frame limit), sends its own
  (``{"protocol": 1, "pid", "device", "worker_version", "model"}``), then ``ready`` once you say the model is
  loaded;
* heartbeats on a thread of their own, so a long request or a long model load never looks like a hang;
* requests: each runs your handler on a thread pool and gets **exactly one** final answer (``response`` or
  ``error``), optionally preceded by ``chunk`` frames; a handler that is a generator streams what it yields;
* cancellation: a ``cancel`` frame sets the request's flag (:attr:`Request.cancelled`);
* ``drain`` (accept nothing new), ``shutdown`` and SIGTERM (finish what is in flight, bounded, then exit 0);
* it exits when fd 3 reaches end-of-file (the supervisor is gone), so a killed supervisor never leaves the
  worker holding device memory.

Frames only ever travel on the channel fd, never on stdout: a stray ``print()`` lands in the supervisor's log
and cannot corrupt the protocol.

Minimal use::

    from npu_supervisor import Worker

    worker = Worker(model="my-model", worker_version="my-engine 1.0")
    worker.connect()          # handshake and heartbeats start now (optional: run() does it)
    model = load_model()      # may take minutes; the supervisor's start_timeout bounds it

    @worker.handler
    def handle(request):
        return model.generate(request.json())   # bytes, str or JSON-able; or raise RequestFailed(...)

    worker.run()              # says ready, serves, exits the process when the supervisor goes away
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import inspect
import json
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable, Dict, Iterable, Optional

from .protocol import (
    DEFAULT_MAX_FRAME_BYTES, PROTOCOL_VERSION, ErrorCode, FrameReader, FrameWriter, MessageType, ProtocolError,
    error_payload, json_bytes, open_stream, to_bytes,
)

__all__ = ["Worker", "Request", "RequestFailed", "WorkerError", "RankInfo", "RankError"]

DEFAULT_WORKER_VERSION = "npu_supervisor-python 0.1.0"


class WorkerError(Exception):
    """The worker cannot talk to a supervisor (not started by npu-supervisord, failed handshake)."""


class RankError(WorkerError):
    """The tensor-parallel variables (``WORLD_SIZE``, ``RANK``, ...) or the rank table are inconsistent: a
    configuration error (exit 78), not something a restart would fix."""


@dataclasses.dataclass(frozen=True)
class RankInfo:
    """Where this process stands in a tensor-parallel group, as npu-supervisord describes it in the environment
    (docs/PROTOCOL.md, "Tensor-parallel groups: what a rank is given"). A worker outside any group
    (``WORLD_SIZE`` unset or 1) gets rank 0 of a world of 1: it is its own leader, and nothing else changes.

    Only the leader (rank 0) ever receives requests. Every rank still has its own channel: it says hello and
    ready, heart-beats and reports health like any worker (:meth:`Worker.run_rank` does the split).
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    #: The group's id (``NPU_GROUP``, e.g. ``"tp0"``).
    group: Optional[str] = None
    #: An HCCL-style JSON rank table written by the supervisor (``RANK_TABLE_FILE``), if any.
    rank_table_file: Optional[str] = None
    #: This rank's own device (``NPU_DEVICE_ID``).
    device: Optional[str] = None

    @property
    def is_leader(self) -> bool:
        """Rank 0: the one rank that receives requests."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True in a group of more than one rank."""
        return self.world_size > 1

    @classmethod
    def from_env(cls, environ: Optional[Dict[str, str]] = None) -> "RankInfo":
        """Reads the group variables (default: ``os.environ``). Raises :class:`RankError` when they are present
        but inconsistent (a rank outside ``0..WORLD_SIZE-1``, no ``MASTER_ADDR``/``MASTER_PORT`` in a group of
        more than one, a ``LOCAL_RANK`` that differs from ``RANK`` (groups span one host), ...)."""
        env = os.environ if environ is None else environ

        def integer(name: str, default: Optional[int], low: int, high: Optional[int] = None) -> Optional[int]:
            text = env.get(name, "")
            if text == "":
                return default
            try:
                value = int(text)
            except ValueError:
                raise RankError("%s=%r is not an integer" % (name, text)) from None
            if value < low or (high is not None and value > high):
                bounds = "%d..%d" % (low, high) if high is not None else ">= %d" % low
                raise RankError("%s=%d is out of range (%s)" % (name, value, bounds))
            return value

        world = integer("WORLD_SIZE", 1, 1)
        assert world is not None
        device = env.get("NPU_DEVICE_ID") or None
        group = env.get("NPU_GROUP") or None
        table = env.get("RANK_TABLE_FILE") or None
        if world == 1:
            return cls(device=device, group=group, rank_table_file=table,
                       master_addr=env.get("MASTER_ADDR") or None, master_port=integer("MASTER_PORT", None, 1, 65535))
        if env.get("RANK", "") == "":
            raise RankError("WORLD_SIZE=%d but RANK is not set" % world)
        rank = integer("RANK", 0, 0, world - 1)
        local_rank = integer("LOCAL_RANK", rank, 0, world - 1)
        assert rank is not None and local_rank is not None
        if local_rank != rank:
            raise RankError("LOCAL_RANK=%d differs from RANK=%d; a group spans one host" % (local_rank, rank))
        addr = env.get("MASTER_ADDR") or None
        if addr is None:
            raise RankError("WORLD_SIZE=%d but MASTER_ADDR is not set" % world)
        port = integer("MASTER_PORT", None, 1, 65535)
        if port is None:
            raise RankError("WORLD_SIZE=%d but MASTER_PORT is not set" % world)
        return cls(rank=rank, local_rank=local_rank, world_size=world, master_addr=addr, master_port=port,
                   group=group, rank_table_file=table, device=device)

    def read_rank_table(self) -> Optional[Dict[str, Any]]:
        """The rank table (``RANK_TABLE_FILE``) parsed, or None when there is none. Raises :class:`RankError`
        when it cannot be read, is not JSON of the expected shape, or does not list this rank."""
        if not self.rank_table_file:
            return None
        path = self.rank_table_file
        try:
            with open(path, "r", encoding="utf-8") as handle:
                table = json.load(handle)
        except OSError as error:
            raise RankError("RANK_TABLE_FILE %s cannot be read: %s" % (path, error.strerror)) from None
        except ValueError as error:
            raise RankError("RANK_TABLE_FILE %s is not valid JSON: %s" % (path, error)) from None
        servers = table.get("server_list") if isinstance(table, dict) else None
        if not isinstance(servers, list):
            raise RankError("RANK_TABLE_FILE %s has no server_list array" % path)
        ranks = set()
        for server in servers:
            devices = server.get("device") if isinstance(server, dict) else None
            if not isinstance(devices, list):
                raise RankError("RANK_TABLE_FILE %s: a server_list entry has no device array" % path)
            for entry in devices:
                if not isinstance(entry, dict) or "rank_id" not in entry:
                    raise RankError("RANK_TABLE_FILE %s: a device entry has no rank_id" % path)
                ranks.add(str(entry["rank_id"]))
        if str(self.rank) not in ranks:
            raise RankError("RANK_TABLE_FILE %s does not list rank %d (it lists %s)"
                            % (path, self.rank, ", ".join(sorted(ranks)) or "none"))
        return table


class RequestFailed(Exception):
    """Raise from a handler to answer the request with an ``error`` frame of this code."""

    def __init__(self, code: str, message: str, retryable: bool = False):
        super().__init__("%s: %s" % (code, message))
        self.code = code
        self.message = message
        self.retryable = retryable


class Request:
    """One request handed to a handler. Thread-safe; answer it once (:meth:`respond` or :meth:`fail`)."""

    def __init__(self, worker: "Worker", request_id: int, payload: bytes):
        self.worker = worker
        self.id = request_id
        self.payload = payload
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._answered = False
        self.chunks_sent = 0

    # -- state

    @property
    def cancelled(self) -> bool:
        """True once the supervisor cancelled the request (client gone, deadline passed): stop working on it."""
        return self._cancelled.is_set()

    def wait_cancelled(self, timeout: Optional[float] = None) -> bool:
        """Blocks up to ``timeout`` seconds or until cancelled; returns whether it was cancelled. Handy as an
        interruptible sleep in simulated engines."""
        return self._cancelled.wait(timeout)

    @property
    def answered(self) -> bool:
        return self._answered

    # -- payload

    def text(self) -> str:
        """The payload as UTF-8 text (raises :class:`RequestFailed` ``bad_request`` when it is not)."""
        try:
            return self.payload.decode("utf-8")
        except UnicodeDecodeError as error:
            raise RequestFailed(ErrorCode.BAD_REQUEST, "payload is not UTF-8: %s" % error) from None

    def json(self) -> Any:
        """The payload parsed as JSON (raises :class:`RequestFailed` ``bad_request`` when it is not)."""
        try:
            return json.loads(self.text())
        except ValueError as error:
            raise RequestFailed(ErrorCode.BAD_REQUEST, "payload is not valid JSON: %s" % error) from None

    # -- answers

    def chunk(self, data: Any) -> bool:
        """Streams a partial answer (``chunk`` frame). Returns False when the request is already answered or
        the channel is gone. Raises ``ValueError`` for a chunk larger than the supervisor's frame limit."""
        if self._answered or self.worker._answers_closed:
            return False
        ok = self.worker._send(MessageType.CHUNK, self.id, to_bytes(data))
        if ok:
            self.chunks_sent += 1
        return ok

    def stream(self, pieces: Iterable[Any], final: Any = None) -> bool:
        """Sends each piece as a chunk, stopping early (answer: ``cancelled``) if the request is cancelled,
        then answers with ``final`` (default: the pieces concatenated when they are all ``str``/``bytes``).
        Returns True when the full answer was sent."""
        collected = []
        for piece in pieces:
            if self.cancelled:
                self.fail(ErrorCode.CANCELLED, "cancelled after %d chunk(s)" % self.chunks_sent)
                return False
            data = to_bytes(piece)
            collected.append(data)
            self.chunk(data)
        return self.respond(b"".join(collected) if final is None else final)

    def respond(self, data: Any = b"") -> bool:
        """The final, successful answer. Only the first answer counts; returns whether this one was sent."""
        if not self._claim():
            return False
        body = to_bytes(data)
        limit = self.worker.max_frame_bytes
        if 10 + len(body) > limit:
            self.worker._send(MessageType.ERROR, self.id, error_payload(
                ErrorCode.WORKER_ERROR, "the response of %d bytes exceeds max_frame_bytes (%d)" % (len(body), limit)))
            return False
        return self.worker._send(MessageType.RESPONSE, self.id, body)

    def fail(self, code: str, message: str, retryable: bool = False) -> bool:
        """The final answer, as an error. Only the first answer counts; returns whether this one was sent."""
        if not self._claim():
            return False
        return self.worker._send(MessageType.ERROR, self.id, error_payload(code, message, retryable))

    def _claim(self) -> bool:
        with self._lock:
            if self._answered or self.worker._answers_closed:
                return False
            self._answered = True
            return True

    def __repr__(self) -> str:
        return "Request(id=%d, %d bytes%s)" % (self.id, len(self.payload), ", cancelled" if self.cancelled else "")


Handler = Callable[[Request], Any]


class Worker:
    """A worker process's connection to npu-supervisord.

    :param model: model name reported in ``hello`` (shown in the supervisor's log).
    :param worker_version: version string reported in ``hello``.
    :param max_threads: requests handled at once (the thread pool's size); match the config's ``max_inflight``.
    :param fd: the channel fd; default ``NPU_SUPERVISOR_FD``.
    :param device: the device id; default ``NPU_DEVICE_ID`` (the supervisor's hello overrides neither).
    :param term_grace: seconds SIGTERM / ``shutdown`` wait for requests in flight before exiting 0.
    :param handle_sigterm: install the graceful SIGTERM handler (only possible from the main thread).
    :param exit_process: exit the process when the channel closes (the contract). False returns from
        :meth:`run` instead (tests, embedding).
    :param line_buffered_output: make stdout line-buffered so ``print`` reaches the supervisor's log at once.
    :param rank: this process's place in a tensor-parallel group; default :meth:`RankInfo.from_env` (which raises
        :class:`RankError` for inconsistent variables).
    """

    def __init__(self, model: Optional[str] = None, worker_version: str = DEFAULT_WORKER_VERSION,
                 max_threads: int = 8, fd: Optional[int] = None, device: Optional[str] = None,
                 term_grace: float = 5.0, handle_sigterm: bool = True, exit_process: bool = True,
                 line_buffered_output: bool = True, rank: Optional[RankInfo] = None):
        if fd is None:
            value = os.environ.get("NPU_SUPERVISOR_FD")
            if not value:
                raise WorkerError("NPU_SUPERVISOR_FD is not set: this program is meant to be started by "
                                  "npu-supervisord (its channel is fd 3)")
            try:
                fd = int(value)
            except ValueError:
                raise WorkerError("NPU_SUPERVISOR_FD=%r is not a file descriptor number" % value) from None
        if fd in (0, 1, 2):
            raise WorkerError("NPU_SUPERVISOR_FD=%d would put frames on stdin/stdout/stderr; the channel must be "
                              "its own descriptor (normally 3)" % fd)
        try:
            os.fstat(fd)
        except OSError as error:
            raise WorkerError("channel fd %d is not open: %s" % (fd, error.strerror)) from None
        if max_threads < 1:
            raise ValueError("max_threads must be at least 1")
        self.fd = fd
        self.device = device if device is not None else os.environ.get("NPU_DEVICE_ID", "?")
        self.model = model
        self.worker_version = worker_version
        self.max_threads = max_threads
        self.term_grace = term_grace
        self.handle_sigterm = handle_sigterm
        self.exit_process = exit_process
        self.line_buffered_output = line_buffered_output
        self.rank = rank if rank is not None else RankInfo.from_env()
        #: The supervisor's hello (``protocol``, ``device``, ``heartbeat_interval_ms``, ``max_frame_bytes``).
        self.supervisor_hello: Optional[Dict[str, Any]] = None
        self.heartbeat_interval = 1.0
        self.max_frame_bytes = DEFAULT_MAX_FRAME_BYTES

        self._handler: Optional[Handler] = None
        self._reader: Optional[FrameReader] = None
        self._writer: Optional[FrameWriter] = None
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._requests: Dict[int, Request] = {}
        self._state = threading.Condition()
        self._inflight = 0
        self._connected = False
        self._ready_sent = False
        self._draining = False
        self._exiting = False
        self._closed = threading.Event()
        self._close_reason = ""
        self._close_lock = threading.Lock()
        self._heartbeats_stopped = threading.Event()
        self._eof = threading.Event()
        self._flushing_exit = False
        self._exit_code: Optional[int] = None
        self._answers_closed = False
        self._reader_thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ public API

    def handler(self, function: Handler) -> Handler:
        """Decorator (or plain call) registering the request handler.

        The handler gets a :class:`Request` on a pool thread and answers it by
        * returning the response (``bytes``, ``str``, or anything JSON-able; ``None`` is an empty response),
        * being a generator: every yielded item is sent as a ``chunk`` (checked for cancellation in between),
          and the generator's ``return`` value is the final response,
        * raising :class:`RequestFailed` (an ``error`` frame with its code) or any other exception
          (``worker_error`` with the exception's text; the traceback goes to stderr),
        * or calling :meth:`Request.respond` / :meth:`Request.fail` itself.
        """
        self._handler = function
        return function

    @property
    def inflight(self) -> int:
        """Requests accepted and not yet finished."""
        with self._state:
            return self._inflight

    @property
    def draining(self) -> bool:
        return self._draining

    def connect(self) -> Dict[str, Any]:
        """Handshake: waits for the supervisor's hello, sends this worker's hello, starts heartbeats and the
        reader thread. Returns the supervisor's hello. Raises :class:`WorkerError` when the supervisor does not
        speak this protocol."""
        if self._connected:
            assert self.supervisor_hello is not None
            return self.supervisor_hello
        os.set_inheritable(self.fd, False)  # helpers we spawn must not hold the channel open
        if self.line_buffered_output:
            reconfigure = getattr(sys.stdout, "reconfigure", None)
            if reconfigure is not None:
                try:
                    reconfigure(line_buffering=True)
                except (ValueError, OSError):  # pragma: no cover - exotic stdout
                    pass
        stream = open_stream(self.fd)
        self._reader = FrameReader(stream)
        self._writer = FrameWriter(stream)
        try:
            first = self._reader.read_frame()
        except (OSError, ProtocolError) as error:
            raise WorkerError("reading the supervisor's hello failed: %s" % error) from None
        if first is None:
            raise WorkerError("the supervisor closed the channel before saying hello")
        if first.type != MessageType.HELLO:
            raise WorkerError("expected hello from the supervisor, got a %s frame" % MessageType.name(first.type))
        try:
            hello = first.json()
            if not isinstance(hello, dict):
                raise ValueError("not a JSON object")
        except ValueError as error:
            raise WorkerError("the supervisor's hello is not valid JSON: %s" % error) from None
        version = hello.get("protocol")
        if version != PROTOCOL_VERSION:
            raise WorkerError("the supervisor speaks protocol %r, this library speaks %d"
                              % (version, PROTOCOL_VERSION))
        self._apply_hello(hello)
        pid = os.getpid()
        self._writer.write(MessageType.HELLO, 0, json_bytes({
            "protocol": PROTOCOL_VERSION, "pid": pid, "device": self.device,
            "worker_version": self.worker_version, "model": self.model,
        }))
        self._connected = True
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.max_threads, thread_name_prefix="npu-request")
        threading.Thread(target=self._heartbeat_loop, name="npu-heartbeat", daemon=True).start()
        self._reader_thread = threading.Thread(target=self._read_loop, name="npu-channel-reader", daemon=True)
        self._reader_thread.start()
        if self.handle_sigterm and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)
        self._log("pid %d connected (heartbeat every %d ms, max frame %d bytes)"
                  % (pid, int(self.heartbeat_interval * 1000), self.max_frame_bytes))
        return hello

    def ready(self, info: Optional[Dict[str, Any]] = None) -> None:
        """Tells the supervisor the model is loaded: requests start arriving. Needs a handler."""
        if self._handler is None:
            raise WorkerError("register a request handler (@worker.handler) before saying ready")
        self.connect()
        if self._ready_sent:
            return
        self._ready_sent = True
        self._send(MessageType.READY, 0, json_bytes(info) if info is not None else b"")
        self._log("ready")

    def run(self, handler: Optional[Handler] = None) -> str:
        """Connects (if not yet), says ready (if not yet) and serves until the channel closes, a ``shutdown``
        frame or SIGTERM. Then exits the process (0 on a clean close) unless ``exit_process=False``, in which
        case it returns why it stopped (``"eof"``, ``"shutdown"``, ``"SIGTERM"``, ``"error: ..."``)."""
        if handler is not None:
            self.handler(handler)
        self.connect()
        self.ready()
        while not self._closed.wait(3600):
            pass
        return self._close_reason

    def run_rank(self, handler: Optional[Handler] = None, follower_loop: Optional[Callable[[], Any]] = None) -> str:
        """The leader/follower split of a tensor-parallel group, in one call.

        * Rank 0 (and a worker outside any group): :meth:`run` with ``handler``.
        * Other ranks: :meth:`run_follower` with ``follower_loop``.

        Join the group (e.g. ``torch.distributed.init_process_group``) before calling it: ``ready`` goes out
        only here, and a rank must not say ready before its group has formed."""
        if self.rank.is_leader:
            return self.run(handler)
        return self.run_follower(follower_loop)

    def run_follower(self, loop: Optional[Callable[[], Any]] = None) -> str:
        """Serves as a follower rank: connects, says ready, then runs ``loop``, the follower's side of the
        collectives (waiting for the leader's broadcast of the next request, running the same forward pass),
        while heartbeats go on on their own thread.

        ``loop`` runs on a thread of its own, so that the main thread stays free for SIGTERM (a follower blocked
        in a collective must still stop politely). The supervisor never sends a follower requests; one that
        arrives anyway is answered ``worker_error`` (``rank N ... is a follower``). When ``loop`` raises, the
        communicator is broken: :meth:`lost_peer` logs it and exits 1 (restartable: the supervisor restarts the
        whole group). When it returns, the process exits 0. End-of-file on the channel and SIGTERM end the
        process as with :meth:`run`. With ``exit_process=False`` it returns why it stopped instead."""
        if self._handler is None:
            rank = self.rank

            def refuse(request: Request) -> None:
                raise RequestFailed(ErrorCode.WORKER_ERROR, "rank %d of group %s is a follower: only rank 0 serves "
                                    "requests" % (rank.rank, rank.group or "(unnamed)"))

            self.handler(refuse)
        self.connect()
        self.ready()
        if loop is not None:
            def follow() -> None:
                try:
                    loop()
                except Exception as error:  # noqa: BLE001 - any failure of a collective breaks the group
                    self.lost_peer(error)
                    self._close("lost peer: %s: %s" % (type(error).__name__, error), 1)
                    return
                self._log("rank %d: follower loop finished" % self.rank.rank)
                self._close("follower loop finished", 0)

            threading.Thread(target=follow, name="npu-follower", daemon=True).start()
        while not self._closed.wait(3600):
            pass
        return self._close_reason

    def lost_peer(self, error: Any, exit_code: int = 1) -> None:
        """The group is broken (a collective failed: a peer died, stopped answering past its timeout, or closed
        its connection): logs ``rank N: lost peer: ...`` and exits ``exit_code`` (never 78: the group must be
        restarted). A request in progress is deliberately not answered: the supervisor retries it on another
        replica once the whole group is down (an answer would be the client's failure)."""
        detail = "%s: %s" % (type(error).__name__, error) if isinstance(error, BaseException) else str(error)
        self._log("rank %d: lost peer: %s; exiting %d" % (self.rank.rank, detail, exit_code))
        if self.exit_process:
            self.exit(exit_code)

    def report_error(self, code: str, message: str) -> bool:
        """A worker-level error (request id 0): the supervisor logs it; ``device_oom`` also makes the coming
        exit show as ``device_oom`` in status and metrics."""
        return self._send(MessageType.ERROR, 0, error_payload(code, message))

    def report_device_oom(self, message: str) -> bool:
        """Reports that the device ran out of memory (error frame, request id 0, code ``device_oom``). Exit
        right after it (:meth:`exit`): the supervisor restarts the worker with a fresh device context."""
        return self.report_error(ErrorCode.DEVICE_OOM, message)

    def device_oom(self, message: str, request: Optional[Request] = None, exit_code: int = 1) -> None:
        """All of the device-OOM drill at once: fails ``request`` (if given) with ``device_oom``, reports it,
        logs it to stderr and exits with ``exit_code``. Never returns."""
        if request is not None:
            request.fail(ErrorCode.DEVICE_OOM, message)
        self.report_device_oom(message)
        self._log("device out of memory: %s; exiting %d" % (message, exit_code))
        self.exit(exit_code)

    def send_health(self, report: Dict[str, Any]) -> bool:
        """The worker's own view of its health (``health`` frame, JSON)."""
        return self._send(MessageType.HEALTH, 0, json_bytes(report))

    def stop_heartbeats(self) -> None:
        """Stops heart-beating (fault drills: what a wedged process looks like to the supervisor)."""
        self._heartbeats_stopped.set()

    def exit(self, code: int = 0, flush_timeout: float = 2.0) -> None:
        """Ends the process with ``code`` (``os._exit``: request threads cannot hold it up).

        Before that it makes sure the supervisor has read every frame already sent (the answers, a device-OOM
        report): it half-closes the channel and waits, at most ``flush_timeout`` seconds, for the supervisor to
        close its end, which it does only after consuming everything before the end-of-file. Without this, a
        supervisor that notices the exit first could drop those frames (and run an answered request again).
        """
        self._exiting = True
        with self._close_lock:
            if self._exit_code is None:
                self._exit_code = code  # the first exit asked for wins (a racing EOF must not turn 1 into 0)
        stream = self._reader.stream if self._reader is not None else None
        if (self._connected and not self._eof.is_set() and hasattr(stream, "shutdown")
                and threading.current_thread() is not self._reader_thread):
            self._flushing_exit = True
            try:
                stream.shutdown(1)  # SHUT_WR
            except OSError:
                pass
            else:
                self._eof.wait(flush_timeout)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - the supervisor (reading our output) may be gone
                pass
        os._exit(self._exit_code)

    # ------------------------------------------------------------------ internals

    def _apply_hello(self, hello: Dict[str, Any]) -> None:
        self.supervisor_hello = hello
        interval = hello.get("heartbeat_interval_ms")
        if isinstance(interval, int) and interval > 0:
            self.heartbeat_interval = interval / 1000.0
        limit = hello.get("max_frame_bytes")
        if isinstance(limit, int) and limit >= 10:
            self.max_frame_bytes = limit
            if self._reader is not None:
                self._reader.max_frame_bytes = limit
            if self._writer is not None:
                self._writer.max_frame_bytes = limit

    def _send(self, type_: int, request_id: int, payload: bytes) -> bool:
        writer = self._writer
        if writer is None:
            raise WorkerError("not connected: call connect() first")
        try:
            writer.write(type_, request_id, payload)
            return True
        except OSError:
            # EPIPE/ECONNRESET: the supervisor is gone; the reader sees EOF and ends the process.
            return False

    def _log(self, message: str) -> None:
        try:
            sys.stderr.write("npu_supervisor.worker[%s]: %s\n" % (self.device, message))
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - stderr may be a broken pipe when the supervisor died
            pass

    def _heartbeat_loop(self) -> None:
        while not self._heartbeats_stopped.wait(self.heartbeat_interval):
            if self._closed.is_set() or not self._send(MessageType.HEARTBEAT, 0, b""):
                return

    def _read_loop(self) -> None:
        assert self._reader is not None
        reason = "eof"
        code = 0
        try:
            while True:
                frame = self._reader.read_frame()
                if frame is None:
                    if not self._flushing_exit:
                        self._log("supervisor channel closed; exiting")
                    break
                if frame.type == MessageType.SHUTDOWN:
                    # Keep reading meanwhile: cancels still count, and EOF still ends the process at once.
                    self._begin_stop("shutdown")
                    continue
                self._dispatch(frame)
        except (OSError, ProtocolError) as error:
            reason, code = "error: %s" % error, 1
            if not self._flushing_exit:
                self._log("channel error: %s; exiting" % error)
        self._eof.set()
        if self._flushing_exit:
            return  # exit() half-closed the channel and now ends the process with its own code
        self._close(reason, code)

    def _dispatch(self, frame: Any) -> None:
        if frame.type == MessageType.REQUEST:
            self._accept(frame.request_id, frame.payload)
        elif frame.type == MessageType.CANCEL:
            with self._state:
                request = self._requests.get(frame.request_id)
            if request is not None:
                request._cancelled.set()
        elif frame.type == MessageType.DRAIN:
            self._draining = True
            self._log("draining: finishing %d request(s), accepting nothing new" % self.inflight)
        elif frame.type == MessageType.HELLO:
            try:
                hello = frame.json()
                if isinstance(hello, dict):
                    self._apply_hello(hello)
            except ValueError:
                pass
        # Anything else (heartbeat echoes, types of later versions) is ignored.

    def _accept(self, request_id: int, payload: bytes) -> None:
        request = Request(self, request_id, payload)
        if self._draining or self._exiting:
            request.fail(ErrorCode.SHUTTING_DOWN, "the worker on device %s is draining" % self.device, True)
            return
        with self._state:
            if request_id in self._requests:
                return  # a duplicate id would break "one answer per request"; the first one wins
            self._requests[request_id] = request
            self._inflight += 1
        assert self._executor is not None
        try:
            self._executor.submit(self._run_request, request)
        except RuntimeError:  # executor shut down: we are exiting
            request.fail(ErrorCode.SHUTTING_DOWN, "the worker is exiting", True)
            self._done(request)

    def _run_request(self, request: Request) -> None:
        try:
            if request.cancelled:
                request.fail(ErrorCode.CANCELLED, "cancelled before it started")
                return
            handler = self._handler
            if handler is None:
                request.fail(ErrorCode.WORKER_ERROR, "the worker has no request handler")
                return
            result = handler(request)
            if inspect.isgenerator(result):
                result = self._drain_generator(request, result)
                if request.answered:
                    return
            if not request.answered:
                request.respond(result)
        except RequestFailed as failure:
            request.fail(failure.code, failure.message, failure.retryable)
        except Exception as error:  # noqa: BLE001 - every request gets its one answer
            self._log("request %d failed:\n%s" % (request.id, traceback.format_exc().rstrip()))
            request.fail(ErrorCode.WORKER_ERROR, "%s: %s" % (type(error).__name__, error))
        finally:
            if not request.answered:  # pragma: no cover - defensive
                request.fail(ErrorCode.WORKER_ERROR, "the handler did not answer")
            self._done(request)

    def _drain_generator(self, request: Request, generator: Any) -> Any:
        while True:
            if request.cancelled:
                generator.close()
                request.fail(ErrorCode.CANCELLED, "cancelled after %d chunk(s)" % request.chunks_sent)
                return None
            try:
                piece = next(generator)
            except StopIteration as stop:
                return stop.value
            request.chunk(piece)

    def _done(self, request: Request) -> None:
        with self._state:
            if self._requests.get(request.id) is request:
                del self._requests[request.id]
                self._inflight -= 1
            self._state.notify_all()

    def _finish_inflight(self, why: str) -> None:
        """Accepts nothing new and waits (at most ``term_grace``) for requests in flight."""
        self._draining = True
        deadline = time.monotonic() + self.term_grace
        with self._state:
            if self._inflight:
                self._log("%s: finishing %d request(s) in flight" % (why, self._inflight))
            while self._inflight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._log("%s: %d request(s) still running after %.1fs; exiting anyway"
                              % (why, self._inflight, self.term_grace))
                    break
                self._state.wait(remaining)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._begin_stop("SIGTERM")

    def _begin_stop(self, why: str) -> None:
        """Graceful stop (``shutdown`` frame, SIGTERM): finish what is in flight (bounded), then exit 0."""
        if self._exiting:
            return
        self._exiting = True

        def stop() -> None:
            self._finish_inflight(why)
            self._close(why, 0)

        threading.Thread(target=stop, name="npu-stop", daemon=True).start()

    def _close(self, reason: str, code: int) -> None:
        with self._close_lock:
            if self._close_reason:
                return
            self._close_reason = reason
        self._heartbeats_stopped.set()
        # Requests still running are abandoned, not answered: the supervisor re-dispatches them (if nothing of
        # them was streamed) once the channel closes, or answers worker_lost. Their handlers see `cancelled`.
        self._answers_closed = True
        with self._state:
            for request in self._requests.values():
                request._cancelled.set()
        if self.exit_process:
            self.exit(code)
        self._closed.set()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        stream = self._reader.stream if self._reader is not None else None
        if stream is not None and hasattr(stream, "shutdown"):
            try:
                stream.shutdown(2)  # SHUT_RDWR: the supervisor sees EOF; our reader thread wakes up
            except OSError:
                pass

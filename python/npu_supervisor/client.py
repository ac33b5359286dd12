"""Clients of npu-supervisord's sockets: requests.sock (inference), status.sock (health JSON), control.sock.

One :class:`Client` is one connection to requests.sock. It is thread-safe and multiplexed: any number of
threads may call :meth:`Client.infer` at once, and :meth:`Client.submit` pipelines (send many requests, then
collect the answers, matched by request id, in any order). A background thread reads the connection and routes
each frame to its request.

::

    from npu_supervisor import Client, RequestError

    with Client("/run/npu-supervisor/requests.sock") as client:
        text = client.infer({"prompt": "Hi", "max_new_tokens": 5})
        pending = [client.submit({"prompt": p}) for p in prompts]       # pipelined
        answers = [p.result(timeout=30) for p in pending]
        client.infer({"prompt": "Hi", "stream": True}, on_chunk=lambda b: print(b.decode(), end=""))
"""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from .protocol import (
    DEFAULT_MAX_FRAME_BYTES, FLAG_HAS_OPTIONS, FrameReader, FrameWriter, MessageType, ProtocolError,
    encode_request_options, json_bytes, parse_error_payload, to_bytes,
)

__all__ = [
    "Client", "PendingRequest", "NPUSupervisorError", "RequestError", "ConnectionClosed", "Unreachable",
    "status", "control", "wait_for_status", "wait_until_ready",
]

_U64_MAX = (1 << 64) - 1


class NPUSupervisorError(Exception):
    """Base of every error this library raises about the supervisor."""


class RequestError(NPUSupervisorError):
    """The supervisor (or the worker) answered with an ``error`` frame."""

    def __init__(self, code: str, message: str, retryable: bool = False):
        super().__init__("%s: %s%s" % (code, message, " (retryable)" if retryable else ""))
        self.code = code
        self.message = message
        self.retryable = retryable

    @classmethod
    def from_payload(cls, payload: bytes) -> "RequestError":
        error = parse_error_payload(payload)
        return cls(error["code"], error["message"], error["retryable"])


class ConnectionClosed(NPUSupervisorError, ConnectionError):
    """The connection ended before the answer came (supervisor stopped, connection-level error).
    ``error`` is the supervisor's connection-level :class:`RequestError` when it sent one."""

    def __init__(self, message: str, error: Optional[RequestError] = None):
        super().__init__(message)
        self.error = error


class Unreachable(NPUSupervisorError, ConnectionError):
    """Nothing listens on the socket (daemon not running, wrong path, no permission)."""


def _connect(path: str, timeout: Optional[float]) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as error:
        sock.close()
        hint = ""
        if isinstance(error, (FileNotFoundError, ConnectionRefusedError)):
            hint = " (is npu-supervisord running? the path is set by run_dir / *_socket in its config)"
        elif isinstance(error, PermissionError):
            hint = " (socket_mode / control_group in the config decide who may connect)"
        raise Unreachable("cannot connect to %s: %s%s" % (path, error.strerror or error, hint)) from None
    sock.settimeout(None)
    return sock


class PendingRequest:
    """A request sent on a :class:`Client`, whose answer may not have arrived yet.

    Consume it from one thread: :meth:`iter_chunks` (streamed parts as they come) and/or :meth:`result`.
    """

    def __init__(self, client: "Client", request_id: int):
        self.client = client
        self.id = request_id
        #: Chunks consumed by :meth:`result` (not those already taken through :meth:`iter_chunks`).
        self.chunks: List[bytes] = []
        self._items: "queue.Queue[Tuple[str, Any]]" = queue.Queue()
        self._outcome: Optional[Tuple[str, Any]] = None
        self._answered = threading.Event()

    @property
    def done(self) -> bool:
        """Whether the final answer (or the connection's end) has arrived."""
        return self._answered.is_set()

    def _deliver(self, kind: str, value: Any) -> None:
        if kind != "chunk":
            self._answered.set()
        self._items.put((kind, value))

    def _next(self, deadline: Optional[float]) -> Tuple[str, Any]:
        if self._outcome is not None:
            return self._outcome
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            item = self._items.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("no answer to request %d within the timeout" % self.id) from None
        if item[0] != "chunk":
            self._outcome = item
        return item

    def iter_chunks(self, timeout: Optional[float] = None) -> Iterator[bytes]:
        """Yields streamed chunks in order until the final answer (then call :meth:`result` for it).
        ``timeout`` bounds the whole iteration (raises ``TimeoutError``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            kind, value = self._next(deadline)
            if kind != "chunk":
                return
            yield value

    def result(self, timeout: Optional[float] = None,
               on_chunk: Optional[Callable[[bytes], None]] = None) -> bytes:
        """The response payload. Chunks still unread go to ``on_chunk`` (and to :attr:`chunks`).

        Raises :class:`RequestError` for an ``error`` answer, :class:`ConnectionClosed` when the connection
        ended first, ``TimeoutError`` when ``timeout`` seconds passed (the request stays in flight: cancel it
        with :meth:`cancel` if you give up on it).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            kind, value = self._next(deadline)
            if kind == "chunk":
                self.chunks.append(value)
                if on_chunk is not None:
                    on_chunk(value)
                continue
            if kind == "response":
                return value
            raise value

    def cancel(self) -> None:
        """Asks the supervisor to cancel; the final answer will be a ``cancelled`` :class:`RequestError`
        (unless the real answer was already on its way)."""
        self.client.cancel(self.id)

    def __repr__(self) -> str:
        return "PendingRequest(id=%d%s)" % (self.id, ", done" if self.done else "")


class Client:
    """A connection to requests.sock.

    :param path: the socket (``run_dir``/requests.sock).
    :param connect_timeout: bound on connecting, in seconds.
    :param max_frame_bytes: the supervisor's ``max_frame_bytes``; larger requests are refused here, with a
        clear error, instead of getting the connection closed by the supervisor.
    """

    def __init__(self, path: str, connect_timeout: Optional[float] = 5.0,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES):
        self.path = path
        self._sock = _connect(path, connect_timeout)
        self._reader = FrameReader(self._sock, max_frame_bytes)
        self._writer = FrameWriter(self._sock, max_frame_bytes)
        self._lock = threading.Lock()
        self._pending: Dict[int, PendingRequest] = {}
        self._pings: Dict[int, "queue.Queue[bool]"] = {}
        self._next_id = 1
        self._closed: Optional[NPUSupervisorError] = None
        self._closing = False
        self._thread = threading.Thread(target=self._read_loop, name="npu-client-reader", daemon=True)
        self._thread.start()

    # -- context manager

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- requests

    def _allocate_id(self) -> int:
        request_id = self._next_id
        self._next_id = 1 if self._next_id >= _U64_MAX else self._next_id + 1
        return request_id

    def submit(self, payload: Any, deadline_ms: Optional[int] = None,
               device: Optional[str] = None) -> PendingRequest:
        """Sends a request without waiting for its answer (pipelining). ``payload``: bytes, str, or anything
        JSON-able (sent as JSON). ``deadline_ms``: relative deadline (the supervisor's ``default_deadline``
        otherwise); ``device``: pin the request to that device's worker."""
        body = to_bytes(payload)
        flags = 0
        if deadline_ms is not None or device is not None:
            body = encode_request_options(deadline_ms, device) + body
            flags = FLAG_HAS_OPTIONS
        with self._lock:
            if self._closed is not None:
                raise self._closed
            request_id = self._allocate_id()
            pending = PendingRequest(self, request_id)
            self._pending[request_id] = pending
        try:
            self._writer.write(MessageType.REQUEST, request_id, body, flags)
        except ValueError:
            with self._lock:
                self._pending.pop(request_id, None)
            raise
        except OSError as error:
            with self._lock:
                self._pending.pop(request_id, None)
            raise ConnectionClosed("sending request %d to %s failed: %s" % (request_id, self.path, error)) from None
        return pending

    def infer(self, payload: Any, deadline_ms: Optional[int] = None, device: Optional[str] = None,
              on_chunk: Optional[Callable[[bytes], None]] = None, timeout: Optional[float] = None) -> bytes:
        """Sends one request and waits for its final answer; streamed chunks go to ``on_chunk`` in order.

        Returns the response bytes. Raises :class:`RequestError` (``code``, ``message``, ``retryable``) for an
        error answer, :class:`ConnectionClosed` when the connection ends first, ``TimeoutError`` after
        ``timeout`` seconds (the request is then cancelled).
        """
        pending = self.submit(payload, deadline_ms=deadline_ms, device=device)
        try:
            return pending.result(timeout=timeout, on_chunk=on_chunk)
        except TimeoutError:
            try:
                self.cancel(pending.id)
            except NPUSupervisorError:
                pass
            raise

    def infer_json(self, payload: Any, **kwargs: Any) -> Any:
        """:meth:`infer`, with the response parsed as JSON."""
        return json.loads(self.infer(payload, **kwargs).decode("utf-8"))

    def cancel(self, request_id: int) -> None:
        """Cancels a request sent on this connection (its answer becomes a ``cancelled`` error)."""
        try:
            self._writer.write(MessageType.CANCEL, request_id)
        except OSError as error:
            raise ConnectionClosed("sending cancel to %s failed: %s" % (self.path, error)) from None

    def ping(self, timeout: float = 5.0) -> float:
        """Round trip of a ``heartbeat`` frame through the supervisor's event loop, in seconds."""
        answer: "queue.Queue[bool]" = queue.Queue()
        with self._lock:
            if self._closed is not None:
                raise self._closed
            request_id = self._allocate_id()
            self._pings[request_id] = answer
        start = time.monotonic()
        try:
            self._writer.write(MessageType.HEARTBEAT, request_id)
            ok = answer.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("no heartbeat echo from %s within %.1fs" % (self.path, timeout)) from None
        except OSError as error:
            raise ConnectionClosed("ping to %s failed: %s" % (self.path, error)) from None
        finally:
            with self._lock:
                self._pings.pop(request_id, None)
        if not ok:
            raise self._closed or ConnectionClosed("connection closed")
        return time.monotonic() - start

    @property
    def in_flight(self) -> int:
        """Requests sent on this connection and not yet answered."""
        with self._lock:
            return len(self._pending)

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def close(self) -> None:
        """Closes the connection. The supervisor cancels whatever is still in flight on it; waiting callers
        get :class:`ConnectionClosed`."""
        self._closing = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    # -- reading

    def _read_loop(self) -> None:
        failure: NPUSupervisorError = ConnectionClosed("the supervisor closed the connection to %s" % self.path)
        try:
            for frame in self._reader:
                if frame.request_id == 0:
                    if frame.type == MessageType.ERROR:
                        error = RequestError.from_payload(frame.payload)
                        if error.code not in ("protocol_error", "too_many_connections"):
                            # Non-fatal notices on id 0 (a duplicate request id was ignored): the connection
                            # and every request in flight go on.
                            continue
                        # A connection-level error (protocol_error, too_many_connections): the supervisor
                        # closes the connection after it, so nothing in flight will be answered.
                        failure = ConnectionClosed("the supervisor ended the connection to %s: %s"
                                                   % (self.path, error), error)
                        with self._lock:
                            self._closed = failure
                            failed = list(self._pending.values())
                            self._pending.clear()
                        for pending in failed:
                            pending._deliver("error", error)
                    continue
                if frame.type == MessageType.HEARTBEAT:
                    with self._lock:
                        ping = self._pings.get(frame.request_id)
                    if ping is not None:
                        ping.put(True)
                    continue
                with self._lock:
                    pending = self._pending.get(frame.request_id)
                    if pending is not None and frame.type in (MessageType.RESPONSE, MessageType.ERROR):
                        del self._pending[frame.request_id]
                if pending is None:
                    continue  # an answer to a request we gave up on
                if frame.type == MessageType.CHUNK:
                    pending._deliver("chunk", frame.payload)
                elif frame.type == MessageType.RESPONSE:
                    pending._deliver("response", frame.payload)
                elif frame.type == MessageType.ERROR:
                    pending._deliver("error", RequestError.from_payload(frame.payload))
        except ProtocolError as error:
            failure = ConnectionClosed("the supervisor sent a malformed stream on %s: %s" % (self.path, error))
        except OSError as error:
            failure = ConnectionClosed("reading from %s failed: %s" % (self.path, error))
        if self._closing:
            failure = ConnectionClosed("the connection to %s was closed by this client" % self.path)
        with self._lock:
            self._closed = failure
            pending_all = list(self._pending.values())
            self._pending.clear()
            pings = list(self._pings.values())
        for pending in pending_all:
            pending._deliver("closed", failure)
        for ping in pings:
            ping.put(False)


# ---------------------------------------------------------------------------------------------------------------
# status.sock and control.sock


def status(path: str, timeout: float = 5.0) -> Dict[str, Any]:
    """The supervisor's status document (what status.sock writes): ``state`` (ok, degraded, unavailable),
    ``reason``, ``supervisor``, ``queue_depth`` and ``workers`` (``device``, ``state``, ``pid``, ``restarts``,
    ``last_exit``, ``inflight``, ...)."""
    sock = _connect(path, timeout)
    sock.settimeout(timeout)
    data = bytearray()
    try:
        while True:
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
    except socket.timeout:
        raise TimeoutError("status.sock at %s did not finish its document within %.1fs" % (path, timeout)) from None
    finally:
        sock.close()
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise NPUSupervisorError("%s did not answer with a JSON document (%d bytes): %s"
                                 % (path, len(data), error)) from None
    if not isinstance(document, dict):
        raise NPUSupervisorError("%s answered JSON that is not an object" % path)
    return document


def control(path: str, command: str, devices: Union[None, str, Sequence[str]] = None,
            lines: Optional[int] = None, timeout: float = 10.0) -> Any:
    """Runs one command on control.sock and returns its JSON answer.

    ``command``: ``status``, ``health``, ``pid``, ``start``, ``stop``, ``restart``, ``tail``, ``shutdown``.
    ``devices``: device ids (a string is one device; ``"all"`` means every device). ``lines``: for ``tail``.
    Raises :class:`RequestError` when the supervisor refuses (``permission_denied``, ``bad_request``, ...).
    """
    document: Dict[str, Any] = {"command": command}
    if devices is not None:
        document["devices"] = [devices] if isinstance(devices, str) else [str(d) for d in devices]
    if lines is not None:
        document["lines"] = lines
    sock = _connect(path, timeout)
    sock.settimeout(timeout)
    try:
        FrameWriter(sock).write(MessageType.REQUEST, 1, json_bytes(document))
        for frame in FrameReader(sock):
            if frame.request_id not in (0, 1):
                continue
            if frame.type == MessageType.ERROR:
                raise RequestError.from_payload(frame.payload)
            if frame.type in (MessageType.RESPONSE, MessageType.CHUNK):
                return json.loads(frame.payload.decode("utf-8")) if frame.payload else None
        raise ConnectionClosed("control.sock at %s closed without answering %r" % (path, command))
    except socket.timeout:
        raise TimeoutError("no answer to %r from %s within %.1fs" % (command, path, timeout)) from None
    finally:
        sock.close()


def wait_for_status(path: str, predicate: Callable[[Dict[str, Any]], bool], timeout: float = 30.0,
                    interval: float = 0.05, what: str = "the condition") -> Dict[str, Any]:
    """Polls status.sock until ``predicate(document)`` holds; returns that document. Raises ``TimeoutError``
    (with the last document or connection error) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            document = status(path, timeout=max(0.5, min(5.0, deadline - time.monotonic())))
            last = document
            if predicate(document):
                return document
        except (NPUSupervisorError, TimeoutError) as error:
            last = error
        if time.monotonic() >= deadline:
            raise TimeoutError("%s did not hold within %.1fs; last status: %s" % (what, timeout, last))
        time.sleep(interval)


def wait_until_ready(path: str, devices: Optional[Sequence[str]] = None, timeout: float = 30.0) -> Dict[str, Any]:
    """Waits until every worker (or those of ``devices``) is ``ready``; returns the status document."""
    wanted = None if devices is None else {str(d) for d in devices}

    def ready(document: Dict[str, Any]) -> bool:
        workers = [w for w in document.get("workers", []) if wanted is None or w.get("device") in wanted]
        return bool(workers) and all(w.get("state") == "ready" for w in workers)

    return wait_for_status(path, ready, timeout=timeout, what="all workers ready")

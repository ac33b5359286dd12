"""The npu-supervisor wire protocol: frames, message types, error codes, request options.

Every socket of the supervisor (requests.sock, control.sock) and the worker channel (fd 3) carries frames::

    u32  N            big-endian; counts everything after itself, so N >= 10
    u8   type         MessageType
    u8   flags        bit 0 (FLAG_HAS_OPTIONS): request options prefix (clients only)
    u64  request_id   big-endian; 0 = the connection itself
    ...  payload      N - 10 bytes

N is bounded (``max_frame_bytes``, default 16 MiB). The decoder checks N as soon as its four bytes are in, before
it waits for (or stores) a single byte of the body, so a hostile length costs nothing.

This module is pure: no sockets, no threads (except :class:`FrameReader`, which wraps a blocking socket).
Standard library only; Python 3.9+.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

__all__ = [
    "PROTOCOL_VERSION", "HEADER_LENGTH", "DEFAULT_MAX_FRAME_BYTES", "FLAG_HAS_OPTIONS",
    "MessageType", "ErrorCode", "Frame", "FrameDecoder", "FrameReader", "FrameWriter", "open_stream",
    "ProtocolError", "FrameTooLarge", "FrameTooShort", "TruncatedFrame",
    "encode_frame", "decode_frames", "encode_request_options", "split_request_options",
    "error_payload", "parse_error_payload", "to_bytes", "json_bytes",
]

#: The protocol version exchanged in ``hello`` (both directions).
PROTOCOL_VERSION = 1
#: Bytes after the length field that every frame carries: type, flags, request id.
HEADER_LENGTH = 10
#: Default upper bound on N (``max_frame_bytes`` in the supervisor's config).
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024
#: Flag bit 0 on a client ``request``: the payload starts with u16 length + JSON options.
FLAG_HAS_OPTIONS = 0x01

_LENGTH = struct.Struct(">I")
_HEADER = struct.Struct(">IBBQ")  # length, type, flags, request id
_U16 = struct.Struct(">H")
_U64_MAX = (1 << 64) - 1


class MessageType:
    """The type byte of a frame (plain ints: a type this version does not know still decodes)."""

    HELLO = 0x01      # both directions on the worker channel; JSON
    READY = 0x02      # worker -> supervisor: model loaded; optional JSON
    REQUEST = 0x03    # client -> supervisor -> worker; opaque payload (JSON command on control.sock)
    RESPONSE = 0x04   # the final, successful answer; opaque payload
    CHUNK = 0x05      # a streamed part of an answer; any number before the final answer
    ERROR = 0x06      # the final, failed answer (id != 0) or a connection-level error (id 0); JSON
    CANCEL = 0x07     # stop working on a request
    HEARTBEAT = 0x08  # worker -> supervisor: still alive (a client may send one: it is echoed)
    HEALTH = 0x09     # worker -> supervisor: the worker's own view of its health; JSON
    DRAIN = 0x0A      # supervisor -> worker: finish what you hold, accept nothing new
    SHUTDOWN = 0x0B   # supervisor -> worker: finish and exit 0

    _NAMES = {
        0x01: "hello", 0x02: "ready", 0x03: "request", 0x04: "response", 0x05: "chunk", 0x06: "error",
        0x07: "cancel", 0x08: "heartbeat", 0x09: "health", 0x0A: "drain", 0x0B: "shutdown",
    }

    @classmethod
    def name(cls, value: int) -> str:
        """``"chunk"`` for 0x05; ``"type(0xee)"`` for a type this version does not know."""
        return cls._NAMES.get(value, "type(0x%02x)" % value)


class ErrorCode:
    """The ``code`` of an error payload (docs/PROTOCOL.md, "Error codes")."""

    OVERLOADED = "overloaded"                      # every worker and the queue are full (retryable)
    DEADLINE_EXCEEDED = "deadline_exceeded"        # no answer before the request's deadline
    WORKER_LOST = "worker_lost"                    # the worker died after streaming, or retries ran out
    NO_WORKERS = "no_workers"                      # nothing can serve and nothing is starting (retryable)
    BAD_REQUEST = "bad_request"                    # bad options, unknown device, unknown command
    CANCELLED = "cancelled"                        # cancelled by the client (a cancel frame)
    PROTOCOL_ERROR = "protocol_error"              # a frame violated the protocol
    UNSUPPORTED = "unsupported"                    # message type not accepted on this socket
    SHUTTING_DOWN = "shutting_down"                # the supervisor accepts nothing new (retryable)
    PERMISSION_DENIED = "permission_denied"        # control command needs more privileges
    DEVICE_OOM = "device_oom"                      # the worker ran out of device (NPU/GPU) memory
    WORKER_ERROR = "worker_error"                  # the worker failed the request for a reason of its own
    TOO_MANY_CONNECTIONS = "too_many_connections"  # connection limit reached (retryable)
    COMMAND_FAILED = "command_failed"              # a control command failed


class ProtocolError(Exception):
    """A byte stream that cannot be decoded into frames. Fatal for the stream: after it nobody knows where
    the next frame starts, so the connection must be closed."""


class FrameTooLarge(ProtocolError):
    """The length field announced more than the maximum; nothing was allocated or read for the body."""

    def __init__(self, length: int, maximum: int):
        super().__init__("frame length %d exceeds the maximum of %d bytes" % (length, maximum))
        self.length = length
        self.maximum = maximum


class FrameTooShort(ProtocolError):
    """The length field is smaller than the fixed 10-byte header."""

    def __init__(self, length: int):
        super().__init__("frame length %d is shorter than the %d-byte header" % (length, HEADER_LENGTH))
        self.length = length


class TruncatedFrame(ProtocolError):
    """The stream ended in the middle of a frame."""

    def __init__(self, buffered: int):
        super().__init__("stream ended inside a frame (%d bytes buffered)" % buffered)
        self.buffered = buffered


class Frame:
    """One frame. ``payload`` is ``bytes``; ``type`` and ``flags`` are ints; ``request_id`` is a u64."""

    __slots__ = ("type", "flags", "request_id", "payload")

    def __init__(self, type: int, request_id: int = 0, payload: bytes = b"", flags: int = 0):
        self.type = type
        self.flags = flags
        self.request_id = request_id
        self.payload = payload

    def encode(self) -> bytes:
        return encode_frame(self.type, self.request_id, self.payload, self.flags)

    def json(self) -> Any:
        """The payload parsed as JSON (raises ``ValueError`` when it is not)."""
        return json.loads(self.payload.decode("utf-8"))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frame):
            return NotImplemented
        return (self.type, self.flags, self.request_id, self.payload) == (
            other.type, other.flags, other.request_id, other.payload)

    def __repr__(self) -> str:
        payload = self.payload if len(self.payload) <= 64 else self.payload[:64] + b"..."
        return "Frame(%s, id=%d, flags=0x%02x, payload=%r)" % (
            MessageType.name(self.type), self.request_id, self.flags, payload)


def to_bytes(value: Any) -> bytes:
    """Payload conversion used by the worker and the client: bytes-like as is, ``str`` as UTF-8, ``None`` as
    empty, anything else (dict, list, number) as compact JSON."""
    if value is None:
        return b""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    return json_bytes(value)


def json_bytes(value: Any) -> bytes:
    """Compact, key-sorted JSON as UTF-8 (what the Swift side writes)."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode("utf-8")


def encode_frame(type: int, request_id: int = 0, payload: Any = b"", flags: int = 0) -> bytes:
    """The bytes of one frame (length, header and payload in one buffer: one frame is one write)."""
    body = to_bytes(payload)
    if not 0 <= type <= 0xFF:
        raise ValueError("message type %r is not a u8" % (type,))
    if not 0 <= flags <= 0xFF:
        raise ValueError("flags %r is not a u8" % (flags,))
    if not 0 <= request_id <= _U64_MAX:
        raise ValueError("request id %r is not a u64" % (request_id,))
    length = HEADER_LENGTH + len(body)
    if length > 0xFFFFFFFF:
        raise ValueError("payload of %d bytes does not fit a frame" % len(body))
    return _HEADER.pack(length, type, flags, request_id) + body


class FrameDecoder:
    """Splits a byte stream into frames, whatever the split points of the stream are.

    ``feed(data)`` buffers bytes; ``next_frame()`` returns the next complete frame or ``None``. The length is
    checked (too short, too large) as soon as its four bytes are buffered, so an oversized frame raises
    :class:`FrameTooLarge` before any of its body is waited for. Errors are sticky: the stream is dead.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES):
        if max_frame_bytes < HEADER_LENGTH:
            raise ValueError("max_frame_bytes must be at least %d" % HEADER_LENGTH)
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        self._offset = 0
        self._error: Optional[ProtocolError] = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buffer) - self._offset

    def feed(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        if self._offset and self._offset >= len(self._buffer) // 2:
            del self._buffer[:self._offset]
            self._offset = 0
        self._buffer += data
        self._check_length()

    def _check_length(self) -> Optional[int]:
        if len(self._buffer) - self._offset < 4:
            return None
        (length,) = _LENGTH.unpack_from(self._buffer, self._offset)
        if length < HEADER_LENGTH:
            self._error = FrameTooShort(length)
            raise self._error
        if length > self.max_frame_bytes:
            self._error = FrameTooLarge(length, self.max_frame_bytes)
            raise self._error
        return length

    def next_frame(self) -> Optional[Frame]:
        if self._error is not None:
            raise self._error
        length = self._check_length()
        if length is None or len(self._buffer) - self._offset < 4 + length:
            return None
        _, type_, flags, request_id = _HEADER.unpack_from(self._buffer, self._offset)
        start = self._offset + 4 + HEADER_LENGTH
        end = self._offset + 4 + length
        payload = bytes(self._buffer[start:end])
        self._offset = end
        if self._offset == len(self._buffer):
            self._buffer.clear()
            self._offset = 0
        return Frame(type_, request_id, payload, flags)

    def frames(self) -> Iterator[Frame]:
        """Every complete frame buffered now."""
        while True:
            frame = self.next_frame()
            if frame is None:
                return
            yield frame

    def finish(self) -> None:
        """The stream ended: raises :class:`TruncatedFrame` if a partial frame is buffered."""
        if self._error is not None:
            raise self._error
        if self.buffered:
            self._error = TruncatedFrame(self.buffered)
            raise self._error


def decode_frames(data: bytes, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> List[Frame]:
    """Every frame of a complete byte string (raises :class:`TruncatedFrame` for a partial last frame)."""
    decoder = FrameDecoder(max_frame_bytes)
    decoder.feed(data)
    frames = list(decoder.frames())
    decoder.finish()
    return frames


class _FdStream:
    """recv/sendall over a plain file descriptor (a pipe), for when the channel is not a socket."""

    def __init__(self, fd: int):
        self._fd = fd

    def recv(self, size: int) -> bytes:
        return os.read(self._fd, size)

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def fileno(self) -> int:
        return self._fd


class FrameReader:
    """Reads frames from a blocking socket (or anything with ``recv``) through a :class:`FrameDecoder`."""

    def __init__(self, stream: Any, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, chunk_size: int = 65536):
        self.stream = stream
        self.decoder = FrameDecoder(max_frame_bytes)
        self.chunk_size = chunk_size

    @property
    def max_frame_bytes(self) -> int:
        return self.decoder.max_frame_bytes

    @max_frame_bytes.setter
    def max_frame_bytes(self, value: int) -> None:
        self.decoder.max_frame_bytes = value

    def read_frame(self) -> Optional[Frame]:
        """The next frame; ``None`` at a clean end of stream.

        Raises :class:`ProtocolError` for a malformed stream (including EOF inside a frame) and ``OSError`` for
        a failed read (``socket.timeout`` when the socket has a timeout).
        """
        while True:
            frame = self.decoder.next_frame()
            if frame is not None:
                return frame
            try:
                data = self.stream.recv(self.chunk_size)
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue
            if not data:
                self.decoder.finish()
                return None
            self.decoder.feed(data)

    def __iter__(self) -> Iterator[Frame]:
        while True:
            frame = self.read_frame()
            if frame is None:
                return
            yield frame


class FrameWriter:
    """Writes whole frames to a socket; a lock keeps frames of several threads from interleaving."""

    def __init__(self, stream: Any, max_frame_bytes: Optional[int] = None):
        self.stream = stream
        self.max_frame_bytes = max_frame_bytes
        self._lock = threading.Lock()

    def write(self, type: int, request_id: int = 0, payload: Any = b"", flags: int = 0) -> None:
        data = encode_frame(type, request_id, payload, flags)
        if self.max_frame_bytes is not None and len(data) - 4 > self.max_frame_bytes:
            raise ValueError("a %s frame of %d bytes exceeds max_frame_bytes (%d): the peer would reject it"
                             % (MessageType.name(type), len(data) - 4, self.max_frame_bytes))
        self.write_raw(data)

    def write_frame(self, frame: Frame) -> None:
        self.write(frame.type, frame.request_id, frame.payload, frame.flags)

    def write_raw(self, data: bytes) -> None:
        with self._lock:
            self.stream.sendall(data)


def open_stream(fd: int) -> Any:
    """A socket object for ``fd`` (or a plain-fd stream when it is not a socket). Takes ownership of ``fd``."""
    try:
        return socket.socket(fileno=fd)
    except OSError:
        return _FdStream(fd)


# ---------------------------------------------------------------------------------------------------------------
# Payload helpers


def encode_request_options(deadline_ms: Optional[int] = None, device: Optional[str] = None) -> bytes:
    """The options prefix of a client request with :data:`FLAG_HAS_OPTIONS`: u16 length + JSON."""
    options: Dict[str, Any] = {}
    if deadline_ms is not None:
        if isinstance(deadline_ms, bool) or not isinstance(deadline_ms, int) or deadline_ms < 1:
            raise ValueError("deadline_ms must be a positive integer number of milliseconds, not %r"
                             % (deadline_ms,))
        options["deadline_ms"] = deadline_ms
    if device is not None:
        options["device"] = str(device)
    body = json_bytes(options)
    if len(body) > 0xFFFF:
        raise ValueError("request options are longer than 65535 bytes")
    return _U16.pack(len(body)) + body


def split_request_options(payload: bytes) -> Tuple[Dict[str, Any], bytes]:
    """Splits a request payload that carries options into (options dict, opaque rest).

    Raises :class:`ValueError` when the prefix is truncated or is not a JSON object.
    """
    if len(payload) < 2:
        raise ValueError("request options prefix is truncated")
    (length,) = _U16.unpack_from(payload, 0)
    if len(payload) < 2 + length:
        raise ValueError("request options prefix is truncated")
    try:
        options = json.loads(payload[2:2 + length].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:  # deep nesting: RecursionError
        raise ValueError("request options are not valid JSON: %s" % error) from None
    if not isinstance(options, dict):
        raise ValueError("request options are not a JSON object")
    return options, bytes(payload[2 + length:])


def error_payload(code: str, message: str, retryable: bool = False) -> bytes:
    """The JSON body of an ``error`` frame."""
    return json_bytes({"code": code, "message": message, "retryable": bool(retryable)})


def parse_error_payload(payload: bytes) -> Dict[str, Any]:
    """``{"code", "message", "retryable"}`` from an ``error`` frame. A payload that is not such JSON becomes a
    ``worker_error`` carrying the raw text (as the supervisor does), so a garbled error is still an error."""
    try:
        value = json.loads(payload.decode("utf-8"))
        if isinstance(value, dict) and isinstance(value.get("code"), str):
            return {"code": value["code"], "message": str(value.get("message", "")),
                    "retryable": bool(value.get("retryable", False))}
    except (UnicodeDecodeError, ValueError, RecursionError):  # deep nesting ("[[[..."): RecursionError
        pass
    return {"code": ErrorCode.WORKER_ERROR, "message": payload.decode("utf-8", "replace"), "retryable": False}


Payload = Union[bytes, bytearray, memoryview, str, dict, list, None]

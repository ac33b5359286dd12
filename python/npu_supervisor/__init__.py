"""Python worker and client library for npu-supervisor (standard library only, Python 3.9+).

* :class:`Worker` - what a Python inference engine (torch_npu, vLLM-Ascend, MindIE) links to, to be supervised
  by npu-supervisord: handshake, heartbeats, requests on a thread pool, streaming, cancellation, device OOM.
* :class:`Client` - requests.sock: ``infer()``, pipelining with ``submit()``, ``cancel()``;
  :func:`status` (status.sock) and :func:`control` (control.sock).
* :mod:`npu_supervisor.protocol` - the frames themselves.
"""

from .client import (
    Client, ConnectionClosed, NPUSupervisorError, PendingRequest, RequestError, Unreachable, control, status,
    wait_for_status, wait_until_ready,
)
from .protocol import (
    DEFAULT_MAX_FRAME_BYTES, PROTOCOL_VERSION, ErrorCode, Frame, FrameDecoder, FrameTooLarge, FrameTooShort,
    MessageType, ProtocolError, TruncatedFrame, decode_frames, encode_frame,
)
from .worker import RankError, RankInfo, Request, RequestFailed, Worker, WorkerError

__version__ = "0.1.0"

__all__ = [
    "Client", "PendingRequest", "RequestError", "ConnectionClosed", "Unreachable", "NPUSupervisorError",
    "status", "control", "wait_for_status", "wait_until_ready",
    "Worker", "Request", "RequestFailed", "WorkerError", "RankInfo", "RankError",
    "Frame", "FrameDecoder", "MessageType", "ErrorCode", "ProtocolError", "FrameTooLarge", "FrameTooShort",
    "TruncatedFrame", "encode_frame", "decode_frames", "PROTOCOL_VERSION", "DEFAULT_MAX_FRAME_BYTES",
    "__version__",
]

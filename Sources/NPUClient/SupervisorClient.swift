import Glibc
import NIOConcurrencyHelpers
import NIOCore
import WireProtocol

/// A blocking client for npu-supervisord's request and control sockets. One instance is one connection;
/// requests may be pipelined (send several, then read answers, matched by request id in any order).
/// Safe to share between threads: writes never interleave, readers take turns (a frame goes to whichever reader
/// gets it, so several threads that wait for their own answers should use one client each).
public final class SupervisorClient: Sendable {
    public let path: String
    public let io: BlockingFrameIO
    private let nextID = NIOLockedValueBox<UInt64>(1)

    /// Connects to a Unix socket.
    /// - Parameter timeout: bound on each read (nil: wait forever).
    /// - Throws: ``ClientError/unreachable(_:)`` when nothing listens there.
    public init(socketPath: String, timeout: Duration? = nil) throws {
        self.path = socketPath
        let fd = try connectUnixSocket(path: socketPath)
        if let timeout {
            let ns = timeout.components.seconds * 1_000_000_000 + timeout.components.attoseconds / 1_000_000_000
            var tv = timeval(tv_sec: Int(ns / 1_000_000_000), tv_usec: Int(ns % 1_000_000_000 / 1000))
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        }
        self.io = BlockingFrameIO(fd: fd)
    }

    deinit { Glibc.close(io.fd) }

    /// A fresh request id for this connection.
    public func makeRequestID() -> UInt64 {
        nextID.withLockedValue { id in
            defer { id += 1 }
            return id
        }
    }

    /// Sends an inference request without waiting for its answer.
    public func sendRequest(id: UInt64, payload: ByteBuffer, options: RequestOptions? = nil) throws {
        if let options {
            try io.write(Frame(type: .request, flags: .hasOptions, requestID: id, payload: try options.prefixing(payload)))
        } else {
            try io.write(Frame(type: .request, requestID: id, payload: payload))
        }
    }

    /// Asks the supervisor to cancel a request; its final answer will be a `cancelled` error.
    public func cancel(id: UInt64) throws {
        try io.write(Frame(type: .cancel, requestID: id))
    }

    /// The next frame from the supervisor, or nil when it closed the connection.
    /// - Throws: ``ClientError/timedOut`` when a read timeout was set and passed.
    public func readFrame() throws -> Frame? {
        do {
            return try io.readFrame()
        } catch let error as FrameIOError where error.errno == EAGAIN || error.errno == EWOULDBLOCK {
            throw ClientError.timedOut
        }
    }

    /// Sends one request and waits for its final answer, passing streamed chunks to `onChunk`.
    public func infer(_ payload: ByteBuffer, options: RequestOptions? = nil,
                      onChunk: (ByteBuffer) -> Void = { _ in }) throws -> InferenceOutcome {
        let id = makeRequestID()
        try sendRequest(id: id, payload: payload, options: options)
        while let frame = try readFrame() {
            // Id 0 carries connection-level errors; only those that end the connection end this request.
            if frame.requestID == 0 {
                let code = frame.type == .error ? frame.errorPayload.code : ""
                guard code == ErrorCode.protocolError || code == ErrorCode.tooManyConnections else { continue }
                return .error(frame.errorPayload)
            }
            guard frame.requestID == id else { continue }
            switch frame.type {
            case .chunk: onChunk(frame.payload)
            case .response: return .response(frame.payload)
            case .error: return .error(frame.errorPayload)
            default: continue
            }
        }
        throw ClientError.closed
    }

    /// Sends a control command and returns the first answer frame (`response`, `error`, or a `chunk` of
    /// `tail -f`).
    public func control(_ command: ControlCommand) throws -> Frame {
        let id = makeRequestID()
        try io.write(Frame(type: .request, requestID: id, payload: try JSONCoding.encode(command)))
        while let frame = try readFrame() {
            if frame.requestID == id || frame.requestID == 0 { return frame }
        }
        throw ClientError.closed
    }
}

/// The final answer to an inference request.
public enum InferenceOutcome: Sendable, Equatable {
    case response(ByteBuffer)
    case error(ErrorPayload)
}

public enum ClientError: Error, Sendable, Equatable, CustomStringConvertible {
    /// Nothing listens on the socket (daemon not running, or wrong path).
    case unreachable(String)
    /// The supervisor closed the connection before answering.
    case closed
    /// No answer within the read timeout.
    case timedOut

    public var description: String {
        switch self {
        case .unreachable(let why): why
        case .closed: "the supervisor closed the connection before answering"
        case .timedOut: "no answer from the supervisor within the timeout"
        }
    }
}

/// Connects a blocking, close-on-exec Unix stream socket to `path`.
/// - Throws: ``ClientError/unreachable(_:)`` with the path and the reason.
public func connectUnixSocket(path: String) throws -> CInt {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { throw ClientError.unreachable("socket(): \(String(cString: strerror(errno)))") }
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array(path.utf8)
    guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
        Glibc.close(fd)
        throw ClientError.unreachable("socket path too long: \(path)")
    }
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
        raw.copyBytes(from: bytes)
        raw[bytes.count] = 0
    }
    let rc = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
            Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
        }
    }
    guard rc == 0 else {
        let e = errno
        Glibc.close(fd)
        throw ClientError.unreachable("cannot connect to \(path): \(String(cString: strerror(e)))"
            + (e == ENOENT || e == ECONNREFUSED ? " (is npu-supervisord running?)" : ""))
    }
    return fd
}

/// Reads the status document from `status.sock` (the daemon writes one JSON document per connection, then
/// closes).
/// - Throws: ``ClientError/unreachable(_:)``, or a decoding error when the answer is not a status document.
public func readStatusDocument(path: String) throws -> StatusDocument {
    let fd = try connectUnixSocket(path: path)
    defer { Glibc.close(fd) }
    var data = [UInt8]()
    var buffer = [UInt8](repeating: 0, count: 1 << 16)
    while true {
        let n = read(fd, &buffer, buffer.count)
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { break }
        data += buffer[0..<n]
    }
    return try JSONCoding.decode(StatusDocument.self, from: ByteBuffer(bytes: data))
}

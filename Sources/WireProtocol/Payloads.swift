import NIOCore

/// The protocol version this build speaks; exchanged in `hello`.
public let wireProtocolVersion = 1

/// Error codes carried in ``ErrorPayload/code``. Documented in docs/PROTOCOL.md, section "Error codes".
public enum ErrorCode {
    /// Every worker and the queue are full.
    public static let overloaded = "overloaded"
    /// The request's deadline passed before an answer.
    public static let deadlineExceeded = "deadline_exceeded"
    /// The worker holding the request died after it had streamed part of the answer, or retries ran out.
    public static let workerLost = "worker_lost"
    /// No worker can serve (all failed or stopped) and none is starting.
    public static let noWorkers = "no_workers"
    /// The request could not be understood (bad options, unknown device, unknown command).
    public static let badRequest = "bad_request"
    /// The request was cancelled by the client (a `cancel` frame).
    public static let cancelled = "cancelled"
    /// A frame violated the protocol (too large, too short, wrong type in this direction).
    public static let protocolError = "protocol_error"
    /// The message type is not supported on this socket.
    public static let unsupported = "unsupported"
    /// The supervisor is shutting down and accepts nothing new.
    public static let shuttingDown = "shutting_down"
    /// The control command needs privileges the caller lacks.
    public static let permissionDenied = "permission_denied"
    /// The worker ran out of device (NPU/GPU) memory.
    public static let deviceOOM = "device_oom"
    /// The worker failed the request for a reason of its own.
    public static let workerError = "worker_error"
    /// Too many client connections.
    public static let tooManyConnections = "too_many_connections"
    /// The control command was understood but could not be carried out (e.g. during shutdown).
    public static let commandFailed = "command_failed"
}

/// The JSON body of an `error` frame.
public struct ErrorPayload: Codable, Sendable, Equatable {
    public var code: String
    public var message: String
    public var retryable: Bool

    public init(code: String, message: String, retryable: Bool = false) {
        self.code = code
        self.message = message
        self.retryable = retryable
    }

    /// Lenient on input: a worker's error with only `code` (and perhaps `message`) is still understood.
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        code = try c.decode(String.self, forKey: .code)
        message = try c.decodeIfPresent(String.self, forKey: .message) ?? ""
        retryable = try c.decodeIfPresent(Bool.self, forKey: .retryable) ?? false
    }

    enum CodingKeys: String, CodingKey { case code, message, retryable }
}

/// Options a client may put in front of a request payload (flag ``FrameFlags/hasOptions``).
public struct RequestOptions: Codable, Sendable, Equatable {
    /// Relative deadline in milliseconds from the moment the supervisor reads the request.
    public var deadlineMS: Int?
    /// Pin the request to one device's worker.
    public var device: String?

    public init(deadlineMS: Int? = nil, device: String? = nil) {
        self.deadlineMS = deadlineMS
        self.device = device
    }

    enum CodingKeys: String, CodingKey {
        case deadlineMS = "deadline_ms"
        case device
    }
}

/// Supervisor → worker `hello`.
public struct HelloFromSupervisor: Codable, Sendable, Equatable {
    public var protocolVersion: Int
    public var device: String
    public var heartbeatIntervalMS: Int
    public var maxFrameBytes: Int

    public init(protocolVersion: Int = wireProtocolVersion, device: String, heartbeatIntervalMS: Int,
                maxFrameBytes: Int) {
        self.protocolVersion = protocolVersion
        self.device = device
        self.heartbeatIntervalMS = heartbeatIntervalMS
        self.maxFrameBytes = maxFrameBytes
    }

    enum CodingKeys: String, CodingKey {
        case protocolVersion = "protocol"
        case device
        case heartbeatIntervalMS = "heartbeat_interval_ms"
        case maxFrameBytes = "max_frame_bytes"
    }
}

/// Worker → supervisor `hello`.
public struct HelloFromWorker: Codable, Sendable, Equatable {
    public var protocolVersion: Int
    public var pid: Int32
    public var device: String?
    public var workerVersion: String?
    public var model: String?

    public init(protocolVersion: Int = wireProtocolVersion, pid: Int32, device: String?, workerVersion: String?,
                model: String?) {
        self.protocolVersion = protocolVersion
        self.pid = pid
        self.device = device
        self.workerVersion = workerVersion
        self.model = model
    }

    enum CodingKeys: String, CodingKey {
        case protocolVersion = "protocol"
        case pid
        case device
        case workerVersion = "worker_version"
        case model
    }
}

extension RequestOptions {
    /// Splits a client `request` payload that carries options into the options and the opaque rest.
    /// - Throws: ``RequestOptionsError`` when the prefix is truncated or is not valid JSON options.
    public static func split(_ payload: ByteBuffer,
                             decode: (ByteBuffer) throws -> RequestOptions) throws -> (RequestOptions, ByteBuffer) {
        var payload = payload
        guard let length = payload.readInteger(as: UInt16.self),
              let json = payload.readSlice(length: Int(length))
        else { throw RequestOptionsError(message: "request options prefix is truncated") }
        do {
            return (try decode(json), payload)
        } catch {
            throw RequestOptionsError(message: "request options are not valid JSON options: \(JSONCoding.describe(error))")
        }
    }

    /// Prefixes `payload` with these options (u16 length + JSON) for a request with ``FrameFlags/hasOptions``.
    public static func prefixed(_ json: ByteBuffer, payload: ByteBuffer) -> ByteBuffer {
        var out = ByteBuffer()
        out.reserveCapacity(2 + json.readableBytes + payload.readableBytes)
        out.writeInteger(UInt16(json.readableBytes))
        var json = json
        var payload = payload
        out.writeBuffer(&json)
        out.writeBuffer(&payload)
        return out
    }
}

/// A malformed options prefix on a request.
public struct RequestOptionsError: Error, Sendable, CustomStringConvertible {
    public var message: String
    public var description: String { message }
}

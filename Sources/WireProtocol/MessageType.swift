/// The type byte of a frame. A struct rather than an enum so that a frame with a type this build does not know
/// still decodes: on the client sockets it is answered with an `unsupported` error and the connection stays
/// up; on a worker channel (whose protocol version was agreed in `hello`) it is a protocol violation.
public struct MessageType: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }

    /// Both directions on the worker channel; JSON payload (see ``HelloFromSupervisor``, ``HelloFromWorker``).
    public static let hello = MessageType(rawValue: 0x01)
    /// Worker → supervisor: the model is loaded, send requests. Optional JSON payload.
    public static let ready = MessageType(rawValue: 0x02)
    /// Client → supervisor → worker: an inference (or control) request. Opaque payload.
    public static let request = MessageType(rawValue: 0x03)
    /// The final, successful answer to a request. Opaque payload.
    public static let response = MessageType(rawValue: 0x04)
    /// A streamed part of an answer; any number may precede the final `response`.
    public static let chunk = MessageType(rawValue: 0x05)
    /// The final, failed answer to a request (request id ≠ 0), or a connection-level error (request id 0).
    /// JSON ``ErrorPayload``.
    public static let error = MessageType(rawValue: 0x06)
    /// Stop working on a request; no answer is expected for it any more.
    public static let cancel = MessageType(rawValue: 0x07)
    /// Worker → supervisor: still alive. Empty payload.
    public static let heartbeat = MessageType(rawValue: 0x08)
    /// Worker → supervisor: the worker's own view of its health (JSON).
    public static let health = MessageType(rawValue: 0x09)
    /// Supervisor → worker: finish what you hold, accept nothing new.
    public static let drain = MessageType(rawValue: 0x0A)
    /// Supervisor → worker: finish and exit 0.
    public static let shutdown = MessageType(rawValue: 0x0B)

    public var description: String {
        switch self {
        case .hello: "hello"
        case .ready: "ready"
        case .request: "request"
        case .response: "response"
        case .chunk: "chunk"
        case .error: "error"
        case .cancel: "cancel"
        case .heartbeat: "heartbeat"
        case .health: "health"
        case .drain: "drain"
        case .shutdown: "shutdown"
        default: "type(0x\(String(rawValue, radix: 16)))"
        }
    }
}

/// The order of a worker's conversation on its channel (docs/PROTOCOL.md, "Worker channel"): the worker says
/// `hello` (agreeing the protocol version) before `ready`, and sends only the frames a worker may send. The
/// runtime decodes each frame into a ``Message``; the session judges it. Pure: no I/O, no clock.
///
/// ```
///   awaitingHello ─hello(version ok)─► greeted ─ready─► ready
///        │ ready, bad version, unreadable hello, forbidden frame: violation (the worker is killed)
/// ```
public struct WorkerSession: Sendable, Hashable {
    public enum State: Sendable, Hashable { case awaitingHello, greeted, ready }

    /// A frame from the worker, as far as the session cares.
    public enum Message: Sendable, Hashable {
        case hello(protocolVersion: Int)
        /// A hello whose JSON payload could not be read (the decoder's message).
        case unreadableHello(String)
        case ready
        case heartbeat
        case health
        case response
        case chunk
        case error
        /// A frame type a worker may not send (its name, for the message).
        case forbidden(String)
    }

    public enum Verdict: Sendable, Hashable {
        /// Nothing to do beyond what the frame itself means.
        case accepted
        /// The hello was accepted: the protocol version is agreed.
        case greeted
        /// The first `ready` after the hello: the model is loaded.
        case becameReady
        /// The worker broke the protocol: kill it with reason `protocol_error` and this explanation.
        case violation(String)
    }

    /// The protocol version the supervisor speaks.
    public let protocolVersion: Int
    public private(set) var state: State = .awaitingHello

    public init(protocolVersion: Int) { self.protocolVersion = protocolVersion }

    public mutating func received(_ message: Message) -> Verdict {
        switch message {
        case .hello(let version):
            guard version == protocolVersion else {
                return .violation("speaks protocol \(version), supervisor speaks \(protocolVersion)")
            }
            if state == .awaitingHello { state = .greeted }
            return .greeted
        case .unreadableHello(let why):
            return .violation("hello payload is not valid JSON: \(why)")
        case .ready:
            switch state {
            case .awaitingHello: return .violation("sent ready before hello (the protocol version was never agreed)")
            case .greeted:
                state = .ready
                return .becameReady
            case .ready: return .accepted
            }
        case .heartbeat, .health, .response, .chunk, .error:
            return .accepted
        case .forbidden(let name):
            return .violation("sent a \(name) frame, which workers may not send")
        }
    }
}

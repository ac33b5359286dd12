import Glibc
import NIOConcurrencyHelpers
import NIOCore
import WireProtocol

/// What a Swift worker links to: the supervisor's end of the protocol on fd 3, with hello, ready, heartbeats
/// (on their own thread, so a long request does not look like a hang), request dispatch and cancellation.
/// The worker exits when fd 3 reaches end-of-file: a supervisor that died must not leave it holding the device.
public final class WorkerConnection: Sendable {
    public let io: BlockingFrameIO
    public let device: String
    /// What the reading thread, the heartbeat thread and the request threads share.
    private let state = NIOLockedValueBox(State())

    private struct State {
        var supervisorHello: HelloFromSupervisor?
        var cancelled: Set<UInt64> = []
        var inflight = 0
        var heartbeatsStopped = false
        var draining = false
    }

    /// The supervisor's hello (heartbeat interval, frame limit), once received.
    public var supervisorHello: HelloFromSupervisor? { state.withLockedValue { $0.supervisorHello } }

    /// Connects to the channel named by `NPU_SUPERVISOR_FD` (normally 3).
    /// - Throws: ``WorkerError`` when the variable is missing (not started by npu-supervisord).
    public static func fromEnvironment() throws -> WorkerConnection {
        guard let value = getenv("NPU_SUPERVISOR_FD"), let fd = CInt(String(cString: value)) else {
            throw WorkerError("NPU_SUPERVISOR_FD is not set: this program is meant to be started by npu-supervisord")
        }
        let device = getenv("NPU_DEVICE_ID").map { String(cString: $0) } ?? "?"
        return WorkerConnection(fd: fd, device: device)
    }

    public init(fd: CInt, device: String) {
        self.io = BlockingFrameIO(fd: fd)
        self.device = device
    }

    /// Sends hello (protocol version, pid, device, versions).
    public func hello(workerVersion: String, model: String?) throws {
        let hello = HelloFromWorker(pid: getpid(), device: device, workerVersion: workerVersion, model: model)
        try io.write(Frame(type: .hello, payload: try JSONCoding.encode(hello)))
        // Written from the thread that read the supervisor's hello, so batched until that thread reads again,
        // which may be only after a long model load or a tensor-parallel rendezvous: send it now.
        try io.flush()
    }

    /// Says the model is loaded: the supervisor starts sending requests.
    public func ready() throws {
        try io.write(Frame(type: .ready))
        try io.flush()
    }

    /// Reports a worker-level error (request id 0), e.g. `device_oom` just before exiting.
    public func reportError(code: String, message: String) {
        try? io.write(.error(requestID: 0, code: code, message: message))
    }

    /// Stops sending heartbeats (fault injection: what a wedged process looks like).
    public func stopHeartbeats() { state.withLockedValue { $0.heartbeatsStopped = true } }

    public func isCancelled(_ id: UInt64) -> Bool { state.withLockedValue { $0.cancelled.contains(id) } }

    /// Requests being handled now.
    public var inflightCount: Int { state.withLockedValue { $0.inflight } }

    /// Starts heart-beating every `interval` on a thread of its own (until ``stopHeartbeats()``).
    /// - Parameter health: when given, each heartbeat is followed by a `health` frame with the device's state
    ///   as this closure reports it (`nil` = ok, else what is wrong) — the supervisor's `worker` device probe.
    public func startHeartbeats(every interval: Duration, health: (@Sendable () -> String?)? = nil) {
        let io = self.io
        Thread.detach {
            while true {
                sleepFor(interval)
                if self.state.withLockedValue({ $0.heartbeatsStopped }) { return }
                do {
                    try io.write(Frame(type: .heartbeat))
                    if let health { try self.reportHealth(deviceProblem: health()) }
                } catch { return }
            }
        }
    }

    /// Sends a `health` frame: `{"device": "ok"}` or `{"device": "error", "detail": problem}`.
    public func reportHealth(deviceProblem: String?) throws {
        let report = deviceProblem.map { HealthReport(device: "error", detail: $0) } ?? HealthReport(device: "ok", detail: nil)
        try io.write(Frame(type: .health, payload: try JSONCoding.encode(report)))
    }

    /// Reads frames until end-of-file, handing each request to `handler`. Returns at EOF or on `shutdown`;
    /// the caller then exits.
    /// - Parameter handler: called once per request on the reading thread, so it must return quickly: quick
    ///   answers (an echo) can be given inline, real work goes to another thread (``Thread/detach(_:)``). It
    ///   must answer with exactly one ``WorkerRequest/respond(_:)`` or ``WorkerRequest/fail(code:message:retryable:)``.
    public func serve(_ handler: @escaping @Sendable (WorkerRequest) -> Void) throws {
        while let frame = try io.readFrame() {
            switch frame.type {
            case .hello:
                adopt(frame)
            case .request:
                let request = WorkerRequest(id: frame.requestID, payload: frame.payload, connection: self)
                state.withLockedValue { $0.inflight += 1 }
                handler(request)
            case .cancel:
                state.withLockedValue { _ = $0.cancelled.insert(frame.requestID) }
            case .drain:
                state.withLockedValue { $0.draining = true }
            case .shutdown:
                return
            default:
                break
            }
        }
    }

    /// Waits for the hello from the supervisor (it is the first frame it sends).
    public func awaitHello() throws -> HelloFromSupervisor? {
        guard let frame = try io.readFrame() else { return nil }
        if frame.type == .hello { adopt(frame) }
        return supervisorHello
    }

    /// Keeps the supervisor's hello and adopts its frame limit.
    private func adopt(_ hello: Frame) {
        let decoded = try? JSONCoding.decode(HelloFromSupervisor.self, from: hello.payload)
        state.withLockedValue { $0.supervisorHello = decoded }
        if let limit = decoded?.maxFrameBytes { io.maximumFrameLength = limit }
    }

    func finished(_ id: UInt64) {
        state.withLockedValue {
            $0.inflight -= 1
            $0.cancelled.remove(id)
        }
    }
}

/// One request handed to a worker's handler.
public final class WorkerRequest: Sendable {
    public let id: UInt64
    public let payload: ByteBuffer
    let connection: WorkerConnection
    /// Answering threads race (work done vs. cancelled): exactly one final answer goes out.
    private let answered = NIOLockedValueBox(false)

    init(id: UInt64, payload: ByteBuffer, connection: WorkerConnection) {
        self.id = id
        self.payload = payload
        self.connection = connection
    }

    /// True once the supervisor cancelled this request (client gone, deadline): stop working on it.
    public var isCancelled: Bool { connection.isCancelled(id) }

    /// Streams a partial answer.
    public func chunk(_ bytes: ByteBuffer) {
        try? connection.io.write(Frame(type: .chunk, requestID: id, payload: bytes))
    }

    /// The final answer.
    public func respond(_ bytes: ByteBuffer) {
        guard claimAnswer() else { return }
        try? connection.io.write(Frame(type: .response, requestID: id, payload: bytes))
        connection.finished(id)
    }

    /// The final answer, as an error.
    public func fail(code: String, message: String, retryable: Bool = false) {
        guard claimAnswer() else { return }
        try? connection.io.write(.error(requestID: id, code: code, message: message, retryable: retryable))
        connection.finished(id)
    }

    /// True for the first caller only.
    private func claimAnswer() -> Bool {
        answered.withLockedValue { done in
            defer { done = true }
            return !done
        }
    }
}

public struct WorkerError: Error, CustomStringConvertible, Sendable {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// Sleeps the calling thread.
public func sleepFor(_ duration: Duration) {
    let ns = max(0, duration.components.seconds * 1_000_000_000 + duration.components.attoseconds / 1_000_000_000)
    var request = timespec(tv_sec: Int(ns / 1_000_000_000), tv_nsec: Int(ns % 1_000_000_000))
    var remaining = timespec()
    while nanosleep(&request, &remaining) != 0 && errno == EINTR { request = remaining }
}

/// Minimal detached pthreads (no Foundation needed in workers).
public enum Thread {
    public static func detach(_ body: @escaping @Sendable () -> Void) {
        let box = Unmanaged.passRetained(Box(body)).toOpaque()
        var thread = pthread_t()
        var attr = pthread_attr_t()
        pthread_attr_init(&attr)
        pthread_attr_setdetachstate(&attr, Int32(PTHREAD_CREATE_DETACHED))
        let rc = pthread_create(&thread, &attr, { raw in
            let box = Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue()
            box.body()
            return nil
        }, box)
        pthread_attr_destroy(&attr)
        precondition(rc == 0, "pthread_create failed: \(rc)")
    }

    final class Box {
        let body: @Sendable () -> Void
        init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }
}

/// The JSON body of a `health` frame.
public struct HealthReport: Codable, Sendable, Equatable {
    /// `ok`, or anything else (`error`) for a device that cannot serve.
    public var device: String
    public var detail: String?

    public init(device: String, detail: String?) {
        self.device = device
        self.detail = detail
    }
}

@preconcurrency import Dispatch
import Logging
import NIOCore
import SupervisorCore
import WireProtocol

/// One device's place in the supervisor: its spec, its state machine and, while a process runs, the process's
/// channel, output pipe and exit watcher. Touched only on the supervisor's event loop.
final class WorkerSlot: @unchecked Sendable {  // confined to the event loop
    let index: Int
    var spec: WorkerSpec
    var machine: WorkerStateMachine
    /// The frame channel to the current process (its fd 3), nil between processes.
    var channel: (any Channel)?
    var outputChannel: (any Channel)?
    var exitWatch: (any DispatchSourceRead)?
    var spawnedAt: NIODeadline?
    var lastFrameAt: MonotonicInstant?
    var hello: HelloFromWorker?
    var timer: Scheduled<Void>?
    var channelClosedCheck: Scheduled<Void>?
    /// The process was reaped but its channel is still being drained (see `reapIfExited`).
    var reapedExit: ExitReason?
    var exitDrain: Scheduled<Void>?
    /// Requests this process holds.
    var inflight = 0
    var output: LineRing
    /// Frames for the worker, written once per burst (``flush()``).
    var outbound = ByteBuffer()
    var isDirty = false

    init(index: Int, spec: WorkerSpec, outputLines: Int) {
        self.index = index
        self.spec = spec
        self.machine = WorkerStateMachine(policy: spec.policy)
        self.output = LineRing(capacity: outputLines)
    }

    // Health levels (Supervisor+Health.swift).
    enum DeviceHealth: Equatable { case unknown, ok, bad(String) }
    var deviceHealth = DeviceHealth.unknown
    var deviceFailures = 0
    /// The worker was already restarted once for the current device fault: if the fault stays, hold it failed.
    var restartedForDevice = false
    var deviceProbeTimer: Scheduled<Void>?
    var deviceProbeRunning = false
    var inferenceFailures = 0
    var inferenceVerdict = "unknown"
    var inferenceProbeTimer: Scheduled<Void>?
    var inferenceProbeInFlight = false
    /// When a real request last succeeded on this worker (a busy, answering worker needs no probe).
    var lastRealSuccess: NIODeadline?
    /// The worker's latest `health` frame.
    var workerReport: (ok: Bool, detail: String, at: NIODeadline)?

    var isFallback: Bool { spec.isFallback }
    /// The current process's memory cgroup, when cgroups are in use.
    var cgroup: CgroupManager.WorkerCgroup?
    /// Whether any process of this slot ever said ready (the first model load is not an outage).
    var hasBeenReady = false
    /// When the current process said ready.
    var readyAt: NIODeadline?

    /// In rotation: the process said ready, its channel is open and its device is not known to be bad.
    var isServing: Bool {
        guard machine.isReady, channel != nil else { return false }
        if case .bad = deviceHealth { return false }
        return true
    }

    var hasCapacity: Bool { isServing && inflight < spec.maxInflight }

    /// Queues a frame for the worker.
    func send(_ frame: Frame) {
        guard channel != nil else { return }
        frame.write(to: &outbound)
    }

    func flush() {
        isDirty = false
        guard let channel, outbound.readableBytes > 0 else { return }
        channel.writeAndFlush(outbound, promise: nil)
        outbound = channel.allocator.buffer(capacity: 4096)
    }

    func metadata(reason: String? = nil) -> Logger.Metadata {
        var m: Logger.Metadata = ["device": "\(spec.device)"]
        if let pid = machine.pid, pid > 0 { m["worker_pid"] = "\(pid)" }
        if let reason { m["reason"] = "\(reason)" }
        return m
    }
}

/// The last N lines of a worker's output, for `tail`.
struct LineRing {
    let capacity: Int
    private var lines: [String] = []
    private var start = 0

    init(capacity: Int) { self.capacity = capacity }

    mutating func append(_ line: String) {
        guard capacity > 0 else { return }
        if lines.count < capacity {
            lines.append(line)
        } else {
            lines[start] = line
            start = (start + 1) % capacity
        }
    }

    func last(_ n: Int) -> [String] {
        let ordered = Array(lines[start...] + lines[..<start])
        return Array(ordered.suffix(max(0, n)))
    }
}

/// A `tail -f` client on control.sock.
struct OutputFollower {
    let device: String
    let requestID: UInt64
    let channel: any Channel
    var dropped = 0
}

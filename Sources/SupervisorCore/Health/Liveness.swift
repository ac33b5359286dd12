/// The "alive" health level: a ready worker that sends no frame (heartbeat or anything else) for
/// `heartbeat_timeout` is hung and is killed with reason `hang`. Pure: the runtime reports frames with their
/// time; the verdict and the deadline come from here.
public struct Liveness: Sendable, Hashable {
    public private(set) var heartbeatInterval: Duration
    public private(set) var heartbeatTimeout: Duration
    /// When the current process last sent a frame (or was spawned); nil between processes.
    public private(set) var lastFrame: MonotonicInstant?

    public init(heartbeatInterval: Duration, heartbeatTimeout: Duration) {
        self.heartbeatInterval = heartbeatInterval
        self.heartbeatTimeout = heartbeatTimeout
    }

    /// New settings from a reload; the silence counted so far stays.
    public mutating func update(heartbeatInterval: Duration, heartbeatTimeout: Duration) {
        self.heartbeatInterval = heartbeatInterval
        self.heartbeatTimeout = heartbeatTimeout
    }

    /// A new process: its silence is counted from its start.
    public mutating func processStarted(now: MonotonicInstant) { lastFrame = now }
    public mutating func processGone() { lastFrame = nil }
    /// Any frame proves the worker alive. Hot path: one store.
    @inline(__always) public mutating func frameReceived(now: MonotonicInstant) { lastFrame = now }

    /// When a ready worker that stays silent is judged hung.
    public func deadline(isReady: Bool) -> MonotonicInstant? {
        guard isReady, let lastFrame else { return nil }
        return lastFrame + heartbeatTimeout
    }

    public func isHung(isReady: Bool, now: MonotonicInstant) -> Bool {
        guard let deadline = deadline(isReady: isReady) else { return false }
        return now >= deadline
    }

    /// The `alive` level shown in status: `ok`, `down`, or how long a ready worker has been silent once that
    /// is more than three heartbeat intervals (before it is judged hung).
    public func level(isRunning: Bool, isChannelOpen: Bool, isReady: Bool, now: MonotonicInstant) -> String {
        guard isRunning, isChannelOpen else { return "down" }
        if isReady, let lastFrame, now - lastFrame > heartbeatInterval * 3 {
            return "no heartbeat for \(formatSeconds(now - lastFrame, decimals: 1))s"
        }
        return "ok"
    }
}

/// `1.5`, `0.250`: a duration in seconds with a fixed number of decimals (Core has no Foundation formatting).
public func formatSeconds(_ duration: Duration, decimals: Int) -> String {
    var scale: Int64 = 1
    for _ in 0..<decimals { scale *= 10 }
    let ns = duration.nanoseconds
    let negative = ns < 0
    let per = 1_000_000_000 / scale
    let magnitude = ns == .min ? Int64.max : abs(ns)
    let units = magnitude / per + (magnitude % per >= per / 2 ? 1 : 0)
    let whole = units / scale
    var text = "\(whole)"
    if decimals > 0 {
        let frac = String(units % scale)
        text += "." + String(repeating: "0", count: decimals - frac.count) + frac
    }
    return negative ? "-" + text : text
}

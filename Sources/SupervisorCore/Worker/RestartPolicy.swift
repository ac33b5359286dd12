/// When a worker that exited on its own is started again (OTP's permanent / transient / temporary).
public enum RestartPolicy: String, Sendable, Hashable, CaseIterable {
    case always
    case onFailure = "on-failure"
    case never
}

/// Exponential backoff between restarts: `initial * multiplier^attempt`, capped at `maximum`, then spread by
/// up to `jitter` (a fraction) so that many devices failing together do not restart in lockstep.
public struct Backoff: Sendable, Hashable {
    public var initial: Duration
    public var maximum: Duration
    public var multiplier: Double
    public var jitter: Double

    public init(initial: Duration = .seconds(1), maximum: Duration = .seconds(30), multiplier: Double = 2,
                jitter: Double = 0.1) {
        self.initial = initial
        self.maximum = maximum
        self.multiplier = multiplier
        self.jitter = jitter
    }

    /// The delay before restart number `attempt` (0-based).
    /// - Parameter jitterSample: a value in [0, 1) from the caller's random source (pure: no RNG in here).
    public func delay(attempt: Int, jitterSample: Double) -> Duration {
        var seconds = initial.seconds
        let maxSeconds = maximum.seconds
        var n = 0
        while n < attempt && seconds < maxSeconds {
            seconds *= multiplier
            n += 1
        }
        seconds = min(seconds, maxSeconds)
        seconds *= 1 + jitter * (jitterSample * 2 - 1)
        return .nanoseconds(Int64(max(0, seconds) * 1e9))
    }
}

/// OTP's restart intensity: more than `maxRestarts` restarts within `window` means the device is given up
/// (`failed`) instead of being restarted in a loop.
public struct RestartIntensity: Sendable, Hashable {
    public let maxRestarts: Int
    public let window: Duration
    private var recent: [MonotonicInstant] = []

    public init(maxRestarts: Int, window: Duration) {
        self.maxRestarts = maxRestarts
        self.window = window
    }

    /// Records a restart at `now` and says whether the limit is now exceeded.
    public mutating func recordRestart(at now: MonotonicInstant) -> Bool {
        recent.removeAll { now - $0 >= window }
        recent.append(now)
        return recent.count > maxRestarts
    }

    /// Restarts inside the window ending at `now`.
    public func count(at now: MonotonicInstant) -> Int { recent.filter { now - $0 < window }.count }

    public mutating func reset() { recent.removeAll() }
}

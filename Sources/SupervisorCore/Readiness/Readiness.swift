/// What systemd is told, and when (docs/ARCHITECTURE.md, "Readiness"): `READY=1` once the aggregated health
/// says enough workers can serve (`min_ready`), or once the optional `ready_timeout` grace has passed;
/// `STATUS=` whenever the one-line summary changes; `EXTEND_TIMEOUT_USEC=` every few seconds while workers
/// load before READY (a model load of minutes must not hit `TimeoutStartSec=`, and a wedged loop stops
/// extending); `WATCHDOG=1` every half `WATCHDOG_USEC`; `RELOADING=1` … `READY=1` around a reload;
/// `STOPPING=1` at shutdown. Pure: the runtime sends the messages and passes time in.
public struct Readiness: Sendable, Hashable {
    public enum Message: Sendable, Hashable {
        /// `READY=1` (with `MAINPID=`) and `STATUS=`.
        case ready(status: String)
        case status(String)
        /// `EXTEND_TIMEOUT_USEC=`.
        case extendTimeout(microseconds: UInt64)
        case watchdog
        /// `RELOADING=1` with `MONOTONIC_USEC=` and a status.
        case reloading(monotonicMicroseconds: UInt64)
        /// `READY=1` and `STATUS=` after a reload.
        case reloaded(status: String)
        /// `STOPPING=1` and `STATUS=`.
        case stopping(status: String)
    }

    /// How often start-up is extended, and by how much ("send again within this").
    public static let extendEvery: Duration = .seconds(5)
    public static let extendBy: Duration = .seconds(20)

    public let readyTimeout: Duration?
    public let watchdogInterval: Duration?
    public private(set) var hasSentReady = false
    public private(set) var isReloading = false
    public private(set) var isStopping = false
    public private(set) var lastStatus = ""
    private var startedAt: MonotonicInstant?
    private var nextExtend: MonotonicInstant?
    private var nextWatchdog: MonotonicInstant?

    /// - Parameter watchdogInterval: how often to send `WATCHDOG=1` (half of `WATCHDOG_USEC`), nil when off.
    public init(readyTimeout: Duration?, watchdogInterval: Duration?) {
        self.readyTimeout = readyTimeout
        self.watchdogInterval = watchdogInterval
    }

    /// The sockets are bound and the workers starting: the watchdog and the start-up extension begin.
    public mutating func begin(now: MonotonicInstant, loading: Bool) -> [Message] {
        startedAt = now
        var messages: [Message] = []
        if let watchdogInterval {
            messages.append(.watchdog)
            nextWatchdog = now + watchdogInterval
        }
        nextExtend = now
        messages += timer(now: now, loading: loading, summary: nil)
        return messages
    }

    /// The aggregated health after a change (coalesced by the runtime to one call per event-loop turn).
    public mutating func healthPublished(isUnavailable: Bool, summary: String) -> [Message] {
        let status = Self.statusText(summary)
        if !hasSentReady && !isUnavailable && !isStopping {
            hasSentReady = true
            lastStatus = status
            return [.ready(status: status)]
        }
        guard status != lastStatus else { return [] }
        lastStatus = status
        return [.status(status)]
    }

    /// - Parameters:
    ///   - loading: a wanted worker is starting or backing off.
    ///   - summary: the current one-line health, for the grace message (nil before the first aggregation).
    public mutating func timer(now: MonotonicInstant, loading: Bool, summary: String?) -> [Message] {
        var messages: [Message] = []
        if let next = nextWatchdog, now >= next, let watchdogInterval {
            messages.append(.watchdog)
            nextWatchdog = now + watchdogInterval
        }
        if isReloading {
            // A reload that rolls workers takes as long as their model loads: keep systemd's reload timeout
            // (TimeoutStartSec=) from killing `reload --wait` while it makes progress.
            if let next = nextExtend, now >= next {
                if loading { messages.append(.extendTimeout(microseconds: UInt64(Self.extendBy.nanoseconds / 1000))) }
                nextExtend = now + Self.extendEvery
            }
            return messages
        }
        guard !hasSentReady, !isStopping else {
            nextExtend = nil
            return messages
        }
        if let grace = readyTimeout, let startedAt, now - startedAt >= grace {
            let status = Self.statusText("start-up grace ready_timeout (\(grace.configString)) passed; \(summary ?? "")")
            hasSentReady = true
            lastStatus = status
            nextExtend = nil
            messages.append(.ready(status: status))
            return messages
        }
        if let next = nextExtend, now >= next {
            if loading { messages.append(.extendTimeout(microseconds: UInt64(Self.extendBy.nanoseconds / 1000))) }
            nextExtend = now + Self.extendEvery
        }
        return messages
    }

    public var nextDeadline: MonotonicInstant? {
        var next = nextWatchdog
        if isReloading, let extend = nextExtend { next = min(next ?? extend, extend) }
        if !hasSentReady && !isStopping {
            for candidate in [nextExtend, readyTimeout.flatMap { grace in startedAt.map { $0 + grace } }] {
                if let candidate { next = min(next ?? candidate, candidate) }
            }
        }
        return next
    }

    /// A reload begins (before anything is re-read or replaced).
    public mutating func reloadBegan(monotonicMicroseconds: UInt64, now: MonotonicInstant? = nil) -> [Message] {
        guard hasSentReady, !isStopping, !isReloading else { return [] }
        isReloading = true
        nextExtend = now.map { $0 + Self.extendEvery }
        return [.reloading(monotonicMicroseconds: monotonicMicroseconds)]
    }

    /// The reload is over (applied or refused): systemd goes back to `active`.
    public mutating func reloadFinished(summary: String) -> [Message] {
        guard isReloading else { return [] }
        isReloading = false
        nextExtend = nil
        lastStatus = Self.statusText(summary)
        return [.reloaded(status: lastStatus)]
    }

    public mutating func stopping(reason: String) -> [Message] {
        isStopping = true
        nextExtend = nil
        return [.stopping(status: Self.statusText("stopping: \(reason)"))]
    }

    /// A STATUS= value: one line (systemd shows it in `systemctl status`).
    public static func statusText(_ line: String) -> String {
        String(line.map { $0 == "\n" || $0 == "\r" ? " " : $0 })
    }
}

/// Graceful shutdown (docs/ARCHITECTURE.md, "Readiness"): stop accepting, let requests in flight finish for at
/// most `shutdown_timeout` (while some worker can still answer them), answer the rest `shutting_down`, stop
/// every worker, and close the sockets once no worker is left.
public struct Shutdown: Sendable, Hashable {
    public enum State: Sendable, Hashable {
        case running
        case draining(until: MonotonicInstant)
        case stoppingWorkers
        case stopped
    }

    public private(set) var state: State = .running

    public init() {}

    public var isShuttingDown: Bool { state != .running }

    /// Returns false when a shutdown is already under way.
    public mutating func requested(now: MonotonicInstant, timeout: Duration) -> Bool {
        guard state == .running else { return false }
        state = .draining(until: now + timeout)
        return true
    }

    /// Whether draining is over: nothing in flight, the timeout passed, or no worker can answer any more.
    /// Moves to ``State/stoppingWorkers`` when it is.
    public mutating func shouldStopWorkers(now: MonotonicInstant, requestsInFlight: Int, anyServing: Bool) -> Bool {
        guard case .draining(let until) = state else { return false }
        guard requestsInFlight == 0 || now >= until || !anyServing else { return false }
        state = .stoppingWorkers
        return true
    }

    /// Every worker is gone: returns true once, when the sockets must be closed.
    public mutating func workersGone() -> Bool {
        guard state == .stoppingWorkers else { return false }
        state = .stopped
        return true
    }

    public var nextDeadline: MonotonicInstant? {
        if case .draining(let until) = state { return until }
        return nil
    }
}

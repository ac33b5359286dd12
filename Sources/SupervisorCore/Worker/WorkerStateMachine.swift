/// The supervision of one device's worker as a pure state machine: events (past facts, with the time they were
/// seen) go in, at most one action (an imperative for the runtime) comes out, and ``nextDeadline`` says when
/// ``timerFired(now:)`` must be called next. It performs no I/O and reads no clock, so it is tested as tables.
///
/// ```
///   stopped ─start─► starting ─ready─► ready ─stop─► stopping ─exit─► stopped
///                      │  ▲              │              ▲
///      start_timeout ──┘  │     exit ────┴─► backoff ───┘(stop)
///                         └──── timer ◄───────┘   │ too many restarts in the window
///                                                 ▼
///                                               failed ─slow retry timer / start─► starting
/// ```
public struct WorkerStateMachine: Sendable {
    public enum StopStep: Sendable, Hashable { case term, kill }

    public enum State: Sendable, Hashable {
        case stopped
        case starting(pid: Int32, since: MonotonicInstant)
        case ready(pid: Int32, since: MonotonicInstant)
        case stopping(pid: Int32, step: StopStep, deadline: MonotonicInstant)
        case backoff(until: MonotonicInstant)
        /// Given up; `retryAt` is the slow re-try (nil: never, e.g. after exit code 78).
        case failed(retryAt: MonotonicInstant?)
    }

    public enum Desired: String, Sendable, Hashable { case up, down }

    public enum Action: Sendable, Hashable {
        /// Start a new worker process now and report ``spawned(pid:now:)`` or ``spawnFailed(errno:now:jitter:)``.
        case spawn
        /// Send this signal to the worker's process group.
        case signalGroup(Int32)
    }

    /// Everything the machine needs to know about the worker's policy.
    public struct Policy: Sendable, Hashable {
        public var restart: RestartPolicy
        public var backoff: Backoff
        public var backoffResetAfter: Duration
        public var maxRestarts: Int
        public var restartWindow: Duration
        public var failedRetryInterval: Duration
        public var startTimeout: Duration
        public var stopTimeout: Duration
        /// How long to wait after SIGKILL before sending it again (a process stuck in the kernel).
        public var killRepeat: Duration

        public init(restart: RestartPolicy = .always, backoff: Backoff = Backoff(),
                    backoffResetAfter: Duration = .seconds(60), maxRestarts: Int = 5,
                    restartWindow: Duration = .seconds(60), failedRetryInterval: Duration = .seconds(300),
                    startTimeout: Duration = .seconds(300), stopTimeout: Duration = .seconds(15),
                    killRepeat: Duration = .seconds(5)) {
            self.restart = restart
            self.backoff = backoff
            self.backoffResetAfter = backoffResetAfter
            self.maxRestarts = maxRestarts
            self.restartWindow = restartWindow
            self.failedRetryInterval = failedRetryInterval
            self.startTimeout = startTimeout
            self.stopTimeout = stopTimeout
            self.killRepeat = killRepeat
        }
    }

    public private(set) var state: State = .stopped
    public private(set) var desired: Desired = .down
    /// Automatic restarts so far (operator restarts are not counted).
    public private(set) var restarts = 0
    /// The reason of the last exit, if any process has exited yet.
    public private(set) var lastExit: ExitReason?
    /// Exits per ``ExitReason/kind``.
    public private(set) var exitCounts: [String: Int] = [:]
    public var policy: Policy

    private var intensity: RestartIntensity
    private var backoffAttempt = 0
    /// The reason the supervisor decided on before it killed the process (hang, start timeout, ...): it wins
    /// over the plain `signaled(9)` that waitpid will report.
    private var pendingReason: ExitReason?
    /// A reason the worker itself reported (device OOM), valid only if the exit follows soon: a worker that
    /// survives its OOM and dies much later of something else must not be blamed on it.
    private var attributed: (reason: ExitReason, until: MonotonicInstant)?
    /// An operator restart: the exit that follows is expected and is followed by an immediate spawn.
    private var restartRequested = false
    /// ``holdFailed(_:now:)`` is in progress: the exit that follows leaves the worker `failed`.
    private var holdRequested = false
    /// When the process became ready, kept while it is killed for a fault (or stopped with its group): an exit
    /// after long good service is restarted at once however the process was taken down.
    private var readySince: MonotonicInstant?

    public init(policy: Policy) {
        self.policy = policy
        self.intensity = RestartIntensity(maxRestarts: policy.maxRestarts, window: policy.restartWindow)
    }

    /// The current process, if one is running.
    public var pid: Int32? {
        switch state {
        case .starting(let pid, _), .ready(let pid, _), .stopping(let pid, _, _): pid
        case .stopped, .backoff, .failed: nil
        }
    }

    public var isReady: Bool { if case .ready = state { true } else { false } }

    /// The short state name used in status (`starting`, `ready`, `stopping`, `backoff`, `failed`, `stopped`).
    public var stateName: String {
        switch state {
        case .stopped: "stopped"
        case .starting: "starting"
        case .ready: "ready"
        case .stopping: "stopping"
        case .backoff: "backoff"
        case .failed: "failed"
        }
    }

    /// When ``timerFired(now:)`` must next be called, or nil when nothing is scheduled.
    public var nextDeadline: MonotonicInstant? {
        switch state {
        case .starting(_, let since): since + policy.startTimeout
        case .stopping(_, _, let deadline): deadline
        case .backoff(let until): until
        case .failed(let retryAt): retryAt
        case .stopped, .ready: nil
        }
    }

    // MARK: Operator intents

    /// The operator (or start-up) wants the worker running.
    public mutating func start(now: MonotonicInstant) -> Action? {
        desired = .up
        holdRequested = false
        switch state {
        case .stopped, .backoff, .failed:
            intensity.reset()
            backoffAttempt = 0
            return .spawn
        case .stopping:
            // Still going away (an operator stop in progress): start the new one as soon as it is gone,
            // without counting it as a failure or waiting out a backoff.
            restartRequested = true
            return nil
        case .starting, .ready:
            return nil
        }
    }

    /// The operator (or shutdown) wants the worker gone: SIGTERM now, SIGKILL after `stop_timeout`.
    public mutating func stop(now: MonotonicInstant) -> Action? {
        desired = .down
        restartRequested = false
        switch state {
        case .starting(let pid, _), .ready(let pid, _):
            state = .stopping(pid: pid, step: .term, deadline: now + policy.stopTimeout)
            return .signalGroup(SIGTERM_)
        case .backoff, .failed:
            state = .stopped
            return nil
        case .stopped, .stopping:
            return nil
        }
    }

    /// The operator wants a fresh process: stop the current one (if any), then start at once.
    public mutating func restart(now: MonotonicInstant) -> Action? {
        switch state {
        case .starting, .ready:
            let action = stop(now: now)
            desired = .up
            restartRequested = true
            return action
        case .stopping:
            desired = .up
            restartRequested = true
            return nil
        case .stopped, .backoff, .failed:
            return start(now: now)
        }
    }

    // MARK: Facts from the runtime

    /// A process was started after a ``Action/spawn``. Refused (false, nothing changes) while a process is
    /// already running: that would be the runtime's bug, and the running process stays the one supervised.
    @discardableResult
    public mutating func spawned(pid: Int32, now: MonotonicInstant) -> Bool {
        guard self.pid == nil else { return false }
        readySince = nil
        state = .starting(pid: pid, since: now)
        return true
    }

    /// `posix_spawn` failed after a ``Action/spawn``: counted as an exit. Refused while a process runs.
    public mutating func spawnFailed(errno: Int32, now: MonotonicInstant, jitter: Double) -> Action? {
        guard pid == nil else { return nil }
        state = .starting(pid: -1, since: now)
        return exited(.spawnFailed(errno: errno), now: now, jitter: jitter)
    }

    /// The worker sent `ready`. Returns whether it became ready now (false if it was not starting).
    public mutating func readyReceived(now: MonotonicInstant) -> Bool {
        guard case .starting(let pid, _) = state else { return false }
        readySince = now
        state = .ready(pid: pid, since: now)
        return true
    }

    /// The supervisor found a fault it must kill the worker for (hang, protocol error, failed probes).
    /// The reason is remembered and reported when the process is gone.
    public mutating func fault(_ reason: ExitReason, now: MonotonicInstant) -> Action? {
        switch state {
        case .starting(let pid, _), .ready(let pid, _):
            pendingReason = reason
            state = .stopping(pid: pid, step: .kill, deadline: now + policy.killRepeat)
            return .signalGroup(SIGKILL_)
        case .stopping(let pid, .term, _):
            pendingReason = pendingReason ?? reason
            state = .stopping(pid: pid, step: .kill, deadline: now + policy.killRepeat)
            return .signalGroup(SIGKILL_)
        default:
            return nil
        }
    }

    /// Stops the worker and keeps it `failed` (no restart, no retry timer) while the operator still wants it:
    /// its device is bad and restarting the worker did not help. ``start(now:)`` brings it back.
    public mutating func holdFailed(_ reason: ExitReason, now: MonotonicInstant) -> Action? {
        switch state {
        case .starting(let pid, _), .ready(let pid, _):
            pendingReason = reason
            holdRequested = true
            state = .stopping(pid: pid, step: .term, deadline: now + policy.stopTimeout)
            return .signalGroup(SIGTERM_)
        case .stopping:
            holdRequested = true
            return nil
        case .backoff, .stopped, .failed:
            if desired == .up { state = .failed(retryAt: nil) }
            lastExit = lastExit ?? reason
            return nil
        }
    }

    /// One part of a unit of several processes failed (a rank of a tensor-parallel group): remember why, and stop
    /// the rest gently (SIGTERM, SIGKILL after `stop_timeout`). The exit that follows is handled like a crash for
    /// that reason (backoff, restart intensity, exit code 78).
    public mutating func partFailed(_ reason: ExitReason, now: MonotonicInstant) -> Action? {
        switch state {
        case .starting(let pid, _), .ready(let pid, _):
            pendingReason = reason
            state = .stopping(pid: pid, step: .term, deadline: now + policy.stopTimeout)
            return .signalGroup(SIGTERM_)
        case .stopping where desired == .up && !restartRequested:
            pendingReason = pendingReason ?? reason
            return nil
        default:
            return nil
        }
    }

    /// While stopping for a fault: the exit is to be reported as this reason instead (clearer evidence came in).
    public mutating func reattribute(_ reason: ExitReason) {
        if case .stopping = state, pendingReason != nil { pendingReason = reason }
    }

    /// Whether the worker is held `failed` with no timer (exit code 78 or ``holdFailed(_:now:)``).
    public var isHeldFailed: Bool { state == .failed(retryAt: nil) }

    /// Attributes an exit that comes before `until` to `reason`, without killing (the worker reported a
    /// device OOM and is expected to exit by itself).
    public mutating func attribute(_ reason: ExitReason, until: MonotonicInstant) {
        if pid != nil { attributed = (reason, until) }
    }

    /// The worker process is gone (reaped). Decides what comes next.
    /// - Parameter jitter: a sample in [0, 1) for the backoff jitter.
    /// Refused (nil, nothing changes) when no process runs: only a process can exit.
    public mutating func exited(_ observed: ExitReason, now: MonotonicInstant, jitter: Double) -> Action? {
        guard pid != nil else { return nil }
        // Ready until now, or until it was killed for a fault or stopped with its group.
        let wasReadySince: MonotonicInstant? = if case .ready(_, let since) = state { since } else { readySince }
        readySince = nil
        var reason = observed
        if let fault = pendingReason {
            reason = fault
        } else if case .stopping = state, desired == .down || restartRequested {
            // The exit the operator asked for: whatever code the worker chose on SIGTERM. A worker that had
            // to be SIGKILLed after stop_timeout keeps that visible.
            reason = observed == .signaled(signal: SIGKILL_, coreDumped: false) ? observed : .stopped
        } else if let (cause, until) = attributed, now <= until {
            reason = cause
        }
        pendingReason = nil
        attributed = nil
        lastExit = reason
        exitCounts[lastExit!.kind, default: 0] += 1

        if desired == .down {
            state = .stopped
            return nil
        }
        if holdRequested {
            holdRequested = false
            restartRequested = false
            state = .failed(retryAt: nil)
            return nil
        }
        if restartRequested {
            restartRequested = false
            backoffAttempt = 0
            state = .stopped  // the process is gone; the spawn follows at once
            return .spawn
        }
        if case .exited(78) = reason {
            state = .failed(retryAt: nil)
            return nil
        }
        // Not restarted by policy: stopped, but still wanted (so health shows the lost capacity, and
        // `npu-supervisorctl start` brings it back).
        switch policy.restart {
        case .never:
            state = .stopped
            return nil
        case .onFailure where !reason.isFailure:
            state = .stopped
            return nil
        default:
            break
        }
        // A worker that served well for backoff_reset_after is restarted at once: backoff is for repeated
        // failures (runit and s6 likewise throttle only a service that died soon after its start).
        var servedWell = false
        if let since = wasReadySince, now - since >= policy.backoffResetAfter {
            backoffAttempt = 0
            intensity.reset()
            servedWell = true
        }
        if intensity.recordRestart(at: now) {
            state = .failed(retryAt: now + policy.failedRetryInterval)
            return nil
        }
        if servedWell {
            restarts += 1
            state = .stopped  // the process is gone; the spawn follows at once
            return .spawn
        }
        let delay = policy.backoff.delay(attempt: backoffAttempt, jitterSample: jitter)
        backoffAttempt += 1
        restarts += 1
        state = .backoff(until: now + delay)
        return nil
    }

    /// A deadline reported by ``nextDeadline`` has (perhaps) passed.
    public mutating func timerFired(now: MonotonicInstant) -> Action? {
        switch state {
        case .starting(let pid, let since) where now >= since + policy.startTimeout && pid > 0:
            return fault(.startTimeout, now: now)
        case .stopping(let pid, .term, let deadline) where now >= deadline:
            state = .stopping(pid: pid, step: .kill, deadline: now + policy.killRepeat)
            return .signalGroup(SIGKILL_)
        case .stopping(let pid, .kill, let deadline) where now >= deadline:
            state = .stopping(pid: pid, step: .kill, deadline: now + policy.killRepeat)
            return .signalGroup(SIGKILL_)
        case .backoff(let until) where now >= until:
            return .spawn
        case .failed(let retryAt?) where now >= retryAt:
            intensity.reset()
            backoffAttempt = 0
            restarts += 1
            return .spawn
        default:
            return nil
        }
    }
}

// Signal numbers on Linux (the pure core does not import Glibc).
let SIGTERM_: Int32 = 15
let SIGKILL_: Int32 = 9

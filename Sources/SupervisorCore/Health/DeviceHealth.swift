/// The "device" health level of one device (docs/ARCHITECTURE.md, "Health"): probe scheduling, the verdict
/// after `failures` consecutive failed probes, and the rule "restart the worker once (a restart sometimes
/// clears a wedged context), then hold it failed and re-probe on a slower timer until the device recovers".
/// Pure: the runtime runs `command` and `path` probes and reports their result; `worker` probes (the worker's
/// own `health` reports) are judged here, including their staleness.
public struct DeviceHealth: Sendable, Hashable {
    public enum Verdict: Sendable, Hashable {
        case unknown
        case ok
        case bad(String)
    }

    /// The worker's latest `health` frame.
    public struct Report: Sendable, Hashable {
        public var ok: Bool
        public var detail: String
        public var at: MonotonicInstant
    }

    /// What the device level needs to know about the worker.
    public struct WorkerView: Sendable, Hashable {
        public var isStarting: Bool
        public var isReady: Bool
        public var isBackoff: Bool
        /// Held `failed` for this device's fault, while the operator still wants it up.
        public var isHeldFailedForDevice: Bool

        public init(isStarting: Bool, isReady: Bool, isBackoff: Bool, isHeldFailedForDevice: Bool) {
            self.isStarting = isStarting
            self.isReady = isReady
            self.isBackoff = isBackoff
            self.isHeldFailedForDevice = isHeldFailedForDevice
        }
    }

    /// What is due when ``nextProbeAt`` has passed.
    public enum ProbeStep: Sendable, Hashable {
        /// Run the `command` or `path` probe and report ``result(failure:worker:now:)``.
        case run
        /// Only a running worker can report on its device: start one on trial (it counts as the one restart).
        case startTrialWorker
        /// A `worker` probe judged from the latest report: feed it to ``result(failure:worker:now:)``.
        case judged(failure: String?)
        /// No verdict this time (the probe was rescheduled).
        case none
    }

    /// What a probe result means; applied by ``SupervisorMachine`` in this order.
    public enum Effect: Sendable, Hashable {
        /// Healthy after having been out of rotation.
        case backInRotation
        /// Healthy while its worker is held failed for the device: start the worker again.
        case restartHeldWorker
        /// A failed probe below the `failures` threshold: counted, no verdict yet.
        case failedBelowThreshold(count: Int, of: Int, String)
        /// The device is now out of rotation (said once per fault).
        case tookOutOfRotation(String)
        /// Restart the worker once (fault `device_unhealthy`).
        case restartWorkerOnce(String)
        /// Still bad after a restart: stop the worker and hold it failed.
        case holdWorkerFailed(String)
    }

    public private(set) var spec: DeviceProbeSpec
    private(set) var heartbeatInterval: Duration
    private(set) var heartbeatTimeout: Duration
    public private(set) var verdict: Verdict = .unknown
    public private(set) var consecutiveFailures = 0
    /// The worker was already restarted once for the current fault: if the fault stays, hold it failed.
    public private(set) var restartedForDevice = false
    public private(set) var nextProbeAt: MonotonicInstant?
    public private(set) var isProbeRunning = false
    public private(set) var report: Report?
    private var readyAt: MonotonicInstant?

    public init(spec: DeviceProbeSpec, heartbeatInterval: Duration, heartbeatTimeout: Duration) {
        self.spec = spec
        self.heartbeatInterval = heartbeatInterval
        self.heartbeatTimeout = heartbeatTimeout
    }

    /// New probe settings from a reload: the verdict so far stays; a probe that is now off forgets it, and one
    /// that is now on runs at once.
    public mutating func update(spec: DeviceProbeSpec, heartbeatInterval: Duration, heartbeatTimeout: Duration) {
        let wasOff = self.spec.kind == .none
        self.spec = spec
        self.heartbeatInterval = heartbeatInterval
        self.heartbeatTimeout = heartbeatTimeout
        if spec.kind == .none {
            verdict = .unknown
            consecutiveFailures = 0
            nextProbeAt = nil
        } else if wasOff {
            nextProbeAt = nil
            isProbeRunning = false
        }
    }

    /// Arms the first probe of a probe that a reload turned on.
    public mutating func bootIfIdle(now: MonotonicInstant) {
        if spec.kind != .none, nextProbeAt == nil, !isProbeRunning { nextProbeAt = now }
    }

    public var isOutOfRotation: Bool { if case .bad = verdict { true } else { false } }
    public var outOfRotationReason: String? { if case .bad(let why) = verdict { why } else { nil } }

    /// The first probe runs at once.
    public mutating func boot(now: MonotonicInstant) {
        if spec.kind != .none { nextProbeAt = now }
    }

    public mutating func stop() { nextProbeAt = nil }

    /// How long a worker's report stays valid.
    public var staleAfter: Duration { max(spec.interval * 2, heartbeatTimeout) }

    public mutating func due(now: MonotonicInstant, worker: WorkerView) -> ProbeStep {
        nextProbeAt = nil
        switch spec.kind {
        case .none:
            return .none
        case .path, .command:
            guard !isProbeRunning else { return .none }
            isProbeRunning = true
            return .run
        case .worker:
            if worker.isHeldFailedForDevice {
                restartedForDevice = true
                nextProbeAt = now + spec.failedInterval
                return .startTrialWorker
            }
            guard worker.isReady else {
                // Nothing to ask yet: the worker's own report only exists while it runs.
                nextProbeAt = now + spec.interval
                return .none
            }
            if report == nil, let readyAt, now - readyAt < staleAfter {
                // Just became ready: its first report may not have come yet.
                nextProbeAt = now + spec.interval
                return .none
            }
            if let report, now - report.at <= staleAfter {
                return .judged(failure: report.ok ? nil : "worker reports: \(report.detail)")
            }
            return .judged(failure: "no health report from the worker within \(staleAfter.configString)")
        }
    }

    /// A probe's verdict: nil is healthy, else what is wrong. Schedule the next with ``scheduleNext(now:heldFailed:)``.
    public mutating func result(failure: String?, worker: WorkerView, now: MonotonicInstant) -> [Effect] {
        isProbeRunning = false
        guard let failure else {
            consecutiveFailures = 0
            let wasBad = isOutOfRotation
            verdict = .ok
            restartedForDevice = false
            var effects: [Effect] = wasBad ? [.backInRotation] : []
            if worker.isHeldFailedForDevice { effects.append(.restartHeldWorker) }
            return effects
        }
        consecutiveFailures += 1
        guard consecutiveFailures >= spec.failures else {
            return [.failedBelowThreshold(count: consecutiveFailures, of: spec.failures, failure)]
        }
        let wasBad = isOutOfRotation
        verdict = .bad(failure)
        var effects: [Effect] = wasBad ? [] : [.tookOutOfRotation(failure)]
        if worker.isStarting || worker.isReady {
            if !restartedForDevice {
                restartedForDevice = true
                effects.append(.restartWorkerOnce(failure))
            } else if worker.isReady {
                effects.append(.holdWorkerFailed(failure))
            }
        } else if worker.isBackoff && restartedForDevice {
            effects.append(.holdWorkerFailed(failure))
        }
        return effects
    }

    /// After a result: a device held failed is re-probed on the slower `failed_interval`.
    public mutating func scheduleNext(now: MonotonicInstant, heldFailed: Bool) {
        guard spec.kind != .none else { return }
        nextProbeAt = now + (heldFailed ? spec.failedInterval : spec.interval)
    }

    /// The worker's own `health` frame (`ok` false with `detail` when it says the device is bad, or when the
    /// report could not be read).
    public mutating func workerReported(ok: Bool, detail: String, now: MonotonicInstant) {
        report = Report(ok: ok, detail: detail, at: now)
    }

    /// A fresh worker said ready: a device out of rotation gets its verdict soon, not a whole interval later.
    public mutating func workerBecameReady(now: MonotonicInstant) {
        readyAt = now
        if isOutOfRotation, spec.kind != .none {
            let soon = now + max(heartbeatInterval * 2, .milliseconds(50))
            nextProbeAt = min(nextProbeAt ?? soon, soon)
        }
    }

    public mutating func workerGone() {
        report = nil
        readyAt = nil
    }

    /// The `device` level shown in status.
    public var level: String {
        switch (spec.kind, verdict) {
        case (.none, _): "ok (not probed)"
        case (_, .unknown): "unknown"
        case (_, .ok): "ok"
        case (_, .bad(let why)): why
        }
    }
}

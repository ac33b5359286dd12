/// A rolling change across devices (docs/ARCHITECTURE.md, "Rollouts"): a rolling restart, or an upgrade to new
/// worker specs after a reload. One device at a time (no surge: an accelerator host has no spare device), the
/// first one a canary. For each device: drain (requests finish, bounded) → stop → start the target spec →
/// ready within `progress_deadline` → stay ready for `min_ready_time`; after the canary, a bake of `bake_time`
/// with gates on its error rate and p99 latency against the devices still on the old revision. A device that
/// does not become ready, exits, or fails a gate rolls the whole change back (reverse order, same steps); a
/// rollback that fails pauses with the reason.
///
/// Pure: each turn ``advance(now:view:)`` looks at the workers as they are (a reconcile loop, as Kubernetes
/// controllers do) and returns what to do; time enters as `now`.
///
/// ```
///   idle ─begin─► progressing ─every device done─► complete
///                   │   ▲ resume        │ a device fails (not ready, exits, gates)
///                   ▼   │               ▼
///                  paused ◄─fails── rolling_back ─every device back─► rolled_back
/// ```
public struct Rollout: Sendable {
    public enum State: String, Sendable, Hashable {
        case idle, progressing, paused
        case rollingBack = "rolling_back"
        case rolledBack = "rolled_back"
        case complete
    }

    public enum Kind: String, Sendable, Hashable {
        /// New processes, same specs (`restart --rolling`).
        case restart
        /// New specs (a reload changed them).
        case upgrade
    }

    /// One device's change.
    public struct Step: Sendable {
        public var slot: Int
        public var device: String
        public var from: WorkerSpec
        public var to: WorkerSpec

        public init(slot: Int, device: String, from: WorkerSpec, to: WorkerSpec) {
            self.slot = slot
            self.device = device
            self.from = from
            self.to = to
        }
    }

    /// Where the current step is.
    public enum Phase: Sendable, Hashable {
        case draining(until: MonotonicInstant)
        case stopping
        /// Started with the target spec; `exits` is the worker's exit count when it started.
        case starting(deadline: MonotonicInstant, exits: Int)
        case verifying(until: MonotonicInstant, exits: Int)
        case baking(until: MonotonicInstant, exits: Int)
    }

    /// What the rollout needs to know of one worker this turn.
    public struct WorkerView: Sendable, Hashable {
        public var isReady: Bool
        /// A process runs or is about to be spawned.
        public var hasProcess: Bool
        /// Every exit so far (the lifecycle's count): a rise during a step is a crash of the new process.
        public var exits: Int
        public var lastExit: String?
        /// The worker holds no request any more (or its drain timed out).
        public var isDrained: Bool
        /// Requests answered ok / failed since the counters were last reset, and their p99 latency.
        public var ok: Int
        public var failed: Int
        public var p99: Duration?

        public init(isReady: Bool, hasProcess: Bool, exits: Int, lastExit: String?, isDrained: Bool, ok: Int = 0,
                    failed: Int = 0, p99: Duration? = nil) {
            self.isReady = isReady
            self.hasProcess = hasProcess
            self.exits = exits
            self.lastExit = lastExit
            self.isDrained = isDrained
            self.ok = ok
            self.failed = failed
            self.p99 = p99
        }
    }

    /// What the supervisor must do.
    public enum Command: Sendable, Hashable {
        /// Take the slot out of rotation and let its requests finish.
        case drain(slot: Int, until: MonotonicInstant)
        /// Stop its worker (TERM, then KILL after `stop_timeout`).
        case stop(slot: Int)
        /// Give the slot this spec (a new generation if the revision differs) and start it, back in rotation
        /// once ready.
        case start(slot: Int, spec: WorkerSpec)
        /// Zero the slot's request counters (the bake window starts).
        case resetStats(slot: Int)
        case log(LogRecord)
        /// The rollout reached a final or paused state: tell whoever waits (reload --wait, systemd).
        case ended(State, reason: String?)
    }

    public struct Settings: Sendable, Hashable {
        public var drainTimeout: Duration
        public var progressDeadline: Duration
        public var minReadyTime: Duration
        public var bakeTime: Duration
        /// The canary fails the bake when more than this fraction of its requests failed...
        public var maxErrorRate: Double
        /// ...out of at least this many (fewer say nothing).
        public var minRequests: Int
        /// The canary fails the bake when its p99 exceeds the old devices' p99 by this factor (with
        /// `minRequests` on both sides).
        public var maxP99Ratio: Double

        public init(drainTimeout: Duration = .seconds(30), progressDeadline: Duration = .seconds(600),
                    minReadyTime: Duration = .seconds(10), bakeTime: Duration = .seconds(60),
                    maxErrorRate: Double = 0.05, minRequests: Int = 20, maxP99Ratio: Double = 2) {
            self.drainTimeout = drainTimeout
            self.progressDeadline = progressDeadline
            self.minReadyTime = minReadyTime
            self.bakeTime = bakeTime
            self.maxErrorRate = maxErrorRate
            self.minRequests = minRequests
            self.maxP99Ratio = maxP99Ratio
        }
    }

    public private(set) var state: State = .idle
    public private(set) var kind: Kind = .restart
    public private(set) var steps: [Step] = []
    /// The step in progress (an index into ``steps``); `steps.count` when all are done.
    public private(set) var index = 0
    public private(set) var phase: Phase?
    public private(set) var reason: String?
    /// Rolling back: the steps that undo the ones done, in reverse order.
    public private(set) var isRollback = false
    public var settings: Settings
    /// The state before a pause, to resume into.
    private var pausedFrom: State?

    public init(settings: Settings = Settings()) { self.settings = settings }

    public var isActive: Bool { state == .progressing || state == .rollingBack }

    /// The device of the first step: the canary.
    public var canary: String? { steps.first?.device }

    /// "2/4": steps done of all.
    public var progress: String { "\(min(index, steps.count))/\(steps.count)" }

    /// The slot being changed now.
    public var currentSlot: Int? { isActive && index < steps.count ? steps[index].slot : nil }

    // MARK: Operator intents

    /// Starts a change. Refused (with the reason) while another is active or paused.
    public mutating func begin(_ kind: Kind, steps: [Step], now: MonotonicInstant) -> String? {
        guard !isActive, state != .paused else {
            return "a rollout is already \(state.rawValue) (\(progress)); `npu-supervisorctl rollout undo` or wait"
        }
        guard !steps.isEmpty else { return "nothing to roll: no device selected or changed" }
        self.kind = kind
        self.steps = steps
        index = 0
        phase = nil
        reason = nil
        isRollback = false
        state = .progressing
        return nil
    }

    public mutating func pause(reason why: String) -> Bool {
        guard isActive else { return false }
        pausedFrom = state
        state = .paused
        reason = why
        return true
    }

    public mutating func resume() -> Bool {
        guard state == .paused, let from = pausedFrom else { return false }
        state = from
        pausedFrom = nil
        reason = nil
        return true
    }

    /// Rolls back what was done (the current device first). Refused when there is nothing to undo.
    public mutating func undo(reason why: String, now: MonotonicInstant) -> Bool {
        guard state == .progressing || state == .paused && pausedFrom == .progressing || state == .complete
        else { return false }
        startRollback(reason: why)
        return true
    }

    // MARK: Each turn

    /// When ``advance(now:view:)`` must run again at the latest.
    public var nextDeadline: MonotonicInstant? {
        guard isActive, let phase else { return nil }
        switch phase {
        case .draining(let until): return until
        case .stopping: return nil
        case .starting(let deadline, _): return deadline
        case .verifying(let until, _), .baking(let until, _): return until
        }
    }

    /// Looks at the workers and moves the rollout on as far as it can this turn.
    /// - Parameter view: the current view of a slot; `oldP99` is the p99 of the devices not yet changed.
    public mutating func advance(now: MonotonicInstant, view: (Int) -> WorkerView, oldP99: () -> Duration?)
        -> [Command]
    {
        var commands: [Command] = []
        // Several phases may complete in one turn (a drain with nothing in flight, a stop of a dead worker).
        for _ in 0..<(steps.count * 6 + 6) {
            guard isActive else { break }
            guard index < steps.count else {
                finish(&commands)
                break
            }
            let step = steps[index]
            let worker = view(step.slot)
            guard let phase else {
                let until = now + settings.drainTimeout
                commands.append(.drain(slot: step.slot, until: until))
                self.phase = .draining(until: until)
                continue
            }
            switch phase {
            case .draining(let until):
                guard worker.isDrained || now >= until || !worker.hasProcess else { return commands }
                commands.append(.stop(slot: step.slot))
                self.phase = .stopping
            case .stopping:
                guard !worker.hasProcess else { return commands }
                commands.append(.start(slot: step.slot, spec: step.to))
                self.phase = .starting(deadline: now + settings.progressDeadline, exits: worker.exits)
                return commands  // the start must be carried out before the worker is looked at again
            case .starting(let deadline, let exits):
                if worker.exits > exits {
                    fail("device \(step.device) \(worker.lastExit.map { "exited (\($0))" } ?? "exited") before it was ready",
                         &commands)
                } else if worker.isReady {
                    self.phase = .verifying(until: now + settings.minReadyTime, exits: exits)
                } else if now >= deadline {
                    fail("device \(step.device) not ready within progress_deadline (\(settings.progressDeadline.configString))",
                         &commands)
                } else {
                    return commands
                }
            case .verifying(let until, let exits):
                if worker.exits > exits || !worker.isReady {
                    fail("device \(step.device) \(worker.lastExit.map { "exited (\($0))" } ?? "stopped serving") "
                         + "within min_ready_time", &commands)
                } else if now >= until {
                    if index == 0 && !isRollback && kind == .upgrade && steps.count > 1 && settings.bakeTime > .zero {
                        commands.append(.resetStats(slot: step.slot))
                        self.phase = .baking(until: now + settings.bakeTime, exits: exits)
                        commands.append(.log(LogRecord(level: .notice, slot: step.slot, pid: nil,
                            message: "rollout: canary \(step.device) ready; baking for \(settings.bakeTime.configString)",
                            reason: nil)))
                    } else {
                        nextStep(&commands)
                    }
                } else {
                    return commands
                }
            case .baking(let until, let exits):
                if worker.exits > exits || !worker.isReady {
                    fail("canary \(step.device) \(worker.lastExit.map { "exited (\($0))" } ?? "stopped serving") "
                         + "while baking", &commands)
                } else if let why = gateFailure(worker, oldP99: oldP99()) {
                    fail("canary \(step.device) failed its gates: \(why)", &commands)
                } else if now >= until {
                    nextStep(&commands)
                } else {
                    return commands
                }
            }
        }
        return commands
    }

    /// Why the canary fails its gates, or nil.
    public func gateFailure(_ canary: WorkerView, oldP99: Duration?) -> String? {
        let total = canary.ok + canary.failed
        guard total >= settings.minRequests else { return nil }
        let rate = Double(canary.failed) / Double(total)
        if rate > settings.maxErrorRate {
            return "error rate \(percent(rate)) over \(total) requests (max_error_rate \(percent(settings.maxErrorRate)))"
        }
        if let p99 = canary.p99, let old = oldP99, old > .zero,
           Double(p99.nanoseconds) > Double(old.nanoseconds) * settings.maxP99Ratio {
            return "p99 \(formatSeconds(p99, decimals: 3))s against \(formatSeconds(old, decimals: 3))s on the old revision "
                + "(max_p99_ratio \(settings.maxP99Ratio))"
        }
        return nil
    }

    // MARK: Internals

    private mutating func nextStep(_ commands: inout [Command]) {
        let step = steps[index]
        commands.append(.log(LogRecord(level: .notice, slot: step.slot, pid: nil,
                                       message: "rollout: device \(step.device) done (\(index + 1)/\(steps.count))"
                                           + (isRollback ? ", rolled back" : ""), reason: nil)))
        index += 1
        phase = nil
    }

    private mutating func finish(_ commands: inout [Command]) {
        state = isRollback ? .rolledBack : .complete
        phase = nil
        commands.append(.log(LogRecord(level: isRollback ? .warning : .notice, slot: nil, pid: nil,
                                       message: isRollback ? "rollout rolled back: \(reason ?? "")"
                                           : "rollout complete (\(steps.count) device(s))", reason: nil)))
        commands.append(.ended(state, reason: reason))
    }

    private mutating func fail(_ why: String, _ commands: inout [Command]) {
        commands.append(.log(LogRecord(level: .error, slot: currentSlot, pid: nil,
                                       message: (isRollback ? "rollback failed: " : "rollout failed: ") + why,
                                       reason: "rollout")))
        if isRollback {
            // Nothing better to go back to: stop here and say so.
            reason = "rollback failed: \(why)"
            pausedFrom = nil
            state = .paused
            commands.append(.ended(.paused, reason: reason))
            return
        }
        startRollback(reason: why)
    }

    /// A supervisor restarted in the middle of an upgrade: `steps` are every device of it, the first `done`
    /// of them already on the new spec. It comes back paused: `resume` goes on, `undo` rolls back.
    public mutating func restore(steps: [Step], done: Int, reason why: String) {
        kind = .upgrade
        self.steps = steps
        index = min(done, steps.count)
        phase = nil
        isRollback = false
        reason = why
        pausedFrom = .progressing
        state = .paused
    }

    private mutating func startRollback(reason why: String) {
        // Undo every device touched, the current one first: its previous spec back.
        let touched = index < steps.count && phase != nil ? index + 1 : min(index, steps.count)
        steps = steps[..<touched].reversed().map { Step(slot: $0.slot, device: $0.device, from: $0.to, to: $0.from) }
        index = 0
        phase = nil
        isRollback = true
        reason = why
        pausedFrom = nil
        state = .rollingBack  // with no step to undo, the next turn finishes it at once
    }
}

func percent(_ fraction: Double) -> String {
    let tenths = Int((fraction * 1000).rounded())
    return "\(tenths / 10).\(tenths % 10)%"
}

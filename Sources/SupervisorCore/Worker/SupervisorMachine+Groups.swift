/// Tensor-parallel groups: one replica over several devices, one process (rank) per device, started, watched and
/// restarted as one unit.
///
/// Each rank is a slot like any worker (its own process, channel, heartbeats, device probe), but its lifecycle
/// never restarts it on its own (its policy is `never`): the group's lifecycle (a ``WorkerStateMachine`` whose
/// "process" is the whole set of ranks, with the group's backoff and restart intensity) decides. When any rank's
/// process goes away unasked (exit, crash, OOM kill, a fault the supervisor killed it for), the group is broken:
/// the other ranks are stopped (SIGTERM, SIGKILL after `stop_timeout`, as their collective is gone), and once
/// every rank is gone the group's lifecycle decides the restart of all of them together. Only rank 0, the leader,
/// is ever routed to, and only while every rank is ready.
///
/// ```
///   rank exits ──► cause = (rank, reason) ──► group lifecycle: stopping(TERM) ──► other ranks stopped
///                                                     │ every rank gone
///                                                     ▼
///                          leader's requests retried (by the cause) ──► backoff / failed / spawn every rank
/// ```
extension SupervisorMachine {
    /// One tensor-parallel group.
    public struct Group: Sendable {
        public internal(set) var spec: GroupSpec
        /// The ranks' slots in rank order; `slots[0]` is the leader.
        public internal(set) var slots: [Int]
        /// The group as one unit: backoff, restart intensity, `failed`, the operator's start/stop/restart. Its
        /// "pid" is ``incarnation``.
        public internal(set) var lifecycle: WorkerStateMachine
        /// Rises with every start of the group; the runtime gives each a fresh `MASTER_PORT` and rank table.
        public internal(set) var incarnation: Int32 = 0
        /// What broke the group most recently: the rank, its device and why (kept for status after the restart).
        public internal(set) var cause: Cause?
        /// ``cause`` was found in this episode (since the group's last start): only then does it explain the
        /// group's exit and its ranks' consequences.
        var isBroken = false
        /// Ranks the group itself stopped in this episode (their exits are consequences, not causes).
        var stoppedByGroup: Set<Int> = []
        /// The spec sets a rolling upgrade moves between (leader's spec first), by the leader's spec.
        var rolloutSpecs: [[WorkerSpec]] = []

        public var leader: Int { slots[0] }

        public struct Cause: Sendable, Hashable {
            public var rank: Int
            public var device: String
            public var reason: ExitReason
            public var detail: String
        }

        init(spec: GroupSpec, slots: [Int]) {
            self.spec = spec
            self.slots = slots
            self.lifecycle = WorkerStateMachine(policy: spec.policy)
        }
    }

    /// Builds the groups from the configuration (their ranks' slots are already in ``workers``).
    static func makeGroups(_ config: SupervisorConfiguration, workers: inout [Worker]) -> [Group] {
        config.groups.enumerated().map { index, spec in
            let slots = spec.devices.map { device in
                workers.firstIndex { $0.spec.device == device && $0.spec.rank?.group == spec.id }!
            }
            for slot in slots { workers[slot].joinGroup(index) }
            return Group(spec: spec, slots: slots)
        }
    }

    // MARK: The group's decisions carried out

    /// Carries out a decision of the group's lifecycle on its ranks.
    mutating func performGroup(_ action: WorkerStateMachine.Action?, group g: Int, now: MonotonicInstant) {
        switch action {
        case .spawn?:
            startRanks(g, now: now)
        case .signalGroup(let signal)?:
            for slot in groups[g].slots where workers[slot].lifecycle.pid != nil || workers[slot].isSpawnPending {
                if signal == SIGKILL_ {
                    // The group's own SIGKILL step: ranks still running unasked (a start that outlived the group's
                    // start_timeout backstop) are killed; ranks already stopping have their own SIGKILL timer.
                    switch workers[slot].lifecycle.state {
                    case .starting, .ready:
                        groups[g].stoppedByGroup.insert(slot)
                        perform(workers[slot].lifecycle.fault(.startTimeout, now: now), on: slot)
                    default: break
                    }
                } else {
                    // A rank already stopping is being killed for a fault of its own or held failed for its
                    // device: left alone (stopping it again would forget that), and its exit still a cause.
                    if case .stopping = workers[slot].lifecycle.state { continue }
                    groups[g].stoppedByGroup.insert(slot)
                    perform(workers[slot].lifecycle.stop(now: now), on: slot)
                }
            }
            // Nothing left to stop (every rank already gone or never started): the group's exit is now.
            if groups[g].lifecycle.pid != nil, groups[g].slots.allSatisfy({ isGone($0) }) { groupGone(g, now: now) }
        case nil:
            break
        }
        healthDirty = true
    }

    /// Starts every rank of the group: a new incarnation (new `MASTER_PORT`, new rank table).
    mutating func startRanks(_ g: Int, now: MonotonicInstant) {
        groups[g].incarnation += 1
        groups[g].stoppedByGroup = []
        groups[g].isBroken = false
        guard groups[g].lifecycle.spawned(pid: groups[g].incarnation, now: now) else { return }
        emit(.prepareGroup(group: g, incarnation: groups[g].incarnation))
        log(.info, groups[g].leader, "group \(groups[g].spec.id): starting \(groups[g].slots.count) ranks "
            + "(devices \(groups[g].spec.devices.joined(separator: ",")))")
        spawningGroup = true
        defer { spawningGroup = false }
        for slot in groups[g].slots {
            perform(workers[slot].lifecycle.start(now: now), on: slot)
        }
    }

    /// A rank's process is gone (reaped, or never started). Decides whether it broke the group and, once every
    /// rank is gone, what happens to the group.
    /// - Parameter killedUnasked: the rank was asked to stop by its group, but a signal from elsewhere killed it
    ///   (its own evidence of being the cause).
    mutating func rankGone(_ slot: Int, killedUnasked: ExitReason? = nil, now: MonotonicInstant) {
        guard let g = workers[slot].groupIndex else { return }
        let rank = workers[slot].spec.rank?.rank ?? 0
        if let reason = killedUnasked ?? (groups[g].stoppedByGroup.contains(slot) ? nil : workers[slot].lifecycle.lastExit) {
            let cause = Group.Cause(rank: rank, device: workers[slot].spec.device, reason: reason,
                                    detail: killedUnasked == nil ? workers[slot].lastExitDetail ?? reason.detail : reason.detail)
            switch groups[g].lifecycle.state {
            case .starting, .ready:
                groups[g].cause = cause
                groups[g].isBroken = true
                log(.error, slot, "group \(groups[g].spec.id): rank \(rank) (device \(cause.device)) \(cause.detail); "
                    + "stopping the other ranks (their collective is broken) to restart the group",
                    reason: reason.description)
                performGroup(groups[g].lifecycle.partFailed(reason, now: now), group: g, now: now)
            case .stopping where groups[g].lifecycle.desired == .up:
                // Another rank went down on its own in the same episode: the one with the clearer evidence is the
                // cause (a rank killed by a signal or judged by the supervisor, not the one that exited after it
                // lost its peer).
                if groups[g].isBroken, let previous = groups[g].cause,
                   Self.evidence(reason) > Self.evidence(previous.reason) {
                    groups[g].cause = cause
                    groups[g].lifecycle.reattribute(reason)
                    log(.notice, slot, "group \(groups[g].spec.id): rank \(rank) (device \(cause.device)) \(cause.detail); "
                        + "it, not rank \(previous.rank), broke the group")
                    // The rank first taken for the cause exited because of this one: a consequence.
                    let first = groups[g].slots[previous.rank]
                    if let last = workers[first].lifecycle.lastExit {
                        workers[first].exitNote = (last, "\(workers[first].lastExitDetail ?? last.detail), after its group "
                            + "broke: rank \(rank) (device \(cause.device)) \(reason)")
                    }
                }
            default:
                break
            }
        } else if groups[g].isBroken, let cause = groups[g].cause, workers[slot].lifecycle.lastExit != nil {
            workers[slot].exitNote = (workers[slot].lifecycle.lastExit!,
                                      "stopped with its group: rank \(cause.rank) (device \(cause.device)) \(cause.reason)")
        }
        if groups[g].lifecycle.pid != nil, groups[g].slots.allSatisfy({ isGone($0) }) { groupGone(g, now: now) }
    }

    /// How clearly an exit names its own rank as the cause: a supervisor verdict or a signal from outside beats a
    /// plain exit code (a rank exits by itself once it lost its peer).
    static func evidence(_ reason: ExitReason) -> Int {
        switch reason {
        case .stopped, .exited(0): 0
        case .exited, .spawnFailed: 1
        default: 2
        }
    }

    func isGone(_ slot: Int) -> Bool {
        workers[slot].lifecycle.pid == nil && !workers[slot].isSpawnPending && workers[slot].reapedExit == nil
    }

    /// Every rank is gone: the group's lifecycle decides (restart at once, back off, fail), and the leader's
    /// requests are retried or answered by what broke the group.
    mutating func groupGone(_ g: Int, now: MonotonicInstant) {
        let cause = groups[g].isBroken ? groups[g].cause : nil
        if groups[g].lifecycle.desired == .up,
           let held = groups[g].slots.first(where: { workers[$0].isHeldFailedForDevice }) {
            // A rank's device failed its probe after the group was already restarted for it: hold the group
            // failed until the device recovers (DeviceHealth starts the rank's worker again, which starts the group).
            _ = groups[g].lifecycle.holdFailed(workers[held].lifecycle.lastExit ?? .deviceUnhealthy("device probe"), now: now)
        }
        let observed = cause?.reason ?? .stopped
        let action = groups[g].lifecycle.exited(observed, now: now, jitter: groupJitter)
        let reason = groups[g].lifecycle.lastExit ?? observed
        emit(.failInflight(slot: groups[g].leader, cause: RetryPolicy.lossCause(reason)))
        if reason != .stopped {
            emit(.groupExitRecorded(group: g, reason: reason))
            // Per device, only the rank that broke the group counts an exit (the others' are consequences).
            if let cause { emit(.exitRecorded(slot: groups[g].slots[cause.rank], reason: cause.reason)) }
        }
        logGroupTransition(g, now: now)
        performGroup(action, group: g, now: now)
        queueWork.formUnion([.answerHopeless, .dispatch])
        workerGoneDuringShutdown()
    }

    mutating func logGroupTransition(_ g: Int, now: MonotonicInstant) {
        let machine = groups[g].lifecycle
        guard let reason = machine.lastExit else { return }
        var message = "group \(groups[g].spec.id) "
            + ((groups[g].isBroken ? groups[g].cause : nil).map { reason == .stopped ? "stopped" : "down: rank \($0.rank) (device \($0.device)) \($0.reason)" }
                ?? "stopped")
            + " → \(machine.stateName)"
        switch machine.state {
        case .backoff(let until):
            message += "; restart #\(machine.restarts) of the group in \(formatSeconds(until - now, decimals: 2))s"
        case .failed(let retry?):
            message += "; too many restarts (\(machine.policy.maxRestarts) in \(machine.policy.restartWindow.configString)), "
                + "group marked failed, next try in \((retry - now).nanoseconds / 1_000_000_000)s or on `npu-supervisorctl start "
                + "\(groups[g].spec.id)`"
        case .failed(nil):
            if case .exited(78) = reason {
                message += "; not restarted (a rank exited 78: fix its configuration, then `npu-supervisorctl start "
                    + "\(groups[g].spec.id)`)"
            } else {
                message += "; held failed while a rank's device probe fails"
            }
        case .stopped where machine.desired == .up:
            message += "; not restarted (restart policy)"
        default:
            break
        }
        let level: LogRecord.Level = reason == .stopped || machine.desired == .down ? .info : .error
        log(level, groups[g].leader, message, reason: reason.description)
    }

    /// A rank said ready: the group is ready (and its leader in rotation) when every rank is.
    mutating func rankReady(_ slot: Int, now: MonotonicInstant) {
        guard let g = workers[slot].groupIndex,
              groups[g].slots.allSatisfy({ workers[$0].lifecycle.isReady }) else { return }
        let since: MonotonicInstant? = if case .starting(_, let since) = groups[g].lifecycle.state { since } else { nil }
        guard groups[g].lifecycle.readyReceived(now: now) else { return }
        log(.notice, groups[g].leader, "group \(groups[g].spec.id) ready: \(groups[g].slots.count) ranks after "
            + "\(formatSeconds(since.map { now - $0 } ?? .zero, decimals: 3))s")
        healthDirty = true
    }

    /// The group's own deadlines: backoff over, failed retry, the start_timeout backstop, its stop step.
    mutating func groupTimers(_ g: Int, now: MonotonicInstant) {
        guard let deadline = groups[g].lifecycle.nextDeadline, now >= deadline else { return }
        let before = groups[g].lifecycle.stateName
        let action = groups[g].lifecycle.timerFired(now: now)
        if before == "failed", action == .spawn { log(.notice, groups[g].leader, "group \(groups[g].spec.id): retrying the failed group") }
        if before == "starting", action != nil {
            groups[g].cause = nil  // the group itself was late, not one rank
            log(.error, groups[g].leader, "group \(groups[g].spec.id) not ready within start_timeout; killing its ranks",
                reason: "start_timeout")
        }
        performGroup(action, group: g, now: now)
    }

    /// Whether the group's leader may be routed to: the group is ready and so is every rank (channel open,
    /// taking writes, its device in rotation).
    func groupIsOpen(_ g: Int) -> Bool {
        guard groups[g].lifecycle.isReady else { return false }
        return groups[g].slots.allSatisfy { slot in
            let w = workers[slot]
            return w.lifecycle.isReady && w.isChannelOpen && w.unwritableSince == nil && !w.device.isOutOfRotation
                && !w.isRetired
        }
    }

    /// The operator's verbs on a group (a rank's device id names its group: a rank cannot run alone).
    mutating func controlGroup(_ verb: ControlVerb, group g: Int, now: MonotonicInstant) {
        let action: WorkerStateMachine.Action? = switch verb {
        case .start: groups[g].lifecycle.start(now: now)
        case .stop: groups[g].lifecycle.stop(now: now)
        default: groups[g].lifecycle.restart(now: now)
        }
        if verb != .start { groups[g].cause = nil }
        performGroup(action, group: g, now: now)
    }

    /// The slot requests for this slot go to: a rank's group leader, else the slot itself.
    public func routingSlot(_ slot: Int) -> Int {
        workers[slot].groupIndex.map { groups[$0].leader } ?? slot
    }
}

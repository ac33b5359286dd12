/// Changing what runs: drain and undrain, rolling restarts, reloads (in place where possible, rolled where the
/// worker process must change), and the rollout's commands applied to the workers.
extension SupervisorMachine {
    // MARK: Hot path

    /// A request answered by the slot's worker (ok or an error), with its latency: counted for the rollout's
    /// gates. A few integer operations; no allocation.
    @inline(__always)
    public mutating func requestFinished(slot: Int, ok: Bool, latencyNanoseconds: Int64) {
        workers[slot].stats.record(ok: ok, latencyNanoseconds: latencyNanoseconds)
    }

    // MARK: Drain

    mutating func drain(_ slots: [Int], byOperator: Bool, until: MonotonicInstant? = nil, now: MonotonicInstant) {
        // Draining is about routing: a group is drained by its leader, whichever of its devices is named.
        for slot in uniqueRoutingSlots(slots) where !workers[slot].isRetired {
            switch workers[slot].drain {
            case .none:
                let held = router.inflight[slot]
                if held == 0 {
                    workers[slot].drain = .drained(byOperator: byOperator)
                } else {
                    workers[slot].drain = .draining(until: until ?? now + rollout.settings.drainTimeout,
                                                    byOperator: byOperator)
                    router.setDraining(slot, true)
                }
                log(.notice, slot, "drain: out of rotation" + (held > 0 ? "; \(held) request(s) finishing" : "")
                    + (byOperator ? "" : " (rollout)"))
            case .draining(let until, let by):
                workers[slot].drain = .draining(until: until, byOperator: by || byOperator)
            case .drained(let by):
                workers[slot].drain = .drained(byOperator: by || byOperator)
            }
        }
        healthDirty = true
    }

    mutating func undrain(_ slots: [Int], now: MonotonicInstant) {
        for slot in uniqueRoutingSlots(slots) where workers[slot].drain != .none && !workers[slot].isRetired {
            workers[slot].drain = .none
            router.setDraining(slot, false)
            log(.notice, slot, "undrain: back in rotation")
        }
        queueWork.insert(.dispatch)
        healthDirty = true
    }

    mutating func drainSettled(_ slot: Int) {
        guard case .draining(_, let by) = workers[slot].drain else { return }
        workers[slot].drain = .drained(byOperator: by)
        router.setDraining(slot, false)
    }

    /// A drain that outlived `drain_timeout` counts as drained (its remaining requests still run).
    mutating func drainTimers(_ slot: Int, now: MonotonicInstant) {
        guard case .draining(let until, let by) = workers[slot].drain, now >= until else { return }
        log(.warning, slot, "drain_timeout passed with \(router.inflight[slot]) request(s) still held")
        workers[slot].drain = .drained(byOperator: by)
        router.setDraining(slot, false)
    }

    // MARK: Rolling restart and rollout control

    /// Why the last rolling restart or reload was refused (read by the runtime to answer its caller).
    public var refusal: String? { lastRefusal }

    /// The slots requests go to, each once, in the order named (a group's devices name its leader).
    func uniqueRoutingSlots(_ slots: [Int]) -> [Int] {
        var seen: Set<Int> = []
        return slots.map { routingSlot($0) }.filter { seen.insert($0).inserted }
    }

    /// The id a rollout step shows: the device, or a group's id.
    func unitName(_ slot: Int) -> String {
        workers[slot].groupIndex.map { groups[$0].spec.id } ?? workers[slot].spec.device
    }

    /// The wanted state of the unit a slot belongs to (its group's for a rank).
    func unitDesired(_ slot: Int) -> WorkerStateMachine.Desired {
        workers[slot].groupIndex.map { groups[$0].lifecycle.desired } ?? workers[slot].lifecycle.desired
    }

    mutating func rollingRestart(_ slots: [Int], now: MonotonicInstant) {
        lastRefusal = nil
        // A group is one step: its ranks are replaced together.
        let steps = uniqueRoutingSlots(slots).filter { !workers[$0].isRetired && !workers[$0].isFallback && unitDesired($0) == .up }
            .map { Rollout.Step(slot: $0, device: unitName($0), from: workers[$0].spec, to: workers[$0].spec) }
        if let why = rollout.begin(.restart, steps: steps, now: now) {
            lastRefusal = why
            return
        }
        log(.notice, nil, "rolling restart of \(steps.map(\.device).joined(separator: ", ")), "
            + "canary \(rollout.canary ?? "-")")
        emit(.persistRollout)
    }

    mutating func rolloutPause(now: MonotonicInstant) {
        lastRefusal = nil
        if rollout.pause(reason: "paused by the operator") {
            log(.notice, nil, "rollout paused (\(rollout.progress))")
            emit(.persistRollout)
        } else {
            lastRefusal = "no rollout in progress (state \(rollout.state.rawValue))"
        }
    }

    mutating func rolloutResume(now: MonotonicInstant) {
        lastRefusal = nil
        if rollout.resume() {
            log(.notice, nil, "rollout resumed (\(rollout.progress))")
            emit(.persistRollout)
        } else {
            lastRefusal = "no paused rollout to resume (state \(rollout.state.rawValue))"
        }
    }

    mutating func rolloutUndo(now: MonotonicInstant) {
        lastRefusal = nil
        if rollout.undo(reason: "undone by the operator", now: now) {
            log(.warning, nil, "rollout undo: rolling back \(rollout.steps.count) device(s)")
            emit(.persistRollout)
        } else {
            lastRefusal = "nothing to undo (state \(rollout.state.rawValue))"
        }
    }

    /// One turn of the rollout: look at the workers, carry out what it decides.
    mutating func advanceRollout(now: MonotonicInstant) {
        let snapshot = workers
        let inflight = router.inflight
        let groupOpen = groups.indices.map { groupIsOpen($0) }
        let groupHasProcess = groups.map { group in group.slots.contains { !isGone($0) } }
        let groupSnapshot = groups
        let changing = Set(rollout.steps.map(\.slot))
        var old = [Int](repeating: 0, count: RequestStats.bucketCount)
        for (slot, worker) in snapshot.enumerated()
        where !changing.contains(slot) && !worker.isFallback && !worker.isRetired {
            RequestStats.merge(worker.stats, into: &old)
        }
        let oldP99 = old.reduce(0, +) >= rollout.settings.minRequests ? RequestStats.p99(of: old) : nil
        let commands = rollout.advance(now: now, view: { slot in
            let worker = snapshot[slot]
            let isDrained: Bool = switch worker.drain {
            case .drained: true
            case .draining: inflight[slot] == 0
            case .none: inflight[slot] == 0
            }
            if let g = worker.groupIndex {
                // A group's step: every rank ready, any rank's process counts, the group's exits.
                let group = groupSnapshot[g]
                return Rollout.WorkerView(
                    isReady: groupOpen[g], hasProcess: groupHasProcess[g],
                    exits: group.lifecycle.exitCounts.values.reduce(0, +),
                    lastExit: group.lifecycle.lastExit?.description, isDrained: isDrained,
                    ok: worker.stats.ok, failed: worker.stats.failed, p99: worker.stats.p99)
            }
            return Rollout.WorkerView(
                isReady: worker.lifecycle.isReady && worker.isChannelOpen && !worker.device.isOutOfRotation,
                hasProcess: worker.lifecycle.pid != nil || worker.isSpawnPending,
                exits: worker.lifecycle.exitCounts.values.reduce(0, +),
                lastExit: worker.lifecycle.lastExit?.description, isDrained: isDrained,
                ok: worker.stats.ok, failed: worker.stats.failed, p99: worker.stats.p99)
        }, oldP99: { oldP99 })
        for command in commands { apply(command, now: now) }
    }

    mutating func apply(_ command: Rollout.Command, now: MonotonicInstant) {
        switch command {
        case .drain(let slot, let until):
            drain([slot], byOperator: false, until: until, now: now)
        case .stop(let slot):
            if let g = workers[slot].groupIndex {
                performGroup(groups[g].lifecycle.stop(now: now), group: g, now: now)
            } else {
                perform(workers[slot].lifecycle.stop(now: now), on: slot)
            }
        case .start(let slot, let spec):
            if let g = workers[slot].groupIndex {
                // Every rank gets the spec set this step moves to (the leader's spec names it).
                if let set = groups[g].rolloutSpecs.first(where: { $0.first == spec }) {
                    for (rank, rankSpec) in set.enumerated() { replaceSpec(groups[g].slots[rank], with: rankSpec) }
                } else {
                    replaceSpec(slot, with: spec)
                }
                emit(.persistRollout)
                if case .drained(byOperator: false) = workers[slot].drain { workers[slot].drain = .none }
                if case .draining(_, byOperator: false) = workers[slot].drain { workers[slot].drain = .none }
                router.setDraining(slot, false)
                performGroup(groups[g].lifecycle.start(now: now), group: g, now: now)
                break
            }
            replaceSpec(slot, with: spec)
            emit(.persistRollout)  // the device's recorded revision changes now
            if case .drained(byOperator: false) = workers[slot].drain { workers[slot].drain = .none }
            if case .draining(_, byOperator: false) = workers[slot].drain { workers[slot].drain = .none }
            router.setDraining(slot, false)
            perform(workers[slot].lifecycle.start(now: now), on: slot)
        case .resetStats:
            for slot in workers.indices { workers[slot].stats = RequestStats() }
        case .log(let record):
            emit(.log(record))
        case .ended(let state, let reason):
            emit(.rolloutEnded(state, reason: reason))
            emit(.persistRollout)
            if reloadInProgress {
                reloadInProgress = false
                let ok = state == .complete
                finishReload(ok: ok, message: ok ? "reload applied: rollout complete (\(rollout.steps.count) device(s))"
                    : "reload failed: \(reason ?? state.rawValue)")
            }
        }
        healthDirty = true
    }

    /// Gives the slot a new spec: a new generation when the process changes, the settings in place otherwise.
    mutating func replaceSpec(_ slot: Int, with spec: WorkerSpec) {
        let old = workers[slot].spec
        if !old.isSameRevision(as: spec) { workers[slot].generation += 1 }
        workers[slot].spec = spec
        workers[slot].lifecycle.policy = Worker.lifecyclePolicy(spec)
        workers[slot].liveness.update(heartbeatInterval: spec.heartbeatInterval, heartbeatTimeout: spec.heartbeatTimeout)
        workers[slot].device.update(spec: spec.deviceProbe, heartbeatInterval: spec.heartbeatInterval,
                                    heartbeatTimeout: spec.heartbeatTimeout)
        workers[slot].inference.update(spec: spec.inferenceProbe)
        router.setMaxInflight(slot, spec.maxInflight)
    }

    mutating func restoreRollout(previous: [Int: WorkerSpec], onPrevious: Set<Int>) {
        guard isBooting, !previous.isEmpty else { return }
        var previous = previous
        var onPrevious = onPrevious
        // A group is one step, by its leader: its ranks move between the two spec sets together.
        for g in groups.indices where groups[g].slots.contains(where: { previous[$0] != nil }) {
            let old = groups[g].slots.map { previous[$0] ?? workers[$0].spec }
            let new = groups[g].slots.map { workers[$0].spec }
            groups[g].rolloutSpecs = [new, old]
            let wasOnPrevious = groups[g].slots.contains { onPrevious.contains($0) }
            for slot in groups[g].slots.dropFirst() {
                previous[slot] = nil
                onPrevious.remove(slot)
            }
            previous[groups[g].leader] = old[0]
            if wasOnPrevious {
                onPrevious.insert(groups[g].leader)
                for (rank, slot) in groups[g].slots.enumerated().dropFirst() {
                    replaceSpec(slot, with: old[rank])
                    workers[slot].generation = 1
                }
            } else {
                onPrevious.remove(groups[g].leader)
                for slot in groups[g].slots.dropFirst() { workers[slot].generation = 2 }
            }
        }
        let slots = previous.keys.sorted()
        let steps = slots.map { Rollout.Step(slot: $0, device: unitName($0), from: previous[$0]!, to: workers[$0].spec) }
        for slot in onPrevious where previous[slot] != nil {
            replaceSpec(slot, with: previous[slot]!)
            workers[slot].generation = 1
        }
        for slot in slots where !onPrevious.contains(slot) { workers[slot].generation = 2 }
        // The devices already changed come first in the file's order, as the rollout changed them.
        let ordered = steps.filter { !onPrevious.contains($0.slot) } + steps.filter { onPrevious.contains($0.slot) }
        let done = ordered.count - onPrevious.intersection(slots).count
        rollout.restore(steps: ordered, done: done,
                        reason: "the supervisor restarted during this upgrade (\(done)/\(ordered.count) devices on the new "
                            + "revision): `npu-supervisorctl rollout resume` goes on, `rollout undo` rolls back")
        log(.warning, nil, "rollout restored paused: \(rollout.reason ?? "")")
    }

    // MARK: Reload

    mutating func reloadBegan(now: MonotonicInstant) {
        let began = readiness.reloadBegan(monotonicMicroseconds: UInt64(max(0, now.nanoseconds / 1000)), now: now)
        for message in began { emit(.notify(message)) }
    }

    mutating func reloadFailed(_ why: String, now: MonotonicInstant) {
        log(.error, nil, "reload refused, nothing changed: \(why)")
        finishReload(ok: false, message: "reload refused, nothing changed: \(why)")
    }

    mutating func finishReload(ok: Bool, message: String) {
        for notification in readiness.reloadFinished(summary: aggregate().1) { emit(.notify(notification)) }
        emit(.reloadDone(ok: ok, message: message))
    }

    /// Applies a validated configuration: in place where the worker process stays the same, a rollout where
    /// it must change, new devices started, removed ones stopped.
    mutating func reload(_ new: SupervisorConfiguration, now: MonotonicInstant) {
        lastRefusal = nil
        guard !isShuttingDown else {
            reloadFailed("the supervisor is shutting down", now: now)
            return
        }
        guard !rollout.isActive && rollout.state != .paused else {
            lastRefusal = "a rollout is \(rollout.state.rawValue) (\(rollout.progress)); finish or undo it first"
            reloadFailed(lastRefusal!, now: now)
            return
        }
        // A group's shape (its devices, their visibility, the rank table) is fixed while it runs: its ranks share
        // one collective, and a device cannot move between a group and a single worker under live traffic.
        let shape = { (g: GroupSpec) in "\(g.id)=\(g.devices.joined(separator: ","))/\(g.visibleDevices)/\(g.rankTable)" }
        guard groups.map({ shape($0.spec) }) == new.groups.map(shape) else {
            lastRefusal = "the [[group]] tables changed shape (ids, devices, visible_devices or rank_table): that needs a "
                + "restart of the supervisor; a group's other keys can be reloaded"
            reloadFailed(lastRefusal!, now: now)
            return
        }
        var inPlace: [String] = []
        var added: [String] = []
        var removed: [String] = []
        var steps: [Rollout.Step] = []
        let wanted = new.workers + (new.fallback?.workers ?? [])
        let ids = Set(wanted.map(\.device))
        for (g, newGroup) in new.groups.enumerated() {
            let newSpecs = new.workers.filter { $0.rank?.group == newGroup.id }.sorted { $0.rank!.rank < $1.rank!.rank }
            let oldSpecs = groups[g].slots.map { workers[$0].spec }
            groups[g].spec = newGroup
            groups[g].lifecycle.policy = newGroup.policy
            if newSpecs == oldSpecs { continue }
            let running = groups[g].slots.contains { !isGone($0) }
            if !running || zip(oldSpecs, newSpecs).allSatisfy({ $0.isSameRevision(as: $1) }) {
                for (rank, spec) in newSpecs.enumerated() { replaceSpec(groups[g].slots[rank], with: spec) }
                inPlace.append(newGroup.id)
            } else {
                // One step for the whole group: its ranks are stopped and started together on the new specs.
                groups[g].rolloutSpecs = [newSpecs, oldSpecs]
                steps.append(Rollout.Step(slot: groups[g].leader, device: newGroup.id, from: oldSpecs[0], to: newSpecs[0]))
            }
        }
        for spec in wanted where spec.rank == nil {
            if let slot = workers.firstIndex(where: { $0.spec.device == spec.device && !$0.isRetired }) {
                if workers[slot].spec == spec { continue }
                if workers[slot].spec.isSameRevision(as: spec) || workers[slot].lifecycle.pid == nil {
                    // Same process (or none running): the new settings apply at once.
                    replaceSpec(slot, with: spec)
                    inPlace.append(spec.device)
                } else {
                    steps.append(Rollout.Step(slot: slot, device: spec.device, from: workers[slot].spec, to: spec))
                }
            } else {
                workers.append(Worker(spec: spec, protocolVersion: protocolVersion))
                router.append(maxInflight: spec.maxInflight, isFallback: spec.isFallback)
                let slot = workers.count - 1
                added.append(spec.device)
                if !spec.isFallback && !isBooting {
                    workers[slot].device.boot(now: now)
                    perform(workers[slot].lifecycle.start(now: now), on: slot)
                }
            }
        }
        for slot in workers.indices where !workers[slot].isRetired && !ids.contains(workers[slot].spec.device) {
            workers[slot].isRetired = true
            workers[slot].device.stop()
            workers[slot].inference.stop()
            router.setHopeful(slot, false)
            perform(workers[slot].lifecycle.stop(now: now), on: slot)
            removed.append(workers[slot].spec.device)
        }
        config = new
        rollout.settings = new.rollout
        if let spec = new.fallback {
            fallback?.update(whenFewerThan: spec.whenFewerThan, stopAfter: spec.stopAfter)
            if fallback == nil {
                fallback = FallbackController(whenFewerThan: spec.whenFewerThan, stopAfter: spec.stopAfter)
            }
        }
        emit(.configChanged)
        var summary = "reload: \(inPlace.count) changed in place, \(added.count) added, \(removed.count) removed, "
            + "\(steps.count) to roll"
        if !added.isEmpty { summary += "; added \(added.joined(separator: ", "))" }
        if !removed.isEmpty { summary += "; removed \(removed.joined(separator: ", "))" }
        log(.notice, nil, summary)
        healthDirty = true
        if steps.isEmpty {
            finishReload(ok: true, message: summary)
            return
        }
        _ = rollout.begin(.upgrade, steps: steps, now: now)
        reloadInProgress = true
        log(.notice, nil, "rolling upgrade of \(steps.map(\.device).joined(separator: ", ")), canary \(rollout.canary ?? "-")")
        emit(.persistRollout)
    }
}

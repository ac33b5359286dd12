/// The health levels put together: device probe verdicts, inference probe verdicts, the CPU fallback, the
/// aggregated health and what status shows per worker.
extension SupervisorMachine {
    mutating func healthTimers(_ slot: Int, now: MonotonicInstant) {
        if let due = workers[slot].device.nextProbeAt, now >= due {
            switch workers[slot].device.due(now: now, worker: workers[slot].deviceView) {
            case .run:
                emit(.runDeviceProbe(slot: slot))
            case .startTrialWorker:
                log(.notice, slot, "re-probing the device with a trial worker")
                perform(workers[slot].lifecycle.start(now: now), on: slot)
            case .judged(let failure):
                deviceProbeResult(slot, failure: failure, now: now)
            case .none:
                break
            }
        }
        if let due = workers[slot].inference.nextProbeAt, now >= due {
            let worker = workers[slot]
            let step = workers[slot].inference.due(
                now: now, isServing: worker.lifecycle.isReady && worker.isChannelOpen && worker.gangOpen,
                isBusy: router.inflight[slot] >= router.maxInflight[slot])
            if step == .send { emit(.sendInferenceProbe(slot: slot)) }
        }
    }

    /// A device probe verdict: nil is healthy, else what is wrong.
    mutating func deviceProbeResult(_ slot: Int, failure: String?, now: MonotonicInstant) {
        let effects = workers[slot].device.result(failure: failure, worker: workers[slot].deviceView, now: now)
        for effect in effects {
            switch effect {
            case .backInRotation:
                log(.notice, slot, "device healthy again; back in rotation")
                queueWork.insert(.dispatch)
            case .restartHeldWorker:
                log(.notice, slot, "device recovered: starting its worker again")
                perform(workers[slot].lifecycle.start(now: now), on: slot)
            case .failedBelowThreshold(let count, let of, let why):
                log(.warning, slot, "device probe failed (\(count)/\(of)): \(why)")
            case .tookOutOfRotation(let why):
                log(.error, slot, "device unhealthy, out of rotation: \(why)", reason: "device_unhealthy")
            case .restartWorkerOnce(let why):
                log(.warning, slot, "restarting the worker once to try to clear the device fault")
                perform(workers[slot].lifecycle.fault(.deviceUnhealthy(why), now: now), on: slot)
            case .holdWorkerFailed(let why):
                log(.error, slot, "device still unhealthy after a worker restart: worker stopped, device marked "
                    + "failed, re-probed every \(workers[slot].spec.deviceProbe.failedInterval.configString)",
                    reason: "device_unhealthy")
                perform(workers[slot].lifecycle.holdFailed(.deviceUnhealthy(why), now: now), on: slot)
            }
        }
        healthDirty = true
        if !isShuttingDown {
            workers[slot].device.scheduleNext(now: now, heldFailed: workers[slot].lifecycle.isHeldFailed)
        }
    }

    mutating func inferenceProbeResult(_ slot: Int, failure: String?, now: MonotonicInstant) {
        let worker = workers[slot]
        let outcome = workers[slot].inference.result(
            failure: failure, isServing: worker.lifecycle.isReady && worker.isChannelOpen && worker.gangOpen, now: now)
        if isShuttingDown { workers[slot].inference.stop() }
        switch outcome {
        case .passed(again: true):
            log(.notice, slot, "inference probe passes again")
        case .passed, .ignored:
            break
        case .failed(let count, let of, let why, let unhealthy):
            log(.warning, slot, "inference probe failed (\(count)/\(of)): \(why)")
            if unhealthy {
                log(.error, slot, "worker unhealthy: \(of) inference probes failed in a row; restarting it",
                    reason: "unhealthy")
                perform(workers[slot].lifecycle.fault(.unhealthy, now: now), on: slot)
            }
        }
        healthDirty = true
    }

    /// Graceful degradation: CPU fallback workers while too few device workers can serve.
    mutating func evaluateFallback(now: MonotonicInstant) {
        guard var controller = fallback, !isShuttingDown else { return }
        // A group counts once, by its leader (its other ranks never serve).
        let devices = workers.filter { !$0.isFallback && !$0.isRetired && !$0.isFollower }
        let fallbackSlots = workers.indices.filter { workers[$0].isFallback && !workers[$0].isRetired }
        // Workers still on their very first model load count as coming: start-up is not an outage.
        let serving = devices.filter { $0.isServing || ($0.isStarting && !$0.hasBeenReady) }.count
        let wanted = devices.filter { worker in
            (worker.groupIndex.map { groups[$0].lifecycle.desired } ?? worker.lifecycle.desired) == .up
        }.count
        let decision = controller.evaluate(servingDeviceWorkers: serving, wantedDeviceWorkers: wanted, now: now)
        fallback = controller
        switch decision {
        case .start:
            log(.error, nil, "only \(serving) device worker(s) can serve: starting \(fallbackSlots.count) "
                + "CPU fallback worker(s); requests will be slow, not refused", reason: "fallback")
            for slot in fallbackSlots { perform(workers[slot].lifecycle.start(now: now), on: slot) }
        case .stop:
            log(.notice, nil, "device workers serve again: stopping the CPU fallback", reason: "fallback")
            for slot in fallbackSlots { perform(workers[slot].lifecycle.stop(now: now), on: slot) }
        case .none:
            break
        }
    }

    public var isFallbackActive: Bool { fallback?.isActive ?? false }

    /// The aggregated health and its one-line reason.
    public func aggregate() -> (OverallHealth, String) {
        let inputs = workers.filter { !$0.isRetired && !$0.isFollower }.map { worker in
            if let g = worker.groupIndex {
                // The group is one replica: one line, under its id, with the group's state and last cause.
                let group = groups[g]
                let outOfRotation = group.slots.lazy.compactMap { slot in
                    self.workers[slot].device.outOfRotationReason.map { "device \(self.workers[slot].spec.device): \($0)" }
                }.first
                return WorkerHealthInput(
                    device: group.spec.id, state: group.lifecycle.stateName, desiredUp: group.lifecycle.desired == .up,
                    isServing: worker.isServing,
                    lastExit: group.cause.map { "rank \($0.rank) \($0.reason)" } ?? group.lifecycle.lastExit?.description,
                    restarts: group.lifecycle.restarts, outOfRotation: outOfRotation, isDrained: worker.drain != .none)
            }
            return WorkerHealthInput(
                device: worker.spec.device, state: worker.lifecycle.stateName,
                desiredUp: worker.lifecycle.desired == .up, isServing: worker.isServing,
                lastExit: worker.lifecycle.lastExit?.description, restarts: worker.lifecycle.restarts,
                isFallback: worker.isFallback, outOfRotation: worker.device.outOfRotationReason,
                isDrained: worker.drain != .none)
        }
        return HealthAggregator.aggregate(inputs, minReady: config.minReady)
    }

    /// The four levels of one worker, as status shows them.
    public func healthLevels(_ slot: Int, now: MonotonicInstant) -> HealthLevels {
        let worker = workers[slot]
        let model: String = switch worker.lifecycle.state {
        case .ready: "ok"
        case .starting: "loading"
        default: "down"
        }
        return HealthLevels(
            alive: worker.liveness.level(isRunning: worker.lifecycle.pid != nil, isChannelOpen: worker.isChannelOpen,
                                         isReady: worker.lifecycle.isReady, now: now),
            device: worker.device.level, model: model,
            inference: worker.inference.level(isReady: worker.lifecycle.isReady), inRotation: worker.isServing)
    }
}

/// One worker's health levels (docs/PROTOCOL.md, status document `health`).
public struct HealthLevels: Sendable, Hashable {
    public var alive: String
    public var device: String
    public var model: String
    public var inference: String
    public var inRotation: Bool
}

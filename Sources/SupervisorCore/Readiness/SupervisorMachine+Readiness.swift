/// READY / STATUS / EXTEND / WATCHDOG / RELOADING, the operator's verbs, and the graceful shutdown.
extension SupervisorMachine {
    mutating func publishHealth() {
        let (health, line) = aggregate()
        let messages = readiness.healthPublished(isUnavailable: health == .unavailable, summary: line)
        for message in messages {
            if case .ready = message { log(.notice, nil, "ready: \(line)") }
            emit(.notify(message))
        }
    }

    mutating func timer(now: MonotonicInstant) {
        for slot in workers.indices {
            workerTimers(slot, now: now)
            healthTimers(slot, now: now)
            drainTimers(slot, now: now)
        }
        for g in groups.indices { groupTimers(g, now: now) }
        if let check = fallback?.nextCheck, now >= check { healthDirty = true }
        if let deadline = readiness.nextDeadline, now >= deadline {
            // The summary is only for the start-up grace message.
            let summary = readiness.hasSentReady ? nil : aggregate().1
            for message in readiness.timer(now: now, loading: isLoading || rollout.isActive, summary: summary) {
                if case .ready(let status) = message { log(.warning, nil, status) }
                emit(.notify(message))
            }
        }
    }

    /// The operator's start, stop, restart and shutdown (the runtime answers the read-only verbs itself).
    mutating func control(_ verb: ControlVerb, slots: [Int], uid: UInt32?, now: MonotonicInstant) {
        switch verb {
        case .start, .stop, .restart:
            guard !isShuttingDown else { return }
            var groupsDone: Set<Int> = []
            for slot in slots {
                if let g = workers[slot].groupIndex {
                    // A rank's device names its group: the ranks start, stop and restart together.
                    if groupsDone.insert(g).inserted {
                        log(.notice, groups[g].leader, "\(verb.rawValue) of group \(groups[g].spec.id) requested by uid \(uid ?? 0)")
                        controlGroup(verb, group: g, now: now)
                    }
                    continue
                }
                log(.notice, slot, "\(verb.rawValue) requested by uid \(uid ?? 0)")
                let action: WorkerStateMachine.Action? = switch verb {
                case .start: workers[slot].lifecycle.start(now: now)
                case .stop: workers[slot].lifecycle.stop(now: now)
                default: workers[slot].lifecycle.restart(now: now)
                }
                perform(action, on: slot)
            }
        case .shutdown:
            beginShutdown(reason: "shutdown requested by uid \(uid ?? 0)", requestsInFlight: requestsInFlight, now: now)
        case .drain:
            drain(slots, byOperator: true, now: now)
        case .undrain:
            undrain(slots, now: now)
        case .status, .health, .pid, .tail, .reload, .rollout:
            break
        }
    }

    mutating func beginShutdown(reason: String, requestsInFlight inFlight: Int, now: MonotonicInstant) {
        requestsInFlight = inFlight
        guard shutdown.requested(now: now, timeout: config.shutdownTimeout) else { return }
        log(.notice, nil, "shutting down: \(reason); draining \(inFlight) request(s)")
        for message in readiness.stopping(reason: reason) { emit(.notify(message)) }
        for slot in workers.indices {
            workers[slot].device.stop()
            workers[slot].inference.stop()
        }
        drainCheck(now: now)
    }

    /// Draining is over once nothing is in flight, the timeout passed, or no worker can answer any more.
    mutating func drainCheck(now: MonotonicInstant) {
        let anyServing = workers.contains { $0.lifecycle.isReady }
        guard shutdown.shouldStopWorkers(now: now, requestsInFlight: requestsInFlight, anyServing: anyServing)
        else { return }
        emit(.answerAllShuttingDown)
        for g in groups.indices { performGroup(groups[g].lifecycle.stop(now: now), group: g, now: now) }
        for slot in workers.indices { perform(workers[slot].lifecycle.stop(now: now), on: slot) }
        workerGoneDuringShutdown()
    }

    /// Shutdown completes once every worker is gone.
    mutating func workerGoneDuringShutdown() {
        guard shutdown.state == .stoppingWorkers,
              workers.allSatisfy({ $0.lifecycle.pid == nil && !$0.isSpawnPending }),
              groups.allSatisfy({ $0.lifecycle.pid == nil }) else { return }
        if shutdown.workersGone() { emit(.closeSockets) }
    }
}

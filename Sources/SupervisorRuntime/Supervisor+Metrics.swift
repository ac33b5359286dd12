import Glibc
import NIOCore
import SupervisorCore
import WireProtocol

/// `GET /metrics`: everything rendered at scrape time from the per-slot counters and the machine's state.
/// The list of names is in the README ("Monitoring") and docs/PROTOCOL.md.
extension Supervisor {
    func renderMetrics() -> [UInt8] {
        eventLoop.assertInEventLoop()
        let m = metrics
        let mono = Self.now()
        let nowNIO = NIODeadline.now()
        var wall = timespec()
        clock_gettime(CLOCK_REALTIME, &wall)
        let wallSeconds = Double(wall.tv_sec) + Double(wall.tv_nsec) / 1e9
        let devices = machine.workers.map(\.spec.device)
        m.grow(to: devices.count)
        /// The device label of an array index of `m` (0 is none).
        func device(_ index: Int) -> String {
            index == 0 ? "none" : index - 1 < devices.count ? devices[index - 1] : "slot\(index - 1)"
        }
        var e = Exposition()

        e.family("inference_requests_total", "counter",
                 "Final answers to inference requests by device (the worker that last held it; none when none did) and status (ok or the error code).")
        // Every status that counts is always present for every device and for none: rate() needs the zero.
        for index in 0...m.slotCount {
            for outcome in SupervisorMetrics.outcomes {
                let count = m.requests[index * SupervisorMetrics.outcomes.count + outcome.rawValue]
                if count > 0 || outcome == .ok || outcome.counts {
                    e.sample("inference_requests_total", [("device", device(index)), ("status", outcome.code)], Double(count))
                }
            }
        }
        e.family("inference_latency_seconds", "histogram",
                 "Time from accepting a request to its final answer, by the device that answered.")
        for index in 0...m.slotCount {
            e.histogram("inference_latency_seconds", [("device", device(index))], m.latency[index])
        }
        e.family("npu_supervisor_request_queue_seconds", "histogram",
                 "Time a request waited for a worker with room before its first dispatch (0 when one had room).")
        for index in 1..<(m.slotCount + 1) {
            e.histogram("npu_supervisor_request_queue_seconds", [("device", device(index))], m.queueTime[index])
        }
        e.family("npu_supervisor_time_to_first_chunk_seconds", "histogram",
                 "Time from accepting a streamed request to its first chunk reaching the client.")
        for index in 1..<(m.slotCount + 1) {
            e.histogram("npu_supervisor_time_to_first_chunk_seconds", [("device", device(index))], m.firstChunk[index])
        }

        e.family("npu_supervisor_requests_running", "gauge", "Requests a device's worker holds now.")
        for slot in devices.indices {
            e.sample("npu_supervisor_requests_running", [("device", devices[slot])], Double(machine.router.inflight[slot]))
        }
        e.family("npu_supervisor_requests_waiting", "gauge", "Requests queued for a worker with room.")
        e.sample("npu_supervisor_requests_waiting", [], Double(queuedCount))
        e.family("npu_supervisor_queue_depth", "gauge", "Requests waiting for a worker with room (same as requests_waiting).")
        e.sample("npu_supervisor_queue_depth", [], Double(queuedCount))

        let stateNames = ["stopped", "starting", "ready", "stopping", "backoff", "failed"]
        // A rank of a tensor-parallel group is up, wanted and held failed with its group (its followers never
        // take requests themselves, yet serve while the group does).
        func group(_ w: SupervisorMachine.Worker) -> SupervisorMachine.Group? { w.groupIndex.map { machine.groups[$0] } }
        e.family("npu_supervisor_worker_up", "gauge",
                 "1 when the device's worker is ready and in rotation (a group's rank: while its group is).")
        for (i, w) in machine.workers.enumerated() {
            let up = group(w).map { machine.workers[$0.leader].isServing } ?? w.isServing
            e.sample("npu_supervisor_worker_up", [("device", devices[i])], up ? 1 : 0)
        }
        e.family("npu_supervisor_worker_ready", "gauge", "1 when the device's worker process has said ready.")
        for (i, w) in machine.workers.enumerated() {
            e.sample("npu_supervisor_worker_ready", [("device", devices[i])], w.lifecycle.isReady ? 1 : 0)
        }
        e.family("npu_supervisor_worker_wanted", "gauge",
                 "1 when the worker should run (the operator wants it up; a CPU fallback worker only while the fallback is active).")
        for (i, w) in machine.workers.enumerated() {
            let desired = group(w)?.lifecycle.desired ?? w.lifecycle.desired
            e.sample("npu_supervisor_worker_wanted", [("device", devices[i])], desired == .up ? 1 : 0)
        }
        e.family("npu_supervisor_worker_fallback", "gauge", "1 for a CPU fallback slot, 0 for a device.")
        for (i, w) in machine.workers.enumerated() {
            e.sample("npu_supervisor_worker_fallback", [("device", devices[i])], w.isFallback ? 1 : 0)
        }
        e.family("npu_supervisor_worker_state", "gauge", "1 for the worker's current lifecycle state, 0 for the others.")
        for (i, w) in machine.workers.enumerated() {
            let current = w.lifecycle.stateName
            for name in stateNames {
                e.sample("npu_supervisor_worker_state", [("device", devices[i]), ("state", name)], current == name ? 1 : 0)
            }
        }
        e.family("npu_supervisor_worker_held_failed", "gauge",
                 "1 while the worker is held failed (restart intensity exceeded, or its device stayed unhealthy) although wanted up.")
        for (i, w) in machine.workers.enumerated() {
            var held = false
            let lifecycle = group(w)?.lifecycle ?? w.lifecycle
            if case .failed = lifecycle.state, lifecycle.desired == .up { held = true }
            e.sample("npu_supervisor_worker_held_failed", [("device", devices[i])], held ? 1 : 0)
        }
        e.family("npu_supervisor_device_healthy", "gauge",
                 "1 healthy (or not probed), 0 unhealthy, -1 unknown (no verdict yet, or the last probe could not run or timed out). Alert on != 1.")
        for (i, w) in machine.workers.enumerated() {
            let value: Double = switch (w.device.spec.kind, w.device.verdict) {
            case (.none, _): 1
            case (_, .ok): 1
            case (_, .bad): i < m.probeFailed.count && m.probeFailed[i] ? -1 : 0
            case (_, .unknown): -1
            }
            e.sample("npu_supervisor_device_healthy", [("device", devices[i])], value)
        }
        e.family("npu_supervisor_worker_restarts_total", "counter",
                 "Worker exits by reason (exited, signaled, oom_killed, hang, device_unhealthy, ...); each is followed by a restart unless held failed or stopped.")
        for i in devices.indices {
            var exits = m.exits[i + 1]
            for reason in SupervisorMetrics.restartReasons where exits[reason] == nil { exits[reason] = 0 }
            for (reason, count) in exits.sorted(by: { $0.key < $1.key }) {
                e.sample("npu_supervisor_worker_restarts_total", [("device", devices[i]), ("reason", reason)], Double(count))
            }
        }
        e.family("npu_supervisor_worker_start_time_seconds", "gauge",
                 "Unix time the device's current worker process was started (0 when none runs).")
        e.family("npu_supervisor_worker_uptime_seconds", "gauge", "Seconds since the current worker process was started.")
        for i in devices.indices where i < slots.count {
            let up = slots[i].spawnedAt.map { Double((nowNIO - $0).nanoseconds) / 1e9 }
            e.sample("npu_supervisor_worker_start_time_seconds", [("device", devices[i])], up.map { wallSeconds - $0 } ?? 0)
            e.sample("npu_supervisor_worker_uptime_seconds", [("device", devices[i])], up ?? 0)
        }
        if !machine.groups.isEmpty {
            e.family("npu_supervisor_group_up", "gauge",
                     "1 when the tensor-parallel group is in rotation (every rank ready, its leader taking requests).")
            for group in machine.groups {
                e.sample("npu_supervisor_group_up", [("group", group.spec.id)], machine.workers[group.leader].isServing ? 1 : 0)
            }
            e.family("npu_supervisor_group_ranks", "gauge", "The group's number of ranks (WORLD_SIZE).")
            for group in machine.groups {
                e.sample("npu_supervisor_group_ranks", [("group", group.spec.id)], Double(group.slots.count))
            }
            e.family("npu_supervisor_group_state", "gauge", "1 for the group's current state, 0 for the others.")
            for group in machine.groups {
                for name in stateNames {
                    e.sample("npu_supervisor_group_state", [("group", group.spec.id), ("state", name)],
                             group.lifecycle.stateName == name ? 1 : 0)
                }
            }
            e.family("npu_supervisor_group_restarts_total", "counter",
                     "Times the whole group went down by the cause's reason (its ranks are restarted together unless held failed).")
            for (g, group) in machine.groups.enumerated() {
                var exits = m.groupExits[g] ?? [:]
                for reason in SupervisorMetrics.restartReasons where exits[reason] == nil { exits[reason] = 0 }
                for (reason, count) in exits.sorted(by: { $0.key < $1.key }) {
                    e.sample("npu_supervisor_group_restarts_total", [("group", group.spec.id), ("reason", reason)], Double(count))
                }
            }
        }
        e.family("npu_supervisor_fallback_active", "gauge",
                 "1 while CPU fallback workers run because device workers cannot serve.")
        e.sample("npu_supervisor_fallback_active", [], machine.fallback?.isActive == true ? 1 : 0)
        e.family("npu_supervisor_requests_quarantined_total", "counter",
                 "Requests not retried because they were in flight on two workers that crashed (suspected of crashing them).")
        e.sample("npu_supervisor_requests_quarantined_total", [], Double(m.quarantined))
        e.family("npu_supervisor_rollouts_total", "counter", "Rolling restarts and upgrades by how they ended.")
        for result in Set(["complete", "rolled_back", "paused"]).union(m.rollouts.keys).sorted() {
            e.sample("npu_supervisor_rollouts_total", [("result", result)], Double(m.rollouts[result] ?? 0))
        }
        e.family("npu_supervisor_build_info", "gauge", "Always 1; the supervisor's release in the version label.")
        e.sample("npu_supervisor_build_info", [("version", Self.version)], 1)
        e.family("npu_supervisor_start_time_seconds", "gauge", "Unix time the supervisor started.")
        e.sample("npu_supervisor_start_time_seconds", [],
                 wallSeconds - Double((nowNIO - startedAt).nanoseconds) / 1e9)

        // The availability account (docs/PROTOCOL.md, status document `availability`).
        let account = machine.availability
        let (since, window) = account.figures(now: mono)
        e.family("npu_supervisor_availability_objective_ratio", "gauge", "The configured availability objective ([availability] objective).")
        e.sample("npu_supervisor_availability_objective_ratio", [], account.objective)
        e.family("npu_supervisor_availability_window_seconds", "gauge", "The rolling window of the account ([availability] window).")
        e.sample("npu_supervisor_availability_window_seconds", [], account.window.seconds)
        e.family("npu_supervisor_availability_ratio", "gauge",
                 "Succeeded / (succeeded + failures not caused by the client), since start and over the rolling window.")
        e.family("npu_supervisor_availability_error_budget_remaining_ratio", "gauge",
                 "1 - (1 - availability) / (1 - objective): 1 untouched, 0 spent, negative overspent.")
        e.family("npu_supervisor_capacity_availability_ratio", "gauge",
                 "1 - device-seconds of capacity lost / (devices x seconds), since start and over the rolling window.")
        for (name, f) in [("since_start", since), ("rolling", window)] {
            e.sample("npu_supervisor_availability_ratio", [("window", name)], f.availability)
            e.sample("npu_supervisor_availability_error_budget_remaining_ratio", [("window", name)], f.errorBudgetRemaining)
            e.sample("npu_supervisor_capacity_availability_ratio", [("window", name)], f.capacityAvailability)
        }
        e.family("npu_supervisor_requests_accepted_total", "counter", "Requests accepted (dispatched or queued).")
        e.sample("npu_supervisor_requests_accepted_total", [], Double(since.tally.accepted))
        e.family("npu_supervisor_requests_refused_total", "counter", "Requests refused at once (overloaded, no_workers, shutting_down).")
        e.sample("npu_supervisor_requests_refused_total", [], Double(since.tally.refused))
        e.family("npu_supervisor_requests_abandoned_total", "counter", "Accepted requests whose client hung up before the answer.")
        e.sample("npu_supervisor_requests_abandoned_total", [], Double(since.tally.abandoned))
        e.family("npu_supervisor_capacity_lost_seconds_total", "counter",
                 "Seconds of a device's capacity lost, by cause: down (should serve, cannot), draining (taken out on purpose), failed (held failed).")
        for d in 0..<account.deviceCount {
            for capacity in AvailabilityAccount.Capacity.allCases where capacity != .serving {
                e.sample("npu_supervisor_capacity_lost_seconds_total", [("device", account.deviceIDs[d]), ("cause", capacity.name)],
                         since.lostSeconds[d][capacity.rawValue])
            }
        }
        return Array(e.text.utf8)
    }
}

extension Supervisor {
    /// The status document's `availability` object.
    func availabilityStatus(now: MonotonicInstant) -> AvailabilityStatus {
        let account = machine.availability
        let (since, window) = account.figures(now: now)
        func span(_ f: AvailabilityAccount.Figures) -> AvailabilitySpan {
            var failed: [String: Int] = [:]
            for outcome in AvailabilityAccount.Outcome.allCases where outcome != .ok && f.tally.count(outcome) > 0 {
                failed[outcome.code] = f.tally.count(outcome)
            }
            var lost: [String: [String: Double]] = [:]
            for d in 0..<account.deviceCount {
                var row: [String: Double] = [:]
                for c in AvailabilityAccount.Capacity.allCases where c != .serving {
                    row[c.name] = (f.lostSeconds[d][c.rawValue] * 1000).rounded() / 1000
                }
                lost[account.deviceIDs[d]] = row
            }
            return AvailabilitySpan(
                seconds: f.seconds, received: f.tally.received, accepted: f.tally.accepted, refused: f.tally.refused,
                answered: f.tally.answered, abandoned: f.tally.abandoned, succeeded: f.tally.succeeded, failed: failed,
                availability: f.availability, errorBudgetRemaining: f.errorBudgetRemaining,
                capacityLostSeconds: lost, capacityAvailability: f.capacityAvailability)
        }
        return AvailabilityStatus(objective: account.objective, windowSeconds: account.window.seconds,
                                  sinceStart: span(since), window: span(window))
    }
}

/// Worker lifecycle events: spawn, session frames, channel, exit, and the timers of the lifecycle.
extension SupervisorMachine {
    mutating func boot(now: MonotonicInstant) {
        guard isBooting else { return }
        isBooting = false
        for slot in workers.indices where !workers[slot].isFallback && workers[slot].groupIndex == nil {
            perform(workers[slot].lifecycle.start(now: now), on: slot)
        }
        for g in groups.indices { performGroup(groups[g].lifecycle.start(now: now), group: g, now: now) }
        for slot in workers.indices { workers[slot].device.boot(now: now) }
        for message in readiness.begin(now: now, loading: isLoading) { emit(.notify(message)) }
    }

    /// A wanted worker is starting or backing off (systemd's start-up is extended meanwhile).
    var isLoading: Bool {
        let groupLoading = groups.contains { group in
            guard group.lifecycle.desired == .up else { return false }
            switch group.lifecycle.state {
            case .starting, .backoff: return true
            default: return false
            }
        }
        return groupLoading || workers.contains { worker in
            guard worker.lifecycle.desired == .up else { return false }
            if worker.isSpawnPending { return true }
            switch worker.lifecycle.state {
            case .starting, .backoff: return true
            default: return false
            }
        }
    }

    /// A request the worker held ended `deadline_exceeded`. A worker that heartbeats but answers nothing is not
    /// hung by the liveness rule; this streak judges it: `inference_probe.failures` expiries in a row make it
    /// `unhealthy` (restarted, its requests retried).
    mutating func requestExpired(_ slot: Int, now: MonotonicInstant) {
        guard workers[slot].lifecycle.isReady else { return }
        workers[slot].expiredInARow += 1
        let limit = max(1, workers[slot].spec.inferenceProbe.failures)
        guard workers[slot].expiredInARow >= limit else { return }
        workers[slot].expiredInARow = 0
        log(.error, slot, "worker unhealthy: \(limit) requests in a row got no answer within their deadline; restarting it",
            reason: "unhealthy")
        perform(workers[slot].lifecycle.fault(.unhealthy, now: now), on: slot)
    }

    mutating func spawned(_ slot: Int, pid: Int32, now: MonotonicInstant) {
        let wasPending = workers[slot].isSpawnPending
        workers[slot].isSpawnPending = false
        // Only a spawn the machine asked for, for a worker still wanted, becomes the slot's process; anything
        // else (the runtime's bug) is killed at once rather than left running unsupervised.
        guard wasPending, workers[slot].lifecycle.desired == .up, workers[slot].lifecycle.spawned(pid: pid, now: now)
        else {
            log(.error, slot, "a worker process nobody asked for (pid \(pid)) was reported started; killing it", pid: pid)
            emit(.signal(slot: slot, pid: pid, signal: 9))
            return
        }
        workers[slot].session = WorkerSession(protocolVersion: workers[slot].session.protocolVersion)
        workers[slot].liveness.processStarted(now: now)
        workers[slot].startedAt = now
        workers[slot].isChannelOpen = false
        workers[slot].reapedExit = nil
        workers[slot].exitDrainDeadline = nil
        workers[slot].channelClosedDeadline = nil
        workers[slot].unwritableSince = nil
        workers[slot].expiredInARow = 0
        log(.info, slot, "started worker: \(workers[slot].spec.command.joined(separator: " "))")
        healthDirty = true
    }

    mutating func spawnFailed(_ slot: Int, errno: Int32, message: String, jitter: Double, now: MonotonicInstant) {
        workers[slot].isSpawnPending = false
        log(.error, slot, "could not start worker: \(message)", reason: "spawn_failed")
        let action = workers[slot].lifecycle.spawnFailed(errno: errno, now: now, jitter: jitter)
        logTransition(slot, pid: nil, note: nil, now: now)
        perform(action, on: slot)
        if workers[slot].groupIndex != nil {
            groupJitter = jitter
            rankGone(slot, now: now)
        }
    }

    mutating func workerMessage(_ slot: Int, pid: Int32, _ message: WorkerSession.Message, now: MonotonicInstant) {
        guard workers[slot].lifecycle.pid == pid else { return }
        workers[slot].liveness.frameReceived(now: now)
        switch workers[slot].session.received(message) {
        case .accepted, .greeted:
            break
        case .violation(let why):
            protocolViolation(slot, why, now: now)
        case .becameReady:
            guard workers[slot].lifecycle.readyReceived(now: now) else { return }
            let startup = workers[slot].startedAt.map { now - $0 } ?? .zero
            log(.notice, slot, "worker ready after \(formatSeconds(startup, decimals: 3))s")
            workers[slot].hasBeenReady = true
            workers[slot].device.workerBecameReady(now: now)
            workers[slot].inference.workerBecameReady(now: now)
            if isShuttingDown {
                workers[slot].device.stop()
                workers[slot].inference.stop()
            }
            healthDirty = true
            queueWork.insert(.dispatch)
            if workers[slot].groupIndex != nil { rankReady(slot, now: now) }
        }
    }

    mutating func protocolViolation(_ slot: Int, _ why: String, now: MonotonicInstant) {
        log(.error, slot, "worker broke the protocol: \(why); killing it", reason: "protocol_error")
        perform(workers[slot].lifecycle.fault(.protocolError(why), now: now), on: slot)
    }

    /// The channel closed. If the process was already reaped, its exit is handled now (every frame it wrote
    /// has been read). Otherwise its requests cannot be answered any more; they are retried when the exit says
    /// whose fault it was (a crash spends a request's retry, a kill from outside does not), which follows at
    /// once for a process that died, and within a second for one that closed fd 3 but kept running (killed).
    mutating func channelClosed(_ slot: Int, pid: Int32, now: MonotonicInstant) {
        guard workers[slot].lifecycle.pid == pid else { return }
        if workers[slot].reapedExit != nil {
            finishExit(slot, pid: pid, now: now)
            return
        }
        if workers[slot].isChannelOpen {
            workers[slot].isChannelOpen = false
        }
        workers[slot].channelClosedDeadline = workers[slot].channelClosedDeadline ?? now + .seconds(1)
        healthDirty = true
    }

    mutating func processExited(_ slot: Int, pid: Int32, _ observed: ExitReason, oomKillsRose: Bool?, jitter: Double,
                                now: MonotonicInstant) {
        guard workers[slot].lifecycle.pid == pid, workers[slot].reapedExit == nil else { return }
        let (reason, note) = ExitVerdict.classify(observed, oomKillsRose: oomKillsRose)
        workers[slot].reapedExit = (reason, note, jitter)
        workers[slot].channelClosedDeadline = nil
        if workers[slot].isChannelOpen {
            // Frames the worker wrote just before it exited (its last answers, a device_oom report) are still
            // in the socket: read them up to the EOF before deciding anything, or an answered request would be
            // run again and the exit misattributed. The EOF is immediate now that the process is gone; the
            // deadline only guards against a descendant that escaped the group and still holds fd 3.
            workers[slot].exitDrainDeadline = now + .milliseconds(500)
            return
        }
        finishExit(slot, pid: pid, now: now)
    }

    /// The process is reaped and its channel drained: hand the exit to the lifecycle.
    mutating func finishExit(_ slot: Int, pid: Int32, now: MonotonicInstant) {
        guard let (reason, note, jitter) = workers[slot].reapedExit else { return }
        workers[slot].reapedExit = nil
        workers[slot].exitDrainDeadline = nil
        workers[slot].channelClosedDeadline = nil
        if workers[slot].isChannelOpen {
            workers[slot].isChannelOpen = false
        }
        emit(.closeChannel(slot: slot))
        workers[slot].startedAt = nil
        workers[slot].unwritableSince = nil
        workers[slot].liveness.processGone()
        workers[slot].device.workerGone()
        workers[slot].inference.workerGone()
        // A rank the group only asked to stop (SIGTERM) that died of a signal all the same was killed by someone
        // else before the request arrived: evidence its group must weigh (SupervisorMachine+Groups.swift).
        var killedUnasked: ExitReason?
        if workers[slot].groupIndex != nil, case .stopping(_, .term, _) = workers[slot].lifecycle.state,
           Self.evidence(reason) == 2, reason != .signaled(signal: SIGTERM_, coreDumped: false) {
            killedUnasked = reason
        }
        let action = workers[slot].lifecycle.exited(reason, now: now, jitter: jitter)
        // The requests it held: retried or answered, by what the exit says of them. A group's leader's requests
        // wait for the whole group to be down, when what broke it is known (a rank that exits because it lost its
        // peer is not the cause).
        if workers[slot].groupIndex == nil {
            emit(.failInflight(slot: slot, cause: RetryPolicy.lossCause(workers[slot].lifecycle.lastExit ?? reason)))
        }
        // The same words in status as in the log line below.
        if let last = workers[slot].lifecycle.lastExit, last == .signaled(signal: 9, coreDumped: false), let note {
            workers[slot].exitNote = (last, "killed by SIGKILL (\(note))")
        } else {
            workers[slot].exitNote = nil
        }
        logTransition(slot, pid: pid, note: note, now: now)
        if let last = workers[slot].lifecycle.lastExit, last != .stopped, workers[slot].groupIndex == nil {
            emit(.exitRecorded(slot: slot, reason: last))
        }
        perform(action, on: slot)
        if workers[slot].groupIndex != nil {
            groupJitter = jitter
            rankGone(slot, killedUnasked: killedUnasked, now: now)
        }
        queueWork.formUnion([.answerHopeless, .dispatch])
        workerGoneDuringShutdown()
    }

    /// One line per exit: what happened and what comes next.
    mutating func logTransition(_ slot: Int, pid: Int32?, note: String?, now: MonotonicInstant) {
        let machine = workers[slot].lifecycle
        guard let reason = machine.lastExit else { return }
        // A SIGKILL while a memory cgroup watched the worker: say what the counter proves instead of "possibly OOM".
        let detail = reason == .signaled(signal: 9, coreDumped: false) ? note.map { "killed by SIGKILL (\($0))" } : nil
        if let rank = workers[slot].spec.rank {
            // A rank's own state says little: what happens next is its group's decision (logged by the group).
            let level: LogRecord.Level = reason == .stopped || machine.desired == .down ? .info : .error
            log(level, slot, "worker (rank \(rank.rank) of group \(rank.group)) \(detail ?? reason.detail)",
                reason: reason.description, pid: pid)
            return
        }
        var message = "worker \(detail ?? reason.detail) → \(machine.stateName)"
        switch machine.state {
        case .backoff(let until):
            message += "; restart #\(machine.restarts) in \(formatSeconds(until - now, decimals: 2))s"
        case .failed(let retry?):
            message += "; too many restarts (\(machine.policy.maxRestarts) in \(machine.policy.restartWindow.configString)), "
                + "device marked failed, next try in \((retry - now).nanoseconds / 1_000_000_000)s or on `npu-supervisorctl start`"
        case .failed(nil):
            // The words a pinned request's `no_workers` answer uses too.
            message += "; " + (Admission.failedNote(machine, device: workers[slot].spec.device) ?? "")
        default:
            break
        }
        let level: LogRecord.Level = reason == .stopped || machine.desired == .down ? .info : .error
        log(level, slot, message, reason: reason.description, pid: pid)
    }

    /// Lifecycle deadlines, liveness, the exit drain and the closed-channel check.
    mutating func workerTimers(_ slot: Int, now: MonotonicInstant) {
        if let deadline = workers[slot].lifecycle.nextDeadline, now >= deadline {
            let before = workers[slot].lifecycle.stateName
            let isStarting: Bool = if case .starting = workers[slot].lifecycle.state { true } else { false }
            let action = workers[slot].lifecycle.timerFired(now: now)
            if isStarting, action != nil {
                log(.error, slot, "worker not ready within start_timeout "
                    + "(\(workers[slot].spec.policy.startTimeout.configString)); killing it", reason: "start_timeout")
            }
            if before == "failed", action == .spawn { log(.notice, slot, "retrying failed device") }
            perform(action, on: slot)
        }
        // A worker whose channel closed is judged by the closed-channel rule below, not by its silence: the
        // reason is then the same every time.
        if workers[slot].liveness.isHung(isReady: workers[slot].lifecycle.isReady && workers[slot].isChannelOpen, now: now) {
            log(.error, slot, "worker missed heartbeats; killing it", reason: "hang")
            perform(workers[slot].lifecycle.fault(.hang, now: now), on: slot)
        }
        if let since = workers[slot].unwritableSince, now >= since + workers[slot].spec.heartbeatTimeout,
           workers[slot].lifecycle.pid != nil {
            workers[slot].unwritableSince = nil
            if case .stopping = workers[slot].lifecycle.state {} else {
                log(.error, slot, "worker has not read its channel (fd 3) for \(workers[slot].spec.heartbeatTimeout.configString) "
                    + "while requests wait for it; killing it", reason: "hang")
                perform(workers[slot].lifecycle.fault(.hang, now: now), on: slot)
            }
        }
        if let deadline = workers[slot].exitDrainDeadline, now >= deadline, let pid = workers[slot].lifecycle.pid {
            finishExit(slot, pid: pid, now: now)
        }
        if let deadline = workers[slot].channelClosedDeadline, now >= deadline {
            workers[slot].channelClosedDeadline = nil
            if case .stopping = workers[slot].lifecycle.state {} else if workers[slot].pid != nil {
                protocolViolation(slot, "closed its channel (fd 3) but kept running", now: now)
            }
        }
    }
}

/// Whether a new request is accepted, and the verdicts that end a request without an answer from a worker:
/// retry after a lost worker, deadline, hopeless queue. Pure; the error codes are docs/PROTOCOL.md's.
public enum Admission {
    public enum Verdict: Sendable, Hashable {
        /// Dispatch it (or queue it if no worker has room).
        case accept
        /// Refuse at once with this error code and message (retryable as the code says).
        case refuse(code: String, message: String, retryable: Bool)
    }

    /// Whether a worker in this state may serve soon.
    public static func isHopeful(_ worker: WorkerStateMachine) -> Bool {
        switch worker.state {
        case .starting, .ready, .backoff: true
        case .stopping: worker.desired == .up
        case .stopped, .failed: false
        }
    }

    /// A request that no worker could take at once: queue it or refuse it as `overloaded`.
    public static func queueOrRefuse(queued: Int, maxQueue: Int) -> Verdict {
        guard queued < maxQueue else {
            return .refuse(code: "overloaded",
                           message: "all workers are at max_inflight and the queue is full (\(maxQueue) waiting)",
                           retryable: true)
        }
        return .accept
    }

    /// Why no worker can serve (every candidate stopped or failed with no restart coming soon), or nil when one
    /// may: a request then waits (queued) rather than being refused `no_workers`.
    /// - Parameter candidates: the device and state of each worker the request may go to.
    /// - Parameter groups: candidates that are tensor-parallel groups (by id): named "group ID".
    public static func noWorkersReason(_ candidates: [(device: String, state: WorkerStateMachine)],
                                       groups: Set<String> = []) -> String? {
        if candidates.contains(where: { isHopeful($0.state) }) { return nil }
        let states = candidates.map { candidate in
            var text = "\(groups.contains(candidate.device) ? "group" : "device") \(candidate.device) \(candidate.state.stateName)"
            // A failed device says why and what brings it back: the client's answer is often the first place an
            // operator looks (docs/PROTOCOL.md 1.2, exit code 78).
            if let note = failedNote(candidate.state, device: candidate.device), let exit = candidate.state.lastExit {
                text += " (worker \(exit.detail); \(note))"
            }
            return text
        }
        return "no worker can serve: " + states.joined(separator: ", ")
    }

    /// Why a `failed` worker stays down and what brings it back; nil when it is not failed. The same words in its
    /// log line (``SupervisorMachine/logTransition(_:pid:note:now:)``) and in a `no_workers` answer.
    public static func failedNote(_ worker: WorkerStateMachine, device: String) -> String? {
        guard case .failed(let retry) = worker.state else { return nil }
        if retry != nil {
            return "too many restarts (\(worker.policy.maxRestarts) in \(worker.policy.restartWindow.configString)), "
                + "retried every failed_retry_interval or on `npu-supervisorctl start \(device)`"
        }
        if case .deviceUnhealthy = worker.lastExit {
            return "held failed while the device probe fails (its worker was already restarted once)"
        }
        if case .exited(78) = worker.lastExit {
            return "not restarted: fix its configuration, then `npu-supervisorctl start \(device)`"
        }
        return "held failed until `npu-supervisorctl start \(device)`"
    }
}

/// What happens to a request whose worker died before answering (docs/PROTOCOL.md 5.6, "Worker death and
/// retries").
public enum RetryPolicy {
    public enum Decision: Sendable, Hashable {
        /// Re-dispatch it (to the front of the queue: it is among the oldest). `spendsRetry`: the death may have
        /// been the request's doing, so it counts against `retries`.
        case retry(spendsRetry: Bool)
        /// Answer it with the error code given by the caller (`worker_lost`) and this message.
        case fail(String)
        /// It was in flight on workers that crashed twice: suspected of crashing them; answered `worker_lost`
        /// with this message instead of taking a third worker down.
        case quarantine(String)
    }

    /// Whose fault a worker's death may have been, for the requests it held.
    public enum LossCause: Sendable, Hashable {
        /// The worker crashed on its own (exit, SIGSEGV, SIGABRT, a device OOM): a request it was running may
        /// have caused it. Spends a retry; counts toward the poison rule.
        case crash
        /// The kernel's OOM killer or a hang: often not the request's doing (another process's memory, a wedged
        /// device), sometimes so. Spends no retry, but counts toward the poison rule, so that a request that
        /// does it every time is stopped after the second.
        case suspect
        /// Killed from outside or for a reason of the supervisor's own (a signal it did not raise itself, a
        /// failed probe, a device fault, an operator's stop or restart, a rollout): not the request's doing.
        /// Spends no retry (its deadline still bounds it).
        case notTheRequest
        /// Unclear (a protocol violation): spends a retry, but is not counted as a crash.
        case unknown

        /// Whether the death counts toward the poison rule (two such deaths with the request in flight).
        public var countsAsCrash: Bool { self == .crash || self == .suspect }
    }

    public static func lossCause(_ reason: ExitReason) -> LossCause {
        switch reason {
        case .exited, .deviceOOM: .crash
        case .signaled(let signal, _): [4, 5, 6, 7, 8, 11, 31].contains(signal) ? .crash : .notTheRequest
        case .oomKilled, .hang: .suspect
        case .unhealthy, .deviceUnhealthy, .stopped, .startTimeout, .spawnFailed: .notTheRequest
        case .protocolError: .unknown
        }
    }

    /// - Parameters:
    ///   - crashes: crashes of workers this request was in flight on, this one included.
    public static func afterWorkerLost(device: String, streamed: Bool, isProbe: Bool, attempts: Int, retries: Int,
                                       isShuttingDown: Bool, cause: LossCause, crashes: Int) -> Decision {
        if streamed {
            return .fail("the worker on device \(device) died after streaming part of the answer")
        }
        if isProbe || isShuttingDown {
            return .fail("the worker on device \(device) died; retries exhausted (\(attempts) attempts)")
        }
        if crashes >= 2 {
            return .quarantine("the request was in flight on \(crashes) workers that crashed; it is suspected of "
                + "crashing workers and is not sent to another one")
        }
        // retries = 0: the operator wants no request run twice, whatever the cause.
        if retries > 0 && (cause == .notTheRequest || cause == .suspect) { return .retry(spendsRetry: false) }
        if attempts <= retries { return .retry(spendsRetry: true) }
        return .fail("the worker on device \(device) died; retries exhausted (\(attempts) attempts)")
    }

    /// The message of `deadline_exceeded`.
    /// - Parameter pinnedNotServing: for a request pinned to a device whose worker is not serving, that
    ///   device and its state (the request waited for it, not for busy workers).
    public static func deadlineMessage(timeoutMilliseconds: Int64, wasQueued: Bool,
                                       pinnedNotServing: (device: String, state: String)? = nil) -> String {
        var message = "no answer within \(timeoutMilliseconds) ms"
        if wasQueued {
            if let pinned = pinnedNotServing {
                message += " (still queued: device \(pinned.device) is \(pinned.state), not serving)"
            } else {
                message += " (still queued: every worker was busy)"
            }
        }
        return message
    }
}

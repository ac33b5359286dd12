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
    public static func noWorkersReason(_ candidates: [(device: String, state: WorkerStateMachine)]) -> String? {
        if candidates.contains(where: { isHopeful($0.state) }) { return nil }
        let states = candidates.map { "device \($0.device) \($0.state.stateName)" }.joined(separator: ", ")
        return "no worker can serve: " + states
    }
}

/// What happens to a request whose worker died before answering (docs/PROTOCOL.md, "Retries").
public enum RetryPolicy {
    public enum Decision: Sendable, Hashable {
        /// Re-dispatch it (to the front of the queue: it is among the oldest).
        case retry
        /// Answer it with the error code given by the caller (`worker_lost`) and this message.
        case fail(String)
    }

    /// - Parameters:
    ///   - streamed: a chunk of it already reached the client (it must never run twice).
    ///   - isProbe: the supervisor's own inference probe (never retried elsewhere).
    ///   - attempts: dispatches so far (1 = first try).
    ///   - retries: the configured `retries`.
    public static func afterWorkerLost(device: String, streamed: Bool, isProbe: Bool, attempts: Int, retries: Int,
                                       isShuttingDown: Bool) -> Decision {
        if !streamed && !isProbe && attempts <= retries && !isShuttingDown { return .retry }
        return .fail(streamed
            ? "the worker on device \(device) died after streaming part of the answer"
            : "the worker on device \(device) died; retries exhausted (\(attempts) attempts)")
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

import Logging
import NIOCore
import SupervisorCore
import WireProtocol

/// One accepted client request, from the moment it is read until its one final answer.
final class PendingRequest: @unchecked Sendable {  // confined to the event loop
    /// The supervisor's own id (unique across connections); what the worker sees.
    let id: UInt64
    /// The id the client chose; what the client sees.
    let clientID: UInt64
    /// Cleared when the client hangs up.
    var client: ClientConnection?
    let payload: ByteBuffer
    let pinnedSlot: WorkerSlot?
    let deadline: NIODeadline
    let timeout: TimeAmount
    /// Dispatches so far (1 = first try).
    var attempts = 0
    /// Whether any chunk reached the client: then the request must never run again.
    var streamed = false
    var worker: WorkerSlot?
    /// The last worker it was sent to (for metrics; `worker` is cleared when it dies).
    unowned(unsafe) var lastWorker: WorkerSlot?
    var isQueued = false
    var isFinished = false
    /// An inference probe of the supervisor's own: never retried elsewhere; `onFinish` gets the answer.
    var isProbe = false
    var onFinish: ((Frame?) -> Void)?
    /// Links in the deadline list of requests with the same timeout (in deadline order).
    var newer: PendingRequest?
    unowned(unsafe) var older: PendingRequest?
    var deadlineList: DeadlineList?

    init(id: UInt64, clientID: UInt64, client: ClientConnection?, payload: ByteBuffer, pinnedSlot: WorkerSlot?,
         timeout: TimeAmount, now: NIODeadline) {
        self.id = id
        self.clientID = clientID
        self.client = client
        self.payload = payload
        self.pinnedSlot = pinnedSlot
        self.timeout = timeout
        self.deadline = now + timeout
    }
}

/// Requests that share one timeout, oldest first: their deadlines are in the same order, so only the oldest
/// needs a timer. Removal is O(1). This replaces a timer per request (an allocation and a heap operation each).
final class DeadlineList: @unchecked Sendable {  // confined to the event loop
    var oldest: PendingRequest?
    unowned(unsafe) var newest: PendingRequest?

    var isEmpty: Bool { oldest == nil }

    func append(_ request: PendingRequest) {
        request.deadlineList = self
        if let newest {
            newest.newer = request
            request.older = newest
        } else {
            oldest = request
        }
        newest = request
    }

    func remove(_ request: PendingRequest) {
        guard request.deadlineList === self else { return }
        if let older = request.older { older.newer = request.newer } else { oldest = request.newer }
        if let newer = request.newer { newer.older = request.older } else { newest = request.older }
        request.newer = nil
        request.older = nil
        request.deadlineList = nil
    }
}

extension Supervisor {
    /// A `request` frame from a client.
    func clientRequest(_ client: ClientConnection, _ frame: Frame) {
        let clientID = frame.requestID
        guard clientID != 0 else {
            client.send(.error(requestID: 0, code: ErrorCode.badRequest, message: "request id 0 is reserved"))
            return
        }
        guard client.requests[clientID] == nil else {
            // Answering under the same id would give the first request two final answers: say it on id 0.
            client.send(.error(requestID: 0, code: ErrorCode.badRequest,
                               message: "request id \(clientID) is already in flight on this connection; "
                                   + "the duplicate was ignored"))
            return
        }
        guard !isShuttingDown else {
            client.send(.error(requestID: clientID, code: ErrorCode.shuttingDown,
                               message: "the supervisor is shutting down", retryable: true))
            return
        }
        var payload = frame.payload
        var options = RequestOptions()
        if frame.flags.contains(.hasOptions) {
            do {
                (options, payload) = try RequestOptions.split(frame.payload)
            } catch {
                client.send(.error(requestID: clientID, code: ErrorCode.badRequest, message: "\(error)"))
                return
            }
        }
        var pinned: WorkerSlot?
        if let device = options.device {
            guard let slot = slots.first(where: { $0.spec.device == device }) else {
                client.send(.error(requestID: clientID, code: ErrorCode.badRequest,
                                   message: "unknown device '\(device)'; configured: "
                                       + slots.map(\.spec.device).joined(separator: ", ")))
                return
            }
            pinned = slot
        }
        if let reason = noWorkersReason(pinned: pinned) {
            client.send(.error(requestID: clientID, code: ErrorCode.noWorkers, message: reason, retryable: true))
            return
        }
        let timeout: TimeAmount = options.deadlineMS.map { .milliseconds(Int64(max(1, $0))) } ?? defaultTimeout
        let request = PendingRequest(id: nextRequestID, clientID: clientID, client: client, payload: payload,
                                     pinnedSlot: pinned, timeout: timeout, now: .now())
        nextRequestID &+= 1
        if !dispatchNow(request) {
            guard queue.count < config.requests.maxQueue else {
                client.send(.error(requestID: clientID, code: ErrorCode.overloaded,
                                   message: "all workers are at max_inflight and the queue is full "
                                       + "(\(config.requests.maxQueue) waiting)", retryable: true))
                return
            }
            request.isQueued = true
            queue.append(request)
        }
        requests[request.id] = request
        client.requests[clientID] = request
        client.updateReading()
        trackDeadline(request)
    }

    var defaultTimeout: TimeAmount { .nanoseconds(config.requests.defaultDeadline.nanoseconds) }

    func trackDeadline(_ request: PendingRequest) {
        let list: DeadlineList
        if let existing = deadlineLists[request.timeout.nanoseconds] {
            list = existing
        } else {
            list = DeadlineList()
            deadlineLists[request.timeout.nanoseconds] = list
        }
        let wasEmpty = list.isEmpty
        list.append(request)
        // Only a list that was empty can bring the earliest deadline forward.
        if wasEmpty && (deadlineTimerAt == nil || request.deadline < deadlineTimerAt!) {
            armDeadlineTimer(at: request.deadline)
        }
    }

    func armDeadlineTimer(at deadline: NIODeadline) {
        deadlineTimer?.cancel()
        deadlineTimerAt = deadline
        deadlineTimer = eventLoop.scheduleTask(deadline: deadline) { self.deadlineTimerFired() }
    }

    func deadlineTimerFired() {
        deadlineTimer = nil
        deadlineTimerAt = nil
        let now = NIODeadline.now()
        var next: NIODeadline?
        for (key, list) in deadlineLists {
            while let oldest = list.oldest, oldest.deadline <= now {
                expire(oldest)
            }
            if let oldest = list.oldest {
                next = next.map { min($0, oldest.deadline) } ?? oldest.deadline
            } else if deadlineLists.count > 16 {
                deadlineLists.removeValue(forKey: key)  // many distinct client deadlines: drop idle lists
            }
        }
        if let next { armDeadlineTimer(at: next) }
        flushAll()
        dispatchQueued()
    }

    /// Why nothing can serve (every candidate stopped or failed with no retry coming soon), or nil.
    func noWorkersReason(pinned: WorkerSlot?) -> String? {
        if isBooting { return nil }
        let candidates = pinned.map { [$0] } ?? slots
        let hopeful = candidates.contains { slot in
            switch slot.machine.state {
            case .starting, .ready, .backoff: return true
            case .stopping: return slot.machine.desired == .up
            case .stopped, .failed: return false
            }
        }
        if hopeful { return nil }
        let states = candidates.map { "device \($0.spec.device) \($0.machine.stateName)" }.joined(separator: ", ")
        return "no worker can serve: " + states
    }

    /// Sends the request to the least-loaded ready worker, if one has room.
    func dispatchNow(_ request: PendingRequest) -> Bool {
        guard let slot = pickWorker(for: request) else { return false }
        request.attempts += 1
        request.worker = slot
        request.lastWorker = slot
        slot.inflight += 1
        slot.send(Frame(type: .request, requestID: request.id, payload: request.payload))
        if !slot.isDirty {
            slot.isDirty = true
            dirtyWorkers.append(slot)
        }
        return true
    }

    /// The device worker with the fewest requests in flight that has room; CPU fallback workers only when no
    /// device worker can serve at all (a busy device is worth waiting for: CPU is ~50x slower).
    func pickWorker(for request: PendingRequest) -> WorkerSlot? {
        if let pinned = request.pinnedSlot { return pinned.hasCapacity ? pinned : nil }
        var best: WorkerSlot?
        let count = deviceSlotCount
        roundRobin = roundRobin + 1 < count ? roundRobin + 1 : 0
        var anyDeviceServing = false
        for offset in 0..<count {
            let index = roundRobin + offset < count ? roundRobin + offset : roundRobin + offset - count
            let slot = slots[index]
            guard slot.hasCapacity else {
                if !anyDeviceServing && slot.isServing { anyDeviceServing = true }
                continue
            }
            anyDeviceServing = true
            if best == nil || slot.inflight < best!.inflight { best = slot }
        }
        if best != nil || anyDeviceServing || count == slots.count { return best }
        for slot in slots[count...] where slot.hasCapacity {
            if best == nil || slot.inflight < best!.inflight { best = slot }
        }
        return best
    }

    /// Moves queued requests to workers that have room, oldest first.
    func dispatchQueued() {
        guard !queue.isEmpty else { return }
        var kept = CircularBuffer<PendingRequest>()
        var blocked = false
        while let request = queue.popFirst() {
            if !request.isQueued { continue }
            if !blocked && dispatchNow(request) {
                request.isQueued = false
                continue
            }
            if request.pinnedSlot == nil { blocked = true }
            kept.append(request)
        }
        queue = kept
    }

    /// Writes everything queued for clients and workers during this burst: one write per channel.
    func flushAll() {
        if !dirtyWorkers.isEmpty {
            for slot in dirtyWorkers { slot.flush() }
            dirtyWorkers.removeAll(keepingCapacity: true)
        }
        if !dirtyClients.isEmpty {
            for client in dirtyClients { client.flush() }
            dirtyClients.removeAll(keepingCapacity: true)
        }
    }

    /// Every request the slot holds: re-dispatched if nothing of it reached the client yet and retries remain,
    /// else answered with `code`.
    func failInflight(of slot: WorkerSlot, code: String) {
        guard slot.inflight > 0 else { return }
        let held = requests.values.filter { $0.worker === slot }.sorted { $0.id < $1.id }
        slot.inflight = 0
        var retried: [PendingRequest] = []
        for request in held {
            request.worker = nil
            if !request.streamed && !request.isProbe && request.attempts <= config.requests.retries && !isShuttingDown {
                retried.append(request)
            } else {
                let why = request.streamed
                    ? "the worker on device \(slot.spec.device) died after streaming part of the answer"
                    : "the worker on device \(slot.spec.device) died; retries exhausted (\(request.attempts) attempts)"
                finish(request, with: .error(requestID: request.clientID, code: code, message: why))
            }
        }
        if !retried.isEmpty {
            logger.warning("re-dispatching \(retried.count) request(s) of a lost worker", metadata: slot.metadata())
        }
        // Retries go to the front of the queue: they are the oldest requests.
        for request in retried.reversed() {
            request.isQueued = true
            queue.prepend(request)
        }
    }

    /// Delivers the one final answer and forgets the request.
    func finish(_ request: PendingRequest, with frame: Frame?) {
        guard !request.isFinished else { return }
        request.isFinished = true
        requests.removeValue(forKey: request.id)
        request.deadlineList?.remove(request)
        if request.isQueued {
            request.isQueued = false
            if let index = queue.firstIndex(where: { $0 === request }) { queue.remove(at: index) }
        }
        if let slot = request.worker {
            slot.inflight -= 1
            request.worker = nil
        }
        if !request.isProbe, let frame {
            metrics.requestFinished(device: request.lastWorker?.spec.device ?? "none", ok: frame.type == .response,
                                    latency: .nanoseconds((NIODeadline.now() - (request.deadline - request.timeout)).nanoseconds))
        }
        if let onFinish = request.onFinish {
            request.onFinish = nil
            onFinish(frame)
        }
        if let client = request.client {
            request.client = nil
            client.requests.removeValue(forKey: request.clientID)
            if let frame { client.send(frame) }
            if client.isReadingPaused { client.updateReading() }
            if client.isInputClosed && client.requests.isEmpty { client.closeAfterFlush() }
        }
    }

    /// Queued requests none of whose candidate workers can come back (failed, stopped) are answered
    /// `no_workers` now instead of waiting for their deadlines.
    func answerHopelessQueued() {
        guard !queue.isEmpty else { return }
        for request in Array(queue) where request.isQueued {
            if let reason = noWorkersReason(pinned: request.pinnedSlot) {
                finish(request, with: .error(requestID: request.clientID, code: ErrorCode.noWorkers,
                                             message: reason, retryable: true))
            }
        }
    }

    func expire(_ request: PendingRequest) {
        cancelOnWorker(request)
        finish(request, with: .error(requestID: request.clientID, code: ErrorCode.deadlineExceeded,
                                     message: "no answer within \(request.timeout.nanoseconds / 1_000_000) ms"
                                         + (request.isQueued ? " (still queued: every worker was busy)" : "")))
    }

    func cancelOnWorker(_ request: PendingRequest) {
        guard let slot = request.worker, slot.channel != nil else { return }
        slot.send(Frame(type: .cancel, requestID: request.id))
        if !slot.isDirty {
            slot.isDirty = true
            dirtyWorkers.append(slot)
        }
    }

    /// A `cancel` frame from the client.
    func clientCancel(_ client: ClientConnection, clientID: UInt64) {
        guard let request = client.requests[clientID] else { return }
        cancelOnWorker(request)
        finish(request, with: .error(requestID: clientID, code: ErrorCode.cancelled, message: "cancelled by the client"))
        dispatchQueued()
    }

    /// The client hung up: its requests are cancelled and their places freed at once.
    func clientGone(_ client: ClientConnection) {
        clients.removeValue(forKey: ObjectIdentifier(client))
        for request in Array(client.requests.values) {
            cancelOnWorker(request)
            finish(request, with: nil)
        }
        client.requests.removeAll()
        dispatchQueued()
        flushAll()
    }
}

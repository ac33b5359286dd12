import Logging
import NIOCore
import SupervisorCore
import WireProtocol

/// One accepted client request, from the moment it is read until its one final answer.
final class PendingRequest {
    /// The supervisor's own id (unique across connections); what the worker sees.
    let id: UInt64
    /// The id the client chose; what the client sees.
    let clientID: UInt64
    /// Cleared when the client hangs up.
    #if DEBUG
    var client: ClientConnection?
    #else
    @exclusivity(unchecked) var client: ClientConnection?
    #endif
    /// Released when it is answered while queued (its tombstone in the queue must not hold the bytes).
    #if DEBUG
    var payload: ByteBuffer
    #else
    @exclusivity(unchecked) var payload: ByteBuffer
    #endif
    /// The slot the client pinned it to (`device` option), -1 for any.
    let pinned: Int
    let deadline: NIODeadline
    let timeout: TimeAmount
    /// Dispatches so far (1 = first try), not counting those lost to deaths that were not its doing.
    #if DEBUG
    var attempts = 0
    #else
    @exclusivity(unchecked) var attempts = 0
    #endif
    /// Crashes of workers it was in flight on (two make it a poison suspect).
    #if DEBUG
    var crashes = 0
    #else
    @exclusivity(unchecked) var crashes = 0
    #endif
    /// Whether any chunk reached the client: then the request must never run again.
    #if DEBUG
    var streamed = false
    #else
    @exclusivity(unchecked) var streamed = false
    #endif
    /// The slot holding it now, -1 for none.
    #if DEBUG
    var worker = -1
    #else
    @exclusivity(unchecked) var worker = -1
    #endif
    /// The last slot it was sent to (for metrics; `worker` is cleared when it dies), -1 for none.
    #if DEBUG
    var lastWorker = -1
    #else
    @exclusivity(unchecked) var lastWorker = -1
    #endif
    #if DEBUG
    var isQueued = false
    #else
    @exclusivity(unchecked) var isQueued = false
    #endif
    #if DEBUG
    var isFinished = false
    #else
    @exclusivity(unchecked) var isFinished = false
    #endif
    /// An inference probe of the supervisor's own: never retried elsewhere; `onFinish` gets the answer.
    #if DEBUG
    var isProbe = false
    #else
    @exclusivity(unchecked) var isProbe = false
    #endif
    #if DEBUG
    var onFinish: ((Frame?) -> Void)?
    #else
    @exclusivity(unchecked) var onFinish: ((Frame?) -> Void)?
    #endif
    /// The HTTP exchange waiting for it (the request front), nil for requests.sock clients.
    #if DEBUG
    var http: HTTPExchange?
    #else
    @exclusivity(unchecked) var http: HTTPExchange?
    #endif
    /// Links in the deadline list of requests with the same timeout (in deadline order).
    #if DEBUG
    var newer: PendingRequest?
    #else
    @exclusivity(unchecked) var newer: PendingRequest?
    #endif
    #if DEBUG
    unowned(unsafe) var older: PendingRequest?
    #else
    @exclusivity(unchecked) unowned(unsafe) var older: PendingRequest?
    #endif
    #if DEBUG
    var deadlineList: DeadlineList?
    #else
    @exclusivity(unchecked) var deadlineList: DeadlineList?
    #endif

    init(id: UInt64, clientID: UInt64, client: ClientConnection?, payload: ByteBuffer, pinned: Int,
         timeout: TimeAmount, now: NIODeadline) {
        self.id = id
        self.clientID = clientID
        self.client = client
        self.payload = payload
        self.pinned = pinned
        self.timeout = timeout
        self.deadline = now + timeout
    }
}

/// Requests that share one timeout, oldest first: their deadlines are in the same order, so only the oldest
/// needs a timer. Removal is O(1). This replaces a timer per request (an allocation and a heap operation each).
final class DeadlineList {
    /// The timeout its requests share, in nanoseconds.
    let timeout: Int64
    #if DEBUG
    var oldest: PendingRequest?
    #else
    @exclusivity(unchecked) var oldest: PendingRequest?
    #endif
    #if DEBUG
    unowned(unsafe) var newest: PendingRequest?
    #else
    @exclusivity(unchecked) unowned(unsafe) var newest: PendingRequest?
    #endif

    init(timeout: Int64) { self.timeout = timeout }

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
    func clientRequest(_ client: ClientConnection, _ frame: Frame, receivedAt acceptedAt: NIODeadline) {
        eventLoop.assertInEventLoop()
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
            refused(.shuttingDown)
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
                refused(.badRequest)
                client.send(.error(requestID: clientID, code: ErrorCode.badRequest, message: "\(error)"))
                return
            }
        }
        var pinned = -1
        if let device = options.device {
            guard let slot = pinTargets[device] else {
                refused(.badRequest)
                client.send(.error(requestID: clientID, code: ErrorCode.badRequest, message: unknownPinMessage(device)))
                return
            }
            pinned = slot
        }
        if let reason = noWorkersReason(pinned: pinned) {
            refused(.noWorkers)
            client.send(.error(requestID: clientID, code: ErrorCode.noWorkers, message: reason, retryable: true))
            return
        }
        let timeout: TimeAmount = options.deadlineMS.map { .milliseconds(Int64(max(1, $0))) } ?? defaultTimeout
        let request = PendingRequest(id: nextRequestID, clientID: clientID, client: client, payload: payload,
                                     pinned: pinned, timeout: timeout, now: acceptedAt)
        nextRequestID &+= 1
        if !dispatchNow(request) {
            if case .refuse(let code, let message, let retryable) =
                Admission.queueOrRefuse(queued: queuedCount, maxQueue: config.requests.maxQueue) {
                refused(AvailabilityAccount.Outcome(code: code))
                client.send(.error(requestID: clientID, code: code, message: message, retryable: retryable))
                return
            }
            enqueue(request)
        }
        machine.availability.accepted(now: MonotonicInstant(nanoseconds: Int64(acceptedAt.uptimeNanoseconds)))
        requests[request.id] = request
        client.requests[clientID] = request
        client.updateReading()
        trackDeadline(request)
    }

    /// A request answered at the door (never accepted): counted, with no latency.
    func refused(_ outcome: AvailabilityAccount.Outcome) {
        metrics.answered(slot: -1, outcome, latencyNanoseconds: nil)
        machine.availability.finished(outcome, accepted: false, now: Self.now())
    }

    var defaultTimeout: TimeAmount { .nanoseconds(config.requests.defaultDeadline.nanoseconds) }

    func trackDeadline(_ request: PendingRequest) {
        let list: DeadlineList
        if let last = lastDeadlineList, last.timeout == request.timeout.nanoseconds {
            list = last  // nearly every request has the default deadline: no hashing for those
        } else if let existing = deadlineLists[request.timeout.nanoseconds] {
            list = existing
            lastDeadlineList = existing
        } else {
            list = DeadlineList(timeout: request.timeout.nanoseconds)
            deadlineLists[request.timeout.nanoseconds] = list
            lastDeadlineList = list
        }
        let wasEmpty = list.isEmpty
        list.append(request)
        // Only a list that was empty can bring the earliest deadline forward.
        if wasEmpty && (timerAt == nil || request.deadline < timerAt!) {
            armTimer(at: request.deadline)
        }
    }

    /// Answers `deadline_exceeded` to every request past its deadline (from the one timer).
    func expireRequests() {
        let now = NIODeadline.now()
        for (key, list) in deadlineLists {
            while let oldest = list.oldest, oldest.deadline <= now {
                expire(oldest)
            }
            if list.oldest == nil && deadlineLists.count > 16 {
                deadlineLists.removeValue(forKey: key)  // many distinct client deadlines: drop idle lists
                if lastDeadlineList === list { lastDeadlineList = nil }
            }
        }
        flushAll()
        dispatchQueued()
    }

    /// Sends the request to the worker the router picks, if one has room.
    @inline(__always) func dispatchNow(_ request: PendingRequest) -> Bool {
        guard let index = machine.router.pick(pinned: request.pinned >= 0 ? request.pinned : nil) else { return false }
        machine.router.assign(index)
        if request.attempts == 0 {
            // Queue time: zero without a clock read when a worker had room at once.
            metrics.dispatched(slot: index, waitedNanoseconds: request.isQueued
                ? (NIODeadline.now() - (request.deadline - request.timeout)).nanoseconds : 0)
        }
        request.attempts += 1
        request.worker = index
        request.lastWorker = index
        let slot = slots[index]
        slot.sendRequest(id: request.id, payload: request.payload)
        if !slot.isDirty {
            slot.isDirty = true
            dirtyWorkers.append(slot)
        }
        return true
    }

    /// Queues a request that no worker can take now (`first`: ahead of the others, for retries).
    func enqueue(_ request: PendingRequest, first: Bool = false) {
        request.isQueued = true
        queuedCount += 1
        if request.pinned >= 0 { queuedPinned += 1 }
        if first { queue.prepend(request) } else { queue.append(request) }
    }

    /// The request is no longer waiting (placed, answered, expired); the caller takes it out of `queue`.
    @inline(__always) func leftQueue(_ request: PendingRequest) {
        request.isQueued = false
        queuedCount -= 1
        if request.pinned >= 0 { queuedPinned -= 1 }
    }

    /// Debug builds (the test suites) check after each queue operation that the counters match the queue.
    @inline(__always) func checkQueueCounts() {
        #if DEBUG
        var waiting = 0
        var pinned = 0
        for request in queue where request.isQueued {
            waiting += 1
            if request.pinned >= 0 { pinned += 1 }
        }
        assert(waiting == queuedCount && pinned == queuedPinned,
               "queue counters drifted: \(queuedCount) / \(queuedPinned) counted, \(waiting) / \(pinned) waiting")
        #endif
    }

    /// Moves queued requests to workers that have room, oldest first (the head-of-line rule of ``QueueScan``).
    /// Called after every answer while anything is queued.
    func dispatchQueued() {
        guard !queue.isEmpty else { return }
        defer { checkQueueCounts() }
        if queuedPinned == 0 {
            // Only requests for any worker: the first one that cannot be placed ends the pass, and the rest stay
            // where they are. The cost is what is placed, not the queue's length: rebuilding a queue of hundreds
            // after each answer (a backed-up worker channel under 64 x 16 clients of 4 KiB) was most of the
            // supervisor's CPU (BENCHMARKS.md).
            while let request = queue.first {
                if request.isQueued {
                    guard dispatchNow(request) else { return }
                    leftQueue(request)
                }
                queue.removeFirst()
            }
            return
        }
        var kept = CircularBuffer<PendingRequest>()
        var scan = QueueScan()
        while let request = queue.popFirst() {
            if !request.isQueued { continue }
            if scan.shouldTry && dispatchNow(request) {
                leftQueue(request)
                continue
            }
            scan.notPlaced(isPinned: request.pinned >= 0)
            kept.append(request)
        }
        queue = kept
    }

    /// Flushes once every channel that is ready in this turn of the event loop has been read: requests from
    /// many clients to one worker (and answers from both workers to one client) leave in one write each, not
    /// one per channel read. Each write wakes its reader, and those wake-ups were most of the request path's
    /// cost (BENCHMARKS.md). The flush runs in the same turn, after its I/O: no latency is added.
    @inline(__always) func flushAtEndOfTick() {
        guard !flushScheduled else { return }
        flushScheduled = true
        eventLoop.execute { [self] in
            flushScheduled = false
            flushAll()
        }
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

    /// Every request the slot holds: re-dispatched if nothing of it reached the client yet and it may be (see
    /// ``RetryPolicy``: a death that was not the request's doing spends no retry; a request in flight on two
    /// workers that crashed is quarantined), else answered with `code`.
    func failInflight(of index: Int, code: String, cause: RetryPolicy.LossCause) {
        guard machine.router.releaseAll(index) > 0 else { return }
        if machine.router.draining[index] { feed(.drainSettled(slot: index)) }
        let device = slots[index].spec.device
        let held = requests.values.filter { $0.worker == index }.sorted { $0.id < $1.id }
        var retried: [PendingRequest] = []
        for request in held {
            request.worker = -1
            if cause.countsAsCrash { request.crashes += 1 }
            switch RetryPolicy.afterWorkerLost(device: device, streamed: request.streamed, isProbe: request.isProbe,
                                               attempts: request.attempts, retries: config.requests.retries,
                                               isShuttingDown: isShuttingDown, cause: cause, crashes: request.crashes) {
            case .retry(let spendsRetry):
                if !spendsRetry { request.attempts -= 1 }  // the next dispatch counts again
                retried.append(request)
            case .fail(let why):
                finish(request, with: .error(requestID: request.clientID, code: code, message: why))
            case .quarantine(let why):
                metrics.quarantined += 1
                logger.warning("request \(request.clientID) (\(request.payload.readableBytes) bytes) quarantined: \(why)",
                               metadata: slots[index].metadata(reason: "poison"))
                finish(request, with: .error(requestID: request.clientID, code: code, message: why))
            }
        }
        if !retried.isEmpty {
            logger.warning("re-dispatching \(retried.count) request(s) of a lost worker", metadata: slots[index].metadata())
        }
        // Retries go to the front of the queue: they are the oldest requests.
        // Not one that was answered meanwhile (a probe's verdict can re-enter and close its client's requests).
        for request in retried.reversed() where !request.isFinished {
            enqueue(request, first: true)
        }
    }

    /// Delivers the one final answer and forgets the request.
    /// - Parameter at: the time of the answer when the caller has it (a burst of answers read at once shares one
    ///   clock read); nil reads the clock.
    func finish(_ request: PendingRequest, with frame: Frame?, at answeredAt: NIODeadline? = nil) {
        guard !request.isFinished else { return }
        request.isFinished = true
        requests.removeValue(forKey: request.id)
        request.deadlineList?.remove(request)
        if request.isQueued {
            // Left in `queue` as a tombstone that every pass skips: searching for it was O(queue) per request,
            // quadratic when a full queue expires at once. Compacted when tombstones outnumber the waiting.
            leftQueue(request)
            request.payload = ByteBuffer()
            if queue.count > 2 * queuedCount + 64 { queue = CircularBuffer(queue.filter(\.isQueued)) }
            checkQueueCounts()
        }
        if request.worker >= 0 {
            let slot = request.worker
            machine.router.release(slot)
            request.worker = -1
            if machine.router.draining[slot] && machine.router.inflight[slot] == 0 { feed(.drainSettled(slot: slot)) }
        }
        if !request.isProbe {
            let now = answeredAt ?? NIODeadline.now()
            let mono = MonotonicInstant(nanoseconds: Int64(now.uptimeNanoseconds))
            if let frame {
                let latency = (now - (request.deadline - request.timeout)).nanoseconds
                let outcome: AvailabilityAccount.Outcome =
                    frame.type == .response ? .ok : AvailabilityAccount.Outcome(code: frame.errorPayload.code)
                metrics.answered(slot: request.lastWorker, outcome, latencyNanoseconds: latency)
                machine.availability.finished(outcome, accepted: true, now: mono)
                if request.lastWorker >= 0 {
                    machine.requestFinished(slot: request.lastWorker, ok: frame.type == .response,
                                            latencyNanoseconds: latency)
                }
            } else {
                machine.availability.abandoned(now: mono)
            }
        }
        if let onFinish = request.onFinish {
            request.onFinish = nil
            onFinish(frame)
        }
        if let http = request.http {
            request.http = nil
            http.finish(frame)
        }
        if let client = request.client {
            request.client = nil
            client.requests.removeValue(forKey: request.clientID)
            if let frame { client.send(frame) }
            if client.isReadingPaused { client.updateReading() }
            if client.isInputClosed { client.closeIfInputDone() }
        }
        // Draining for a shutdown: the last answer lets the machine stop the workers.
        if requests.isEmpty, case .draining = machine.shutdown.state { feed(.requestsInFlight(0)) }
    }

    /// Queued requests none of whose candidate workers can come back (failed, stopped) are answered
    /// `no_workers` now instead of waiting for their deadlines.
    func answerHopelessQueued() {
        guard !queue.isEmpty else { return }
        for request in Array(queue) where request.isQueued {
            if let reason = noWorkersReason(pinned: request.pinned) {
                finish(request, with: .error(requestID: request.clientID, code: ErrorCode.noWorkers,
                                             message: reason, retryable: true))
            }
        }
    }

    func expire(_ request: PendingRequest) {
        cancelOnWorker(request)
        let heldBy = request.isProbe ? -1 : request.worker
        var pinnedNotServing: (device: String, state: String)?
        if request.isQueued, request.pinned >= 0, !machine.router.serving[request.pinned] {
            let worker = machine.workers[request.pinned]
            pinnedNotServing = (worker.spec.device, worker.drain != .none ? worker.drain.name : worker.lifecycle.stateName)
        }
        finish(request, with: .error(requestID: request.clientID, code: ErrorCode.deadlineExceeded,
                                     message: RetryPolicy.deadlineMessage(
                                        timeoutMilliseconds: request.timeout.nanoseconds / 1_000_000,
                                        wasQueued: request.isQueued, pinnedNotServing: pinnedNotServing)))
        // No answer from the worker that held it: a failure of that worker (a mute one is judged by these).
        if heldBy >= 0 { feed(.requestExpired(slot: heldBy)) }
    }

    func cancelOnWorker(_ request: PendingRequest) {
        guard request.worker >= 0 else { return }
        let slot = slots[request.worker]
        guard slot.channel != nil else { return }
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

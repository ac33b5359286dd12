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
    /// Its entry's ring in ``Supervisor/deadlineRings``, -1 once answered (or never tracked).
    #if DEBUG
    var deadlineRing = -1
    #else
    @exclusivity(unchecked) var deadlineRing = -1
    #endif
    /// Arrival order (ids index a table and do not say it): retries of a lost worker's requests keep it.
    let sequence: UInt64

    init(id: UInt64, sequence: UInt64, clientID: UInt64, client: ClientConnection?, payload: ByteBuffer,
         pinned: Int, timeout: TimeAmount, now: NIODeadline) {
        self.id = id
        self.sequence = sequence
        self.clientID = clientID
        self.client = client
        self.payload = payload
        self.pinned = pinned
        self.timeout = timeout
        self.deadline = now + timeout
    }
}

/// The deadlines of the requests that share one timeout, oldest first: they come in deadline order, so only the
/// oldest needs the timer. An entry is a request's id and deadline, not a reference (appending one costs no
/// reference counting, which linking the request objects into a list did, 11 retains and releases per request).
/// A request answered before its deadline leaves its entry behind: the timer drops it when it reaches the head
/// (its id finds nothing in ``Supervisor/requests``), a compaction drops it when the ring holds more than twice
/// its live entries, and all are dropped when no request of the ring is left. So a ring holds at most
/// 2 x live + 64 entries.
struct DeadlineRing {
    struct Entry {
        let id: UInt64
        let deadline: NIODeadline
    }
    /// The timeout its requests share, in nanoseconds.
    var timeout: Int64
    var entries = CircularBuffer<Entry>()
    /// Requests of the ring not answered yet.
    var live = 0

    init(timeout: Int64) { self.timeout = timeout }
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
        let request = PendingRequest(id: requests.nextID, sequence: nextSequence, clientID: clientID, client: client,
                                     payload: payload, pinned: pinned, timeout: timeout, now: acceptedAt)
        nextSequence &+= 1
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
        let id = requests.insert(request)
        assert(id == request.id, "the request table changed between nextID and insert")
        client.requests[clientID] = request
        // Reaching the limit pauses reading; a channel that stops being writable pauses it from
        // `channelWritabilityChanged` (asking NIO for writability per request cost reference counting).
        if client.requests.count >= config.requests.maxInflightPerConnection { client.updateReading() }
        trackDeadline(request)
    }

    /// A request answered at the door (never accepted): counted, with no latency.
    func refused(_ outcome: AvailabilityAccount.Outcome) {
        metrics.answered(slot: -1, outcome, latencyNanoseconds: nil)
        machine.availability.finished(outcome, accepted: false, now: Self.now())
    }

    var defaultTimeout: TimeAmount { .nanoseconds(config.requests.defaultDeadline.nanoseconds) }

    func trackDeadline(_ request: PendingRequest) {
        let timeout = request.timeout.nanoseconds
        let ring: Int
        if lastDeadlineRing >= 0 && deadlineRings[lastDeadlineRing].timeout == timeout {
            ring = lastDeadlineRing  // nearly every request has the default deadline: no hashing for those
        } else {
            ring = deadlineRing(for: timeout)
            lastDeadlineRing = ring
        }
        request.deadlineRing = ring
        let wasEmpty = deadlineRings[ring].entries.isEmpty
        deadlineRings[ring].entries.append(DeadlineRing.Entry(id: request.id, deadline: request.deadline))
        deadlineRings[ring].live += 1
        if deadlineRings[ring].entries.count > 2 &* deadlineRings[ring].live &+ 64 {
            // Answered requests' entries outnumber the live ones: drop them (amortized O(1) per request).
            let table = requests
            deadlineRings[ring].entries.removeAll { table[$0.id] == nil }
        }
        // Only a ring that was empty can bring the earliest deadline forward: a ring's head (live or not) is
        // never later than its newest entry, and the timer is armed no later than every ring's head.
        if wasEmpty && (timerAt == nil || request.deadline < timerAt!) {
            armTimer(at: request.deadline)
        }
    }

    /// The ring for `timeout`: the existing one, an idle one taken over (many distinct client deadlines: at most
    /// 16 rings are kept beyond the busy ones), or a new one.
    private func deadlineRing(for timeout: Int64) -> Int {
        if let ring = deadlineRingIndex[timeout] { return ring }
        if deadlineRings.count >= 16,
           let idle = deadlineRings.firstIndex(where: { $0.live == 0 && $0.entries.isEmpty }) {
            deadlineRingIndex.removeValue(forKey: deadlineRings[idle].timeout)
            deadlineRings[idle].timeout = timeout
            deadlineRingIndex[timeout] = idle
            return idle
        }
        deadlineRings.append(DeadlineRing(timeout: timeout))
        deadlineRingIndex[timeout] = deadlineRings.count - 1
        return deadlineRings.count - 1
    }

    /// Answers `deadline_exceeded` to every request past its deadline (from the one timer).
    func expireRequests() {
        let now = NIODeadline.now()
        for ring in deadlineRings.indices {
            while let head = deadlineRings[ring].entries.first, head.deadline <= now {
                deadlineRings[ring].entries.removeFirst()
                if let request = requests[head.id] { expire(request) }
            }
        }
        // Rings no request uses any more go from the end (idle ones before a busy one are taken over by new
        // timeout values): a burst of distinct client deadlines does not leave every later pass walking them.
        while deadlineRings.count > 16, let last = deadlineRings.last, last.live == 0, last.entries.isEmpty {
            deadlineRingIndex.removeValue(forKey: last.timeout)
            deadlineRings.removeLast()
        }
        if lastDeadlineRing >= deadlineRings.count { lastDeadlineRing = -1 }
        // Expiries free their workers' places: queued requests take them, and all of it goes out now.
        dispatchQueued()
        flushAll()
    }

    /// Sends the request to the worker the router picks, if one has room.
    @inline(__always) func dispatchNow(_ request: PendingRequest) -> Bool {
        guard let index = machine.router.pick(pinned: request.pinned >= 0 ? request.pinned : nil,
                                              burstAffinity: config.requests.burstAffinity) else { return false }
        machine.router.assign(index)
        if request.attempts == 0 {
            // Queue time: zero without a clock read when a worker had room at once.
            metrics.dispatched(slot: index, waitedNanoseconds: request.isQueued
                ? (NIODeadline.now() - (request.deadline - request.timeout)).nanoseconds : 0)
        }
        request.attempts += 1
        request.worker = index
        request.lastWorker = index
        // Not retained: `slots` holds every slot for the supervisor's life.
        unowned(unsafe) let slot = slots[index]
        slot.sendRequest(id: request.id, payload: request.payload)
        if !slot.isDirty {
            slot.isDirty = true
            dirtyWorkers.append(slot)
            flushAtEndOfTick()
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
    /// cost (BENCHMARKS.md). The flush runs in the same turn, after its I/O: no latency is added. Scheduled by
    /// every read turn and by the first frame queued for a channel in a turn, whatever queued it (a timer's
    /// expiries, a worker's death and its retries, a paused client resumed): nothing waits for a later turn.
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
        machine.router.endBurst()
        // Taken one by one rather than iterated and cleared: a flush can close a client, whose requests are
        // then cancelled on their workers and whose places go to queued requests, dirtying channels while this
        // runs; those are flushed too, not dropped from the list while still marked dirty.
        while let slot = dirtyWorkers.popLast() { slot.flush() }
        while let client = dirtyClients.popLast() { client.flush() }
    }

    /// Every request the slot holds: re-dispatched if nothing of it reached the client yet and it may be (see
    /// ``RetryPolicy``: a death that was not the request's doing spends no retry; a request in flight on two
    /// workers that crashed is quarantined), else answered with `code`.
    func failInflight(of index: Int, code: String, cause: RetryPolicy.LossCause) {
        guard machine.router.releaseAll(index) > 0 else { return }
        if machine.router.draining[index] { feed(.drainSettled(slot: index)) }
        let device = slots[index].spec.device
        let held = requests.allValues.filter { $0.worker == index }.sorted { $0.sequence < $1.sequence }
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
        if let frame {
            let ok = frame.type == .response
            settle(request, outcome: ok ? .ok : AvailabilityAccount.Outcome(code: frame.errorPayload.code), ok: ok,
                   at: answeredAt)
        } else {
            settle(request, outcome: nil, ok: false, at: answeredAt)
        }
        deliverToWaiters(request, frame)
        if let client = request.client {
            request.client = nil
            client.requests.removeValue(forKey: request.clientID)
            if let frame { client.send(frame) }
            answered(client)
        }
        if requests.isEmpty { lastAnswerGone() }
    }

    /// ``finish(_:with:at:)`` for a worker's answer (the hot path): the answer goes into the client's buffer as it
    /// came, under the client's id, without a ``Frame`` built and copied on the way (each copy retains and
    /// releases the payload's storage).
    @inline(__always)
    func finishAnswered(_ request: PendingRequest, type: MessageType, flags: FrameFlags, payload: ByteBuffer,
                        at answeredAt: NIODeadline) {
        guard !request.isFinished else { return }
        let ok = type == .response
        settle(request, outcome: ok ? .ok : AvailabilityAccount.Outcome(code: Frame(type: type, payload: payload).errorPayload.code),
               ok: ok, at: answeredAt)
        if request.onFinish != nil || request.http != nil {
            deliverToWaiters(request, Frame(type: type, flags: flags, requestID: request.clientID, payload: payload))
        }
        if let client = request.client {
            request.client = nil
            client.requests.removeValue(forKey: request.clientID)
            client.send(type: type, flags: flags, requestID: request.clientID, payload: payload)
            answered(client)
        }
        if requests.isEmpty { lastAnswerGone() }
    }

    /// The bookkeeping of a final answer: the request leaves every table, its worker's place is freed, and the
    /// answer is counted (`outcome` nil: abandoned, its client gone).
    @inline(__always)
    private func settle(_ request: PendingRequest, outcome: AvailabilityAccount.Outcome?, ok: Bool,
                        at answeredAt: NIODeadline?) {
        request.isFinished = true
        requests.remove(request.id)
        if request.deadlineRing >= 0 {
            let ring = request.deadlineRing
            request.deadlineRing = -1
            deadlineRings[ring].live -= 1
            // Every entry left is an answered request's: none can expire.
            if deadlineRings[ring].live == 0 { deadlineRings[ring].entries.removeAll(keepingCapacity: true) }
        }
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
            if let outcome {
                let latency = (now - (request.deadline - request.timeout)).nanoseconds
                metrics.answered(slot: request.lastWorker, outcome, latencyNanoseconds: latency)
                machine.availability.finished(outcome, accepted: true, now: mono)
                if request.lastWorker >= 0 {
                    machine.requestFinished(slot: request.lastWorker, ok: ok, latencyNanoseconds: latency)
                }
            } else {
                machine.availability.abandoned(now: mono)
            }
        }
    }

    /// The answer to whoever waits for it besides a requests.sock client: a probe's judge, an HTTP exchange.
    private func deliverToWaiters(_ request: PendingRequest, _ frame: Frame?) {
        if let onFinish = request.onFinish {
            request.onFinish = nil
            onFinish(frame)
        }
        if let http = request.http {
            request.http = nil
            http.finish(frame)
        }
    }

    /// One of the client's requests was answered: reading may resume, a half-closed client may be done.
    @inline(__always)
    private func answered(_ client: ClientConnection) {
        if client.isReadingPaused { client.updateReading() }
        if client.isInputClosed { client.closeIfInputDone() }
    }

    /// Draining for a shutdown: the last answer lets the machine stop the workers.
    private func lastAnswerGone() {
        if case .draining = machine.shutdown.state { feed(.requestsInFlight(0)) }
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
        guard slot.hasChannel else { return }
        slot.send(Frame(type: .cancel, requestID: request.id))
        if !slot.isDirty {
            slot.isDirty = true
            dirtyWorkers.append(slot)
            flushAtEndOfTick()
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
        for request in client.requests.values {
            cancelOnWorker(request)
            finish(request, with: nil)
        }
        client.requests.removeAll()
        dispatchQueued()
        flushAll()
    }
}

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
    weak var client: ClientConnection?
    let payload: ByteBuffer
    let pinnedSlot: WorkerSlot?
    var deadlineTask: Scheduled<Void>?
    /// Dispatches so far (1 = first try).
    var attempts = 0
    /// Whether any chunk reached the client: then the request must never run again.
    var streamed = false
    weak var worker: WorkerSlot?
    var isQueued = false

    init(id: UInt64, clientID: UInt64, client: ClientConnection, payload: ByteBuffer, pinnedSlot: WorkerSlot?) {
        self.id = id
        self.clientID = clientID
        self.client = client
        self.payload = payload
        self.pinnedSlot = pinnedSlot
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
            client.send(.error(requestID: clientID, code: ErrorCode.badRequest,
                               message: "request id \(clientID) is already in flight on this connection"))
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
        let deadlineMS = options.deadlineMS.map { max(1, $0) }
        let timeout: TimeAmount = deadlineMS.map { .milliseconds(Int64($0)) }
            ?? .nanoseconds(config.requests.defaultDeadline.nanoseconds)

        let request = PendingRequest(id: nextRequestID, clientID: clientID, client: client, payload: payload,
                                     pinnedSlot: pinned)
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
        client.requests[clientID] = request.id
        client.updateReading()
        request.deadlineTask = eventLoop.scheduleTask(in: timeout) { [weak request] in
            guard let request else { return }
            self.expire(request, after: timeout)
        }
    }

    /// Why nothing can serve (every candidate stopped or failed with no retry coming soon), or nil.
    func noWorkersReason(pinned: WorkerSlot?) -> String? {
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
        slot.inflight.insert(request.id)
        slot.channel!.write(Frame(type: .request, requestID: request.id, payload: request.payload), promise: nil)
        slot.needsFlush = true
        return true
    }

    func pickWorker(for request: PendingRequest) -> WorkerSlot? {
        if let pinned = request.pinnedSlot { return pinned.hasCapacity ? pinned : nil }
        var best: WorkerSlot?
        let count = slots.count
        roundRobin = (roundRobin + 1) % max(1, count)
        for offset in 0..<count {
            let slot = slots[(roundRobin + offset) % count]
            guard slot.hasCapacity else { continue }
            if best == nil || slot.inflight.count < best!.inflight.count { best = slot }
        }
        return best
    }

    /// Moves queued requests to workers that have room, oldest first.
    func dispatchQueued() {
        guard !queue.isEmpty else {
            flushWorkers()
            return
        }
        var kept = CircularBuffer<PendingRequest>()
        var blocked = false
        while let request = queue.popFirst() {
            if !request.isQueued { continue }  // finished while waiting (cancel, deadline)
            if !blocked && dispatchNow(request) {
                request.isQueued = false
                continue
            }
            if request.pinnedSlot == nil { blocked = true }
            kept.append(request)
        }
        queue = kept
        flushWorkers()
    }

    func flushWorkers() {
        for slot in slots where slot.needsFlush {
            slot.needsFlush = false
            slot.channel?.flush()
        }
    }

    func flushClients() {
        for client in dirtyClients { client.flushIfNeeded() }
        dirtyClients.removeAll(keepingCapacity: true)
        flushWorkers()
    }

    /// Every request the slot holds: re-dispatched if nothing of it reached the client yet and retries remain,
    /// else answered with `code`.
    func failInflight(of slot: WorkerSlot, code: String) {
        guard !slot.inflight.isEmpty else { return }
        let ids = slot.inflight
        slot.inflight.removeAll()
        var retried: [PendingRequest] = []
        for id in ids.sorted() {
            guard let request = requests[id] else { continue }
            request.worker = nil
            if !request.streamed && request.attempts <= config.requests.retries && !isShuttingDown {
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
    func finish(_ request: PendingRequest, with frame: Frame) {
        guard requests.removeValue(forKey: request.id) != nil else { return }
        request.deadlineTask?.cancel()
        if request.isQueued {
            request.isQueued = false
            if let index = queue.firstIndex(where: { $0 === request }) { queue.remove(at: index) }
        }
        if let slot = request.worker {
            slot.inflight.remove(request.id)
            request.worker = nil
        }
        if let client = request.client {
            client.requests.removeValue(forKey: request.clientID)
            client.send(frame)
            client.updateReading()
        }
    }

    func expire(_ request: PendingRequest, after timeout: TimeAmount) {
        guard requests[request.id] != nil else { return }
        cancelOnWorker(request)
        finish(request, with: .error(requestID: request.clientID, code: ErrorCode.deadlineExceeded,
                                     message: "no answer within \(timeout.nanoseconds / 1_000_000) ms"))
        flushClients()
        dispatchQueued()
    }

    func cancelOnWorker(_ request: PendingRequest) {
        guard let slot = request.worker, let channel = slot.channel else { return }
        channel.write(Frame(type: .cancel, requestID: request.id), promise: nil)
        slot.needsFlush = true
    }

    /// A `cancel` frame from the client.
    func clientCancel(_ client: ClientConnection, clientID: UInt64) {
        guard let id = client.requests[clientID], let request = requests[id] else { return }
        cancelOnWorker(request)
        finish(request, with: .error(requestID: clientID, code: ErrorCode.cancelled, message: "cancelled by the client"))
        dispatchQueued()
    }

    /// The client hung up: its requests are cancelled and their places freed at once.
    func clientGone(_ client: ClientConnection) {
        clients.removeValue(forKey: ObjectIdentifier(client))
        for id in client.requests.values {
            guard let request = requests[id] else { continue }
            cancelOnWorker(request)
            request.client = nil
            finish(request, with: Frame(type: .error))
        }
        client.requests.removeAll()
        dispatchQueued()
    }
}

/// The routing policy (docs/ARCHITECTURE.md, "Routing"): a request goes to the ready device worker with the
/// fewest requests in flight that has room (`max_inflight`); ties are broken round-robin so that idle workers
/// share the load; CPU fallback workers are used only when no device worker can serve at all (a busy device
/// is worth waiting for: CPU is about 50x slower). A request pinned to a device goes there or waits.
///
/// Burst affinity (`[requests] burst_affinity`, off by default): requests read in one pass of the event loop
/// (a burst) go to the worker the burst's previous request went to while that worker has room and holds at
/// most `burst_affinity` more than the least-loaded one. Spreading every request is right when a request costs
/// milliseconds of device time; when it costs microseconds (embeddings, tokenization, an echo), each extra
/// worker a burst touches costs a write and a wake-up of that worker, which are then most of the cost.
///
/// Workers are integer slot indices: `0..<deviceCount` are device workers, the rest fallback workers. This is
/// the request hot path: no allocation, no dictionary, no clock.
public struct Router: Sendable, Hashable {
    /// Requests each worker holds now.
    public private(set) var inflight: [Int]
    public private(set) var maxInflight: [Int]
    /// In rotation: ready, channel open, device not known to be bad. Kept current by ``SupervisorMachine``.
    public private(set) var serving: [Bool]
    /// May serve soon: starting, ready, backing off, or stopping to come back (``Admission/isHopeful(_:)``).
    /// A request for a worker that is not hopeful is answered `no_workers` at once instead of waiting for its
    /// deadline. Kept current by ``SupervisorMachine``, so the hot path reads two stored values.
    public private(set) var hopeful: [Bool]
    /// Whether any worker is hopeful.
    public private(set) var anyHopeful = true
    /// CPU fallback workers, used only when no device worker serves.
    public private(set) var isFallback: [Bool]
    /// Being drained: the runtime reports when such a worker holds nothing any more.
    public private(set) var draining: [Bool]
    private var roundRobin = 0
    /// The worker the burst's previous request was assigned to; -1 at the start of a burst (``endBurst()``).
    public private(set) var burstSlot = -1

    public init(maxInflight: [Int], isFallback: [Bool]) {
        self.maxInflight = maxInflight
        self.inflight = Array(repeating: 0, count: maxInflight.count)
        self.serving = Array(repeating: false, count: maxInflight.count)
        // Before boot every worker is about to start: requests wait.
        self.hopeful = Array(repeating: true, count: maxInflight.count)
        self.isFallback = isFallback
        self.draining = Array(repeating: false, count: maxInflight.count)
    }

    public var slotCount: Int { inflight.count }

    @inline(__always) public func hasCapacity(_ slot: Int) -> Bool {
        serving[slot] && inflight[slot] < maxInflight[slot]
    }

    /// The worker for the next request, or nil when it must wait. Does not count it in: see ``assign(_:)``.
    /// `burstAffinity` > 0: the burst's previous worker while it has room and holds at most that many more
    /// than the least-loaded worker of its kind (device or fallback).
    @inline(__always) public mutating func pick(pinned: Int?, burstAffinity: Int = 0) -> Int? {
        guard let best = leastLoaded(pinned: pinned) else { return nil }
        if burstAffinity > 0 && pinned == nil {
            let previous = burstSlot
            if previous >= 0 && previous != best && hasCapacity(previous) && isFallback[previous] == isFallback[best]
                && inflight[previous] - inflight[best] <= burstAffinity {
                return previous
            }
        }
        return best
    }

    /// A burst is over (the event loop flushed what it read): the next request starts from the least loaded.
    @inline(__always) public mutating func endBurst() { burstSlot = -1 }

    private mutating func leastLoaded(pinned: Int?) -> Int? {
        if let pinned { return hasCapacity(pinned) ? pinned : nil }
        let count = inflight.count
        guard count > 0 else { return nil }
        var best = -1
        roundRobin = roundRobin + 1 < count ? roundRobin + 1 : 0
        var anyDeviceServing = false
        var anyFallback = false
        for offset in 0..<count {
            let index = roundRobin + offset < count ? roundRobin + offset : roundRobin + offset - count
            guard serving[index] else { continue }
            guard !isFallback[index] else {
                anyFallback = true
                continue
            }
            anyDeviceServing = true
            guard inflight[index] < maxInflight[index] else { continue }
            if best < 0 || inflight[index] < inflight[best] { best = index }
        }
        if best >= 0 || anyDeviceServing || !anyFallback { return best >= 0 ? best : nil }
        for index in 0..<count where isFallback[index] && hasCapacity(index) {
            if best < 0 || inflight[index] < inflight[best] { best = index }
        }
        return best >= 0 ? best : nil
    }

    @inline(__always) public mutating func assign(_ slot: Int) {
        inflight[slot] += 1
        burstSlot = slot
    }

    @inline(__always) public mutating func release(_ slot: Int) { inflight[slot] -= 1 }

    /// The worker lost every request it held (it died): returns how many.
    public mutating func releaseAll(_ slot: Int) -> Int {
        let held = inflight[slot]
        inflight[slot] = 0
        return held
    }

    mutating func setServing(_ slot: Int, _ isServing: Bool) { serving[slot] = isServing }

    mutating func setHopeful(_ slot: Int, _ isHopeful: Bool) {
        guard hopeful[slot] != isHopeful else { return }
        hopeful[slot] = isHopeful
        anyHopeful = hopeful.contains(true)
    }

    mutating func setMaxInflight(_ slot: Int, _ value: Int) { maxInflight[slot] = value }

    mutating func setDraining(_ slot: Int, _ value: Bool) { draining[slot] = value }

    /// A slot added by a reload (a new device): appended, so existing indices stay valid.
    mutating func append(maxInflight max: Int, isFallback fallback: Bool) {
        maxInflight.append(max)
        inflight.append(0)
        serving.append(false)
        hopeful.append(true)
        isFallback.append(fallback)
        draining.append(false)
    }
}

/// The queue's head-of-line rule: queued requests are tried oldest first; once a request that may go to any
/// worker cannot be placed, nothing behind it is tried in this pass (a later request must not overtake an
/// older one for the same workers). A pinned request that cannot be placed does not block the others.
public struct QueueScan: Sendable {
    public private(set) var isBlocked = false

    public init() {}

    /// Whether to try placing the next queued request.
    @inline(__always) public var shouldTry: Bool { !isBlocked }

    /// The request could not be placed (or was not tried).
    @inline(__always) public mutating func notPlaced(isPinned: Bool) {
        if !isPinned { isBlocked = true }
    }
}

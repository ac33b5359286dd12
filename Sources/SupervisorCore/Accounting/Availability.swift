/// The availability account (docs/PROTOCOL.md, status document `availability`): since start and over a rolling
/// window, what happened to the requests clients sent, and how many seconds of each device's capacity were lost,
/// as an availability figure against the configured objective with the error budget left.
///
/// Pure and cross-device: the runtime reports each request's fate through the one-store mutating methods
/// (``accepted(now:)``, ``finished(_:accepted:now:)``, ``abandoned(now:)``: an array increment, and a bucket
/// rotation at most once per bucket width), and ``SupervisorMachine`` samples the devices' states at the end of
/// every event (``sample(_:now:)``). Reads (``figures(now:)``) are for status and scrapes, never the hot path.
///
/// Request availability = succeeded / (succeeded + failures that count). A failure counts unless the client
/// caused it (`bad_request`, `cancelled`); refusals (`overloaded`, `no_workers`, `shutting_down`) count: the
/// client did not get an answer. A request whose client hung up before its answer is `abandoned` and not counted.
public struct AvailabilityAccount: Sendable {
    /// A request's final answer, as an index into the counters.
    public enum Outcome: Int, CaseIterable, Sendable {
        case ok, overloaded, noWorkers, shuttingDown, deadlineExceeded, workerLost, deviceOOM, workerError
        case cancelled, badRequest, other

        /// The wire error code (`ok` for a success): the `status` label of `inference_requests_total`.
        public var code: String {
            switch self {
            case .ok: "ok"
            case .overloaded: "overloaded"
            case .noWorkers: "no_workers"
            case .shuttingDown: "shutting_down"
            case .deadlineExceeded: "deadline_exceeded"
            case .workerLost: "worker_lost"
            case .deviceOOM: "device_oom"
            case .workerError: "worker_error"
            case .cancelled: "cancelled"
            case .badRequest: "bad_request"
            case .other: "other"
            }
        }

        /// An error code from the wire; unknown codes are `other`.
        public init(code: String) {
            self = Outcome.allCases.first { $0.code == code } ?? .other
        }

        /// Whether this outcome counts against availability (the client did not cause it).
        public var counts: Bool { self != .cancelled && self != .badRequest }
    }

    /// What a device's capacity is doing, sampled at the end of every event.
    public enum Capacity: Int, CaseIterable, Sendable {
        /// In rotation, or not expected to be (its first model load, a fallback-only slot).
        case serving
        /// Should serve but cannot: crashed, restarting, hung, out of rotation for its device.
        case down
        /// Taken out on purpose: stopped or being stopped by an operator, a reload, a rollout or a shutdown.
        case draining
        /// Held failed (restart intensity exceeded, or the device stayed unhealthy).
        case failed

        public var name: String {
            switch self {
            case .serving: "serving"
            case .down: "down"
            case .draining: "draining"
            case .failed: "failed"
            }
        }
    }

    /// Counters for one span of time (since start, or one bucket of the window).
    public struct Tally: Sendable, Equatable {
        public var accepted = 0
        public var abandoned = 0
        /// Final answers by outcome, refusals included (``Outcome`` raw values).
        public var outcomes = [Int](repeating: 0, count: Outcome.allCases.count)
        /// Nanoseconds lost per device and ``Capacity`` (`device * Capacity.allCases.count + capacity`).
        public var lostNanoseconds: [Int64]

        init(devices: Int) { lostNanoseconds = [Int64](repeating: 0, count: devices * Capacity.allCases.count) }

        mutating func add(_ other: Tally) {
            accepted += other.accepted
            refused += other.refused
            abandoned += other.abandoned
            for i in outcomes.indices { outcomes[i] += other.outcomes[i] }
            for i in lostNanoseconds.indices { lostNanoseconds[i] += other.lostNanoseconds[i] }
        }

        public func count(_ outcome: Outcome) -> Int { outcomes[outcome.rawValue] }
        public var succeeded: Int { outcomes[Outcome.ok.rawValue] }
        /// Requests refused at the door (never accepted); their outcomes are in ``outcomes`` too.
        public var refused = 0
        /// Final answers to accepted requests.
        public var answered: Int { outcomes.reduce(0, +) - refused }
        /// Requests received: accepted or refused.
        public var received: Int { accepted + refused }
        public var countedFailures: Int { Outcome.allCases.filter { $0 != .ok && $0.counts }.reduce(0) { $0 + count($1) } }
    }

    /// The figures of one span, for status and `/metrics`.
    public struct Figures: Sendable, Equatable {
        public var seconds: Double
        public var tally: Tally
        /// succeeded / (succeeded + counted failures); 1 with nothing counted.
        public var availability: Double
        /// 1 - (1 - availability) / (1 - objective): 1 untouched, 0 spent, negative overspent.
        public var errorBudgetRemaining: Double
        /// Seconds lost per device and cause (`down`, `draining`, `failed`).
        public var lostSeconds: [[Double]]
        /// 1 - seconds lost / (devices x seconds).
        public var capacityAvailability: Double
    }

    public let objective: Double
    public let window: Duration
    /// The devices accounted for, by id (CPU fallback slots are not devices). A device is added the first time
    /// it is sampled (``addDevice(_:)``); a device id served by several slots over time is one device.
    public private(set) var deviceIDs: [String]
    public var deviceCount: Int { deviceIDs.count }
    public static let bucketCount = 60
    let bucketNanoseconds: Int64
    public private(set) var total: Tally
    public private(set) var startedAt: MonotonicInstant?
    var buckets: [Tally]
    /// The absolute bucket number (`now / bucketNanoseconds`) of `buckets[current]`.
    var currentBucket: Int64 = 0
    var current = 0
    /// The devices' states at the last sample, and when it was taken.
    public private(set) var states: [Capacity]
    var sampledAt: MonotonicInstant?

    public init(objective: Double, window: Duration, devices: [String]) {
        self.objective = objective
        self.window = window
        deviceIDs = []
        bucketNanoseconds = max(1, window.nanoseconds / Int64(Self.bucketCount))
        total = Tally(devices: 0)
        buckets = [Tally](repeating: Tally(devices: 0), count: Self.bucketCount)
        states = []
        for id in devices { _ = addDevice(id) }
    }

    /// The index of a device id, added (serving, nothing lost) when new.
    public mutating func addDevice(_ id: String) -> Int {
        if let index = deviceIDs.firstIndex(of: id) { return index }
        deviceIDs.append(id)
        let zeros = [Int64](repeating: 0, count: Capacity.allCases.count)
        total.lostNanoseconds += zeros
        for i in buckets.indices { buckets[i].lostNanoseconds += zeros }
        states.append(.serving)
        return deviceIDs.count - 1
    }

    // MARK: Counting (the runtime's hot path: no allocation)

    /// Moves the window to `now`, clearing buckets that fell out of it.
    @inline(__always) mutating func rotate(_ now: MonotonicInstant) {
        let bucket = now.nanoseconds / bucketNanoseconds
        if bucket == currentBucket { return }
        rotateSlow(bucket)
    }

    mutating func rotateSlow(_ bucket: Int64) {
        if startedAt == nil {
            currentBucket = bucket
            return
        }
        // A late event: the runtime reads the clock once per read burst, so an event can carry a time from
        // before one already counted in this loop turn. It is counted in the current bucket; moving the ring back
        // would put it out of step with `current`, and the next event would clear a bucket still in the window.
        if bucket < currentBucket { return }
        let steps = Int(min(Int64(Self.bucketCount), bucket - currentBucket))
        for _ in 0..<steps {
            current = (current + 1) % Self.bucketCount
            buckets[current] = Tally(devices: deviceIDs.count)
        }
        currentBucket = bucket
    }

    mutating func begin(_ now: MonotonicInstant) {
        if startedAt == nil {
            startedAt = now
            sampledAt = now
            currentBucket = now.nanoseconds / bucketNanoseconds
        }
    }

    /// A request was taken in (dispatched or queued).
    @inline(__always) public mutating func accepted(now: MonotonicInstant) {
        begin(now)
        rotate(now)
        total.accepted += 1
        buckets[current].accepted += 1
    }

    /// A final answer: to an accepted request (`accepted`), or a refusal at the door.
    @inline(__always) public mutating func finished(_ outcome: Outcome, accepted: Bool, now: MonotonicInstant) {
        begin(now)
        rotate(now)
        total.outcomes[outcome.rawValue] += 1
        buckets[current].outcomes[outcome.rawValue] += 1
        if !accepted {
            total.refused += 1
            buckets[current].refused += 1
        }
    }

    /// An accepted request's client hung up before its answer.
    public mutating func abandoned(now: MonotonicInstant) {
        begin(now)
        rotate(now)
        total.abandoned += 1
        buckets[current].abandoned += 1
    }

    /// The devices' states now: the time since the last sample is charged to the states seen then.
    public mutating func sample(_ states: [Capacity], now: MonotonicInstant) {
        begin(now)
        rotate(now)
        if let last = sampledAt, now > last {
            let elapsed = (now - last).nanoseconds
            for device in 0..<min(deviceCount, self.states.count) where self.states[device] != .serving {
                let i = device * Capacity.allCases.count + self.states[device].rawValue
                total.lostNanoseconds[i] += elapsed
                buckets[current].lostNanoseconds[i] += elapsed
            }
        }
        sampledAt = now
        for device in 0..<min(deviceCount, states.count) { self.states[device] = states[device] }
    }

    // MARK: Reads

    /// Since start and over the window, as of `now` (the interval since the last sample is included).
    public func figures(now: MonotonicInstant) -> (sinceStart: Figures, window: Figures) {
        var copy = self
        copy.sample(states, now: now)
        let start = copy.startedAt ?? now
        var inWindow = Tally(devices: copy.deviceCount)
        for bucket in copy.buckets { inWindow.add(bucket) }
        let elapsed = max(0, (now - start).seconds)
        return (copy.makeFigures(copy.total, seconds: elapsed),
                copy.makeFigures(inWindow, seconds: min(elapsed, window.seconds)))
    }

    func makeFigures(_ tally: Tally, seconds: Double) -> Figures {
        let counted = tally.succeeded + tally.countedFailures
        let availability = counted == 0 ? 1 : Double(tally.succeeded) / Double(counted)
        let budget = objective >= 1 ? (availability >= 1 ? 1 : 0) : 1 - (1 - availability) / (1 - objective)
        var lost: [[Double]] = []
        var lostTotal = 0.0
        for device in 0..<deviceCount {
            let row = Capacity.allCases.map { capacity in
                Double(tally.lostNanoseconds[device * Capacity.allCases.count + capacity.rawValue]) / 1e9
            }
            lostTotal += row.reduce(0, +)
            lost.append(row)
        }
        let capacity = seconds <= 0 || deviceCount == 0 ? 1 : max(0, 1 - lostTotal / (Double(deviceCount) * seconds))
        return Figures(seconds: seconds, tally: tally, availability: availability, errorBudgetRemaining: budget,
                       lostSeconds: lost, capacityAvailability: capacity)
    }
}

/// `[availability]`: the objective the account is measured against and its rolling window.
public struct AvailabilitySettings: Sendable, Hashable {
    /// The availability objective as a fraction (0.9999 is 99.99%).
    public var objective: Double = 0.9999
    /// The rolling window (kept in 60 buckets: figures move one bucket at a time).
    public var window: Duration = .seconds(3600)

    public init() {}
}

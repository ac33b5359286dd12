import SupervisorCore

/// Prometheus metrics (docs/PROTOCOL.md 8.3, README "Monitoring"). Requests are counted in plain per-slot integer
/// arrays on the event loop (an increment and a short bucket scan per answer, no lock, no dictionary, no
/// allocation); everything is rendered in the text exposition format when `/metrics` is scraped, with the gauges
/// read from the machine then. The article's names are kept so its alert rules work unchanged:
/// `inference_requests_total{device,status}` and `inference_latency_seconds{device}`; the rest is
/// `npu_supervisor_*`.
final class SupervisorMetrics {  // loop-confined, like the rest of the driver
    /// A histogram's bucket counts (non-cumulative; the last is +Inf) and sum.
    struct Histogram {
        var counts = [Int](repeating: 0, count: SupervisorMetrics.bucketNanoseconds.count + 1)
        var sumNanoseconds: Int64 = 0

        @inline(__always) mutating func observe(_ nanoseconds: Int64) {
            var i = 0
            let bounds = SupervisorMetrics.bucketNanoseconds
            while i < bounds.count && nanoseconds > bounds[i] { i += 1 }
            counts[i] += 1
            sumNanoseconds &+= nanoseconds
        }
    }

    static let bucketSeconds: [Double] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
    static let bucketNanoseconds: [Int64] = bucketSeconds.map { Int64($0 * 1e9) }
    static let outcomes = AvailabilityAccount.Outcome.allCases

    /// Worker slots `0..<slotCount` are at index `slot + 1`; index 0 is "none" (refused, or expired before
    /// reaching a worker). Slots added later (a reload) grow the arrays on their first count.
    #if DEBUG
    private(set) var slotCount: Int
    #else
    @exclusivity(unchecked) private(set) var slotCount: Int
    #endif
    /// `requests[(slot + 1) * outcomes.count + outcome]`.
    #if DEBUG
    private(set) var requests: [Int]
    #else
    @exclusivity(unchecked) private(set) var requests: [Int]
    #endif
    #if DEBUG
    var latency: [Histogram]
    #else
    @exclusivity(unchecked) var latency: [Histogram]
    #endif
    #if DEBUG
    var queueTime: [Histogram]
    #else
    @exclusivity(unchecked) var queueTime: [Histogram]
    #endif
    #if DEBUG
    var firstChunk: [Histogram]
    #else
    @exclusivity(unchecked) var firstChunk: [Histogram]
    #endif
    /// Exits per slot and reason kind (rare: a dictionary is fine).
    var exits: [[String: Int]]
    /// Per slot: its last device probe could not run or timed out (the gauge says -1, not 0, then).
    var probeFailed: [Bool] = []

    func probeCouldNotRun(slot: Int, _ failed: Bool) {
        if slot >= probeFailed.count { probeFailed += [Bool](repeating: false, count: slot + 1 - probeFailed.count) }
        probeFailed[slot] = failed
    }

    /// Rollouts by how they ended (`complete`, `rolled_back`, `paused`).
    var rollouts: [String: Int] = [:]

    init(slotCount: Int) {
        self.slotCount = 0
        requests = [Int](repeating: 0, count: Self.outcomes.count)
        latency = [Histogram()]
        queueTime = latency
        firstChunk = latency
        exits = [[:]]
        grow(to: slotCount)
    }

    func grow(to count: Int) {
        guard count > slotCount else { return }
        let added = count - slotCount
        requests += [Int](repeating: 0, count: added * Self.outcomes.count)
        latency += [Histogram](repeating: Histogram(), count: added)
        queueTime += [Histogram](repeating: Histogram(), count: added)
        firstChunk += [Histogram](repeating: Histogram(), count: added)
        exits += [[String: Int]](repeating: [:], count: added)
        slotCount = count
    }

    /// The array index of a slot (-1: none).
    @inline(__always) func index(_ slot: Int) -> Int {
        if slot < 0 { return 0 }
        if slot >= slotCount { grow(to: slot + 1) }
        return slot &+ 1
    }

    /// One final answer. `slot` is the worker that last held it, -1 for none; `latency` from acceptance,
    /// nil for a refusal at the door.
    @inline(__always) func answered(slot: Int, _ outcome: AvailabilityAccount.Outcome, latencyNanoseconds: Int64?) {
        let i = index(slot)
        requests[i &* Self.outcomes.count &+ outcome.rawValue] &+= 1
        if let latencyNanoseconds { latency[i].observe(latencyNanoseconds) }
    }

    /// A request left the queue for its first worker after waiting this long (0 when dispatched at once).
    @inline(__always) func dispatched(slot: Int, waitedNanoseconds: Int64) {
        queueTime[index(slot)].observe(waitedNanoseconds)
    }

    @inline(__always) func firstChunk(slot: Int, afterNanoseconds: Int64) {
        firstChunk[index(slot)].observe(afterNanoseconds)
    }

    /// A rollout ended: `complete`, `rolled_back` or `paused`.
    /// Requests answered `worker_lost` as suspected of crashing workers (``RetryPolicy``).
    var quarantined = 0

    func rolloutEnded(result: String) {
        rollouts[result, default: 0] += 1
    }

    /// Every exit reason that is followed by a restart: each is always present (at 0) so that `increase()` sees the
    /// first one. An operator's or a shutdown's stop (`stopped`) is not a restart and is not counted.
    static let restartReasons: [String] = [
        ExitReason.exited(code: 1), .signaled(signal: 9, coreDumped: false), .oomKilled, .deviceOOM, .hang, .unhealthy,
        .deviceUnhealthy(""), .protocolError(""), .startTimeout, .spawnFailed(errno: 0),
    ].map(\.kind)

    /// Tensor-parallel groups: the causes of their restarts (by group index, reason kind).
    var groupExits: [Int: [String: Int]] = [:]

    func groupExited(group: Int, reason: String) {
        groupExits[group, default: [:]][reason, default: 0] += 1
    }

    func workerExited(slot: Int, reason: String) {
        if reason == ExitReason.stopped.kind { return }
        exits[index(slot)][reason, default: 0] += 1
    }
}

/// The text exposition format (version 0.0.4), written by hand: one `# HELP`/`# TYPE` per family.
struct Exposition {
    var text = ""

    mutating func family(_ name: String, _ type: String, _ help: String) {
        text += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
    }

    mutating func sample(_ name: String, _ labels: [(String, String)] = [], _ value: Double) {
        text += name
        if !labels.isEmpty {
            text += "{" + labels.map { "\($0.0)=\"\(Self.escape($0.1))\"" }.joined(separator: ",") + "}"
        }
        text += " " + Self.format(value) + "\n"
    }

    mutating func histogram(_ name: String, _ labels: [(String, String)], _ h: SupervisorMetrics.Histogram) {
        var cumulative = 0
        for (i, bound) in SupervisorMetrics.bucketSeconds.enumerated() {
            cumulative += h.counts[i]
            sample(name + "_bucket", labels + [("le", Self.format(bound))], Double(cumulative))
        }
        cumulative += h.counts[SupervisorMetrics.bucketSeconds.count]
        sample(name + "_bucket", labels + [("le", "+Inf")], Double(cumulative))
        sample(name + "_sum", labels, Double(h.sumNanoseconds) / 1e9)
        sample(name + "_count", labels, Double(cumulative))
    }

    static func escape(_ s: String) -> String {
        var out = ""
        for c in s {
            switch c {
            case "\\": out += "\\\\"
            case "\"": out += "\\\""
            case "\n": out += "\\n"
            default: out.append(c)
            }
        }
        return out
    }

    static func format(_ v: Double) -> String {
        if v.isNaN { return "NaN" }
        if v.isInfinite { return v > 0 ? "+Inf" : "-Inf" }
        if v == v.rounded() && abs(v) < 1e15 { return String(Int64(v)) }
        return "\(v)"
    }
}

/// Answers of one worker counted in plain integers: ok, failed, and a latency histogram with power-of-two
/// buckets (1 µs … ~1 h), enough for a p99 to within a factor of two. The rollout's gates compare a canary's
/// with the old revision's. Hot path: ``record(ok:latencyNanoseconds:)`` is a few integer operations.
public struct RequestStats: Sendable, Hashable {
    public static let bucketCount = 32
    public private(set) var ok = 0
    public private(set) var failed = 0
    /// `buckets[i]` counts latencies below 2^(i+10) ns (~1 µs × 2^i).
    public private(set) var buckets = [Int](repeating: 0, count: RequestStats.bucketCount)

    public init() {}

    @inline(__always)
    public mutating func record(ok isOK: Bool, latencyNanoseconds ns: Int64) {
        if isOK { ok += 1 } else { failed += 1 }
        let micros = UInt64(max(0, ns)) >> 10
        let index = micros == 0 ? 0 : min(Self.bucketCount - 1, 64 - micros.leadingZeroBitCount)
        buckets[index] += 1
    }

    public var total: Int { ok + failed }

    /// The upper bound of the bucket holding the 99th percentile, nil without answers.
    public var p99: Duration? { Self.p99(of: buckets) }

    public static func p99(of buckets: [Int]) -> Duration? {
        let total = buckets.reduce(0, +)
        guard total > 0 else { return nil }
        let rank = (total * 99 + 99) / 100
        var seen = 0
        for (index, count) in buckets.enumerated() {
            seen += count
            if seen >= rank { return .nanoseconds(Int64(1) << Int64(index + 10)) }
        }
        return nil
    }

    /// Adds another worker's histogram into `into`.
    public static func merge(_ other: RequestStats, into buckets: inout [Int]) {
        for index in buckets.indices { buckets[index] += other.buckets[index] }
    }
}

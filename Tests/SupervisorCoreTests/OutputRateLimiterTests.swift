import SupervisorCore
import Testing

/// The output rate limit's verdicts, as a table: (time in ms, line bytes) → verdict. Rate 1000 B/s, so the
/// bucket holds 1000 bytes and refills 1 byte per ms; a line costs its bytes + 1 (its newline).
struct OutputRateLimiterTests {
    enum V: Equatable { case keep, drop, marker(String) }

    static func run(_ rate: Int?, _ steps: [(ms: Int64, bytes: Int)]) -> [V] {
        var limiter = OutputRateLimiter(bytesPerSecond: rate)
        return steps.map { step in
            switch limiter.admit(lineBytes: step.bytes, nowNanoseconds: step.ms * 1_000_000) {
            case .keep: .keep
            case .drop: .drop
            case .keepAfterMarker(let m): .marker(m)
            }
        }
    }

    @Test func noLimitKeepsEverything() {
        #expect(Self.run(nil, [(0, 1 << 20), (0, 1 << 20), (1, 16384)]) == [.keep, .keep, .keep])
    }

    @Test func table() {
        let cases: [(String, [(ms: Int64, bytes: Int)], [V])] = [
            ("a burst of one second's worth is kept", [(0, 499), (0, 499)], [.keep, .keep]),
            ("past the burst: dropped", [(0, 499), (0, 499), (0, 1)], [.keep, .keep, .drop]),
            ("a line bigger than the bucket is always dropped", [(0, 1000), (5000, 1000)], [.drop, .drop]),
            ("while dropping, a line that fits waits for half the bucket",
             [(0, 999), (0, 9), (20, 9), (499, 9), (500, 9)],
             [.keep, .drop, .drop, .drop, .marker(OutputRateLimiter.marker(lines: 3, bytes: 30))]),
            ("refill is capped at one second's worth", [(0, 999), (10_000, 999), (10_000, 0)],
             [.keep, .keep, .drop]),
            ("time that goes backwards refills nothing", [(1000, 999), (500, 9)], [.keep, .drop]),
            ("one line dropped", [(0, 1000), (0, 1)],
             [.drop, .marker("[npu-supervisord: 1 line (1001 bytes) of output dropped: over output_rate_limit]")]),
        ]
        for (name, steps, expected) in cases {
            #expect(Self.run(1000, steps) == expected, "\(name)")
        }
    }

    @Test func steadyFloodGetsFewMarkers() {
        // 100-byte lines at 10x the rate for 10 s: about a tenth kept, a marker at most twice a second.
        var limiter = OutputRateLimiter(bytesPerSecond: 100_000)
        var kept = 0, markers = 0
        for i in 0..<100_000 {
            switch limiter.admit(lineBytes: 99, nowNanoseconds: Int64(i) * 100_000) {
            case .keep: kept += 1
            case .keepAfterMarker: kept += 1; markers += 1
            case .drop: break
            }
        }
        #expect(kept >= 9_000 && kept <= 12_000)
        #expect(markers <= 21)
        #expect(limiter.totalDroppedLines == 100_000 - kept)
        #expect(limiter.flushMarker() != nil || limiter.droppedLines == 0)
    }
}

/// Whether a line of a worker's output is kept (ring, log, `tail -f`) or dropped: a token bucket of bytes per
/// worker (`output_rate_limit` bytes per second, a burst of one second's worth). A flooding worker's output is
/// still read (its pipe never fills and blocks it); what is over the rate is counted, and the first line kept
/// after a run of dropped ones is preceded by one marker saying how much was dropped.
///
/// Pure: the time is passed in (nanoseconds of a monotonic clock); no clock is read here.
public struct OutputRateLimiter: Sendable, Equatable {
    /// Bytes per second; nil: no limit (every line is kept).
    public let bytesPerSecond: Int?
    /// Tokens (bytes) available now.
    public private(set) var tokens: Double
    public private(set) var lastNanoseconds: Int64?
    /// Dropped since the last marker.
    /// Dropping: a run of dropped lines ends only once half a second's worth is back in the bucket, so a
    /// steady flood gets a marker about twice a second, not one before every line that happens to fit.
    public private(set) var isDropping = false
    public private(set) var droppedLines = 0
    public private(set) var droppedBytes = 0
    /// Dropped since this limiter was made (for metrics and tests).
    public private(set) var totalDroppedLines = 0
    public private(set) var totalDroppedBytes = 0

    public enum Verdict: Equatable, Sendable {
        /// Keep the line.
        case keep
        /// Keep the line, after this marker (what was dropped before it).
        case keepAfterMarker(String)
        /// Drop the line (counted).
        case drop
    }

    public init(bytesPerSecond: Int?) {
        self.bytesPerSecond = bytesPerSecond
        self.tokens = Double(bytesPerSecond ?? 0)
    }

    /// A line's cost: its bytes plus its newline.
    public mutating func admit(lineBytes: Int, nowNanoseconds now: Int64) -> Verdict {
        guard let rate = bytesPerSecond else { return .keep }
        if let last = lastNanoseconds, now > last {
            tokens = min(Double(rate), tokens + Double(now - last) * Double(rate) / 1e9)
        }
        if lastNanoseconds == nil || now > lastNanoseconds! { lastNanoseconds = now }
        let cost = Double(lineBytes + 1)
        guard tokens >= cost, !isDropping || tokens >= max(cost, Double(rate) / 2) else {
            isDropping = true
            droppedLines += 1
            droppedBytes += lineBytes + 1
            totalDroppedLines += 1
            totalDroppedBytes += lineBytes + 1
            return .drop
        }
        tokens -= cost
        isDropping = false
        guard droppedLines > 0 else { return .keep }
        let marker = Self.marker(lines: droppedLines, bytes: droppedBytes)
        droppedLines = 0
        droppedBytes = 0
        return .keepAfterMarker(marker)
    }

    /// What was dropped and not yet reported (at the end of a process's output), as a marker; nil for nothing.
    public mutating func flushMarker() -> String? {
        guard droppedLines > 0 else { return nil }
        defer { droppedLines = 0; droppedBytes = 0 }
        return Self.marker(lines: droppedLines, bytes: droppedBytes)
    }

    public static func marker(lines: Int, bytes: Int) -> String {
        "[npu-supervisord: \(lines) line\(lines == 1 ? "" : "s") (\(bytes) bytes) of output dropped: over output_rate_limit]"
    }
}

/// A point on a monotonic clock, in nanoseconds since an arbitrary origin. The pure core never reads a clock:
/// the runtime passes `now` in (from `NIODeadline.now()`), and tests pass whatever instants their tables need.
public struct MonotonicInstant: Comparable, Hashable, Sendable, CustomStringConvertible {
    public var nanoseconds: Int64

    public init(nanoseconds: Int64) { self.nanoseconds = nanoseconds }

    public static func seconds(_ s: Double) -> MonotonicInstant { MonotonicInstant(nanoseconds: Int64(s * 1e9)) }

    public static func < (a: MonotonicInstant, b: MonotonicInstant) -> Bool { a.nanoseconds < b.nanoseconds }

    public static func + (a: MonotonicInstant, d: Duration) -> MonotonicInstant {
        MonotonicInstant(nanoseconds: a.nanoseconds &+ d.nanoseconds)
    }

    public static func - (a: MonotonicInstant, b: MonotonicInstant) -> Duration {
        .nanoseconds(a.nanoseconds &- b.nanoseconds)
    }

    public var description: String { "t+\(Double(nanoseconds) / 1e9)s" }
}

extension Duration {
    /// The duration in whole nanoseconds (saturating).
    public var nanoseconds: Int64 {
        let (s, a) = components
        let (ns, overflow) = s.multipliedReportingOverflow(by: 1_000_000_000)
        if overflow { return s < 0 ? .min : .max }
        return ns &+ a / 1_000_000_000
    }

    /// The duration in seconds as a Double, for JSON and humans.
    public var seconds: Double { Double(nanoseconds) / 1e9 }

    /// `1.5s`, `250ms`, `2m`: the shortest exact unit, as accepted by the config.
    public var configString: String {
        let ns = nanoseconds
        if ns % 3_600_000_000_000 == 0 && ns != 0 { return "\(ns / 3_600_000_000_000)h" }
        if ns % 60_000_000_000 == 0 && ns != 0 { return "\(ns / 60_000_000_000)m" }
        if ns % 1_000_000_000 == 0 { return "\(ns / 1_000_000_000)s" }
        if ns % 1_000_000 == 0 { return "\(ns / 1_000_000)ms" }
        return "\(Double(ns) / 1e9)s"
    }
}

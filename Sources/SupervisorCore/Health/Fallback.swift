/// Decides when CPU fallback workers run, with hysteresis. Pure: time and counts come in.
public struct FallbackController: Sendable {
    public enum Decision: Sendable, Hashable { case start, stop, none }

    public private(set) var whenFewerThan: Int
    public private(set) var stopAfter: Duration
    public private(set) var isActive = false
    private var healthySince: MonotonicInstant?

    public init(whenFewerThan: Int, stopAfter: Duration) {
        self.whenFewerThan = whenFewerThan
        self.stopAfter = stopAfter
    }

    /// New thresholds from a reload; whether the fallback runs stays as it is until the next evaluation.
    public mutating func update(whenFewerThan: Int, stopAfter: Duration) {
        self.whenFewerThan = whenFewerThan
        self.stopAfter = stopAfter
    }

    /// - Parameters:
    ///   - servingDeviceWorkers: device (non-fallback) workers that can serve now.
    ///   - wantedDeviceWorkers: device workers the operator wants up (stopped ones do not trigger fallback
    ///     unless nothing is left).
    public mutating func evaluate(servingDeviceWorkers: Int, wantedDeviceWorkers: Int, now: MonotonicInstant) -> Decision {
        let threshold = min(whenFewerThan, max(1, wantedDeviceWorkers))
        if servingDeviceWorkers < threshold {
            healthySince = nil
            if !isActive {
                isActive = true
                return .start
            }
            return .none
        }
        guard isActive else { return .none }
        let since = healthySince ?? now
        healthySince = since
        if now - since >= stopAfter {
            isActive = false
            healthySince = nil
            return .stop
        }
        return .none
    }

    /// When ``evaluate`` should next be called to notice that `stopAfter` has passed, if it is counting.
    public var nextCheck: MonotonicInstant? { healthySince.map { $0 + stopAfter } }
}

/// The "inference" health level of one worker (docs/ARCHITECTURE.md, "Health"): a short real request every
/// `interval`, skipped while real traffic on the worker succeeds, postponed while the worker holds its maximum
/// of requests; `failures` failed probes in a row make the worker `unhealthy` (it is restarted). Pure: the
/// runtime sends the probe as an ordinary request and reports the judged answer.
public struct InferenceProbe: Sendable, Hashable {
    public enum Step: Sendable, Hashable {
        /// Nothing to do (not serving, or a probe is already out).
        case none
        /// A real request succeeded within the interval: counted as a pass without a probe.
        case skipped
        /// The worker holds its maximum of requests: try again next interval.
        case postponed
        /// Send the probe request now and report ``result(failure:isServing:now:)``.
        case send
    }

    public enum Outcome: Sendable, Hashable {
        /// Passed; `again` when it had been failing.
        case passed(again: Bool)
        /// Failed (`count` of `failures`); `unhealthy` when that makes the streak.
        case failed(count: Int, of: Int, String, unhealthy: Bool)
        /// No verdict: the probe was lost with its worker (the exit reason speaks for it).
        case ignored
    }

    /// The answer to a probe, as far as the judge needs it.
    public enum Answer: Sendable, Hashable {
        /// No answer (the request ended without one).
        case none
        case error(code: String, message: String)
        /// An opaque non-JSON answer with this many bytes.
        case bytes(Int)
        /// A JSON object answer; the value of the configured text field when it is a string, `.some(nil)` when
        /// the field is there but not a string, nil when the field is absent.
        case json(textField: String??)
    }

    public private(set) var spec: InferenceProbeSpec
    public private(set) var consecutiveFailures = 0
    public private(set) var verdict = "unknown"
    public private(set) var nextProbeAt: MonotonicInstant?
    public private(set) var isInFlight = false
    /// When a real request last succeeded on this worker (a busy, answering worker needs no probe).
    public private(set) var lastRealSuccess: MonotonicInstant?

    public init(spec: InferenceProbeSpec) { self.spec = spec }

    /// New settings from a reload; the streak so far stays. A probe turned off stops at once.
    public mutating func update(spec: InferenceProbeSpec) {
        self.spec = spec
        if !spec.enabled { nextProbeAt = nil }
    }

    public mutating func workerBecameReady(now: MonotonicInstant) {
        consecutiveFailures = 0
        verdict = "unknown"
        schedule(now: now)
    }

    public mutating func workerGone() {
        nextProbeAt = nil
        isInFlight = false
        lastRealSuccess = nil
    }

    public mutating func stop() { nextProbeAt = nil }

    /// Hot path: one store.
    @inline(__always) public mutating func realRequestSucceeded(now: MonotonicInstant) { lastRealSuccess = now }

    private mutating func schedule(now: MonotonicInstant) {
        nextProbeAt = spec.enabled ? now + spec.interval : nil
    }

    /// ``nextProbeAt`` has passed.
    /// - Parameters:
    ///   - isServing: the worker is ready and its channel open.
    ///   - isBusy: it holds its `max_inflight` requests.
    public mutating func due(now: MonotonicInstant, isServing: Bool, isBusy: Bool) -> Step {
        nextProbeAt = nil
        guard isServing, !isInFlight else { return .none }
        if let last = lastRealSuccess, now - last < spec.interval {
            _ = result(failure: nil, skipped: true, isServing: true, now: now)
            return .skipped
        }
        guard !isBusy else {
            schedule(now: now)
            return .postponed
        }
        isInFlight = true
        return .send
    }

    /// The probe could not be dispatched after all.
    public mutating func sendFailed(now: MonotonicInstant) {
        isInFlight = false
        schedule(now: now)
    }

    /// A probe's verdict: nil is a pass, else what was wrong.
    public mutating func result(failure: String?, skipped: Bool = false, isServing: Bool, now: MonotonicInstant) -> Outcome {
        if !skipped { isInFlight = false }
        if isServing { schedule(now: now) }
        guard let failure else {
            let again = consecutiveFailures > 0
            consecutiveFailures = 0
            verdict = skipped ? "ok (real traffic)" : "ok"
            return .passed(again: again)
        }
        // A probe lost with its worker says nothing about inference: the worker's exit reason speaks for it.
        guard isServing, !failure.hasPrefix("worker_lost") else { return .ignored }
        consecutiveFailures += 1
        verdict = "failing (\(consecutiveFailures)/\(spec.failures)): \(failure)"
        return .failed(count: consecutiveFailures, of: spec.failures, failure,
                       unhealthy: consecutiveFailures >= spec.failures)
    }

    /// nil when the answer is a real answer (non-empty text), else why not.
    public static func judge(_ answer: Answer, textField: String) -> String? {
        switch answer {
        case .none: return "no answer"
        case .error(let code, let message): return "\(code): \(message)"
        case .bytes(0): return "empty answer"
        case .bytes: return nil
        case .json(let field):
            switch field {
            case nil: return nil
            case .some(nil): return "empty \(textField) in the answer"
            case .some(.some(let text)): return text.isEmpty ? "empty \(textField) in the answer" : nil
            }
        }
    }

    /// The `inference` level shown in status.
    public func level(isReady: Bool) -> String {
        guard isReady else { return "unknown" }
        return spec.enabled ? verdict : "ok (not probed)"
    }
}

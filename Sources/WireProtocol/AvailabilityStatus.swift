/// The status document's `availability` object (docs/PROTOCOL.md, "Status document"): the availability account
/// since start and over the rolling window.
public struct AvailabilityStatus: Codable, Sendable, Equatable {
    /// The configured objective as a fraction (0.9999).
    public var objective: Double
    public var windowSeconds: Double
    public var sinceStart: AvailabilitySpan
    public var window: AvailabilitySpan

    public init(objective: Double, windowSeconds: Double, sinceStart: AvailabilitySpan, window: AvailabilitySpan) {
        self.objective = objective
        self.windowSeconds = windowSeconds
        self.sinceStart = sinceStart
        self.window = window
    }

    enum CodingKeys: String, CodingKey {
        case objective, window
        case windowSeconds = "window_seconds"
        case sinceStart = "since_start"
    }
}

/// One span of the account.
public struct AvailabilitySpan: Codable, Sendable, Equatable {
    /// How long the span is (since start: the supervisor's uptime; window: at most `window_seconds`).
    public var seconds: Double
    /// Requests received: accepted + refused.
    public var received: Int
    /// Taken in (dispatched or queued).
    public var accepted: Int
    /// Answered at once without being accepted (`overloaded`, `no_workers`, `shutting_down`, `bad_request`).
    public var refused: Int
    /// Final answers to accepted requests.
    public var answered: Int
    /// Accepted requests whose client hung up before the answer (not counted).
    public var abandoned: Int
    public var succeeded: Int
    /// Failed answers (refusals included) by error code.
    public var failed: [String: Int]
    /// succeeded / (succeeded + failures other than `bad_request` and `cancelled`).
    public var availability: Double
    /// 1 - (1 - availability) / (1 - objective).
    public var errorBudgetRemaining: Double
    /// Seconds of capacity lost per device: `down`, `draining`, `failed`.
    public var capacityLostSeconds: [String: [String: Double]]
    /// 1 - device-seconds lost / (devices x seconds).
    public var capacityAvailability: Double

    public init(seconds: Double, received: Int, accepted: Int, refused: Int, answered: Int, abandoned: Int,
                succeeded: Int, failed: [String: Int], availability: Double, errorBudgetRemaining: Double,
                capacityLostSeconds: [String: [String: Double]], capacityAvailability: Double) {
        self.seconds = seconds
        self.received = received
        self.accepted = accepted
        self.refused = refused
        self.answered = answered
        self.abandoned = abandoned
        self.succeeded = succeeded
        self.failed = failed
        self.availability = availability
        self.errorBudgetRemaining = errorBudgetRemaining
        self.capacityLostSeconds = capacityLostSeconds
        self.capacityAvailability = capacityAvailability
    }

    enum CodingKeys: String, CodingKey {
        case seconds, received, accepted, refused, answered, abandoned, succeeded, failed, availability
        case errorBudgetRemaining = "error_budget_remaining"
        case capacityLostSeconds = "capacity_lost_seconds"
        case capacityAvailability = "capacity_availability"
    }
}

/// The availability account composed into the machine: each device's capacity is classified at the end of every
/// event (``AvailabilityAccount/sample(_:now:)``); requests are counted by the runtime on ``availability``.
extension SupervisorMachine {
    /// What the device slot's capacity is doing now.
    public func capacity(_ slot: Int) -> AvailabilityAccount.Capacity {
        let worker = workers[slot]
        if worker.isServing { return .serving }
        if isShuttingDown { return .draining }
        if case .failed = worker.lifecycle.state, worker.lifecycle.desired == .up { return .failed }
        if worker.lifecycle.desired == .down { return .draining }
        // Its first model load is not an outage: nothing was served yet to lose.
        if !worker.hasBeenReady && worker.lifecycle.lastExit == nil { return .serving }
        return .down
    }

    /// Samples every device's capacity into the account (end of every event).
    mutating func sampleAvailability(now: MonotonicInstant) {
        var states: [AvailabilityAccount.Capacity] = []
        states.reserveCapacity(deviceCount)
        for slot in 0..<deviceCount { states.append(capacity(slot)) }
        availability.sample(states, now: now)
    }
}

/// The availability account composed into the machine: each device's capacity is classified at the end of every
/// event (``AvailabilityAccount/sample(_:now:)``); requests are counted by the runtime on ``availability``.
extension SupervisorMachine {
    /// What the device slot's capacity is doing now.
    public func capacity(_ slot: Int) -> AvailabilityAccount.Capacity {
        if let g = workers[slot].groupIndex {
            // Every device of a group serves (or not) with the group: its leader's rotation, its lifecycle.
            let group = groups[g]
            if workers[group.leader].isServing { return .serving }
            if isShuttingDown { return .draining }
            if case .failed = group.lifecycle.state, group.lifecycle.desired == .up { return .failed }
            if group.lifecycle.desired == .down { return .draining }
            if !group.slots.contains(where: { workers[$0].hasBeenReady }) && group.lifecycle.lastExit == nil { return .serving }
            return .down
        }
        let worker = workers[slot]
        if worker.isServing { return .serving }
        if isShuttingDown { return .draining }
        if case .failed = worker.lifecycle.state, worker.lifecycle.desired == .up { return .failed }
        if worker.lifecycle.desired == .down { return .draining }
        // Its first model load is not an outage: nothing was served yet to lose.
        if !worker.hasBeenReady && worker.lifecycle.lastExit == nil { return .serving }
        return .down
    }

    /// Samples every device's capacity into the account (end of every event). A device whose id several slots
    /// share counts as serving when any of them serves, else the first of down, failed, draining that one of
    /// them is in; a device no slot serves any more (removed by a reload) counts as draining.
    mutating func sampleAvailability(now: MonotonicInstant) {
        var states = [AvailabilityAccount.Capacity](repeating: .draining, count: availability.deviceCount)
        for slot in workers.indices where !workers[slot].spec.isFallback {
            var index = availability.deviceIDs.firstIndex(of: workers[slot].spec.device) ?? -1
            if index < 0 {
                index = availability.addDevice(workers[slot].spec.device)
                states.append(.draining)
            }
            let state = capacity(slot)
            if Self.rank(state) < Self.rank(states[index]) { states[index] = state }
        }
        availability.sample(states, now: now)
    }

    /// Which state wins when slots of one device disagree: serving, then down, failed, draining.
    static func rank(_ c: AvailabilityAccount.Capacity) -> Int {
        switch c {
        case .serving: 0
        case .down: 1
        case .failed: 2
        case .draining: 3
        }
    }
}

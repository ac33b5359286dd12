import SupervisorCore
import Testing

/// The availability account as tables: request outcomes, the rolling window, capacity lost per device, the
/// figures against the objective; then composed into the machine (a crash charges `down` seconds).
struct AvailabilityTests {
    static let t0 = MonotonicInstant.seconds(1000)
    typealias Outcome = AvailabilityAccount.Outcome

    @Test func outcomesFromWireCodes() {
        let table: [(String, Outcome, Bool)] = [
            ("overloaded", .overloaded, true), ("no_workers", .noWorkers, true), ("shutting_down", .shuttingDown, true),
            ("deadline_exceeded", .deadlineExceeded, true), ("worker_lost", .workerLost, true),
            ("device_oom", .deviceOOM, true), ("worker_error", .workerError, true), ("cancelled", .cancelled, false),
            ("bad_request", .badRequest, false), ("something_new", .other, true),
        ]
        for (code, outcome, counts) in table {
            #expect(Outcome(code: code) == outcome, "\(code)")
            #expect(outcome.counts == counts, "\(code)")
        }
        #expect(Outcome.ok.code == "ok")
    }

    @Test func availabilityAndBudgetFromRequestOutcomes() {
        // (succeeded, failures by outcome, expected availability, expected budget left at 99%)
        let table: [(Int, [Outcome: Int], Double, Double)] = [
            (0, [:], 1, 1),
            (100, [:], 1, 1),
            (99, [.workerLost: 1], 0.99, 0),
            (199, [.deadlineExceeded: 1], 0.995, 0.5),
            (98, [.overloaded: 1, .noWorkers: 1], 0.98, -1),
            (100, [.badRequest: 5, .cancelled: 3], 1, 1),  // client-caused: not counted
        ]
        for (ok, failures, availability, budget) in table {
            var a = AvailabilityAccount(objective: 0.99, window: .seconds(600), devices: ["0"])
            for _ in 0..<ok {
                a.accepted(now: Self.t0)
                a.finished(.ok, accepted: true, now: Self.t0)
            }
            for (outcome, n) in failures {
                for _ in 0..<n { a.finished(outcome, accepted: false, now: Self.t0) }
            }
            let (since, window) = a.figures(now: Self.t0 + .seconds(1))
            #expect(abs(since.availability - availability) < 1e-9, "\(ok) \(failures)")
            #expect(abs(since.errorBudgetRemaining - budget) < 1e-9, "\(ok) \(failures)")
            #expect(since.tally == window.tally, "everything is inside the window")
            #expect(since.tally.succeeded == ok)
            #expect(since.tally.refused == failures.values.reduce(0, +))
            #expect(since.tally.received == ok + since.tally.refused)
            #expect(since.tally.answered == ok)
        }
    }

    @Test func acceptedAnsweredAbandoned() {
        var a = AvailabilityAccount(objective: 0.999, window: .seconds(60), devices: ["0"])
        for _ in 0..<5 { a.accepted(now: Self.t0) }
        a.finished(.ok, accepted: true, now: Self.t0)
        a.finished(.deadlineExceeded, accepted: true, now: Self.t0)
        a.finished(.noWorkers, accepted: true, now: Self.t0)  // answered from the queue: accepted, not refused
        a.abandoned(now: Self.t0)
        a.finished(.overloaded, accepted: false, now: Self.t0)
        let t = a.figures(now: Self.t0).sinceStart.tally
        #expect(t.accepted == 5 && t.refused == 1 && t.received == 6)
        #expect(t.answered == 3 && t.abandoned == 1 && t.succeeded == 1)
        #expect(t.count(.noWorkers) == 1 && t.count(.overloaded) == 1 && t.countedFailures == 3)
    }

    @Test func theRollingWindowForgetsOldBuckets() {
        // 60 s window: 60 buckets of 1 s.
        var a = AvailabilityAccount(objective: 0.99, window: .seconds(60), devices: ["0"])
        a.finished(.workerLost, accepted: false, now: Self.t0)
        a.finished(.ok, accepted: false, now: Self.t0 + .seconds(30))
        var (since, window) = a.figures(now: Self.t0 + .seconds(59))
        #expect(window.tally.count(.workerLost) == 1 && window.availability == 0.5)
        a.finished(.ok, accepted: false, now: Self.t0 + .seconds(61))
        (since, window) = a.figures(now: Self.t0 + .seconds(61))
        #expect(window.tally.count(.workerLost) == 0, "the failure at t0 left the window")
        #expect(window.tally.succeeded == 2 && window.availability == 1)
        #expect(since.tally.count(.workerLost) == 1 && since.tally.succeeded == 2)
        #expect(window.seconds == 60 && since.seconds == 61)
        // A long silence clears the whole window.
        a.finished(.ok, accepted: false, now: Self.t0 + .seconds(1000))
        (since, window) = a.figures(now: Self.t0 + .seconds(1000))
        #expect(window.tally.succeeded == 1 && since.tally.succeeded == 3)
    }

    @Test func aLateEventCountsInTheCurrentBucketAndTheWindowKeepsItsData() {
        // The runtime's events carry the time of their read burst, so one may come after a later one.
        var a = AvailabilityAccount(objective: 0.99, window: .seconds(60), devices: ["0"])
        a.finished(.ok, accepted: false, now: Self.t0)
        a.finished(.workerLost, accepted: false, now: Self.t0 + .seconds(30))
        for step in 1...40 {
            a.finished(.ok, accepted: false, now: Self.t0 + .seconds(30) + .milliseconds(Int64(step) * 1000))
            // Late: its time was read before the one above (1 ms earlier, in the bucket before).
            a.finished(.ok, accepted: false, now: Self.t0 + .seconds(30) + .milliseconds(Int64(step) * 1000 - 1))
        }
        let (since, window) = a.figures(now: Self.t0 + .seconds(70))
        #expect(since.tally.succeeded == 81)
        #expect(window.tally.count(.workerLost) == 1, "the failure 40 s ago is still inside the 60 s window")
        #expect(window.tally.succeeded == 80, "only the answer at t0 left the window")
    }

    @Test func capacityLostIsChargedToTheStateSeenAtTheLastSample() {
        var a = AvailabilityAccount(objective: 0.999, window: .seconds(600), devices: ["0", "1"])
        a.sample([.serving, .serving], now: Self.t0)
        a.sample([.down, .serving], now: Self.t0 + .seconds(10))
        a.sample([.serving, .failed], now: Self.t0 + .seconds(14))   // device 0 was down 4 s
        a.sample([.serving, .draining], now: Self.t0 + .seconds(20)) // device 1 failed 6 s
        // Read at t0+30 without a new sample: device 1 has been draining 10 s.
        let (since, window) = a.figures(now: Self.t0 + .seconds(30))
        let C = AvailabilityAccount.Capacity.self
        #expect(since.lostSeconds[0][C.down.rawValue] == 4)
        #expect(since.lostSeconds[1][C.failed.rawValue] == 6)
        #expect(since.lostSeconds[1][C.draining.rawValue] == 10)
        #expect(abs(since.capacityAvailability - (1 - 20.0 / 60)) < 1e-9)
        #expect(window.lostSeconds == since.lostSeconds)
    }

    @Test func devicesAreAddedByIDAndGrowEveryTally() {
        var a = AvailabilityAccount(objective: 0.999, window: .seconds(600), devices: ["0"])
        a.sample([.down], now: Self.t0)
        #expect(a.addDevice("0") == 0, "known")
        #expect(a.addDevice("7") == 1)
        a.sample([.down, .failed], now: Self.t0 + .seconds(2))
        let since = a.figures(now: Self.t0 + .seconds(5)).sinceStart
        let C = AvailabilityAccount.Capacity.self
        #expect(since.lostSeconds[0][C.down.rawValue] == 5)
        #expect(since.lostSeconds[1][C.failed.rawValue] == 3)
    }

    @Test func aCrashChargesDownSecondsUntilTheWorkerIsBackAndTheFirstLoadIsNot() {
        var m = SupervisorMachine(config: config(devices: 2), protocolVersion: 1)
        _ = m.handle(.boot, now: Self.t0)
        #expect(m.capacity(0) == .serving, "the first model load is not an outage")
        m.makeServing(0, pid: 42, now: Self.t0 + .seconds(2))
        m.makeServing(1, pid: 43, now: Self.t0 + .seconds(2))
        _ = m.handle(.processExited(slot: 0, pid: 42, .signaled(signal: 9, coreDumped: false), oomKillsRose: nil,
                                    jitter: 0), now: Self.t0 + .seconds(10))
        _ = m.handle(.channelClosed(slot: 0, pid: 42), now: Self.t0 + .seconds(10))
        #expect(m.capacity(0) == .down && m.capacity(1) == .serving)
        m.frameReceived(slot: 1, now: Self.t0 + .seconds(10))  // device 1 keeps its heartbeat
        _ = m.handle(.timer, now: Self.t0 + .seconds(11))  // backoff over: a new process starts
        m.makeServing(0, pid: 44, now: Self.t0 + .seconds(13))
        #expect(m.capacity(0) == .serving)
        let since = m.availability.figures(now: Self.t0 + .seconds(20)).sinceStart
        #expect(since.lostSeconds[0][AvailabilityAccount.Capacity.down.rawValue] == 3)
        #expect(since.lostSeconds[1].reduce(0, +) == 0)
        // An operator's stop is draining, not down.
        _ = m.handle(.control(.stop, slots: [1], requestedBy: 0), now: Self.t0 + .seconds(20))
        #expect(m.capacity(1) == .draining)
    }
}

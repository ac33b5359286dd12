import SupervisorCore
import Testing

/// What systemd is told, and the graceful shutdown, as tables.
struct ReadinessTests {
    static let t0 = MonotonicInstant.seconds(5)

    @Test func readyOnlyOnceAWorkerServesThenStatusOnChange() {
        var readiness = Readiness(readyTimeout: nil, watchdogInterval: nil)
        _ = readiness.begin(now: Self.t0, loading: true)
        #expect(readiness.healthPublished(isUnavailable: true, summary: "unavailable: 0/2 workers ready")
            == [.status("unavailable: 0/2 workers ready")], "no READY while nothing serves; STATUS says why")
        #expect(readiness.healthPublished(isUnavailable: false, summary: "degraded: 1/2")
            == [.ready(status: "degraded: 1/2")])
        #expect(readiness.healthPublished(isUnavailable: false, summary: "degraded: 1/2") == [], "no repeat")
        #expect(readiness.healthPublished(isUnavailable: false, summary: "2/2 workers ready\nx")
            == [.status("2/2 workers ready x")], "one line")
    }

    @Test func startUpIsExtendedWhileWorkersLoad() {
        var readiness = Readiness(readyTimeout: nil, watchdogInterval: nil)
        #expect(readiness.begin(now: Self.t0, loading: true) == [.extendTimeout(microseconds: 20_000_000)])
        #expect(readiness.nextDeadline == Self.t0 + .seconds(5))
        #expect(readiness.timer(now: Self.t0 + .seconds(5), loading: false, summary: "x") == [],
                "nothing loading: a stuck start-up is not extended")
        #expect(readiness.timer(now: Self.t0 + .seconds(10), loading: true, summary: "x")
            == [.extendTimeout(microseconds: 20_000_000)])
        _ = readiness.healthPublished(isUnavailable: false, summary: "ok")
        #expect(readiness.nextDeadline == nil, "after READY nothing is extended")
    }

    @Test func readyTimeoutSendsReadyWithTheReason() {
        var readiness = Readiness(readyTimeout: .seconds(30), watchdogInterval: nil)
        _ = readiness.begin(now: Self.t0, loading: true)
        #expect(readiness.timer(now: Self.t0 + .seconds(30), loading: true, summary: "unavailable: 0/1")
            == [.ready(status: "start-up grace ready_timeout (30s) passed; unavailable: 0/1")])
        #expect(readiness.hasSentReady)
    }

    @Test func watchdogEveryInterval() {
        var readiness = Readiness(readyTimeout: nil, watchdogInterval: .seconds(2))
        #expect(readiness.begin(now: Self.t0, loading: false).first == .watchdog)
        _ = readiness.healthPublished(isUnavailable: false, summary: "ok")
        #expect(readiness.nextDeadline == Self.t0 + .seconds(2))
        #expect(readiness.timer(now: Self.t0 + .seconds(2), loading: false, summary: nil) == [.watchdog])
        #expect(readiness.nextDeadline == Self.t0 + .seconds(4))
    }

    @Test func reloadIsBracketedAndStoppingEndsReadiness() {
        var readiness = Readiness(readyTimeout: nil, watchdogInterval: nil)
        #expect(readiness.reloadBegan(monotonicMicroseconds: 7) == [], "not before READY")
        _ = readiness.healthPublished(isUnavailable: false, summary: "ok")
        #expect(readiness.reloadBegan(monotonicMicroseconds: 7) == [.reloading(monotonicMicroseconds: 7)])
        #expect(readiness.reloadBegan(monotonicMicroseconds: 8) == [], "one at a time")
        #expect(readiness.reloadFinished(summary: "ok") == [.reloaded(status: "ok")])
        #expect(readiness.stopping(reason: "signal") == [.stopping(status: "stopping: signal")])
        #expect(readiness.reloadBegan(monotonicMicroseconds: 9) == [])
    }

    @Test func shutdownDrainsThenStopsThenCloses() {
        var shutdown = Shutdown()
        let r1 = shutdown.requested(now: Self.t0, timeout: .seconds(10))
        #expect(r1)
        let r2 = shutdown.requested(now: Self.t0, timeout: .seconds(10))
        #expect(!r2, "once")
        #expect(shutdown.nextDeadline == Self.t0 + .seconds(10))
        let r3 = shutdown.shouldStopWorkers(now: Self.t0, requestsInFlight: 2, anyServing: true)
        #expect(!r3)
        let early = shutdown.workersGone()
        #expect(!early, "not while draining")
        let timedOut = shutdown.shouldStopWorkers(now: Self.t0 + .seconds(10), requestsInFlight: 2, anyServing: true)
        #expect(timedOut)
        let r4 = shutdown.workersGone()
        #expect(r4)
        let again = shutdown.workersGone()
        #expect(!again, "the sockets are closed once")

        var idle = Shutdown()
        _ = idle.requested(now: Self.t0, timeout: .seconds(10))
        let r5 = idle.shouldStopWorkers(now: Self.t0, requestsInFlight: 0, anyServing: true)
        #expect(r5)
        var orphaned = Shutdown()
        _ = orphaned.requested(now: Self.t0, timeout: .seconds(10))
        let orphanedStops = orphaned.shouldStopWorkers(now: Self.t0, requestsInFlight: 3, anyServing: false)
        #expect(orphanedStops, "no worker can answer: nothing to wait for")
    }

    @Test func controlVerbsAndSelection() throws {
        #expect(ControlVerb.allCases.filter(\.isMutating)
            == [.start, .stop, .restart, .shutdown, .drain, .undrain, .reload, .rollout])
        #expect(!ControlVerb.rollout.isMutating(action: "status") && !ControlVerb.rollout.isMutating(action: nil))
        #expect(ControlVerb.rollout.isMutating(action: "undo"))
        #expect(try WorkerSelection.select(["all"], among: ["0", "1"], allowEmpty: false) == [0, 1])
        #expect(try WorkerSelection.select(nil, among: ["0", "1"], allowEmpty: true) == [0, 1])
        #expect(try WorkerSelection.select(["1", "0"], among: ["0", "1"], allowEmpty: false) == [1, 0])
        #expect(throws: WorkerSelection.Failure(description: "name one or more devices, or all")) {
            try WorkerSelection.select([], among: ["0"], allowEmpty: false)
        }
        #expect(throws: WorkerSelection.Failure(description: "unknown device '7'; configured: 0, 1")) {
            try WorkerSelection.select(["7"], among: ["0", "1"], allowEmpty: false)
        }
        // A slot a reload removed is "" among the configured ids: never selected, never listed, and its old id
        // gets a message of its own.
        #expect(try WorkerSelection.select(["all"], among: ["0", "", "1"], allowEmpty: false) == [0, 2])
        #expect(try WorkerSelection.select(nil, among: ["0", ""], allowEmpty: true) == [0])
        #expect(throws: WorkerSelection.Failure(description: "unknown device ''; configured: 0, 1")) {
            try WorkerSelection.select([""], among: ["0", "", "1"], allowEmpty: false)
        }
        #expect(throws: WorkerSelection.Failure(
            description: "device 'x' was removed from the configuration by a reload; configured: 0, 1")) {
            try WorkerSelection.select(["x"], among: ["0", "", "1"], removed: ["x"], allowEmpty: false)
        }
    }

    @Test(arguments: [
        (nil, "tail takes exactly one device; none named"),
        ([], "tail takes exactly one device; none named"),
        (["all"], "tail takes exactly one device, not all"),
        (["0", "1"], "tail takes exactly one device; 2 named (0, 1)"),
        (["0", "9"], "tail takes exactly one device; 2 named (0, 9)"),
        (["9"], "unknown device '9'; configured: 0, 1"),
        (["x"], "device 'x' was removed from the configuration by a reload; configured: 0, 1"),
        (["1"], nil),
    ] as [([String]?, String?)])
    func oneDeviceForTail(devices: [String]?, expected: String?) {
        do {
            let slot = try WorkerSelection.selectOne(devices, verb: "tail", among: ["0", "", "1"], removed: ["x"])
            #expect(expected == nil && slot == 2)
        } catch {
            #expect(error.description == expected)
        }
    }
}

import SupervisorCore
import Testing

/// The supervision state machine as tables: events with explicit instants in, actions out. No clock, no I/O.
struct WorkerStateMachineTests {
    static let t0 = MonotonicInstant.seconds(1000)

    static func policy(_ restart: RestartPolicy = .always, maxRestarts: Int = 3) -> WorkerStateMachine.Policy {
        WorkerStateMachine.Policy(
            restart: restart, backoff: Backoff(initial: .seconds(1), maximum: .seconds(8), multiplier: 2, jitter: 0),
            backoffResetAfter: .seconds(60), maxRestarts: maxRestarts, restartWindow: .seconds(60),
            failedRetryInterval: .seconds(300), startTimeout: .seconds(30), stopTimeout: .seconds(15),
            killRepeat: .seconds(5))
    }

    /// A machine with a ready worker (pid 100) since t0.
    static func ready(_ policy: WorkerStateMachine.Policy = policy()) -> WorkerStateMachine {
        var m = WorkerStateMachine(policy: policy)
        let r1 = m.start(now: t0)
        #expect(r1 == .spawn)
        m.spawned(pid: 100, now: t0)
        let r2 = m.readyReceived(now: t0)
        #expect(r2)
        return m
    }

    @Test func startSpawnsAndReadyMakesReady() {
        var m = WorkerStateMachine(policy: Self.policy())
        #expect(m.stateName == "stopped")
        let r3 = m.start(now: Self.t0)
        #expect(r3 == .spawn)
        m.spawned(pid: 42, now: Self.t0)
        #expect(m.state == .starting(pid: 42, since: Self.t0))
        #expect(m.nextDeadline == Self.t0 + .seconds(30), "the start timeout is armed")
        let r4 = m.readyReceived(now: Self.t0 + .seconds(2))
        #expect(r4)
        #expect(m.isReady && m.pid == 42 && m.nextDeadline == nil)
        let r5 = m.readyReceived(now: Self.t0 + .seconds(3))
        #expect(!r5, "a second ready changes nothing")
    }

    @Test(arguments: [
        (ExitReason.signaled(signal: 9, coreDumped: false), "signaled(9)"),
        (.exited(code: 1), "exited(1)"),
        (.exited(code: 0), "exited(0)"),
        (.signaled(signal: 11, coreDumped: true), "signaled(11)"),
    ])
    func anExitBacksOffThenRestarts(reason: ExitReason, shown: String) {
        var m = Self.ready()
        let r6 = m.exited(reason, now: Self.t0 + .seconds(5), jitter: 0.5)
        #expect(r6 == nil)
        #expect(m.state == .backoff(until: Self.t0 + .seconds(6)))
        #expect(m.lastExit?.description == shown)
        #expect(m.restarts == 1)
        let r7 = m.timerFired(now: Self.t0 + .seconds(5.5))
        #expect(r7 == nil, "too early")
        let r8 = m.timerFired(now: Self.t0 + .seconds(6))
        #expect(r8 == .spawn)
    }

    @Test func backoffGrowsAndIsCapped() {
        var m = Self.ready(Self.policy(maxRestarts: 100))
        var now = Self.t0
        var delays: [Duration] = []
        for pid in Int32(101)...106 {
            now = now + .seconds(1)
            _ = m.exited(.exited(code: 1), now: now, jitter: 0.5)
            guard case .backoff(let until) = m.state else {
                Issue.record("expected backoff, got \(m.state)")
                return
            }
            delays.append(until - now)
            now = until
            let r9 = m.timerFired(now: now)
            #expect(r9 == .spawn)
            m.spawned(pid: pid, now: now)
        }
        #expect(delays == [.seconds(1), .seconds(2), .seconds(4), .seconds(8), .seconds(8), .seconds(8)])
    }

    @Test func backoffResetsAfterAStablePeriod() {
        var m = Self.ready(Self.policy(maxRestarts: 100))
        _ = m.exited(.exited(code: 1), now: Self.t0 + .seconds(1), jitter: 0.5)
        _ = m.timerFired(now: Self.t0 + .seconds(2))
        m.spawned(pid: 101, now: Self.t0 + .seconds(2))
        _ = m.exited(.exited(code: 1), now: Self.t0 + .seconds(3), jitter: 0.5)
        #expect(m.state == .backoff(until: Self.t0 + .seconds(5)), "second failure in a row: 2 s")
        _ = m.timerFired(now: Self.t0 + .seconds(5))
        m.spawned(pid: 102, now: Self.t0 + .seconds(5))
        _ = m.readyReceived(now: Self.t0 + .seconds(6))
        // Ready for 100 s (more than backoff_reset_after = 60 s): restarted at once, no backoff...
        let action = m.exited(.exited(code: 1), now: Self.t0 + .seconds(106), jitter: 0.5)
        #expect(action == .spawn && m.restarts == 3)
        m.spawned(pid: 103, now: Self.t0 + .seconds(106))
        // ...and if it fails again soon, backoff starts from 1 s again.
        _ = m.exited(.exited(code: 1), now: Self.t0 + .seconds(107), jitter: 0.5)
        #expect(m.state == .backoff(until: Self.t0 + .seconds(108)))
    }

    /// Good service counts however the process was taken down: a worker killed as hung (or a rank stopped with
    /// its group) after serving for longer than backoff_reset_after is restarted at once.
    @Test func aFaultAfterLongServiceIsRestartedAtOnce() {
        var m = Self.ready(Self.policy(maxRestarts: 100))
        #expect(m.fault(.hang, now: Self.t0 + .seconds(100)) == .signalGroup(9))
        #expect(m.exited(.signaled(signal: 9, coreDumped: false), now: Self.t0 + .seconds(100), jitter: 0.5) == .spawn)
        m.spawned(pid: 101, now: Self.t0 + .seconds(100))
        _ = m.readyReceived(now: Self.t0 + .seconds(101))
        #expect(m.partFailed(.exited(code: 1), now: Self.t0 + .seconds(200)) == .signalGroup(15))
        #expect(m.exited(.stopped, now: Self.t0 + .seconds(200), jitter: 0.5) == .spawn)
        #expect(m.lastExit == .exited(code: 1))
        // A hang soon after the start is a repeated failure: backoff.
        m.spawned(pid: 102, now: Self.t0 + .seconds(200))
        _ = m.readyReceived(now: Self.t0 + .seconds(201))
        _ = m.fault(.hang, now: Self.t0 + .seconds(205))
        #expect(m.exited(.signaled(signal: 9, coreDumped: false), now: Self.t0 + .seconds(205), jitter: 0.5) == nil)
        #expect(m.stateName == "backoff")
    }

    @Test func tooManyRestartsInTheWindowMarkFailed() {
        var m = Self.ready(Self.policy(maxRestarts: 3))
        var now = Self.t0
        for pid in Int32(101)...103 {
            now = now + .seconds(1)
            _ = m.exited(.exited(code: 1), now: now, jitter: 0.5)
            guard case .backoff(let until) = m.state else {
                Issue.record("restart \(pid) should back off")
                return
            }
            now = until
            _ = m.timerFired(now: now)
            m.spawned(pid: pid, now: now)
        }
        now = now + .seconds(1)
        let r10 = m.exited(.exited(code: 1), now: now, jitter: 0.5)
        #expect(r10 == nil)
        #expect(m.state == .failed(retryAt: now + .seconds(300)))
        #expect(m.restarts == 3)
        let r11 = m.timerFired(now: now + .seconds(299))
        #expect(r11 == nil)
        let r12 = m.timerFired(now: now + .seconds(300))
        #expect(r12 == .spawn, "failed devices are re-tried on a slow timer")
    }

    @Test func restartsOutsideTheWindowDoNotAccumulate() {
        var m = Self.ready(Self.policy(maxRestarts: 2))
        var now = Self.t0
        for pid in Int32(101)...110 {
            now = now + .seconds(61)  // each failure more than a window after the previous one
            let action = m.exited(.exited(code: 1), now: now, jitter: 0.5)
            switch m.state {
            case .backoff(let until):
                now = until
                _ = m.timerFired(now: now)
            case .stopped where action == .spawn:
                break  // the first: it had served for 61 s (backoff_reset_after 60 s), restarted at once
            default:
                Issue.record("restart \(pid) should back off or restart at once, got \(m.state)")
                return
            }
            m.spawned(pid: pid, now: now)
        }
    }

    @Test func exitCode78IsNeverRestarted() {
        var m = Self.ready()
        let r13 = m.exited(.exited(code: 78), now: Self.t0 + .seconds(1), jitter: 0)
        #expect(r13 == nil)
        #expect(m.state == .failed(retryAt: nil))
        #expect(m.nextDeadline == nil)
        let r14 = m.start(now: Self.t0 + .seconds(2))
        #expect(r14 == .spawn, "the operator may start it again")
    }

    @Test(arguments: [
        (RestartPolicy.never, ExitReason.exited(code: 1), "stopped"),
        (.onFailure, .exited(code: 0), "stopped"),
        (.onFailure, .exited(code: 1), "backoff"),
        (.always, .exited(code: 0), "backoff"),
    ])
    func restartPolicies(policy: RestartPolicy, reason: ExitReason, next: String) {
        var m = Self.ready(Self.policy(policy))
        _ = m.exited(reason, now: Self.t0 + .seconds(1), jitter: 0)
        #expect(m.stateName == next)
    }

    @Test func stopSendsTermThenKill() {
        var m = Self.ready()
        let r15 = m.stop(now: Self.t0)
        #expect(r15 == .signalGroup(15))
        #expect(m.state == .stopping(pid: 100, step: .term, deadline: Self.t0 + .seconds(15)))
        let r16 = m.timerFired(now: Self.t0 + .seconds(14))
        #expect(r16 == nil)
        let r17 = m.timerFired(now: Self.t0 + .seconds(15))
        #expect(r17 == .signalGroup(9))
        let r18 = m.exited(.signaled(signal: 9, coreDumped: false), now: Self.t0 + .seconds(16), jitter: 0)
        #expect(r18 == nil)
        #expect(m.stateName == "stopped")
        #expect(m.restarts == 0)
    }

    @Test func aCleanStopIsReportedAsStopped() {
        var m = Self.ready()
        _ = m.stop(now: Self.t0)
        _ = m.exited(.signaled(signal: 15, coreDumped: false), now: Self.t0 + .seconds(1), jitter: 0)
        #expect(m.lastExit == .stopped)
    }

    @Test func faultsAreReportedWithTheSupervisorsReason() {
        var m = Self.ready()
        let r19 = m.fault(.hang, now: Self.t0 + .seconds(10))
        #expect(r19 == .signalGroup(9))
        // waitpid says SIGKILL; the reason shown is the one the supervisor decided.
        _ = m.exited(.signaled(signal: 9, coreDumped: false), now: Self.t0 + .seconds(10), jitter: 0)
        #expect(m.lastExit == .hang)
        #expect(m.exitCounts == ["hang": 1])
    }

    @Test func startTimeoutKills() {
        var m = WorkerStateMachine(policy: Self.policy())
        _ = m.start(now: Self.t0)
        m.spawned(pid: 7, now: Self.t0)
        let r20 = m.timerFired(now: Self.t0 + .seconds(30))
        #expect(r20 == .signalGroup(9))
        _ = m.exited(.signaled(signal: 9, coreDumped: false), now: Self.t0 + .seconds(30), jitter: 0)
        #expect(m.lastExit == .startTimeout)
        #expect(m.stateName == "backoff")
    }

    @Test func operatorRestartIsImmediateAndNotCounted() {
        var m = Self.ready()
        let r21 = m.restart(now: Self.t0)
        #expect(r21 == .signalGroup(15))
        let r22 = m.exited(.exited(code: 0), now: Self.t0 + .seconds(1), jitter: 0)
        #expect(r22 == .spawn)
        #expect(m.restarts == 0)
        #expect(m.desired == .up)
    }

    @Test func deviceOOMAttribution() {
        var m = Self.ready()
        m.attribute(.deviceOOM, until: Self.t0 + .seconds(5))
        _ = m.exited(.exited(code: 1), now: Self.t0 + .seconds(1), jitter: 0)
        #expect(m.lastExit == .deviceOOM)
    }

    @Test func staleDeviceOOMAttributionIsNotBlamed() {
        var m = Self.ready()
        m.attribute(.deviceOOM, until: Self.t0 + .seconds(5))
        _ = m.exited(.signaled(signal: 11, coreDumped: false), now: Self.t0 + .seconds(60), jitter: 0)
        #expect(m.lastExit == .signaled(signal: 11, coreDumped: false))
    }

    @Test func anOperatorStopIsStoppedWhateverTheExitCode() {
        var m = Self.ready()
        _ = m.stop(now: Self.t0)
        _ = m.exited(.exited(code: 0), now: Self.t0 + .seconds(1), jitter: 0)
        #expect(m.lastExit == .stopped)
    }

    @Test func startWhileStoppingRespawnsAtOnceWithoutBackoff() {
        var m = Self.ready()
        _ = m.stop(now: Self.t0)
        let r = m.start(now: Self.t0)
        #expect(r == nil)
        let after = m.exited(.exited(code: 0), now: Self.t0 + .seconds(1), jitter: 0)
        #expect(after == .spawn)
        #expect(m.restarts == 0)
    }

    @Test func spawnFailureIsAnExitLikeAnyOther() {
        var m = WorkerStateMachine(policy: Self.policy())
        _ = m.start(now: Self.t0)
        let r23 = m.spawnFailed(errno: 2, now: Self.t0, jitter: 0.5)
        #expect(r23 == nil)
        #expect(m.lastExit == .spawnFailed(errno: 2))
        #expect(m.lastExit?.description == "spawn_failed(2)")
        #expect(m.stateName == "backoff")
    }

    @Test func stopDuringBackoffStopsAtOnce() {
        var m = Self.ready()
        _ = m.exited(.exited(code: 1), now: Self.t0, jitter: 0)
        let r24 = m.stop(now: Self.t0)
        #expect(r24 == nil)
        #expect(m.stateName == "stopped")
        #expect(m.nextDeadline == nil)
    }
}

struct BackoffTests {
    @Test(arguments: [(0.0, 0.9), (0.5, 1.0), (0.999, 1.0998)])
    func jitterSpreadsTheDelay(sample: Double, factor: Double) {
        let b = Backoff(initial: .seconds(1), maximum: .seconds(30), multiplier: 2, jitter: 0.1)
        let d = b.delay(attempt: 0, jitterSample: sample)
        #expect(abs(d.seconds - factor) < 0.001)
    }

    @Test func intensityWindowSlides() {
        var i = RestartIntensity(maxRestarts: 2, window: .seconds(10))
        let t = MonotonicInstant.seconds(0)
        let r25 = i.recordRestart(at: t)
        #expect(!r25)
        let r26 = i.recordRestart(at: t + .seconds(1))
        #expect(!r26)
        let r27 = i.recordRestart(at: t + .seconds(2))
        #expect(r27)
        let r28 = i.recordRestart(at: t + .seconds(12))
        #expect(!r28, "the first two have left the window")
    }
}

struct HealthAggregatorTests {
    static func w(_ device: String, _ state: String, up: Bool = true) -> WorkerHealthInput {
        WorkerHealthInput(device: device, state: state, desiredUp: up, isServing: state == "ready",
                          lastExit: state == "ready" ? nil : "signaled(9)", restarts: state == "ready" ? 0 : 2)
    }

    @Test(arguments: [
        (["ready", "ready"], OverallHealth.ok),
        (["ready", "backoff"], .degraded),
        (["failed", "backoff"], .unavailable),
        (["starting", "starting"], .unavailable),
    ])
    func table(states: [String], expected: OverallHealth) {
        let workers = states.enumerated().map { Self.w(String($0.offset), $0.element) }
        #expect(HealthAggregator.aggregate(workers).0 == expected)
    }

    @Test func reasonNamesTheDevices() {
        let (health, reason) = HealthAggregator.aggregate([Self.w("0", "ready"), Self.w("1", "failed")])
        #expect(health == .degraded)
        #expect(reason == "degraded: 1/2 workers ready (device 1 failed (signaled(9) x2))")
    }

    @Test func operatorStoppedDevicesDoNotDegrade() {
        let (health, reason) = HealthAggregator.aggregate([Self.w("0", "ready"), Self.w("1", "stopped", up: false)])
        #expect(health == .ok)
        #expect(reason.contains("stopped: 1"))
    }

    @Test func minReady() {
        let workers = [Self.w("0", "ready"), Self.w("1", "backoff"), Self.w("2", "backoff")]
        #expect(HealthAggregator.aggregate(workers, minReady: 2).0 == .unavailable)
        #expect(HealthAggregator.aggregate(workers, minReady: 1).0 == .degraded)
    }
}

struct HealthLevelsTests {
    @Test func fallbackServingIsDegradedNotUnavailable() {
        let workers = [
            WorkerHealthInput(device: "0", state: "failed", desiredUp: true, isServing: false, lastExit: "hang", restarts: 5),
            WorkerHealthInput(device: "cpu0", state: "ready", desiredUp: true, isServing: true, lastExit: nil, restarts: 0,
                              isFallback: true),
        ]
        let (health, reason) = HealthAggregator.aggregate(workers)
        #expect(health == .degraded)
        #expect(reason.contains("CPU fallback active (1/1 ready)"))
    }

    @Test func outOfRotationIsExplained() {
        let workers = [
            WorkerHealthInput(device: "0", state: "ready", desiredUp: true, isServing: false, lastExit: nil, restarts: 0,
                              outOfRotation: "npu-smi: Health Status : Critical"),
            WorkerHealthInput(device: "1", state: "ready", desiredUp: true, isServing: true, lastExit: nil, restarts: 0),
        ]
        let (health, reason) = HealthAggregator.aggregate(workers)
        #expect(health == .degraded)
        #expect(reason.contains("device 0 out of rotation: npu-smi: Health Status : Critical"))
    }

    @Test func fallbackHysteresis() {
        var c = FallbackController(whenFewerThan: 2, stopAfter: .seconds(10))
        let t = MonotonicInstant.seconds(0)
        #expect(c.evaluate(servingDeviceWorkers: 4, wantedDeviceWorkers: 4, now: t) == .none)
        #expect(c.evaluate(servingDeviceWorkers: 1, wantedDeviceWorkers: 4, now: t + .seconds(1)) == .start)
        #expect(c.evaluate(servingDeviceWorkers: 0, wantedDeviceWorkers: 4, now: t + .seconds(2)) == .none)
        #expect(c.evaluate(servingDeviceWorkers: 3, wantedDeviceWorkers: 4, now: t + .seconds(3)) == .none)
        #expect(c.nextCheck == t + .seconds(13))
        #expect(c.evaluate(servingDeviceWorkers: 1, wantedDeviceWorkers: 4, now: t + .seconds(5)) == .none,
                "devices dipped again: the clock restarts")
        #expect(c.evaluate(servingDeviceWorkers: 4, wantedDeviceWorkers: 4, now: t + .seconds(6)) == .none)
        #expect(c.evaluate(servingDeviceWorkers: 4, wantedDeviceWorkers: 4, now: t + .seconds(16)) == .stop)
        #expect(!c.isActive)
    }

    @Test func holdFailedStopsAndStaysFailedUntilStarted() {
        var m = WorkerStateMachineTests.ready()
        let r1 = m.holdFailed(.deviceUnhealthy("Critical"), now: WorkerStateMachineTests.t0)
        #expect(r1 == .signalGroup(15))
        let r2 = m.exited(.exited(code: 0), now: WorkerStateMachineTests.t0 + .seconds(1), jitter: 0)
        #expect(r2 == nil)
        #expect(m.isHeldFailed)
        #expect(m.lastExit?.description == "device_unhealthy")
        #expect(m.nextDeadline == nil)
        let r3 = m.start(now: WorkerStateMachineTests.t0 + .seconds(60))
        #expect(r3 == .spawn)
    }
}

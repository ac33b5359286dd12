import SupervisorCore
import Testing

/// The rollout machine alone (phases × what the workers do), then through the composed machine: drain,
/// rolling restart, reload in place / rolled / added / removed, automatic rollback, gates.
struct RolloutTests {
    static let t0 = MonotonicInstant.seconds(100)

    static func spec(_ id: String, command: String = "npu-worker") -> WorkerSpec {
        var spec = config(devices: 1).workers[0]
        spec.device = id
        spec.command = [command]
        return spec
    }

    static func steps(_ ids: [String], to command: String = "new") -> [Rollout.Step] {
        ids.enumerated().map { Rollout.Step(slot: $0.offset, device: $0.element, from: spec($0.element),
                                            to: spec($0.element, command: command)) }
    }

    static let settings = Rollout.Settings(drainTimeout: .seconds(5), progressDeadline: .seconds(20),
                                           minReadyTime: .seconds(2), bakeTime: .seconds(10), maxErrorRate: 0.1,
                                           minRequests: 10, maxP99Ratio: 2)

    /// Views: ready with a process unless said otherwise.
    struct World {
        var views: [Int: Rollout.WorkerView] = [:]
        func view(_ slot: Int) -> Rollout.WorkerView {
            views[slot] ?? Rollout.WorkerView(isReady: true, hasProcess: true, exits: 0, lastExit: nil, isDrained: false)
        }
    }

    static func kinds(_ commands: [Rollout.Command]) -> [String] {
        commands.compactMap {
            switch $0 {
            case .drain(let slot, _): "drain \(slot)"
            case .stop(let slot): "stop \(slot)"
            case .start(let slot, let spec): "start \(slot) \(spec.command[0])"
            case .resetStats: "reset"
            case .ended(let state, _): "ended \(state.rawValue)"
            case .log: nil
            }
        }
    }

    @Test func oneDeviceAtATimeDrainStopStartVerifyThenBakeTheCanary() {
        var rollout = Rollout(settings: Self.settings)
        let begun = rollout.begin(.upgrade, steps: Self.steps(["0", "1"]), now: Self.t0)
        #expect(begun == nil)
        var world = World()
        world.views[0] = .init(isReady: true, hasProcess: true, exits: 0, lastExit: nil, isDrained: false)
        #expect(Self.kinds(rollout.advance(now: Self.t0, view: world.view, oldP99: { nil })) == ["drain 0"])
        // Drained: stop; stopped: start the new spec.
        world.views[0] = .init(isReady: true, hasProcess: true, exits: 0, lastExit: nil, isDrained: true)
        #expect(Self.kinds(rollout.advance(now: Self.t0, view: world.view, oldP99: { nil })) == ["stop 0"])
        world.views[0] = .init(isReady: false, hasProcess: false, exits: 1, lastExit: "stopped", isDrained: true)
        #expect(Self.kinds(rollout.advance(now: Self.t0, view: world.view, oldP99: { nil })) == ["start 0 new"])
        // Loading, then ready, then ready for min_ready_time: the canary bakes.
        world.views[0] = .init(isReady: false, hasProcess: true, exits: 1, lastExit: "stopped", isDrained: false)
        #expect(Self.kinds(rollout.advance(now: Self.t0 + .seconds(1), view: world.view, oldP99: { nil })) == [])
        world.views[0] = .init(isReady: true, hasProcess: true, exits: 1, lastExit: "stopped", isDrained: false)
        #expect(Self.kinds(rollout.advance(now: Self.t0 + .seconds(2), view: world.view, oldP99: { nil })) == [])
        #expect(rollout.nextDeadline == Self.t0 + .seconds(4))
        #expect(Self.kinds(rollout.advance(now: Self.t0 + .seconds(4), view: world.view, oldP99: { nil })) == ["reset"])
        #expect(rollout.nextDeadline == Self.t0 + .seconds(14), "the bake")
        // Baked: the next device.
        #expect(Self.kinds(rollout.advance(now: Self.t0 + .seconds(14), view: world.view, oldP99: { nil })) == ["drain 1"])
        #expect(rollout.progress == "1/2" && rollout.canary == "0")
        world.views[1] = .init(isReady: false, hasProcess: false, exits: 1, lastExit: "stopped", isDrained: true)
        #expect(Self.kinds(rollout.advance(now: Self.t0 + .seconds(14), view: world.view, oldP99: { nil }))
            == ["stop 1", "start 1 new"], "nothing held and no process: stop and start in one turn")
        world.views[1] = .init(isReady: true, hasProcess: true, exits: 1, lastExit: "stopped", isDrained: false)
        _ = rollout.advance(now: Self.t0 + .seconds(15), view: world.view, oldP99: { nil })
        #expect(Self.kinds(rollout.advance(now: Self.t0 + .seconds(17), view: world.view, oldP99: { nil }))
            == ["ended complete"], "no bake after the canary")
        #expect(rollout.state == .complete && rollout.progress == "2/2")
    }

    @Test(arguments: [
        // (what the new process does, why the rollout fails)
        ("exits", "device 0 exited (exited(1)) before it was ready"),
        ("never ready", "device 0 not ready within progress_deadline (20s)"),
        ("exits after ready", "device 0 exited (signaled(11)) within min_ready_time"),
    ])
    func aFailingNewRevisionIsRolledBack(behaviour: String, reason: String) {
        var rollout = Rollout(settings: Self.settings)
        _ = rollout.begin(.upgrade, steps: Self.steps(["0", "1"]), now: Self.t0)
        var world = World()
        world.views[0] = .init(isReady: false, hasProcess: false, exits: 1, lastExit: "stopped", isDrained: true)
        _ = rollout.advance(now: Self.t0, view: world.view, oldP99: { nil })  // drain, stop, start
        var now = Self.t0 + .seconds(1)
        switch behaviour {
        case "exits":
            world.views[0] = .init(isReady: false, hasProcess: false, exits: 2, lastExit: "exited(1)", isDrained: false)
        case "never ready":
            world.views[0] = .init(isReady: false, hasProcess: true, exits: 1, lastExit: "stopped", isDrained: false)
            now = Self.t0 + .seconds(20)
        default:
            world.views[0] = .init(isReady: true, hasProcess: true, exits: 1, lastExit: "stopped", isDrained: false)
            _ = rollout.advance(now: now, view: world.view, oldP99: { nil })
            world.views[0] = .init(isReady: false, hasProcess: false, exits: 2, lastExit: "signaled(11)", isDrained: false)
        }
        let commands = rollout.advance(now: now, view: world.view, oldP99: { nil })
        #expect(rollout.state == .rollingBack)
        #expect(rollout.reason == reason)
        // The failed device goes back to its old spec (drain → stop → start old).
        #expect(Self.kinds(commands).first == "drain 0")
        #expect(rollout.steps.map(\.device) == ["0"], "only the devices touched are rolled back")
        #expect(rollout.steps[0].to.command == ["npu-worker"])
    }

    @Test func theCanaryFailsItsGatesOnErrorsOrLatency() {
        let rollout = Rollout(settings: Self.settings)
        let base = Rollout.WorkerView(isReady: true, hasProcess: true, exits: 0, lastExit: nil, isDrained: false)
        var few = base
        few.failed = 5
        #expect(rollout.gateFailure(few, oldP99: nil) == nil, "5 requests are below min_requests (10)")
        var errors = base
        (errors.ok, errors.failed) = (17, 3)
        #expect(rollout.gateFailure(errors, oldP99: nil) == "error rate 15.0% over 20 requests (max_error_rate 10.0%)")
        var slow = base
        (slow.ok, slow.p99) = (50, .milliseconds(300))
        #expect(rollout.gateFailure(slow, oldP99: .milliseconds(100))
            == "p99 0.300s against 0.100s on the old revision (max_p99_ratio 2.0)")
        #expect(rollout.gateFailure(slow, oldP99: .milliseconds(200)) == nil)
    }

    @Test func aFailedRollbackPausesAndPauseResumeUndo() {
        var rollout = Rollout(settings: Self.settings)
        _ = rollout.begin(.upgrade, steps: Self.steps(["0"]), now: Self.t0)
        var world = World()
        world.views[0] = .init(isReady: false, hasProcess: false, exits: 1, lastExit: "stopped", isDrained: true)
        _ = rollout.advance(now: Self.t0, view: world.view, oldP99: { nil })
        world.views[0] = .init(isReady: false, hasProcess: false, exits: 2, lastExit: "exited(1)", isDrained: true)
        _ = rollout.advance(now: Self.t0, view: world.view, oldP99: { nil })
        #expect(rollout.state == .rollingBack)
        _ = rollout.advance(now: Self.t0, view: world.view, oldP99: { nil })  // drain, stop, start the old spec
        world.views[0] = .init(isReady: false, hasProcess: false, exits: 3, lastExit: "exited(1)", isDrained: true)
        let commands = rollout.advance(now: Self.t0, view: world.view, oldP99: { nil })
        #expect(rollout.state == .paused)
        #expect(rollout.reason == "rollback failed: device 0 exited (exited(1)) before it was ready")
        #expect(Self.kinds(commands).last == "ended paused")
        let resumed = rollout.resume()
        #expect(!resumed, "a failed rollback does not resume into the same failure")

        var other = Rollout(settings: Self.settings)
        _ = other.begin(.restart, steps: Self.steps(["0", "1"], to: "npu-worker"), now: Self.t0)
        let paused = other.pause(reason: "operator")
        #expect(paused)
        #expect(other.nextDeadline == nil && !other.isActive)
        let second = other.begin(.restart, steps: Self.steps(["0"]), now: Self.t0)
        #expect(second != nil, "one rollout at a time")
        let resumedOther = other.resume()
        #expect(resumedOther && other.state == .progressing)
        let undone = other.undo(reason: "operator", now: Self.t0)
        #expect(undone && other.state == .rollingBack)
    }
}

/// Drain, rolling restart and reload through the composed machine.
struct RolloutMachineTests {
    static let t0 = MonotonicInstant.seconds(100)

    static func machine(devices: Int = 2) -> SupervisorMachine {
        var configuration = config(devices: devices)
        configuration.rollout = Rollout.Settings(drainTimeout: .seconds(5), progressDeadline: .seconds(20),
                                                 minReadyTime: .seconds(1), bakeTime: .zero)
        var m = SupervisorMachine(config: configuration, protocolVersion: 1)
        _ = m.handle(.boot, now: t0)
        for slot in 0..<devices { m.makeServing(slot, pid: Int32(100 + slot), now: t0) }
        return m
    }

    @Test func drainTakesAWorkerOutOfRotationUntilItsRequestsFinish() {
        var m = Self.machine()
        m.router.assign(0)
        _ = m.handle(.drain(slots: [0]), now: Self.t0)
        #expect(!m.router.serving[0] && m.router.draining[0])
        #expect(m.workers[0].drain == .draining(until: Self.t0 + .seconds(5), byOperator: true))
        #expect(m.workers[0].lifecycle.isReady, "the worker keeps running")
        m.router.release(0)
        _ = m.handle(.drainSettled(slot: 0), now: Self.t0)
        #expect(m.workers[0].drain == .drained(byOperator: true) && !m.router.draining[0])
        #expect(m.aggregate().1 == "1/2 workers ready; drained: 0", "a drain is not a fault: \(m.aggregate())")
        _ = m.handle(.undrain(slots: [0]), now: Self.t0)
        #expect(m.router.serving[0] && m.aggregate().0 == .ok)
    }

    @Test func aDrainIsBoundedByDrainTimeout() {
        var m = Self.machine()
        m.router.assign(0)
        _ = m.handle(.drain(slots: [0]), now: Self.t0)
        for slot in 0..<2 { m.frameReceived(slot: slot, now: Self.t0 + .seconds(4)) }  // heartbeats
        _ = m.handle(.timer, now: Self.t0 + .seconds(4))
        #expect(m.workers[0].drain == .draining(until: Self.t0 + .seconds(5), byOperator: true))
        #expect(m.nextDeadline == Self.t0 + .seconds(5), "the drain's bound is a deadline of the one timer")
        _ = m.handle(.timer, now: Self.t0 + .seconds(5))
        #expect(m.workers[0].drain == .drained(byOperator: true))
    }

    @Test func aRollingRestartReplacesEachWorkerInTurn() {
        var m = Self.machine()
        let start = m.handle(.rollingRestart(slots: [0, 1]), now: Self.t0)
        #expect(m.refusal == nil && m.rollout.state == .progressing && m.rollout.canary == "0")
        #expect(start.contains(.signal(slot: 0, pid: 100, signal: 15)), "nothing in flight: drained and stopped at once")
        #expect(!m.router.serving[0] && m.router.serving[1], "one device at a time")
        _ = m.handle(.channelClosed(slot: 0, pid: 100), now: Self.t0)
        let exit = m.handle(.processExited(slot: 0, pid: 100, .exited(code: 0), oomKillsRose: nil, jitter: 0), now: Self.t0)
        #expect(exit.contains(.spawn(slot: 0)))
        m.makeServing(0, pid: 200, now: Self.t0 + .milliseconds(500))
        m.frameReceived(slot: 1, now: Self.t0 + .seconds(1))
        let next = m.handle(.timer, now: Self.t0 + .milliseconds(1500))
        #expect(next.contains(.signal(slot: 1, pid: 101, signal: 15)), "device 1 after device 0 served again")
        #expect(m.router.serving[0] && !m.router.serving[1])
        _ = m.handle(.channelClosed(slot: 1, pid: 101), now: Self.t0 + .seconds(2))
        _ = m.handle(.processExited(slot: 1, pid: 101, .exited(code: 0), oomKillsRose: nil, jitter: 0), now: Self.t0 + .seconds(2))
        m.makeServing(1, pid: 201, now: Self.t0 + .seconds(2))
        m.frameReceived(slot: 0, now: Self.t0 + .seconds(3))
        let end = m.handle(.timer, now: Self.t0 + .seconds(3))
        #expect(end.contains(.rolloutEnded(.complete, reason: nil)))
        #expect(m.workers.map(\.lifecycle.restarts) == [0, 0], "a planned restart is not a failure")
        #expect(m.workers.map(\.generation) == [1, 1], "same revision, same generation")
    }

    @Test func reloadAppliesSettingsInPlaceRollsChangedWorkersAddsAndRemoves() {
        var m = Self.machine(devices: 2)
        var next = m.config
        next.workers[0].maxInflight = 7                    // in place
        next.workers[1].command = ["npu-worker", "--v2"]   // rolled
        var added = next.workers[0]
        added.device = "9"
        next.workers.append(added)                          // added
        _ = m.handle(.reloadRequested, now: Self.t0)
        let actions = m.handle(.reload(next), now: Self.t0)
        #expect(m.router.maxInflight[0] == 7 && m.workers[0].generation == 1)
        #expect(m.workers.count == 3 && actions.contains(.spawn(slot: 2)), "device 9 added and started")
        #expect(m.rollout.state == .progressing && m.rollout.steps.map(\.device) == ["1"])
        #expect(m.isReloading)
        #expect(!actions.contains { if case .reloadDone = $0 { true } else { false } }, "done only after the roll")
        // Remove device 9 again: retired, stopped, hidden.
        var shrink = next
        shrink.workers.removeLast()
        _ = m.handle(.reload(shrink), now: Self.t0)
        #expect(m.refusal != nil, "one change at a time: the rollout is still going")
    }

    @Test func reloadRollsBackANewRevisionThatDoesNotStart() {
        var m = Self.machine(devices: 2)
        var next = m.config
        next.workers[0].command = ["npu-worker", "--exit-at-start", "1"]
        next.workers[1].command = ["npu-worker", "--exit-at-start", "1"]
        _ = m.handle(.reloadRequested, now: Self.t0)
        _ = m.handle(.reload(next), now: Self.t0)
        _ = m.handle(.channelClosed(slot: 0, pid: 100), now: Self.t0)
        _ = m.handle(.processExited(slot: 0, pid: 100, .exited(code: 0), oomKillsRose: nil, jitter: 0), now: Self.t0)
        #expect(m.workers[0].spec.command.count == 3 && m.workers[0].generation == 2)
        _ = m.handle(.spawned(slot: 0, pid: 300), now: Self.t0)
        _ = m.handle(.channelOpened(slot: 0, pid: 300), now: Self.t0)
        _ = m.handle(.channelClosed(slot: 0, pid: 300), now: Self.t0)
        let crash = m.handle(.processExited(slot: 0, pid: 300, .exited(code: 1), oomKillsRose: nil, jitter: 0),
                             now: Self.t0 + .milliseconds(10))
        #expect(m.rollout.state == .rollingBack)
        #expect(crash.contains { if case .log(let r) = $0 { r.message.hasPrefix("rollout failed: device 0 exited") } else { false } })
        // The old spec back on device 0; device 1 never touched.
        _ = m.handle(.timer, now: Self.t0 + .seconds(2))
        m.makeServing(0, pid: 301, now: Self.t0 + .seconds(2))
        #expect(m.workers[0].spec.command == ["npu-worker"] && m.workers[0].generation == 3)
        m.frameReceived(slot: 1, now: Self.t0 + .seconds(3))
        let end = m.handle(.timer, now: Self.t0 + .seconds(3))
        #expect(end.contains(.rolloutEnded(.rolledBack, reason: "device 0 exited (exited(1)) before it was ready")))
        #expect(end.contains { if case .reloadDone(false, _) = $0 { true } else { false } }, "reload --wait fails")
        #expect(m.workers[1].spec.command == ["npu-worker"] && m.workers[1].generation == 1)
    }

    @Test func aRestoredUpgradeStartsEachDeviceOnItsRecordedRevisionPaused() {
        var configuration = config(devices: 3)
        configuration.rollout = Rollout.Settings(minReadyTime: .seconds(1), bakeTime: .zero)
        var m = SupervisorMachine(config: configuration, protocolVersion: 1)
        var old = m.workers[1].spec
        old.command = ["npu-worker", "--v1"]
        var old2 = m.workers[2].spec
        old2.command = ["npu-worker", "--v1"]
        // Devices 1 and 2 differ between the two files; device 1 was already upgraded, device 2 not.
        _ = m.handle(.restoreRollout(previous: [1: old, 2: old2], onPrevious: [2]), now: Self.t0)
        #expect(m.rollout.state == .paused && m.rollout.progress == "1/2")
        #expect(m.workers[2].spec.command == ["npu-worker", "--v1"] && m.workers[1].spec.command == ["npu-worker"])
        #expect(m.workers.map(\.generation) == [1, 2, 1])
        let boot = m.handle(.boot, now: Self.t0)
        #expect(boot.filter { if case .spawn = $0 { true } else { false } }.count == 3)
        _ = m.handle(.rolloutResume, now: Self.t0)
        #expect(m.rollout.state == .progressing && m.rollout.currentSlot == 2, "resume goes on with device 2")
    }

    @Test func anInvalidReloadChangesNothingAndTellsSystemdItIsOver() {
        var m = Self.machine()
        _ = m.handle(.publishHealth, now: Self.t0)
        let began = m.handle(.reloadRequested, now: Self.t0)
        #expect(began.contains(.notify(.reloading(monotonicMicroseconds: 100_000_000))))
        let failed = m.handle(.reloadFailed("device[0].command: missing"), now: Self.t0)
        #expect(failed.contains(.reloadDone(ok: false, message: "reload refused, nothing changed: device[0].command: missing")))
        #expect(failed.contains { if case .notify(.reloaded) = $0 { true } else { false } })
    }
}

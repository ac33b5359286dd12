import SupervisorCore
import Testing

/// The composed machine: events in, actions out, with explicit instants. Each test is one scenario the
/// real-process suite also covers end to end (Tests/IntegrationTests), here in microseconds.
struct SupervisorMachineTests {
    static let t0 = MonotonicInstant.seconds(100)

    static func spawns(_ actions: [SupervisorMachine.Action]) -> [Int] {
        actions.compactMap { if case .spawn(let slot) = $0 { slot } else { nil } }
    }

    static func signals(_ actions: [SupervisorMachine.Action]) -> [Int32] {
        actions.compactMap { if case .signal(_, _, let signal) = $0 { signal } else { nil } }
    }

    static func logs(_ actions: [SupervisorMachine.Action]) -> [String] {
        actions.compactMap { if case .log(let record) = $0 { record.message } else { nil } }
    }

    @Test func bootStartsDeviceWorkersNotFallbackOnes() {
        var m = SupervisorMachine(config: config(devices: 2, fallback: 1), protocolVersion: 1)
        #expect(m.noWorkersReason(pinned: nil) == nil, "before boot requests wait")
        let actions = m.handle(.boot, now: Self.t0)
        #expect(Self.spawns(actions) == [0, 1])
        #expect(actions.contains(.healthChanged))
        #expect(!m.isFallbackActive, "workers on their first model load are not an outage")
        #expect(m.handle(.boot, now: Self.t0) == [], "boot happens once")
    }

    @Test func helloThenReadyPutsAWorkerInRotation() {
        var m = SupervisorMachine(config: config(devices: 1), protocolVersion: 1)
        _ = m.handle(.boot, now: Self.t0)
        _ = m.handle(.spawned(slot: 0, pid: 42), now: Self.t0)
        #expect(m.workers[0].lifecycle.stateName == "starting")
        _ = m.handle(.channelOpened(slot: 0, pid: 42), now: Self.t0)
        _ = m.handle(.workerMessage(slot: 0, pid: 42, .hello(protocolVersion: 1)), now: Self.t0)
        #expect(!m.router.serving[0])
        let actions = m.handle(.workerMessage(slot: 0, pid: 42, .ready), now: Self.t0 + .milliseconds(1500))
        #expect(m.router.serving[0] && m.workers[0].isServing)
        #expect(actions.contains(.dispatchQueued))
        #expect(Self.logs(actions).contains("worker ready after 1.500s"))
        #expect(m.aggregate().0 == .ok)
        let publish = m.handle(.publishHealth, now: Self.t0)
        #expect(publish.contains(.notify(.ready(status: "1/1 workers ready"))))
    }

    @Test func readyBeforeHelloIsAProtocolViolation() {
        var m = SupervisorMachine(config: config(devices: 1), protocolVersion: 1)
        _ = m.handle(.boot, now: Self.t0)
        _ = m.handle(.spawned(slot: 0, pid: 42), now: Self.t0)
        let actions = m.handle(.workerMessage(slot: 0, pid: 42, .ready), now: Self.t0)
        #expect(Self.signals(actions) == [9])
        #expect(Self.logs(actions).first?.hasPrefix("worker broke the protocol: sent ready before hello") == true)
    }

    @Test func framesOfAnOldProcessAreIgnored() {
        var m = SupervisorMachine(config: config(devices: 1), protocolVersion: 1)
        m.makeServing(0, pid: 42, now: Self.t0)
        #expect(m.handle(.workerMessage(slot: 0, pid: 41, .forbidden("request")), now: Self.t0) == [])
        #expect(m.handle(.channelClosed(slot: 0, pid: 41), now: Self.t0) == [])
        #expect(m.workers[0].isServing)
    }

    @Test func anExitWaitsForTheChannelEOFThenRetriesAndBacksOff() {
        var m = SupervisorMachine(config: config(devices: 2), protocolVersion: 1)
        _ = m.handle(.boot, now: Self.t0)
        m.makeServing(0, pid: 42, now: Self.t0)
        m.makeServing(1, pid: 43, now: Self.t0)
        let reaped = m.handle(.processExited(slot: 0, pid: 42, .signaled(signal: 9, coreDumped: false),
                                             oomKillsRose: nil, jitter: 0), now: Self.t0 + .seconds(1))
        #expect(!reaped.contains { if case .failInflight = $0 { true } else { false } }, "its last answers are still in the socket")
        #expect(m.nextDeadline == Self.t0 + .seconds(1) + .milliseconds(500))
        let closed = m.handle(.channelClosed(slot: 0, pid: 42), now: Self.t0 + .seconds(1))
        #expect(closed.contains(.failInflight(slot: 0, cause: .notTheRequest)), "a SIGKILL from outside spends no retry")
        #expect(closed.contains(.exitRecorded(slot: 0, reason: .signaled(signal: 9, coreDumped: false))))
        #expect(m.workers[0].lifecycle.state == .backoff(until: Self.t0 + .seconds(2)))
        #expect(!m.router.serving[0] && m.router.serving[1])
        #expect(m.aggregate().0 == .degraded)
        // The backoff ends: a new process.
        #expect(Self.spawns(m.handle(.timer, now: Self.t0 + .seconds(2))) == [0])
    }

    @Test func theExitDrainIsBoundedForAnEscapedHolderOfFd3() {
        var m = SupervisorMachine(config: config(devices: 1), protocolVersion: 1)
        m.makeServing(0, pid: 42, now: Self.t0)
        _ = m.handle(.processExited(slot: 0, pid: 42, .exited(code: 1), oomKillsRose: nil, jitter: 0), now: Self.t0)
        let actions = m.handle(.timer, now: Self.t0 + .milliseconds(500))
        #expect(actions.contains(.closeChannel(slot: 0)) && actions.contains(.failInflight(slot: 0, cause: .crash)))
        #expect(m.workers[0].lifecycle.lastExit == .exited(code: 1))
    }

    @Test(arguments: [(true, ExitReason.oomKilled), (false, .signaled(signal: 9, coreDumped: false)),
                      (nil, .signaled(signal: 9, coreDumped: false))] as [(Bool?, ExitReason)])
    func theCgroupCounterDecidesOOM(rose: Bool?, reason: ExitReason) {
        var m = SupervisorMachine(config: config(devices: 1), protocolVersion: 1)
        m.makeServing(0, pid: 42, now: Self.t0)
        _ = m.handle(.channelClosed(slot: 0, pid: 42), now: Self.t0)
        let actions = m.handle(.processExited(slot: 0, pid: 42, .signaled(signal: 9, coreDumped: false),
                                              oomKillsRose: rose, jitter: 0), now: Self.t0)
        #expect(m.workers[0].lifecycle.lastExit == reason)
        let proven = Self.logs(actions).contains { $0.contains("not the kernel OOM killer") }
        #expect(proven == (rose == false), "a SIGKILL the counter disproves is said to be no OOM kill")
        // Status says what the log says.
        #expect((m.workers[0].lastExitDetail?.contains("not the kernel OOM killer") == true) == (rose == false))
        if rose == nil { #expect(m.workers[0].lastExitDetail?.contains("without a memory cgroup") == true) }
    }

    @Test func aClosedChannelWithALiveProcessIsKilledAfterASecond() {
        var m = SupervisorMachine(config: config(devices: 1), protocolVersion: 1)
        m.makeServing(0, pid: 42, now: Self.t0)
        let closed = m.handle(.channelClosed(slot: 0, pid: 42), now: Self.t0)
        #expect(!closed.contains { if case .failInflight = $0 { true } else { false } },
                "its requests wait for the exit to say whose fault it was")
        #expect(m.nextDeadline == Self.t0 + .seconds(1))
        let actions = m.handle(.timer, now: Self.t0 + .seconds(1))
        #expect(Self.signals(actions) == [9])
        #expect(Self.logs(actions).contains { $0.contains("closed its channel (fd 3) but kept running") })
        let exit = m.handle(.processExited(slot: 0, pid: 42, .signaled(signal: 9, coreDumped: false), oomKillsRose: nil,
                                           jitter: 0), now: Self.t0 + .seconds(1))
        #expect(exit.contains(.failInflight(slot: 0, cause: .unknown)), "then retried, as a protocol violation")
    }

    @Test func aSilentWorkerIsKilledAsHang() {
        var m = SupervisorMachine(config: config(devices: 1), protocolVersion: 1)
        m.makeServing(0, pid: 42, now: Self.t0)
        m.frameReceived(slot: 0, now: Self.t0 + .seconds(2))
        #expect(Self.signals(m.handle(.timer, now: Self.t0 + .seconds(3))) == [], "a frame came 1 s ago")
        let actions = m.handle(.timer, now: Self.t0 + .seconds(5))
        #expect(Self.signals(actions) == [9])
        _ = m.handle(.channelClosed(slot: 0, pid: 42), now: Self.t0 + .seconds(5))
        _ = m.handle(.processExited(slot: 0, pid: 42, .signaled(signal: 9, coreDumped: false), oomKillsRose: nil,
                                    jitter: 0), now: Self.t0 + .seconds(5))
        #expect(m.workers[0].lifecycle.lastExit == .hang, "the supervisor's reason wins over signaled(9)")
    }

    @Test func operatorRestartSpawnsAtOnceWithoutCountingAFailure() {
        var m = SupervisorMachine(config: config(devices: 1), protocolVersion: 1)
        m.makeServing(0, pid: 42, now: Self.t0)
        #expect(Self.signals(m.handle(.control(.restart, slots: [0], requestedBy: 0), now: Self.t0)) == [15])
        _ = m.handle(.channelClosed(slot: 0, pid: 42), now: Self.t0)
        let exit = m.handle(.processExited(slot: 0, pid: 42, .exited(code: 0), oomKillsRose: nil, jitter: 0),
                            now: Self.t0 + .milliseconds(10))
        #expect(Self.spawns(exit) == [0])
        _ = m.handle(.spawned(slot: 0, pid: 43), now: Self.t0 + .milliseconds(11))
        #expect(m.workers[0].pid == 43 && m.workers[0].lifecycle.restarts == 0)
    }

    @Test func aBadDeviceIsRestartedOnceThenHeldFailedAndComesBack() {
        var probe = DeviceProbeSpec()
        probe.kind = .command
        probe.interval = .seconds(10)
        probe.failedInterval = .seconds(60)
        var m = SupervisorMachine(config: config(devices: 2, deviceProbe: probe), protocolVersion: 1)
        _ = m.handle(.boot, now: Self.t0)
        m.makeServing(0, pid: 42, now: Self.t0)
        m.makeServing(1, pid: 43, now: Self.t0)
        #expect(m.handle(.timer, now: Self.t0).filter { if case .runDeviceProbe = $0 { true } else { false } }.count == 2)
        _ = m.handle(.deviceProbeFinished(slot: 1, failure: nil), now: Self.t0)
        let bad = m.handle(.deviceProbeFinished(slot: 0, failure: "Critical"), now: Self.t0)
        #expect(!m.router.serving[0], "out of rotation at once")
        #expect(Self.signals(bad) == [9], "restarted once")
        _ = m.handle(.channelClosed(slot: 0, pid: 42), now: Self.t0)
        _ = m.handle(.processExited(slot: 0, pid: 42, .signaled(signal: 9, coreDumped: false), oomKillsRose: nil,
                                    jitter: 0), now: Self.t0)
        #expect(m.workers[0].lifecycle.lastExit == .deviceUnhealthy("Critical"))
        _ = m.handle(.timer, now: Self.t0 + .seconds(1))  // backoff over: spawn
        m.makeServing(0, pid: 44, now: Self.t0 + .seconds(2))
        #expect(!m.router.serving[0], "ready, but its device is still out of rotation")
        // The fresh worker's device is probed soon (not a whole interval later), still bad: held failed.
        #expect(m.workers[0].device.nextProbeAt == Self.t0 + .seconds(4))
        #expect(m.handle(.timer, now: Self.t0 + .seconds(4)).contains(.runDeviceProbe(slot: 0)))
        let held = m.handle(.deviceProbeFinished(slot: 0, failure: "Critical"), now: Self.t0 + .seconds(4))
        #expect(Self.signals(held) == [15])
        _ = m.handle(.channelClosed(slot: 0, pid: 44), now: Self.t0 + .seconds(4))
        _ = m.handle(.processExited(slot: 0, pid: 44, .exited(code: 0), oomKillsRose: nil, jitter: 0),
                     now: Self.t0 + .seconds(4))
        #expect(m.workers[0].lifecycle.isHeldFailed)
        // Probed again after `interval` (the worker was still stopping at the verdict), then on failed_interval.
        #expect(m.workers[0].device.nextProbeAt == Self.t0 + .seconds(14))
        #expect(m.handle(.timer, now: Self.t0 + .seconds(14)).contains(.runDeviceProbe(slot: 0)))
        _ = m.handle(.deviceProbeFinished(slot: 0, failure: "Critical"), now: Self.t0 + .seconds(14))
        #expect(m.workers[0].device.nextProbeAt == Self.t0 + .seconds(74))
        // Recovery restarts it.
        #expect(m.handle(.timer, now: Self.t0 + .seconds(74)).contains(.runDeviceProbe(slot: 0)))
        #expect(Self.spawns(m.handle(.deviceProbeFinished(slot: 0, failure: nil), now: Self.t0 + .seconds(74))) == [0])
    }

    @Test func theFallbackStartsWhenNoDeviceServesAndStopsAfterTheyServeAgain() {
        var m = SupervisorMachine(config: config(devices: 1, fallback: 1), protocolVersion: 1)
        _ = m.handle(.boot, now: Self.t0)
        m.makeServing(0, pid: 42, now: Self.t0)
        let lost = m.handle(.channelClosed(slot: 0, pid: 42), now: Self.t0)
        #expect(m.isFallbackActive, "its channel is gone: no device worker can serve")
        #expect(Self.spawns(lost) == [1], "the CPU worker")
        _ = m.handle(.processExited(slot: 0, pid: 42, .exited(code: 1), oomKillsRose: nil, jitter: 0), now: Self.t0)
        m.makeServing(1, pid: 50, now: Self.t0)
        var router = m.router
        #expect(router.pick(pinned: nil) == 1)
        _ = m.handle(.timer, now: Self.t0 + .seconds(1))
        m.makeServing(0, pid: 43, now: Self.t0 + .seconds(1))
        #expect(m.isFallbackActive, "hysteresis: stop_after has not passed")
        m.frameReceived(slot: 0, now: Self.t0 + .seconds(5))  // heartbeats
        m.frameReceived(slot: 1, now: Self.t0 + .seconds(5))
        let stop = m.handle(.timer, now: Self.t0 + .seconds(6))
        #expect(!m.isFallbackActive && Self.signals(stop) == [15])
    }

    @Test func inferenceProbeStreakRestartsTheWorker() {
        var probe = InferenceProbeSpec()
        probe.interval = .seconds(30)
        probe.failures = 2
        var m = SupervisorMachine(config: config(devices: 1, inference: probe), protocolVersion: 1)
        m.makeServing(0, pid: 42, now: Self.t0)
        m.frameReceived(slot: 0, now: Self.t0 + .seconds(29))  // heartbeats
        #expect(m.handle(.timer, now: Self.t0 + .seconds(30)).contains(.sendInferenceProbe(slot: 0)))
        _ = m.handle(.inferenceProbeFinished(slot: 0, failure: "empty answer"), now: Self.t0 + .seconds(31))
        m.frameReceived(slot: 0, now: Self.t0 + .seconds(60))
        #expect(m.handle(.timer, now: Self.t0 + .seconds(61)).contains(.sendInferenceProbe(slot: 0)))
        let second = m.handle(.inferenceProbeFinished(slot: 0, failure: "empty answer"), now: Self.t0 + .seconds(62))
        #expect(Self.signals(second) == [9])
        #expect(m.workers[0].inference.verdict == "failing (2/2): empty answer")
    }

    @Test func shutdownDrainsAnswersTheRestStopsWorkersThenClosesSockets() {
        var m = SupervisorMachine(config: config(devices: 1), protocolVersion: 1)
        _ = m.handle(.boot, now: Self.t0)
        m.makeServing(0, pid: 42, now: Self.t0)
        let begin = m.handle(.shutdown(reason: "signal", requestsInFlight: 2), now: Self.t0)
        #expect(begin.contains(.notify(.stopping(status: "stopping: signal"))))
        #expect(Self.signals(begin) == [], "requests in flight drain first")
        #expect(m.shutdown.nextDeadline == Self.t0 + .seconds(10), "draining is bounded by shutdown_timeout")
        let drained = m.handle(.requestsInFlight(0), now: Self.t0 + .seconds(1))
        #expect(drained.contains(.answerAllShuttingDown) && Self.signals(drained) == [15])
        _ = m.handle(.channelClosed(slot: 0, pid: 42), now: Self.t0 + .seconds(1))
        let gone = m.handle(.processExited(slot: 0, pid: 42, .exited(code: 0), oomKillsRose: nil, jitter: 0),
                            now: Self.t0 + .seconds(1))
        #expect(gone.contains(.closeSockets))
        #expect(Self.spawns(gone) == [])
    }

    @Test func startUpGraceAndExtensionGoThroughTheOneTimer() {
        var m = SupervisorMachine(config: config(devices: 1), protocolVersion: 1)
        let boot = m.handle(.boot, now: Self.t0)
        #expect(boot.contains(.notify(.extendTimeout(microseconds: 20_000_000))))
        _ = m.handle(.spawned(slot: 0, pid: 42), now: Self.t0)
        #expect(m.nextDeadline == Self.t0 + .seconds(5), "the next extension comes before the start timeout")
        #expect(m.handle(.timer, now: Self.t0 + .seconds(5)).contains(.notify(.extendTimeout(microseconds: 20_000_000))))
    }

    @Test func aFallbackStartedInTheSameTurnKeepsQueuedRequestsWaiting() {
        var m = SupervisorMachine(config: config(devices: 1, fallback: 1), protocolVersion: 1)
        _ = m.handle(.boot, now: Self.t0)
        _ = m.handle(.spawned(slot: 0, pid: 42), now: Self.t0)
        let actions = m.handle(.processExited(slot: 0, pid: 42, .exited(code: 78), oomKillsRose: nil, jitter: 0),
                               now: Self.t0)
        let spawn = actions.firstIndex(of: .spawn(slot: 1))
        let hopeless = actions.firstIndex(of: .answerHopelessQueued)
        #expect(spawn != nil && hopeless != nil && spawn! < hopeless!,
                "the CPU worker is started before queued requests are judged: \(actions)")
        #expect(m.noWorkersReason(pinned: nil) == nil, "a fallback worker is coming")
        #expect(m.noWorkersReason(pinned: 0)?.hasPrefix("no worker can serve: device 0 failed (worker exited with code 78") == true)
    }

    @Test func aSpawnDueInTheTurnThatEndsTheDrainIsWithdrawn() {
        var m = SupervisorMachine(config: config(devices: 2), protocolVersion: 1)
        _ = m.handle(.boot, now: Self.t0)
        m.makeServing(0, pid: 42, now: Self.t0)
        m.makeServing(1, pid: 43, now: Self.t0)
        _ = m.handle(.channelClosed(slot: 0, pid: 42), now: Self.t0)
        _ = m.handle(.processExited(slot: 0, pid: 42, .exited(code: 1), oomKillsRose: nil, jitter: 0), now: Self.t0)
        // Device 1 still serves a request: the shutdown drains (at most 10 s).
        _ = m.handle(.shutdown(reason: "signal", requestsInFlight: 1), now: Self.t0)
        m.frameReceived(slot: 1, now: Self.t0 + .seconds(19))
        // The backoff (1 s) and the drain (10 s) are both over when the timer fires late.
        let actions = m.handle(.timer, now: Self.t0 + .seconds(20))
        #expect(Self.spawns(actions) == [], "a worker must not start after shutdown stopped it: \(actions)")
        #expect(actions.contains(.answerAllShuttingDown) && Self.signals(actions) == [15])
        _ = m.handle(.channelClosed(slot: 1, pid: 43), now: Self.t0 + .seconds(20))
        let gone = m.handle(.processExited(slot: 1, pid: 43, .exited(code: 0), oomKillsRose: nil, jitter: 0),
                            now: Self.t0 + .seconds(20))
        #expect(gone.contains(.closeSockets), "nothing is left: no process, no pending spawn")
        // A spawn reported anyway is killed, not adopted.
        let late = m.handle(.spawned(slot: 0, pid: 77), now: Self.t0 + .seconds(20))
        #expect(late.contains(.signal(slot: 0, pid: 77, signal: 9)))
        #expect(m.workers[0].pid == nil)
    }

    @Test func startUpGraceSendsReadyWithTheReasonThroughTheMachine() {
        var configuration = config(devices: 1)
        configuration.readyTimeout = .seconds(2)
        var m = SupervisorMachine(config: configuration, protocolVersion: 1)
        _ = m.handle(.boot, now: Self.t0)
        _ = m.handle(.spawned(slot: 0, pid: 42), now: Self.t0)
        #expect(m.nextDeadline == Self.t0 + .seconds(2))
        let actions = m.handle(.timer, now: Self.t0 + .seconds(2))
        #expect(actions.contains(.notify(.ready(status: "start-up grace ready_timeout (2s) passed; unavailable: 0/1 workers ready (device 0 starting)"))))
    }

    @Test func controlVerbsAreRefusedWhileShuttingDown() {
        var m = SupervisorMachine(config: config(devices: 1), protocolVersion: 1)
        _ = m.handle(.shutdown(reason: "x", requestsInFlight: 0), now: Self.t0)
        #expect(Self.spawns(m.handle(.control(.start, slots: [0], requestedBy: 0), now: Self.t0)) == [])
    }
}

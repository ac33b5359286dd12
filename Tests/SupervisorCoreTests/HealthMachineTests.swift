import SupervisorCore
import Testing

/// The worker session order, liveness, device health and the inference probe, as tables.
struct WorkerSessionTests {
    typealias M = WorkerSession.Message

    @Test(arguments: [
        ([M.hello(protocolVersion: 1), .ready], [WorkerSession.Verdict.greeted, .becameReady]),
        ([.ready], [.violation("sent ready before hello (the protocol version was never agreed)")]),
        ([.hello(protocolVersion: 2)], [.violation("speaks protocol 2, supervisor speaks 1")]),
        ([.unreadableHello("bad")], [.violation("hello payload is not valid JSON: bad")]),
        ([.hello(protocolVersion: 1), .ready, .ready], [.greeted, .becameReady, .accepted]),
        ([.heartbeat, .health, .response, .chunk, .error], [.accepted, .accepted, .accepted, .accepted, .accepted]),
        ([.forbidden("request")], [.violation("sent a request frame, which workers may not send")]),
    ] as [([M], [WorkerSession.Verdict])])
    func sessionOrder(messages: [M], verdicts: [WorkerSession.Verdict]) {
        var session = WorkerSession(protocolVersion: 1)
        #expect(messages.map { session.received($0) } == verdicts)
    }
}

struct LivenessTests {
    static let t0 = MonotonicInstant.seconds(50)

    @Test func aSilentReadyWorkerIsHungAtTheTimeout() {
        var liveness = Liveness(heartbeatInterval: .seconds(1), heartbeatTimeout: .seconds(3))
        liveness.processStarted(now: Self.t0)
        #expect(liveness.deadline(isReady: false) == nil, "a loading worker is judged by start_timeout instead")
        #expect(liveness.deadline(isReady: true) == Self.t0 + .seconds(3))
        #expect(!liveness.isHung(isReady: true, now: Self.t0 + .milliseconds(2999)))
        #expect(liveness.isHung(isReady: true, now: Self.t0 + .seconds(3)))
        liveness.frameReceived(now: Self.t0 + .seconds(2))
        #expect(!liveness.isHung(isReady: true, now: Self.t0 + .seconds(3)), "any frame proves it alive")
        #expect(liveness.level(isRunning: true, isChannelOpen: true, isReady: true, now: Self.t0 + .seconds(4)) == "ok")
        #expect(liveness.level(isRunning: true, isChannelOpen: true, isReady: true, now: Self.t0 + .milliseconds(5500))
            == "no heartbeat for 3.5s")
        #expect(liveness.level(isRunning: true, isChannelOpen: false, isReady: true, now: Self.t0) == "down")
    }

    @Test(arguments: [(Duration.milliseconds(1500), 1, "1.5"), (.milliseconds(250), 3, "0.250"),
                      (.seconds(12), 0, "12"), (.milliseconds(-20), 2, "-0.02")])
    func formatsSeconds(duration: Duration, decimals: Int, shown: String) {
        #expect(formatSeconds(duration, decimals: decimals) == shown)
    }
}

struct DeviceHealthTests {
    static let t0 = MonotonicInstant.seconds(10)
    static func spec(_ kind: DeviceProbeSpec.Kind, failures: Int = 1) -> DeviceProbeSpec {
        var spec = DeviceProbeSpec()
        spec.kind = kind
        spec.failures = failures
        spec.interval = .seconds(10)
        spec.failedInterval = .seconds(60)
        return spec
    }
    static let ready = DeviceHealth.WorkerView(isStarting: false, isReady: true, isBackoff: false, isHeldFailedForDevice: false)
    static let backoff = DeviceHealth.WorkerView(isStarting: false, isReady: false, isBackoff: true, isHeldFailedForDevice: false)
    static let held = DeviceHealth.WorkerView(isStarting: false, isReady: false, isBackoff: false, isHeldFailedForDevice: true)

    @Test func restartOnceThenHoldFailedThenRecover() {
        var device = DeviceHealth(spec: Self.spec(.command), heartbeatInterval: .seconds(1), heartbeatTimeout: .seconds(3))
        device.boot(now: Self.t0)
        #expect(device.nextProbeAt == Self.t0, "the first probe runs at once")
        #expect(device.due(now: Self.t0, worker: Self.ready) == .run)
        #expect(device.due(now: Self.t0, worker: Self.ready) == .none, "one probe at a time")
        #expect(device.result(failure: "Critical", worker: Self.ready, now: Self.t0)
            == [.tookOutOfRotation("Critical"), .restartWorkerOnce("Critical")])
        #expect(device.isOutOfRotation)
        // The restarted worker is ready again and the device is still bad: hold it failed.
        #expect(device.result(failure: "Critical", worker: Self.ready, now: Self.t0) == [.holdWorkerFailed("Critical")])
        device.scheduleNext(now: Self.t0, heldFailed: true)
        #expect(device.nextProbeAt == Self.t0 + .seconds(60), "a held device is probed on failed_interval")
        #expect(device.result(failure: nil, worker: Self.held, now: Self.t0) == [.backInRotation, .restartHeldWorker])
        #expect(!device.isOutOfRotation && device.level == "ok")
    }

    @Test func aFaultDuringBackoffAfterTheRestartHoldsItFailed() {
        var device = DeviceHealth(spec: Self.spec(.path), heartbeatInterval: .seconds(1), heartbeatTimeout: .seconds(3))
        _ = device.result(failure: "gone", worker: Self.ready, now: Self.t0)
        #expect(device.result(failure: "gone", worker: Self.backoff, now: Self.t0) == [.holdWorkerFailed("gone")])
    }

    @Test func failuresBelowTheThresholdAreCountedNotJudged() {
        var device = DeviceHealth(spec: Self.spec(.command, failures: 3), heartbeatInterval: .seconds(1),
                                  heartbeatTimeout: .seconds(3))
        #expect(device.result(failure: "x", worker: Self.ready, now: Self.t0) == [.failedBelowThreshold(count: 1, of: 3, "x")])
        #expect(device.result(failure: "x", worker: Self.ready, now: Self.t0) == [.failedBelowThreshold(count: 2, of: 3, "x")])
        #expect(device.result(failure: nil, worker: Self.ready, now: Self.t0) == [], "a pass resets the streak")
        #expect(device.result(failure: "x", worker: Self.ready, now: Self.t0) == [.failedBelowThreshold(count: 1, of: 3, "x")])
    }

    @Test func workerReportsAreJudgedWithStaleness() {
        var device = DeviceHealth(spec: Self.spec(.worker), heartbeatInterval: .seconds(1), heartbeatTimeout: .seconds(3))
        device.workerBecameReady(now: Self.t0)
        #expect(device.due(now: Self.t0 + .seconds(1), worker: Self.ready) == .none, "its first report may not have come yet")
        device.workerReported(ok: false, detail: "ECC error", now: Self.t0 + .seconds(2))
        #expect(device.due(now: Self.t0 + .seconds(3), worker: Self.ready) == .judged(failure: "worker reports: ECC error"))
        device.workerReported(ok: true, detail: "", now: Self.t0 + .seconds(3))
        #expect(device.due(now: Self.t0 + .seconds(4), worker: Self.ready) == .judged(failure: nil))
        // staleAfter = max(2 * interval, heartbeat_timeout) = 20 s
        #expect(device.due(now: Self.t0 + .seconds(24), worker: Self.ready)
            == .judged(failure: "no health report from the worker within 20s"))
        #expect(device.due(now: Self.t0, worker: Self.held) == .startTrialWorker,
                "only a running worker can report: a held device is re-tried with a trial worker")
    }
}

struct InferenceProbeTests {
    static let t0 = MonotonicInstant.seconds(100)
    static func probe(failures: Int = 3) -> InferenceProbe {
        var spec = InferenceProbeSpec()
        spec.interval = .seconds(30)
        spec.failures = failures
        var probe = InferenceProbe(spec: spec)
        probe.workerBecameReady(now: t0)
        return probe
    }

    @Test func threeFailuresInARowMakeTheWorkerUnhealthy() {
        var probe = Self.probe()
        #expect(probe.nextProbeAt == Self.t0 + .seconds(30))
        #expect(probe.due(now: Self.t0 + .seconds(30), isServing: true, isBusy: false) == .send)
        #expect(probe.result(failure: "empty answer", isServing: true, now: Self.t0)
            == .failed(count: 1, of: 3, "empty answer", unhealthy: false))
        #expect(probe.result(failure: "empty answer", isServing: true, now: Self.t0)
            == .failed(count: 2, of: 3, "empty answer", unhealthy: false))
        #expect(probe.result(failure: nil, isServing: true, now: Self.t0) == .passed(again: true))
        for count in 1...3 {
            #expect(probe.result(failure: "x", isServing: true, now: Self.t0)
                == .failed(count: count, of: 3, "x", unhealthy: count == 3))
        }
    }

    @Test func realTrafficSkipsTheProbeAndABusyWorkerPostponesIt() {
        var probe = Self.probe()
        probe.realRequestSucceeded(now: Self.t0 + .seconds(20))
        #expect(probe.due(now: Self.t0 + .seconds(30), isServing: true, isBusy: true) == .skipped)
        #expect(probe.verdict == "ok (real traffic)")
        #expect(probe.due(now: Self.t0 + .seconds(60), isServing: true, isBusy: true) == .postponed)
        #expect(probe.nextProbeAt == Self.t0 + .seconds(90))
        #expect(probe.due(now: Self.t0 + .seconds(90), isServing: false, isBusy: false) == .none)
    }

    @Test func aProbeLostWithItsWorkerIsNoVerdict() {
        var probe = Self.probe()
        _ = probe.due(now: Self.t0 + .seconds(30), isServing: true, isBusy: false)
        #expect(probe.result(failure: "worker_lost: died", isServing: true, now: Self.t0) == .ignored)
        #expect(probe.result(failure: "deadline_exceeded: x", isServing: false, now: Self.t0) == .ignored)
        #expect(probe.consecutiveFailures == 0)
    }

    @Test(arguments: [
        (InferenceProbe.Answer.none, "no answer"),
        (.error(code: "device_oom", message: "full"), "device_oom: full"),
        (.bytes(0), "empty answer"),
        (.bytes(12), nil),
        (.json(textField: .some("Hello")), nil),
        (.json(textField: .some("")), "empty text in the answer"),
        (.json(textField: .some(nil)), "empty text in the answer"),
        (.json(textField: nil), nil),
    ] as [(InferenceProbe.Answer, String?)])
    func judge(answer: InferenceProbe.Answer, failure: String?) {
        #expect(InferenceProbe.judge(answer, textField: "text") == failure)
    }
}

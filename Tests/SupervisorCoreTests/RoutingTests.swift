import SupervisorCore
import Testing

/// The routing policy, the queue's head-of-line rule, admission and retries as tables.
struct RoutingTests {
    /// A router over `devices` device slots and `fallback` fallback slots, each `max` deep, with the given
    /// slots serving and loads.
    static func router(devices: Int, fallback: Int = 0, max: Int = 2, serving: Set<Int>, load: [Int: Int] = [:])
        -> Router
    {
        var machine = SupervisorMachine(config: config(devices: devices, fallback: fallback, maxInflight: max),
                                        protocolVersion: 1)
        for slot in serving { machine.makeServing(slot) }
        var router = machine.router
        for (slot, count) in load { for _ in 0..<count { router.assign(slot) } }
        return router
    }

    @Test(arguments: [
        // (serving, load, expected pick)
        ([0, 1, 2], [0: 1, 1: 0, 2: 1], 1),  // the least loaded
        ([0, 1, 2], [0: 2, 1: 2, 2: 1], 2),  // full workers are skipped
        ([0, 2], [0: 1, 2: 0], 2),           // a worker out of rotation is never picked
        ([1], [1: 1], 1),
    ] as [(Set<Int>, [Int: Int], Int)])
    func picksTheLeastLoadedServingWorkerWithRoom(serving: Set<Int>, load: [Int: Int], expected: Int) {
        var router = Self.router(devices: 3, serving: serving, load: load)
        #expect(router.pick(pinned: nil) == expected)
    }

    @Test func everyDeviceFullMeansWaitNotFallback() {
        var router = Self.router(devices: 2, fallback: 1, max: 1, serving: [0, 1, 2], load: [0: 1, 1: 1])
        #expect(router.pick(pinned: nil) == nil, "a busy device is worth waiting for: CPU is ~50x slower")
    }

    @Test func fallbackOnlyWhenNoDeviceServes() {
        var router = Self.router(devices: 2, fallback: 2, serving: [2, 3], load: [2: 1])
        #expect(router.pick(pinned: nil) == 3, "the least loaded fallback worker")
        var none = Self.router(devices: 2, fallback: 1, serving: [])
        #expect(none.pick(pinned: nil) == nil)
    }

    @Test func idleWorkersShareTheLoadRoundRobin() {
        var router = Self.router(devices: 3, max: 100, serving: [0, 1, 2])
        var picks: [Int] = []
        for _ in 0..<6 {
            let slot = router.pick(pinned: nil)!
            picks.append(slot)
            router.assign(slot)
            router.release(slot)  // answered at once: loads stay equal
        }
        #expect(Set(picks) == [0, 1, 2], "ties rotate instead of always hitting slot 0: \(picks)")
    }

    /// `burst_affinity`: a burst's requests follow its previous one while that worker has room and is at most
    /// the affinity above the least loaded; a new burst starts from the least loaded.
    @Test(arguments: [
        // (affinity, max_inflight, burst size, expected slots in order)
        (0, 100, 6, [0, 1, 0, 1, 0, 1]),        // off: every request to the least loaded, ties in turn
        (8, 100, 6, [0, 0, 0, 0, 0, 0]),        // the whole burst to one worker
        (2, 100, 6, [0, 0, 0, 1, 1, 1]),        // ... until it holds 3 more than the other (0-1, 1-1, 2-1 at most 2)
        (8, 3, 6, [0, 0, 0, 1, 1, 1]),          // ... or is full
    ] as [(Int, Int, Int, [Int])])
    func aBurstStaysOnOneWorkerWithinTheAffinity(affinity: Int, max: Int, size: Int, expected: [Int]) {
        var router = Self.router(devices: 2, max: max, serving: [0, 1])
        var picks: [Int] = []
        for _ in 0..<size {
            guard let slot = router.pick(pinned: nil, burstAffinity: affinity) else { break }
            router.assign(slot)
            picks.append(slot)
        }
        // Ties rotate: the first pick may be either worker; the pattern is what counts.
        let normalized = picks.first == 1 ? picks.map { 1 - $0 } : picks
        #expect(normalized == expected, "picks \(picks)")
    }

    @Test func aNewBurstStartsFromTheLeastLoaded() {
        var router = Self.router(devices: 2, max: 100, serving: [0, 1], load: [0: 5, 1: 4])
        router.endBurst()
        #expect(router.pick(pinned: nil, burstAffinity: 8) == 1, "no burst yet: the least loaded")
        router.assign(1)
        router.assign(1)  // 0: 5, 1: 6
        #expect(router.pick(pinned: nil, burstAffinity: 8) == 1, "within the affinity: stays")
        router.endBurst()
        #expect(router.pick(pinned: nil, burstAffinity: 8) == 0, "after the burst: the least loaded again")
    }

    @Test func affinityNeverLeavesTheRulesOfRotationKindOrPinning() {
        // A worker that left rotation mid-burst is not followed.
        var machine = SupervisorMachine(config: config(devices: 2, maxInflight: 100), protocolVersion: 1)
        machine.makeServing(0)
        machine.makeServing(1)
        machine.router.assign(0)
        _ = machine.handle(.channelWritability(slot: 0, pid: 1000, writable: false), now: .seconds(100))
        #expect(!machine.router.serving[0], "a backed-up channel takes the worker out of rotation")
        #expect(machine.router.pick(pinned: nil, burstAffinity: 8) == 1)
        // A fallback worker is not followed once a device can serve.
        var mixed = Self.router(devices: 1, fallback: 1, max: 100, serving: [0, 1])
        mixed.assign(1)
        #expect(mixed.pick(pinned: nil, burstAffinity: 8) == 0, "the burst was on the CPU fallback: devices first")
        // A pinned request goes to its device whatever the burst; the burst then follows it.
        var pinned = Self.router(devices: 2, max: 100, serving: [0, 1])
        pinned.assign(0)
        #expect(pinned.pick(pinned: 1, burstAffinity: 8) == 1)
        pinned.assign(1)
        #expect(pinned.pick(pinned: nil, burstAffinity: 8) == 1)
    }

    @Test func pinnedRequestsGoToTheirWorkerOrWait() {
        var router = Self.router(devices: 2, max: 1, serving: [0, 1], load: [1: 1])
        #expect(router.pick(pinned: 0) == 0)
        #expect(router.pick(pinned: 1) == nil, "full: it waits, it does not go elsewhere")
        var down = Self.router(devices: 2, serving: [0])
        #expect(down.pick(pinned: 1) == nil)
    }

    @Test func releaseAllReturnsWhatTheLostWorkerHeld() {
        var router = Self.router(devices: 1, max: 8, serving: [0], load: [0: 3])
        #expect(router.releaseAll(0) == 3)
        #expect(router.inflight[0] == 0)
    }

    @Test func headOfLineUnpinnedBlocksPinnedDoesNot() {
        var scan = QueueScan()
        #expect(scan.shouldTry)
        scan.notPlaced(isPinned: true)
        #expect(scan.shouldTry, "a pinned request waiting for its device blocks nobody")
        scan.notPlaced(isPinned: false)
        #expect(!scan.shouldTry, "nothing overtakes an older request for the same workers")
    }

    @Test(arguments: [(0, 2, true), (1, 2, true), (2, 2, false), (5, 2, false)])
    func queueOrRefuse(queued: Int, maxQueue: Int, accepted: Bool) {
        let verdict = Admission.queueOrRefuse(queued: queued, maxQueue: maxQueue)
        if accepted {
            #expect(verdict == .accept)
        } else {
            #expect(verdict == .refuse(code: "overloaded", message: "all workers are at max_inflight and the queue is full (\(maxQueue) waiting)", retryable: true))
        }
    }

    @Test(arguments: [
        // (streamed, probe, attempts, retries, shutting down, cause, crashes, expected)
        (false, false, 1, 1, false, RetryPolicy.LossCause.crash, 1, "retry spends"),
        (false, false, 2, 1, false, .crash, 1, "fail"),
        (false, false, 2, 1, false, .unknown, 0, "fail"),
        (false, false, 5, 1, false, .notTheRequest, 0, "retry free"),   // a kill from outside: the deadline bounds it
        (false, false, 5, 1, false, .suspect, 1, "retry free"),         // an OOM kill or hang: free, but counted...
        (false, false, 1, 1, false, .suspect, 2, "quarantine"),         // ...so the second one stops it
        (false, false, 1, 0, false, .notTheRequest, 0, "fail"),         // retries = 0: never run twice
        (false, false, 1, 3, false, .crash, 2, "quarantine"),           // on two crashed workers: poison suspect
        (true, false, 1, 3, false, .notTheRequest, 0, "fail"),           // streamed: never runs twice
        (false, true, 1, 3, false, .notTheRequest, 0, "fail"),           // the supervisor's own probe
        (false, false, 1, 1, true, .notTheRequest, 0, "fail"),           // shutting down
        (false, false, 1, 0, false, .crash, 1, "fail"),
    ] as [(Bool, Bool, Int, Int, Bool, RetryPolicy.LossCause, Int, String)])
    func retryAfterALostWorker(streamed: Bool, probe: Bool, attempts: Int, retries: Int, shuttingDown: Bool,
                               cause: RetryPolicy.LossCause, crashes: Int, expected: String) {
        let decision = RetryPolicy.afterWorkerLost(device: "3", streamed: streamed, isProbe: probe, attempts: attempts,
                                                   retries: retries, isShuttingDown: shuttingDown, cause: cause,
                                                   crashes: crashes)
        let shown: String = switch decision {
        case .retry(true): "retry spends"
        case .retry(false): "retry free"
        case .fail: "fail"
        case .quarantine: "quarantine"
        }
        #expect(shown == expected)
        if streamed { #expect(decision == .fail("the worker on device 3 died after streaming part of the answer")) }
    }

    @Test(arguments: [
        (ExitReason.signaled(signal: 11, coreDumped: true), RetryPolicy.LossCause.crash),
        (.signaled(signal: 6, coreDumped: false), .crash), (.exited(code: 1), .crash), (.deviceOOM, .crash),
        (.signaled(signal: 9, coreDumped: false), .notTheRequest), (.oomKilled, .suspect), (.hang, .suspect),
        (.stopped, .notTheRequest), (.deviceUnhealthy("x"), .notTheRequest), (.unhealthy, .notTheRequest),
        (.protocolError("x"), .unknown),
    ] as [(ExitReason, RetryPolicy.LossCause)])
    func whoseFaultADeathWas(reason: ExitReason, cause: RetryPolicy.LossCause) {
        #expect(RetryPolicy.lossCause(reason) == cause)
    }

    @Test func deadlineMessageSaysWhetherItWasStillQueued() {
        #expect(RetryPolicy.deadlineMessage(timeoutMilliseconds: 300, wasQueued: false) == "no answer within 300 ms")
        #expect(RetryPolicy.deadlineMessage(timeoutMilliseconds: 300, wasQueued: true)
            == "no answer within 300 ms (still queued: every worker was busy)")
    }

    @Test func noWorkersOnlyWhenNothingCanComeBack() {
        var failed = WorkerStateMachine(policy: .init())
        _ = failed.start(now: .seconds(0))
        failed.spawned(pid: 1, now: .seconds(0))
        _ = failed.exited(.exited(code: 78), now: .seconds(1), jitter: 0)
        let stopped = WorkerStateMachine(policy: .init())
        var backoff = WorkerStateMachine(policy: .init())
        _ = backoff.start(now: .seconds(0))
        backoff.spawned(pid: 2, now: .seconds(0))
        _ = backoff.exited(.exited(code: 1), now: .seconds(1), jitter: 0)
        #expect(Admission.noWorkersReason([("0", failed), ("1", stopped)])
            == "no worker can serve: device 0 failed (worker exited with code 78 (EX_CONFIG: the worker says its "
            + "configuration is wrong); not restarted: fix its configuration, then `npu-supervisorctl start 0`), device 1 stopped")
        #expect(Admission.noWorkersReason([("0", failed), ("1", backoff)]) == nil, "a restart is coming")
    }

    /// Why a failed worker stays down, as its log line and a `no_workers` answer say it (docs/PROTOCOL.md 1.2).
    @Test func failedNoteSaysWhyAndWhatBringsItBack() {
        let policy = WorkerStateMachine.Policy(
            restart: .always, backoff: Backoff(initial: .seconds(1), maximum: .seconds(8), multiplier: 2, jitter: 0),
            backoffResetAfter: .seconds(60), maxRestarts: 0, restartWindow: .seconds(60),
            failedRetryInterval: .seconds(300), startTimeout: .seconds(30), stopTimeout: .seconds(15),
            killRepeat: .seconds(5))
        func exitedOnce(_ reason: ExitReason) -> WorkerStateMachine {
            var m = WorkerStateMachine(policy: policy)
            _ = m.start(now: .seconds(0))
            m.spawned(pid: 1, now: .seconds(0))
            _ = m.exited(reason, now: .seconds(1), jitter: 0)
            return m
        }
        let configError = exitedOnce(.exited(code: 78))
        #expect(configError.state == .failed(retryAt: nil) && configError.desired == .up)
        #expect(Admission.failedNote(configError, device: "7")
            == "not restarted: fix its configuration, then `npu-supervisorctl start 7`")
        let crashLoop = exitedOnce(.exited(code: 1))  // restart_limit 0: failed at the first exit, retried later
        #expect(Admission.failedNote(crashLoop, device: "7")
            == "too many restarts (0 in 1m), retried every failed_retry_interval or on `npu-supervisorctl start 7`")
        var held = WorkerStateMachine(policy: policy)
        _ = held.start(now: .seconds(0))
        held.spawned(pid: 1, now: .seconds(0))
        _ = held.holdFailed(.deviceUnhealthy("no /dev/davinci7"), now: .seconds(1))
        _ = held.exited(.signaled(signal: 15, coreDumped: false), now: .seconds(2), jitter: 0)
        #expect(Admission.failedNote(held, device: "7")
            == "held failed while the device probe fails (its worker was already restarted once)")
        #expect(Admission.failedNote(WorkerStateMachine(policy: policy), device: "7") == nil, "not failed")
        #expect(Admission.noWorkersReason([("7", crashLoop)])
            == "no worker can serve: device 7 failed (worker exited with code 1; too many restarts (0 in 1m), "
            + "retried every failed_retry_interval or on `npu-supervisorctl start 7`)")
    }
}

/// Test configuration helpers shared by the machine tests.
func config(devices: Int, fallback: Int = 0, maxInflight: Int = 2,
            deviceProbe: DeviceProbeSpec = DeviceProbeSpec(), inference: InferenceProbeSpec = disabledProbe(),
            minReady: Int = 1) -> SupervisorConfiguration {
    var config = SupervisorConfiguration()
    config.minReady = minReady
    config.shutdownTimeout = .seconds(10)
    func spec(_ id: String, fallback: Bool) -> WorkerSpec {
        var spec = WorkerSpec(
            device: id, kind: fallback ? .cpu : .npu, command: ["npu-worker"], environment: [:], pinVariable: nil,
            workingDirectory: nil, maxInflight: maxInflight, heartbeatInterval: .seconds(1),
            heartbeatTimeout: .seconds(3),
            policy: WorkerStateMachine.Policy(
                backoff: Backoff(initial: .seconds(1), maximum: .seconds(8), multiplier: 2, jitter: 0),
                maxRestarts: 3, restartWindow: .seconds(60), startTimeout: .seconds(30), stopTimeout: .seconds(15)),
            deviceProbe: deviceProbe, inferenceProbe: inference, isFallback: fallback)
        spec.memoryLimit = nil
        return spec
    }
    config.workers = (0..<devices).map { spec("\($0)", fallback: false) }
    if fallback > 0 {
        config.fallback = FallbackSpec(workers: (0..<fallback).map { spec("cpu\($0)", fallback: true) },
                                       whenFewerThan: 1, stopAfter: .seconds(5))
    }
    return config
}

func disabledProbe() -> InferenceProbeSpec {
    var probe = InferenceProbeSpec()
    probe.enabled = false
    return probe
}

extension SupervisorMachine {
    /// Drives slot `slot` through spawn, channel, hello and ready at `now`; returns its pid.
    @discardableResult
    mutating func makeServing(_ slot: Int, pid: Int32? = nil, now: MonotonicInstant = .seconds(100)) -> Int32 {
        let pid = pid ?? Int32(1000 + slot)
        if workers[slot].lifecycle.desired != .up {
            _ = handle(.control(.start, slots: [slot], requestedBy: 0), now: now)
        }
        _ = handle(.spawned(slot: slot, pid: pid), now: now)
        _ = handle(.channelOpened(slot: slot, pid: pid), now: now)
        _ = handle(.workerMessage(slot: slot, pid: pid, .hello(protocolVersion: 1)), now: now)
        _ = handle(.workerMessage(slot: slot, pid: pid, .ready), now: now)
        return pid
    }
}

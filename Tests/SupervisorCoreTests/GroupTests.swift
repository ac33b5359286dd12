import SupervisorCore
import SupervisorRuntime
import Testing

/// Tensor-parallel groups (SupervisorMachine+Groups.swift): the configuration, and the group machine as tables of
/// events and the actions they must (and must not) produce. The real-process drills are in
/// Tests/IntegrationTests/GroupIntegrationTests.swift.
struct GroupTests {
    static let t0 = MonotonicInstant.seconds(100)

    /// One device (slot 0), group tp0 on devices 1,2 (slots 1,2), group tp1 on devices 3,4 (slots 3,4).
    static let toml = """
        [defaults]
        command = ["npu-worker", "--device", "{device}", "--rank", "{rank}", "--group", "{group}"]
        heartbeat_interval = "1s"
        heartbeat_timeout = "3s"
        backoff_initial = "1s"
        backoff_max = "8s"
        backoff_jitter = 0
        restart_limit = 3
        restart_window = "60s"
        start_timeout = "30s"
        stop_timeout = "15s"
        [defaults.inference_probe]
        enabled = false
        [[device]]
        id = "0"
        [[group]]
        id = "tp0"
        devices = ["1", "2"]
        rank_table = true
        [[group]]
        id = "tp1"
        devices = ["3", "4"]
        visible_devices = "group"
        """

    static func machine(_ text: String = toml) throws -> SupervisorMachine {
        SupervisorMachine(config: try ConfigLoader.parse(text, path: "/tmp/c.toml"), protocolVersion: 1)
    }

    static func spawns(_ actions: [SupervisorMachine.Action]) -> [Int] {
        actions.compactMap { if case .spawn(let slot) = $0 { slot } else { nil } }
    }

    static func signals(_ actions: [SupervisorMachine.Action]) -> [(slot: Int, signal: Int32)] {
        actions.compactMap { if case .signal(let slot, _, let signal) = $0 { (slot, signal) } else { nil } }
    }

    static func failed(_ actions: [SupervisorMachine.Action]) -> [(slot: Int, cause: RetryPolicy.LossCause)] {
        actions.compactMap { if case .failInflight(let slot, let cause) = $0 { (slot, cause) } else { nil } }
    }

    static func logs(_ actions: [SupervisorMachine.Action]) -> [String] {
        actions.compactMap { if case .log(let record) = $0 { record.message } else { nil } }
    }

    static func prepared(_ actions: [SupervisorMachine.Action]) -> [Int] {
        actions.compactMap { if case .prepareGroup(let group, _) = $0 { group } else { nil } }
    }

    // MARK: Configuration

    @Test func configGivesEachRankItsEnvironment() throws {
        let c = try ConfigLoader.parse(Self.toml, path: "/tmp/c.toml")
        #expect(c.workers.map(\.device) == ["0", "1", "2", "3", "4"])
        #expect(c.groups.map(\.id) == ["tp0", "tp1"])
        #expect(c.groups[0].devices == ["1", "2"] && c.groups[0].rankTable && c.groups[0].visibleDevices == .own)
        #expect(c.workers[0].rank == nil)
        #expect(c.workers[2].command.dropFirst() == ["--device", "2", "--rank", "1", "--group", "tp0"])
        let follower = c.workers[2].contractEnvironment
        #expect(follower["RANK"] == "1" && follower["LOCAL_RANK"] == "1" && follower["WORLD_SIZE"] == "2")
        #expect(follower["MASTER_ADDR"] == "127.0.0.1" && follower["NPU_GROUP"] == "tp0")
        #expect(follower["ASCEND_RT_VISIBLE_DEVICES"] == "2" && follower["NPU_DEVICE_ID"] == "2")
        #expect(follower["MASTER_PORT"] == nil, "the runtime picks it for each start")
        #expect(c.workers[3].contractEnvironment["ASCEND_RT_VISIBLE_DEVICES"] == "3,4", "visible_devices = group")
        #expect(c.workers[0].contractEnvironment["RANK"] == nil)
        #expect(!c.workers[2].inferenceProbe.enabled, "only the leader gets requests, so only it is probed")
        // The group's backstop start timeout comes after its ranks' own.
        #expect(c.groups[0].policy.startTimeout == .seconds(31))
    }

    @Test func configOfGroupsAlone() throws {
        let c = try ConfigLoader.parse("[defaults]\ncommand = [\"w\"]\n[[group]]\nid = \"g\"\ndevices = [\"0\", \"1\", \"2\", \"3\"]\n",
                                       path: "/tmp/c.toml")
        #expect(c.workers.map { $0.rank?.rank } == [0, 1, 2, 3])
    }

    @Test(arguments: [
        ("[[device]]\nid = \"1\"\n[[group]]\nid = \"g\"\ndevices = [\"1\", \"2\"]\n", "group[0].devices"),
        ("[[group]]\nid = \"g\"\ndevices = [\"1\", \"2\"]\n[[group]]\nid = \"h\"\ndevices = [\"2\", \"3\"]\n", "group[1].devices"),
        ("[[group]]\nid = \"g\"\ndevices = [\"1\", \"1\"]\n", "group[0].devices"),
        ("[[device]]\nid = \"g\"\n[[group]]\nid = \"g\"\ndevices = [\"1\"]\n", "group[0].id"),
        ("[[group]]\nid = \"g\"\ndevices = [\"1\"]\n[[group]]\nid = \"g\"\ndevices = [\"2\"]\n", "group[1].id"),
        ("[[group]]\nid = \"all\"\ndevices = [\"1\"]\n", "group[0].id"),
        ("[[group]]\nid = \"g\"\n", "group[0].devices"),
        ("[[group]]\ndevices = [\"1\"]\n", "group[0].id"),
        ("[[group]]\nid = \"g\"\ndevices = [\"1\"]\nvisible_devices = \"some\"\n", "group[0].visible_devices"),
        ("[[group]]\nid = \"g\"\ndevices = [\"1\"]\nenv = { MASTER_PORT = \"1\" }\n", "group[0].env.MASTER_PORT"),
        ("[[group]]\nid = \"g\"\ndevices = [\"1\"]\nmax_inflght = 3\n", "group[0].max_inflght"),
    ])
    func configErrorsNameTheKey(_ body: String, _ key: String) {
        do {
            _ = try ConfigLoader.parse("[defaults]\ncommand = [\"w\"]\n" + body, path: "/tmp/c.toml")
            Issue.record("accepted: \(body)")
        } catch let error as ConfigError {
            #expect(error.key == key, "\(error)")
        } catch {
            Issue.record("\(error)")
        }
    }

    @Test func rankTableNamesEveryDeviceWithItsRank() {
        let spec = GroupSpec(id: "tp0", devices: ["4", "5"], policy: .init())
        let json = spec.rankTableJSON(host: "127.0.0.1")
        #expect(json.contains("\"server_id\": \"127.0.0.1\""))
        #expect(json.contains("{\"device_id\": \"4\", \"rank_id\": \"0\"}"))
        #expect(json.contains("{\"device_id\": \"5\", \"rank_id\": \"1\"}"))
        #expect(json.contains("\"status\": \"completed\""))
    }

    // MARK: Start and readiness

    @Test func bootPreparesEachGroupThenSpawnsAllItsRanks() throws {
        var m = try Self.machine()
        let actions = m.handle(.boot, now: Self.t0)
        #expect(Self.spawns(actions).sorted() == [0, 1, 2, 3, 4])
        // The port and rank table exist before any rank of the group is spawned.
        for (g, ranks) in [(0, [1, 2]), (1, [3, 4])] {
            let prepare = actions.firstIndex(of: .prepareGroup(group: g, incarnation: 1))
            let firstSpawn = actions.firstIndex { ranks.map { SupervisorMachine.Action.spawn(slot: $0) }.contains($0) }
            #expect(prepare != nil && firstSpawn != nil && prepare! < firstSpawn!)
        }
        #expect(m.groups[0].lifecycle.stateName == "starting")
    }

    @Test func theLeaderServesOnlyWhenEveryRankIsReady() throws {
        var m = try Self.machine()
        _ = m.handle(.boot, now: Self.t0)
        m.bringUp(1, now: Self.t0)
        #expect(!m.workers[1].isServing && !m.router.serving[1], "rank 1 is not ready yet")
        #expect(m.groups[0].lifecycle.stateName == "starting")
        m.bringUp(2, now: Self.t0 + .milliseconds(700))
        #expect(m.groups[0].lifecycle.stateName == "ready")
        #expect(m.router.serving[1] && !m.router.serving[2], "the leader serves; the follower never does")
        #expect(m.router.hopeful[1] && !m.router.hopeful[2])
        #expect(m.slot(of: "tp0") == 1 && m.slot(of: "2") == 1 && m.slot(of: "0") == 0, "pinning names the leader")
        #expect((1...2).allSatisfy { m.capacity($0) == .serving }, "both devices of a serving group serve")
        let (health, line) = m.aggregate()
        #expect(health == .degraded && line.contains("1/3 workers ready"), "tp1 and device 0 are still starting: \(line)")
    }

    // MARK: Gang restart

    /// Every worker ready.
    static func serving() throws -> SupervisorMachine {
        var m = try machine()
        _ = m.handle(.boot, now: t0)
        for slot in 0..<5 { m.bringUp(slot, now: t0) }
        return m
    }

    @Test func aFollowerKilledTakesTheGroupDownAndRestartsItAsAUnit() throws {
        var m = try Self.serving()
        let t1 = Self.t0 + .seconds(5)
        let exit = m.exit(2, pid: 1002, .signaled(signal: 9, coreDumped: false), now: t1)
        // Out of rotation at once; the leader is stopped gently (its collective is broken); nothing is restarted
        // and no request retried until every rank is gone.
        #expect(!m.router.serving[1])
        #expect(Self.signals(exit).map(\.slot) == [1] && Self.signals(exit)[0].signal == 15)
        #expect(Self.spawns(exit).isEmpty && Self.failed(exit).isEmpty)
        #expect(m.groups[0].cause?.rank == 1 && m.groups[0].cause?.device == "2")
        #expect(m.capacity(1) == .down && m.capacity(2) == .down, "the whole group's capacity is lost, not one device's")
        #expect(m.router.serving[0] && m.router.serving[3], "the other group and the single device keep serving")
        let gone = m.exit(1, pid: 1001, .exited(code: 0), now: t1)
        let failed = Self.failed(gone)
        #expect(failed.count == 1 && failed[0].slot == 1 && failed[0].cause == .notTheRequest,
                "a kill from outside spends no retry of the leader's requests")
        #expect(m.groups[0].lifecycle.stateName == "backoff" && m.groups[0].lifecycle.restarts == 1)
        #expect(m.workers[1].lifecycle.lastExit == .stopped, "the leader's exit is a consequence")
        #expect(m.workers[1].lastExitDetail?.contains("stopped with its group: rank 1 (device 2)") == true)
        #expect(gone.contains(.groupExitRecorded(group: 0, reason: .signaled(signal: 9, coreDumped: false))))
        #expect(gone.contains(.exitRecorded(slot: 2, reason: .signaled(signal: 9, coreDumped: false))))
        #expect(!gone.contains { if case .exitRecorded(1, _) = $0 { true } else { false } }, "the leader's is a consequence")
        // Backoff over: a new incarnation, both ranks spawned together.
        let restart = m.handle(.timer, now: t1 + .seconds(1))
        #expect(Self.prepared(restart) == [0] && Self.spawns(restart).sorted() == [1, 2])
        #expect(m.groups[0].incarnation == 2)
    }

    @Test func aGroupThatServedLongIsRestartedAtOnce() throws {
        var m = try Self.serving()
        let later = Self.t0 + .seconds(120)  // backoff_reset_after is 60 s
        for slot in 0..<5 { m.frameReceived(slot: slot, now: later) }
        _ = m.exit(2, pid: 1002, .signaled(signal: 9, coreDumped: false), now: later)
        let gone = m.exit(1, pid: 1001, .exited(code: 0), now: later)
        #expect(Self.spawns(gone).sorted() == [1, 2], "no backoff after good service")
        #expect(m.groups[0].lifecycle.restarts == 1)
    }

    /// A rank held failed for its device whose leader exits first (it lost its peer): the hold is kept, and the
    /// group is held failed with it, not restarted.
    @Test func aRankHeldForItsDeviceStaysHeldWhenItsLeaderExitsFirst() throws {
        let text = Self.toml.replacing("[[device]]", with: "[defaults.device_probe]\ntype = \"worker\"\ninterval = \"1s\"\n\n[[device]]")
        var m = try Self.machine(text)
        _ = m.handle(.boot, now: Self.t0)
        for slot in 0..<5 { m.bringUp(slot, now: Self.t0) }
        #expect(m.groups[0].lifecycle.isReady)
        // Rank 1 (slot 2) reports its device bad; the probes judge it: restart once, then hold.
        var now = Self.t0
        func probe() {
            now = now + .seconds(1)
            for slot in 0..<5 where m.workers[slot].pid != nil {
                m.frameReceived(slot: slot, now: now)
                _ = m.handle(.workerHealth(slot: slot, pid: m.workers[slot].pid!, ok: slot != 2, detail: "ECC"), now: now)
            }
            _ = m.handle(.timer, now: now)
        }
        probe()
        #expect(m.workers[2].lifecycle.stateName == "stopping", "restarted once for its device")
        _ = m.exit(2, pid: 1002, .signaled(signal: 9, coreDumped: false), now: now)
        _ = m.exit(1, pid: 1001, .exited(code: 1), now: now)
        #expect(m.groups[0].lifecycle.restarts == 1)
        now = now + .seconds(2)
        _ = m.handle(.timer, now: now)
        m.bringUp(1, now: now)
        m.bringUp(2, now: now)
        for _ in 0..<3 where m.workers[2].lifecycle.stateName != "stopping" { probe() }
        #expect(m.workers[2].lifecycle.stateName == "stopping", "held this time")
        // The leader's exit (it lost its peer) is seen before the held rank's.
        _ = m.exit(1, pid: 1001, .exited(code: 1), now: now)
        _ = m.exit(2, pid: 1002, .exited(code: 0), now: now)
        #expect(m.groups[0].lifecycle.isHeldFailed, "\(m.groups[0].lifecycle.stateName)")
        #expect(m.groups[0].lifecycle.restarts == 1)
        #expect(m.groups[0].cause?.rank == 1 && m.groups[0].lifecycle.lastExit?.kind == "device_unhealthy")
    }

    /// A cause belongs to its episode: a later stop (here, shutdown) is a plain stop, not that rank's fault again.
    @Test func aLaterStopDoesNotRepeatAnEarlierCause() throws {
        var m = try Self.serving()
        _ = m.exit(2, pid: 1002, .signaled(signal: 9, coreDumped: false), now: Self.t0)
        _ = m.exit(1, pid: 1001, .exited(code: 0), now: Self.t0)
        let now = Self.t0 + .seconds(2)
        _ = m.handle(.timer, now: now)
        m.bringUp(1, now: now)
        m.bringUp(2, now: now)
        #expect(m.groups[0].lifecycle.isReady && m.groups[0].cause?.rank == 1, "the last cause is kept for status")
        _ = m.handle(.shutdown(reason: "test", requestsInFlight: 0), now: now)
        var actions = m.exit(1, pid: 1001, .exited(code: 0), now: now)
        actions += m.exit(2, pid: 1002, .signaled(signal: 9, coreDumped: false), now: now)
        #expect(m.groups[0].lifecycle.lastExit == .stopped || m.groups[0].lifecycle.lastExit == .signaled(signal: 9, coreDumped: false))
        #expect(!actions.contains { if case .groupExitRecorded = $0 { true } else { false } }, "a stop is no restart")
        #expect(m.workers[2].lastExitDetail?.contains("stopped with its group") != true, "\(m.workers[2].lastExitDetail ?? "-")")
        #expect(!Self.logs(actions).contains { $0.contains("down: rank 1") }, "\(Self.logs(actions))")
    }

    @Test func theRankWithClearerEvidenceIsTheCause() throws {
        var m = try Self.serving()
        let t1 = Self.t0 + .seconds(5)
        // The leader, killed from outside, is reaped after its follower, which exited on its own when it lost
        // its peer: the signal, not the follower's exit code, names the cause.
        _ = m.exit(2, pid: 1002, .exited(code: 1), now: t1)
        #expect(m.groups[0].cause?.rank == 1)
        let gone = m.exit(1, pid: 1001, .signaled(signal: 9, coreDumped: false), now: t1)
        #expect(m.groups[0].cause?.rank == 0 && m.groups[0].cause?.reason == .signaled(signal: 9, coreDumped: false))
        #expect(m.groups[0].lifecycle.lastExit == .signaled(signal: 9, coreDumped: false))
        #expect(Self.failed(gone).map(\.cause) == [.notTheRequest])
        #expect(m.workers[2].lastExitDetail?.contains("after its group broke: rank 0 (device 1) signaled(9)") == true,
                "\(m.workers[2].lastExitDetail ?? "-")")
        #expect(gone.contains(.exitRecorded(slot: 1, reason: .signaled(signal: 9, coreDumped: false))))
    }

    @Test func aCrashingLeaderSpendsItsRequestsRetry() throws {
        var m = try Self.serving()
        let t1 = Self.t0 + .seconds(5)
        _ = m.exit(1, pid: 1001, .signaled(signal: 11, coreDumped: true), now: t1)
        let gone = m.exit(2, pid: 1002, .exited(code: 0), now: t1)
        #expect(Self.failed(gone).map(\.cause) == [.crash])
    }

    @Test func aHungRankIsKilledAndItsGroupRestarted() throws {
        var m = try Self.serving()
        // Rank 1 of tp1 (slot 4) stops heart-beating; the others keep sending frames.
        var now = Self.t0
        for _ in 0..<4 {
            now = now + .seconds(1)
            for slot in [0, 1, 2, 3] { m.frameReceived(slot: slot, now: now) }
            _ = m.handle(.timer, now: now)
        }
        #expect(m.workers[4].lifecycle.stateName == "stopping", "killed as hung")
        _ = m.exit(4, pid: 1004, .signaled(signal: 9, coreDumped: false), now: now)
        #expect(m.groups[1].cause?.reason == .hang && m.groups[1].cause?.device == "4")
        #expect(m.workers[3].lifecycle.stateName == "stopping", "the leader stopped with it")
        _ = m.exit(3, pid: 1003, .exited(code: 0), now: now)
        #expect(m.groups[1].lifecycle.lastExit == .hang)
        #expect(m.groups[0].lifecycle.stateName == "ready", "tp0 untouched")
    }

    @Test func aCrashLoopingGroupEndsFailedWithBoundedRestarts() throws {
        var m = try Self.machine()
        var now = Self.t0
        _ = m.handle(.boot, now: now)
        var pid: Int32 = 5000
        var restarts: [Int] = []
        for _ in 0..<8 {
            // Rank 1 dies at once every time.
            for slot in [1, 2] where m.workers[slot].isSpawnPending {
                pid += 1
                _ = m.handle(.spawned(slot: slot, pid: pid), now: now)
            }
            guard let p2 = m.workers[2].pid, let p1 = m.workers[1].pid else { break }
            _ = m.exit(2, pid: p2, .exited(code: 1), now: now)
            _ = m.exit(1, pid: p1, .exited(code: 0), now: now)
            restarts.append(m.groups[0].lifecycle.restarts)
            now = now + .seconds(10)
            _ = m.handle(.timer, now: now)
        }
        #expect(m.groups[0].lifecycle.stateName == "failed")
        #expect(restarts.last == 3, "restart_limit = 3 in restart_window: \(restarts)")
        #expect(m.workers[1].pid == nil && m.workers[2].pid == nil)
        #expect(m.groups[1].lifecycle.restarts == 0, "tp1's intensity is its own")
    }

    @Test func exitCode78HoldsTheGroupFailed() throws {
        var m = try Self.serving()
        _ = m.exit(2, pid: 1002, .exited(code: 78), now: Self.t0)
        let gone = m.exit(1, pid: 1001, .exited(code: 0), now: Self.t0)
        #expect(m.groups[0].lifecycle.isHeldFailed)
        #expect(Self.spawns(gone).isEmpty)
        #expect(m.noWorkersReason(pinned: 1)?.contains("group tp0 failed") == true)
        // The operator's start brings the whole group back.
        let start = m.handle(.control(.start, slots: [2], requestedBy: 0), now: Self.t0 + .seconds(1))
        #expect(Self.spawns(start).sorted() == [1, 2])
    }

    @Test func operatorVerbsOnARankActOnItsGroup() throws {
        var m = try Self.serving()
        let stop = m.handle(.control(.stop, slots: [2], requestedBy: 0), now: Self.t0)
        #expect(Self.signals(stop).map(\.slot).sorted() == [1, 2] && Self.signals(stop).allSatisfy { $0.signal == 15 })
        _ = m.exit(1, pid: 1001, .exited(code: 0), now: Self.t0)
        let gone = m.exit(2, pid: 1002, .exited(code: 0), now: Self.t0)
        #expect(Self.spawns(gone).isEmpty && m.groups[0].lifecycle.stateName == "stopped")
        #expect(m.groups[0].cause == nil, "a stop on request names no rank")
        #expect(Self.failed(gone).map(\.cause) == [.notTheRequest])
        let restart = m.handle(.control(.restart, slots: [3], requestedBy: 0), now: Self.t0)
        #expect(Self.signals(restart).map(\.slot).sorted() == [3, 4])
        _ = m.exit(3, pid: 1003, .exited(code: 0), now: Self.t0)
        let again = m.exit(4, pid: 1004, .exited(code: 0), now: Self.t0)
        #expect(Self.spawns(again).sorted() == [3, 4], "an operator's restart is immediate")
        #expect(m.groups[1].lifecycle.restarts == 0, "and not counted")
    }

    @Test func aRankThatFailsToSpawnBreaksItsGroup() throws {
        var m = try Self.machine()
        _ = m.handle(.boot, now: Self.t0)
        _ = m.handle(.spawned(slot: 1, pid: 1001), now: Self.t0)
        let failed = m.handle(.spawnFailed(slot: 2, errno: 2, message: "ENOENT", jitter: 0), now: Self.t0)
        #expect(Self.signals(failed).map(\.slot) == [1])
        _ = m.exit(1, pid: 1001, .exited(code: 0), now: Self.t0)
        #expect(m.groups[0].lifecycle.lastExit == .spawnFailed(errno: 2))
        #expect(m.groups[0].lifecycle.stateName == "backoff")
    }

    @Test func shutdownStopsEveryRankAndEndsWhenAllAreGone() throws {
        var m = try Self.serving()
        let actions = m.handle(.shutdown(reason: "test", requestsInFlight: 0), now: Self.t0)
        #expect(Self.signals(actions).map(\.slot).sorted() == [0, 1, 2, 3, 4])
        var last: [SupervisorMachine.Action] = []
        for slot in 0..<5 {
            last = m.exit(slot, pid: Int32(1000 + slot), .exited(code: 0), now: Self.t0)
            #expect(Self.spawns(last).isEmpty, "nothing restarts during shutdown")
        }
        #expect(last.contains(.closeSockets))
    }

    @Test func drainingARankDrainsTheLeader() throws {
        var m = try Self.serving()
        _ = m.handle(.drain(slots: [2]), now: Self.t0)
        #expect(m.workers[1].drain != .none && m.workers[2].drain == .none)
        #expect(!m.router.serving[1])
    }

    @Test func aRollingRestartReplacesTheGroupAsOneStep() throws {
        var m = try Self.serving()
        _ = m.handle(.rollingRestart(slots: [1, 2, 3, 4]), now: Self.t0)
        #expect(m.rollout.steps.map(\.device) == ["tp0", "tp1"])
    }

    @Test func aReloadRollsAGroupAsOneStepOntoNewSpecsForEveryRank() throws {
        var m = try Self.serving()
        let next = try ConfigLoader.parse(Self.toml.replacing("\"--group\", \"{group}\"]", with: "\"--group\", \"{group}\", \"--v2\"]")
                                            .replacing("[[device]]\nid = \"0\"", with: "[[device]]\nid = \"0\"\ncommand = [\"npu-worker\"]")
                                            + "\n[rollout]\nbake_time = \"0s\"\nmin_ready_time = \"1s\"\n",
                                          path: "/tmp/c.toml")
        #expect(next.workers[0].command.count == 1 && next.workers[1].command.last == "--v2")
        _ = m.handle(.reloadRequested, now: Self.t0)
        _ = m.handle(.reload(next), now: Self.t0)
        #expect(m.rollout.steps.map(\.device).sorted() == ["0", "tp0", "tp1"], "one step per group, not per rank")
        // Walk the rollout through: each stop is answered by the exits, each start by the new processes.
        var now = Self.t0
        var pid: Int32 = 2000
        for _ in 0..<40 where m.rollout.isActive {
            now = now + .milliseconds(500)
            for slot in 0..<5 {
                if m.workers[slot].isSpawnPending {
                    pid += 1
                    _ = m.handle(.spawned(slot: slot, pid: pid), now: now)
                    _ = m.handle(.channelOpened(slot: slot, pid: pid), now: now)
                    _ = m.handle(.workerMessage(slot: slot, pid: pid, .hello(protocolVersion: 1)), now: now)
                    _ = m.handle(.workerMessage(slot: slot, pid: pid, .ready), now: now)
                } else if case .stopping(let p, _, _) = m.workers[slot].lifecycle.state {
                    _ = m.exit(slot, pid: p, .exited(code: 0), now: now)
                }
            }
            for slot in 0..<5 where m.workers[slot].pid != nil { m.frameReceived(slot: slot, now: now) }
            _ = m.handle(.timer, now: now)
        }
        #expect(m.rollout.state == .complete, "\(m.rollout.state) \(m.rollout.reason ?? "") \(m.rollout.progress)")
        #expect((1...4).allSatisfy { m.workers[$0].spec.command.last == "--v2" }, "every rank on the new spec")
        #expect(m.groups.allSatisfy { $0.lifecycle.isReady && $0.lifecycle.restarts == 0 })
        #expect(m.router.serving[1] && m.router.serving[3])
    }

    @Test func anUpgradeInterruptedByTheSupervisorsRestartComesBackAsOneGroupStep() throws {
        var m = try Self.machine()
        var old1 = m.workers[1].spec
        var old2 = m.workers[2].spec
        old1.command.append("--v1")
        old2.command.append("--v1")
        _ = m.handle(.restoreRollout(previous: [1: old1, 2: old2], onPrevious: [2]), now: Self.t0)
        #expect(m.rollout.steps.map(\.device) == ["tp0"] && m.rollout.state == .paused)
        #expect(m.workers[1].spec == old1 && m.workers[2].spec == old2, "the whole group starts on the revision it was on")
    }

    @Test func aReloadThatChangesAGroupsShapeIsRefused() throws {
        var m = try Self.serving()
        let next = try ConfigLoader.parse(Self.toml.replacing("devices = [\"3\", \"4\"]", with: "devices = [\"3\", \"4\", \"5\"]"),
                                          path: "/tmp/c.toml")
        _ = m.handle(.reloadRequested, now: Self.t0)
        let actions = m.handle(.reload(next), now: Self.t0)
        #expect(actions.contains { if case .reloadDone(false, let why) = $0 { why.contains("[[group]] tables changed shape") } else { false } })
        #expect(m.workers.count == 5 && m.groups[1].slots.count == 2, "nothing changed")
    }

    /// The sweep: from each state the group can be in, every rank event; the invariants hold after each.
    @Test func invariantsHoldForEveryRankEventInEveryGroupState() throws {
        typealias Setup = (inout SupervisorMachine) -> Void
        let states: [(String, Setup)] = [
            ("starting", { _ in }),
            ("half ready", { m in m.bringUp(1, now: Self.t0) }),
            ("ready", { m in m.bringUp(1, now: Self.t0); m.bringUp(2, now: Self.t0) }),
            ("broken", { m in
                m.bringUp(1, now: Self.t0); m.bringUp(2, now: Self.t0)
                _ = m.exit(2, pid: 1002, .exited(code: 1), now: Self.t0)
            }),
            ("backoff", { m in
                m.bringUp(1, now: Self.t0); m.bringUp(2, now: Self.t0)
                _ = m.exit(2, pid: 1002, .exited(code: 1), now: Self.t0)
                _ = m.exit(1, pid: 1001, .exited(code: 0), now: Self.t0)
            }),
            ("stopped", { m in
                m.bringUp(1, now: Self.t0); m.bringUp(2, now: Self.t0)
                _ = m.handle(.control(.stop, slots: [1], requestedBy: 0), now: Self.t0)
                _ = m.exit(2, pid: 1002, .exited(code: 0), now: Self.t0)
                _ = m.exit(1, pid: 1001, .exited(code: 0), now: Self.t0)
            }),
        ]
        let events: [(String, (SupervisorMachine) -> SupervisorMachine.Event?)] = [
            ("follower exits", { m in m.workers[2].pid.map { .processExited(slot: 2, pid: $0, .exited(code: 1), oomKillsRose: nil, jitter: 0) } }),
            ("leader killed", { m in m.workers[1].pid.map { .processExited(slot: 1, pid: $0, .signaled(signal: 9, coreDumped: false), oomKillsRose: nil, jitter: 0) } }),
            ("follower closes fd 3", { m in m.workers[2].pid.map { .channelClosed(slot: 2, pid: $0) } }),
            ("follower breaks the protocol", { m in m.workers[2].pid.map { .undecodable(slot: 2, pid: $0, message: "bad") } }),
            ("follower reports its device bad", { m in m.workers[2].pid.map { .workerHealth(slot: 2, pid: $0, ok: false, detail: "ECC") } }),
            ("follower ready", { m in m.workers[2].pid.map { .workerMessage(slot: 2, pid: $0, .ready) } }),
            ("start tp0 by a rank", { _ in .control(.start, slots: [2], requestedBy: 0) }),
            ("stop tp0 by a rank", { _ in .control(.stop, slots: [2], requestedBy: 0) }),
            ("restart tp0", { _ in .control(.restart, slots: [1, 2], requestedBy: 0) }),
            ("timer much later", { _ in .timer }),
        ]
        for (stateName, setup) in states {
            for (eventName, event) in events {
                var m = try Self.machine()
                _ = m.handle(.boot, now: Self.t0)
                setup(&m)
                guard let e = event(m) else { continue }
                let later = eventName == "timer much later" ? Self.t0 + .seconds(120) : Self.t0 + .milliseconds(1)
                let actions = m.handle(e, now: later)
                let context = "\(stateName) + \(eventName)"
                // A rank is never spawned alone: either both ranks, after the group's prepare, or none.
                let rankSpawns = Self.spawns(actions).filter { [1, 2].contains($0) }.sorted()
                #expect(rankSpawns.isEmpty || (rankSpawns == [1, 2] && Self.prepared(actions).contains(0)), "\(context)")
                // Only the leader ever serves, and only with every rank ready.
                #expect(!m.router.serving[2], "\(context)")
                if m.router.serving[1] {
                    #expect(m.workers[1].lifecycle.isReady && m.workers[2].lifecycle.isReady
                            && m.groups[0].lifecycle.isReady, "\(context)")
                }
                // The leader's requests are failed only once no rank runs.
                if !Self.failed(actions).filter({ $0.slot == 1 }).isEmpty {
                    #expect(m.workers[1].pid == nil && m.workers[2].pid == nil || rankSpawns == [1, 2], "\(context)")
                }
                #expect(Self.failed(actions).allSatisfy { $0.slot != 2 }, "a follower holds no requests: \(context)")
                // The other group and the single device are never touched.
                #expect(Self.signals(actions).allSatisfy { [1, 2].contains($0.slot) }, "\(context)")
            }
        }
    }
}

extension SupervisorMachine {
    /// The process is reaped and its channel reaches EOF: the actions of both.
    mutating func exit(_ slot: Int, pid: Int32, _ reason: ExitReason, now: MonotonicInstant) -> [Action] {
        let reaped = handle(.processExited(slot: slot, pid: pid, reason, oomKillsRose: nil, jitter: 0), now: now)
        return reaped + handle(.channelClosed(slot: slot, pid: pid), now: now)
    }

    /// Spawned (if asked), channel open, hello, ready: pid 1000 + slot.
    mutating func bringUp(_ slot: Int, now: MonotonicInstant) {
        let pid = Int32(1000 + slot)
        _ = handle(.spawned(slot: slot, pid: pid), now: now)
        _ = handle(.channelOpened(slot: slot, pid: pid), now: now)
        _ = handle(.workerMessage(slot: slot, pid: pid, .hello(protocolVersion: 1)), now: now)
        _ = handle(.workerMessage(slot: slot, pid: pid, .ready), now: now)
    }
}


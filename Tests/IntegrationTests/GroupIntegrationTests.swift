import Foundation
import NIOCore
import NPUClient
import Testing
import TestSupport
import WireProtocol

/// Tensor-parallel groups with real processes: two groups of two ranks and a single device under closed-loop
/// load; a rank killed, a rank hung, a group that crash-loops, the rank environment and the rank table, and
/// nothing left running after shutdown. The table tests of the same rules are Tests/SupervisorCoreTests/GroupTests.swift.
@Suite(.serialized, .timeLimit(.minutes(3)))
struct GroupIntegrationTests {
    static let groups = """
        [[group]]
        id = "tp0"
        devices = ["1", "2"]
        rank_table = true

        [[group]]
        id = "tp1"
        devices = ["3", "4"]
        visible_devices = "group"
        """

    static func makeDaemon(workerArgs: [String] = ["--token-ms", "2", "--load-ms", "100"], defaults: String = "",
                           groups: String = Self.groups, http: String = "") throws -> TestDaemon {
        try TestDaemon(devices: ["0"], workerArgs: workerArgs, defaults: defaults, extra: groups, http: http)
    }

    static func group(_ daemon: TestDaemon, _ id: String) -> GroupStatus? {
        daemon.status()?.groups?.first { $0.id == id }
    }

    /// The variables of a running process.
    static func environment(_ pid: Int32) -> [String: String] {
        guard let data = FileManager.default.contents(atPath: "/proc/\(pid)/environ") else { return [:] }
        var env: [String: String] = [:]
        for entry in data.split(separator: 0) {
            let text = String(decoding: entry, as: UTF8.self)
            if let eq = text.firstIndex(of: "=") { env[String(text[..<eq])] = String(text[text.index(after: eq)...]) }
        }
        return env
    }

    @Test func eachRankGetsItsEnvironmentAndTheRankTable() throws {
        let daemon = try Self.makeDaemon()
        let doc = try #require(daemon.waitAllReady())
        let tp0 = try #require(doc.groups?.first { $0.id == "tp0" })
        let port = try #require(tp0.masterPort)
        #expect(doc.workers.map { $0.group ?? "-" } == ["-", "tp0", "tp0", "tp1", "tp1"])
        #expect(doc.workers.map { $0.rank ?? -1 } == [-1, 0, 1, 0, 1])
        for worker in doc.workers where worker.group == "tp0" {
            let env = Self.environment(try #require(worker.pid))
            #expect(env["RANK"] == String(worker.rank!) && env["LOCAL_RANK"] == String(worker.rank!))
            #expect(env["WORLD_SIZE"] == "2" && env["MASTER_ADDR"] == "127.0.0.1" && env["MASTER_PORT"] == String(port))
            #expect(env["NPU_GROUP"] == "tp0" && env["ASCEND_RT_VISIBLE_DEVICES"] == worker.device)
            #expect(env["RANK_TABLE_FILE"] == tp0.rankTableFile)
        }
        let tp1Leader = try #require(doc.workers.first { $0.device == "3" }?.pid)
        #expect(Self.environment(tp1Leader)["ASCEND_RT_VISIBLE_DEVICES"] == "3,4", "visible_devices = group")
        #expect(Self.environment(tp1Leader)["RANK_TABLE_FILE"] == nil, "rank_table is off for tp1")
        let table = try String(contentsOfFile: try #require(tp0.rankTableFile), encoding: .utf8)
        let json = try #require(try JSONSerialization.jsonObject(with: Data(table.utf8)) as? [String: Any])
        let server = try #require((json["server_list"] as? [[String: Any]])?.first)
        let devices = try #require(server["device"] as? [[String: String]])
        #expect(devices.map { $0["device_id"] } == ["1", "2"] && devices.map { $0["rank_id"] } == ["0", "1"])
        #expect(server["server_id"] as? String == "127.0.0.1" && json["status"] as? String == "completed")
        // Requests pinned to the group (or any of its devices) go to its leader.
        let client = try daemon.client()
        for pin in ["tp0", "2"] {
            let answer = decodeAnswer(try client.infer(payload("{\"prompt\": \"x\"}"), options: RequestOptions(device: pin)))
            #expect(answer?.device == "1", "pinned to \(pin)")
        }
        // The CLI shows the groups.
        let table2 = try daemon.ctl(["status"])
        #expect(table2.stdout.contains("2 (tp0 rank 1)") && table2.stdout.contains("GROUP"), "\(table2.stdout)")
        #expect(daemon.terminate() == 0)
    }

    @Test func aKilledRankRestartsOnlyItsGroupAndNoRequestFails() throws {
        let daemon = try Self.makeDaemon(http: "127.0.0.1:0")
        let before = try #require(daemon.waitAllReady())
        let port = try #require(before.groups?.first { $0.id == "tp0" }?.masterPort)
        let others = before.workers.filter { $0.group != "tp0" }.map(\.pid)
        let load = try RolloutIntegrationTests.Load(daemon, seconds: 4)
        #expect(daemon.waitForDaemonTime(.seconds(1)))
        let follower = try #require(before.workers.first { $0.device == "2" }?.pid)
        #expect(kill(follower, SIGKILL) == 0)
        #expect(eventually {
            guard let g = Self.group(daemon, "tp0") else { return false }
            return g.restarts == 1 && g.state == "ready" && g.serving
        })
        let report = try load.finish()
        #expect(RolloutIntegrationTests.errors(report).isEmpty, "\(report)")
        #expect((report["ok"] as? Int ?? 0) > 50, "\(report)")
        let after = try #require(daemon.status())
        let tp0 = try #require(after.groups?.first { $0.id == "tp0" })
        #expect(tp0.lastExit == "signaled(9)" && tp0.lastExitRank == 1 && tp0.lastExitDevice == "2")
        #expect(tp0.masterPort != nil && tp0.masterPort != port, "a fresh MASTER_PORT for each start")
        #expect(after.workers.filter { $0.group != "tp0" }.map(\.pid) == others, "the other group and the device kept running")
        // The leader's exit is a consequence, whichever exit the supervisor saw first: stopped by its group, or
        // exited on its own (the reference worker exits 1 when it loses its peer) just before.
        let leader = try #require(after.workers.first { $0.device == "1" })
        #expect(["stopped", "exited(1)"].contains(leader.lastExit ?? "-")
                && leader.lastExitDetail?.contains("rank 1 (device 2) signaled(9)") == true, "\(leader)")
        #expect(leader.exits["signaled"] == nil)
        // Prometheus sees the group's restart by its cause, and the group back in rotation.
        let http = try #require(after.supervisor.http)
        let scrape = try HealthTests.curl("http://\(http)/metrics")
        #expect(scrape.body.contains("npu_supervisor_group_restarts_total{group=\"tp0\",reason=\"signaled\"} 1"))
        #expect(scrape.body.contains("npu_supervisor_group_restarts_total{group=\"tp1\",reason=\"signaled\"} 0"))
        #expect(scrape.body.contains("npu_supervisor_group_up{group=\"tp0\"} 1"))
        #expect(scrape.body.contains("npu_supervisor_worker_restarts_total{device=\"2\",reason=\"signaled\"} 1"))
        #expect(scrape.body.contains("npu_supervisor_worker_restarts_total{device=\"1\",reason=\"exited\"} 0"),
                "the leader's exit is not counted as its own failure")
        #expect(scrape.body.contains("npu_supervisor_worker_up{device=\"2\"} 1"), "a follower is up while its group serves")
        #expect(scrape.body.contains("npu_supervisor_group_state{group=\"tp0\",state=\"ready\"} 1"))
        if let promtool = MonitoringTests.promtool {
            let file = daemon.directory + "/metrics.txt"
            try (scrape.body + "\n").write(toFile: file, atomically: true, encoding: .utf8)
            let lint = try runCommand("/bin/sh", ["-c", "\"$0\" check metrics < \"$1\"", promtool, file])
            #expect(lint.status == 0 && lint.stdout.isEmpty && lint.stderr.isEmpty, "\(lint.stdout)\(lint.stderr)")
        }
        #expect(daemon.log.contains("group tp0: rank 1 (device 2) killed by SIGKILL"))
        #expect(daemon.terminate() == 0)
    }

    @Test func aHungRankRestartsItsGroupAsHang() throws {
        let daemon = try Self.makeDaemon(defaults: "heartbeat_timeout = \"1s\"")
        let before = try #require(daemon.waitAllReady())
        let rank = try #require(before.workers.first { $0.device == "4" }?.pid)
        #expect(kill(rank, SIGSTOP) == 0)
        defer { _ = kill(rank, SIGCONT) }
        #expect(eventually {
            guard let g = Self.group(daemon, "tp1") else { return false }
            return g.restarts == 1 && g.state == "ready"
        })
        let tp1 = try #require(Self.group(daemon, "tp1"))
        #expect(tp1.lastExit == "hang" && tp1.lastExitRank == 1 && tp1.lastExitDevice == "4", "\(tp1)")
        #expect(!processExists(rank), "the hung rank was killed")
        #expect(Self.group(daemon, "tp0")?.restarts == 0)
        #expect(daemon.terminate() == 0)
    }

    @Test func aCrashLoopingGroupEndsFailedWithBoundedRestarts() throws {
        // Rank 1 of tp0 exits 3 at once, every time; rank 0 would serve.
        let worker = Binaries.worker
        let groups = """
            [[group]]
            id = "tp0"
            devices = ["1", "2"]
            command = ["/bin/sh", "-c", "[ {rank} = 1 ] && exit 3; exec \(worker) --load-ms 50"]
            restart_limit = 2
            restart_window = "60s"
            failed_retry_interval = "10m"
            """
        let daemon = try Self.makeDaemon(groups: groups)
        #expect(eventually { Self.group(daemon, "tp0")?.state == "failed" })
        let doc = try #require(daemon.status())
        let tp0 = try #require(doc.groups?.first)
        #expect(tp0.restarts == 2 && tp0.lastExit == "exited(3)" && tp0.lastExitRank == 1, "\(tp0)")
        #expect(doc.workers.filter { $0.group == "tp0" }.allSatisfy { $0.pid == nil })
        #expect(doc.workers.first { $0.device == "0" }?.state == "ready", "the single device serves on")
        #expect(doc.state == "degraded")
        // Pinned to a failed group: answered at once, saying why.
        let client = try daemon.client()
        let outcome = try client.infer(payload("{\"prompt\": \"x\"}"), options: RequestOptions(device: "tp0"))
        guard case .error(let error) = outcome else {
            Issue.record("answered \(outcome)")
            return
        }
        #expect(error.code == "no_workers" && error.message.contains("group tp0 failed"), "\(error)")
        #expect(daemon.terminate() == 0)
    }

    @Test func aRanksDeviceFaultRestartsTheGroupOnceThenHoldsItFailed() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("npu-g-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let daemon = try Self.makeDaemon(
            workerArgs: ["--load-ms", "50", "--health-file", directory + "/fault-{device}"],
            defaults: "device_probe = { type = \"worker\", interval = \"200ms\" }")
        #expect(daemon.waitAllReady() != nil)
        // Rank 1 of tp1 (device 4) reports an ECC error from now on.
        try "ECC uncorrectable error".write(toFile: directory + "/fault-4", atomically: true, encoding: .utf8)
        #expect(eventually { Self.group(daemon, "tp1")?.state == "failed" })
        let tp1 = try #require(Self.group(daemon, "tp1"))
        #expect(tp1.lastExit == "device_unhealthy" && tp1.lastExitRank == 1 && tp1.lastExitDevice == "4", "\(tp1)")
        #expect(tp1.restarts == 1, "restarted once to try to clear the fault, then held: \(tp1)")
        #expect(Self.group(daemon, "tp0")?.serving == true && daemon.worker("0")?.health.inRotation == true)
        #expect(daemon.status()?.reason.contains("tp1") == true)
        // The fault cleared: the operator's start brings the whole group back.
        try FileManager.default.removeItem(atPath: directory + "/fault-4")
        #expect(try daemon.ctl(["start", "tp1"]).status == 0)
        #expect(eventually { Self.group(daemon, "tp1")?.serving == true })
        #expect(daemon.terminate() == 0)
    }

    @Test func operatorVerbsTakeAGroupAndNothingIsLeftAfterShutdown() throws {
        let daemon = try Self.makeDaemon()
        let before = try #require(daemon.waitAllReady())
        let tp1 = before.workers.filter { $0.group == "tp1" }.compactMap(\.pid)
        let restart = try daemon.ctl(["restart", "tp1"])
        #expect(restart.status == 0, "\(restart.stderr)")
        #expect(eventually {
            guard let doc = daemon.status() else { return false }
            let pids = doc.workers.filter { $0.group == "tp1" }.map(\.pid)
            return doc.groups?.first { $0.id == "tp1" }?.state == "ready" && pids.allSatisfy { $0 != nil && !tp1.contains($0!) }
        })
        #expect(Self.group(daemon, "tp1")?.restarts == 0, "an operator's restart is not counted")
        let stop = try daemon.ctl(["stop", "2"])
        #expect(stop.status == 0, "\(stop.stderr)")
        #expect(eventually {
            guard let doc = daemon.status() else { return false }
            return doc.groups?.first { $0.id == "tp0" }?.state == "stopped"
                && doc.workers.filter { $0.group == "tp0" }.allSatisfy { $0.pid == nil }
        }, "stopping a rank's device stops its whole group")
        let unknown = try daemon.ctl(["restart", "tp9"])
        #expect(unknown.status != 0 && unknown.stderr.contains("groups: tp0, tp1"), "\(unknown.stderr)")
        let all = try #require(daemon.status()).workers.compactMap(\.pid)
        #expect(daemon.terminate() == 0)
        #expect(all.allSatisfy { !processExists($0) }, "no rank left running")
    }
}

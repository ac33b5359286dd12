import Foundation
import NIOCore
import NPUClient
import Testing
import TestSupport
import WireProtocol

/// Drain, rolling restart, reload and upgrades with automatic rollback, with real processes under
/// closed-loop load (npu-bench load: every client waits for each answer before sending the next).
@Suite(.serialized, .timeLimit(.minutes(3)))
struct RolloutIntegrationTests {
    static let rollout = """
        [rollout]
        drain_timeout = "5s"
        progress_deadline = "3s"
        min_ready_time = "300ms"
        bake_time = "1500ms"
        min_requests = 5
        max_error_rate = 0.2
        """

    /// npu-bench load in the background for `seconds`.
    final class Load {
        let process = Process()
        let output = Pipe()

        init(_ daemon: TestDaemon, seconds: Int, clients: Int = 4) throws {
            process.executableURL = URL(fileURLWithPath: Binaries.directory + "/npu-bench")
            process.arguments = ["load", "--socket", daemon.requestsSocket, "--clients", "\(clients)", "--depth", "1",
                                 "--duration", "\(seconds)", "--machine",
                                 "--json", "{\"prompt\": \"rolling\", \"max_new_tokens\": 4}"]
            process.standardOutput = output
            process.standardError = FileHandle.nullDevice
            try process.run()
        }

        /// Waits for the load to end; its report.
        func finish() throws -> [String: Any] {
            let data = output.fileHandleForReading.readDataToEndOfFile()
            process.waitUntilExit()
            let line = String(decoding: data, as: UTF8.self).split(separator: "\n").last ?? ""
            return try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        }
    }

    static func errors(_ report: [String: Any]) -> [String: Any] { report["errors"] as? [String: Any] ?? ["?": 1] }

    /// Rewrites the config's worker command (the `command = [...]` line of `[defaults]`).
    static func setWorkerArguments(_ daemon: TestDaemon, _ arguments: [String]) throws {
        let text = try String(contentsOfFile: daemon.configPath, encoding: .utf8)
        let argv = ([Binaries.worker] + arguments).map { "\"\($0)\"" }.joined(separator: ", ")
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false).map { line in
            line.hasPrefix("command = [") ? "command = [\(argv)]" : String(line)
        }
        try lines.joined(separator: "\n").write(toFile: daemon.configPath, atomically: true, encoding: .utf8)
    }

    @Test func drainTakesADeviceOutOfRotationAndUndrainPutsItBack() throws {
        let daemon = try TestDaemon(devices: ["0", "1"], extra: Self.rollout)
        #expect(daemon.waitAllReady() != nil)
        let drain = try daemon.ctl(["drain", "0"])
        #expect(drain.status == 0, "\(drain.stderr)")
        #expect(eventually { daemon.worker("0")?.drain == "drained" })
        #expect(daemon.worker("0")?.state == "ready", "the worker keeps running")
        #expect(daemon.status()?.reason.contains("drained: 0") == true)
        let client = try daemon.client()
        for _ in 0..<6 {
            #expect(decodeAnswer(try client.infer(payload("{\"prompt\": \"x\"}")))?.device == "1")
        }
        #expect(try daemon.ctl(["undrain", "0"]).status == 0)
        #expect(eventually { daemon.worker("0")?.drain == "no" && daemon.worker("0")?.health.inRotation == true })
        #expect(daemon.status()?.state == "ok")
        #expect(daemon.terminate() == 0)
    }

    @Test func aRollingRestartUnderLoadLosesNoRequest() throws {
        let daemon = try TestDaemon(devices: ["0", "1"], workerArgs: ["--token-ms", "1", "--load-ms", "200"],
                                    extra: Self.rollout)
        let before = try #require(daemon.waitAllReady()).workers.map(\.pid)
        let load = try Load(daemon, seconds: 5)
        #expect(eventually { (daemon.status()?.workers.map(\.inflight).reduce(0, +) ?? 0) > 0 }, "load is flowing")
        let restart = try daemon.ctl(["restart", "--rolling", "all"])
        #expect(restart.status == 0, "\(restart.stderr)")
        #expect(eventually(timeout: .seconds(20)) { daemon.status()?.rollout?.state == "complete" })
        let report = try load.finish()
        #expect(report["never_answered"] as? Int == 0)
        #expect(Self.errors(report).isEmpty, "a rolling restart fails no request: \(report)")
        #expect((report["ok"] as? Int ?? 0) > 50)
        let after = try #require(daemon.status()).workers
        #expect(zip(before, after.map(\.pid)).allSatisfy { $0 != $1 }, "every worker is a new process")
        #expect(after.allSatisfy { $0.restarts == 0 && $0.generation == 1 })
        #expect(daemon.log.contains("rollout complete (2 device(s))"))
        #expect(daemon.terminate() == 0)
    }

    @Test func anUpgradeByReloadUnderLoadLosesNoRequestAndRaisesTheGeneration() throws {
        let daemon = try TestDaemon(devices: ["0", "1"], workerArgs: ["--token-ms", "1", "--load-ms", "200"],
                                    extra: Self.rollout)
        let before = try #require(daemon.waitAllReady())
        let oldRevision = before.workers[0].revision
        let load = try Load(daemon, seconds: 6)
        try Self.setWorkerArguments(daemon, ["--token-ms", "1", "--load-ms", "200", "--model", "sim-llm-7b-v2"])
        let reload = try daemon.ctl(["reload", "--wait"])
        #expect(reload.status == 0, "\(reload.stdout) \(reload.stderr)")
        #expect(reload.stdout.contains("rollout complete"))
        let report = try load.finish()
        #expect(report["never_answered"] as? Int == 0)
        #expect(Self.errors(report).isEmpty, "an upgrade fails no request: \(report)")
        let after = try #require(daemon.status())
        #expect(after.rollout?.state == "complete")
        #expect(after.workers.allSatisfy { $0.generation == 2 && $0.revision != oldRevision && $0.state == "ready" })
        #expect(daemon.terminate() == 0)
    }

    @Test(arguments: [
        (["--exit-at-start", "1"], "before it was ready", false),
        (["--never-ready"], "not ready within progress_deadline", false),
        (["--fail-requests"], "failed its gates: error rate", true),
    ])
    func aBadUpgradeIsRolledBackWhileTheOldRevisionServes(arguments: [String], reason: String, canaryServes: Bool) throws {
        let daemon = try TestDaemon(devices: ["0", "1"], workerArgs: ["--token-ms", "1"],
                                    defaults: "restart_limit = 100", extra: Self.rollout)
        let before = try #require(daemon.waitAllReady())
        let untouched = before.workers[1].pid
        let load = try Load(daemon, seconds: 5)
        try Self.setWorkerArguments(daemon, ["--token-ms", "1"] + arguments)
        let reload = try daemon.ctl(["reload", "--wait"])
        #expect(reload.status == 1, "a reload whose rollout was rolled back fails: \(reload.stdout)")
        #expect(reload.stderr.contains(reason), "\(reload.stderr)")
        let report = try load.finish()
        #expect(report["never_answered"] as? Int == 0)
        if !canaryServes {
            #expect(Self.errors(report).isEmpty, "the broken canary never served: \(report)")
        }
        let after = try #require(daemon.status())
        #expect(after.rollout?.state == "rolled_back")
        #expect(after.rollout?.reason?.contains(reason) == true)
        #expect(after.workers.allSatisfy { $0.revision == before.workers[0].revision && $0.state == "ready" },
                "every device back on the old revision")
        #expect(after.workers[1].pid == untouched, "the device after the canary was never touched")
        #expect(daemon.log.contains("rollout failed: "))
        #expect(daemon.terminate() == 0)
    }

    @Test func aReloadWithAnInvalidFileChangesNothing() throws {
        let daemon = try TestDaemon(devices: ["0", "1"], extra: Self.rollout)
        let before = try #require(daemon.waitAllReady())
        let text = try String(contentsOfFile: daemon.configPath, encoding: .utf8)
        try (text + "\n[requests]\nmax_queue = -3\n").write(toFile: daemon.configPath, atomically: true, encoding: .utf8)
        let reload = try daemon.ctl(["reload", "--wait"])
        #expect(reload.status == 1)
        #expect(reload.stderr.contains("requests.max_queue"), "the key is named: \(reload.stderr)")
        let after = try #require(daemon.status())
        #expect(after.workers.map(\.pid) == before.workers.map(\.pid))
        #expect(after.state == "ok")
        #expect(decodeAnswer(try daemon.client().infer(payload("{\"prompt\": \"still here\"}"))) != nil)
        #expect(daemon.terminate() == 0)
    }

    @Test func aReloadAddsAndRemovesDevicesAndAppliesSettingsInPlace() throws {
        let daemon = try TestDaemon(devices: ["0", "1"], extra: Self.rollout)
        let before = try #require(daemon.waitAllReady())
        var text = try String(contentsOfFile: daemon.configPath, encoding: .utf8)
        text = text.replacingOccurrences(of: "[[device]]\nid = \"1\"", with: "[[device]]\nid = \"2\"")
        text += "\n[requests]\nmax_queue = 7\n"
        try text.write(toFile: daemon.configPath, atomically: true, encoding: .utf8)
        let reload = try daemon.ctl(["reload", "--wait"])
        #expect(reload.status == 0, "\(reload.stderr)")
        #expect(reload.stdout.contains("1 added, 1 removed"), "\(reload.stdout)")
        #expect(eventually { daemon.status()?.workers.map(\.device) == ["0", "2"] && daemon.worker("2")?.state == "ready" })
        #expect(daemon.worker("0")?.pid == before.workers[0].pid, "an unchanged device keeps its process")
        #expect(!processExists(before.workers[1].pid!), "the removed device's worker is stopped")
        #expect(daemon.terminate() == 0)
    }

    @Test func aSupervisorRestartedDuringAnUpgradeComesBackPausedWithEachDeviceOnItsRevision() throws {
        let settings = Self.rollout.replacingOccurrences(of: "progress_deadline = \"3s\"", with: "progress_deadline = \"60s\"")
        let daemon = try TestDaemon(devices: ["0", "1"], extra: settings)
        let before = try #require(daemon.waitAllReady())
        let oldRevision = try #require(before.workers[0].revision)
        // The new revision never becomes ready: the upgrade stays on its canary.
        try Self.setWorkerArguments(daemon, ["--never-ready"])
        #expect(try daemon.ctl(["reload"]).status == 0)
        #expect(eventually { daemon.worker("0")?.generation == 2 && daemon.worker("0")?.state == "starting" })
        try daemon.restartAfterSIGKILL()
        #expect(eventually { daemon.status()?.rollout?.state == "paused" }, "\(daemon.status()?.rollout as Any)")
        let doc = try #require(daemon.status())
        #expect(doc.rollout?.reason?.contains("restarted during this upgrade") == true)
        #expect(doc.workers[1].revision == oldRevision, "device 1 had not been changed: it starts on the old revision")
        #expect(doc.workers[0].revision != oldRevision, "device 0 was on the new revision")
        #expect(eventually { daemon.worker("1")?.state == "ready" })
        // Undo: device 0 back to the old revision.
        let undo = try daemon.ctl(["rollout", "undo"])
        #expect(undo.status == 0, "\(undo.stderr)")
        #expect(eventually(timeout: .seconds(20)) { daemon.status()?.rollout?.state == "rolled_back" })
        #expect(eventually { daemon.status()?.workers.allSatisfy { $0.revision == oldRevision && $0.state == "ready" } == true })
        #expect(daemon.terminate() == 0)
    }

    @Test func theAgentCheckWeighsTheHostByServingDevicesAndSaysDrain() throws {
        let port = try freeTCPPort()
        let daemon = try TestDaemon(devices: ["0", "1", "2", "3"], extra: Self.rollout,
                                    httpExtra: "agent_check = \"127.0.0.1:\(port)\"")
        #expect(daemon.waitAllReady() != nil)
        #expect(try agentCheck(port) == "up 100%")
        #expect(try daemon.ctl(["drain", "0"]).status == 0)
        #expect(eventually { (try? agentCheck(port)) == "up 75%" })
        #expect(try daemon.ctl(["drain", "all"]).status == 0)
        #expect(eventually { (try? agentCheck(port)) == "drain" }, "a host-wide drain tells the balancer to drain")
        #expect(try daemon.ctl(["undrain", "all"]).status == 0)
        #expect(eventually { (try? agentCheck(port)) == "up 100%" })
        #expect(daemon.terminate() == 0)
    }
}

/// A TCP port nobody listens on now (bound to 0, read, released).
func freeTCPPort() throws -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let bound = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0 }
    }
    guard bound else { throw POSIXError(.EADDRINUSE) }
    return Int(UInt16(bigEndian: address.sin_port))
}

/// One agent-check answer: connect, read the line, trimmed.
func agentCheck(_ port: Int) throws -> String {
    let result = try runCommand("/usr/bin/curl", ["-s", "--max-time", "2", "telnet://127.0.0.1:\(port)"])
    return result.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
}

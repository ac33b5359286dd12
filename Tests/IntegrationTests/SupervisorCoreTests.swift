import Foundation
import NIOCore
import NPUClient
import TestSupport
import Testing
import WireProtocol

/// The supervisor core end to end: the real npu-supervisord, real npu-worker processes, the real CLI.
@Suite(.serialized, .timeLimit(.minutes(2)))
struct SupervisorLifecycleTests {
    @Test func allWorkersBecomeReadyAndShowInStatus() throws {
        let daemon = try TestDaemon()
        let doc = try #require(daemon.waitAllReady())
        #expect(doc.state == "ok")
        #expect(doc.workers.map(\.device) == ["0", "1", "2", "3"])
        for w in doc.workers {
            #expect(w.pid != nil && processExists(w.pid!))
            #expect(w.restarts == 0)
            #expect(w.lastExit == nil)
            #expect(w.inflight == 0)
        }
        let table = try daemon.ctl(["status"])
        #expect(table.status == 0)
        #expect(table.stdout.contains("state: ok"))
        for w in doc.workers { #expect(table.stdout.contains("\(w.pid!)")) }
        let json = try daemon.ctl(["status", "--json"])
        let viaCLI = try JSONDecoder().decode(StatusDocument.self, from: Data(json.stdout.utf8))
        #expect(viaCLI.workers.map(\.pid) == doc.workers.map(\.pid))
        let health = try daemon.ctl(["health"])
        #expect(health.status == 0)
        // How exits are detected is chosen once and said once (the suite also runs with the waitid thread).
        let forced = ProcessInfo.processInfo.environment["NPU_SUPERVISOR_NO_PIDFD"].map { !$0.isEmpty && $0 != "0" } ?? false
        let detection = daemon.log.split(separator: "\n").filter { $0.contains("exit detection: ") }
        #expect(detection.count == 1, "\(detection)")
        #expect(detection.first?.contains(forced ? "a waitid thread" : "pidfd per child") == true, "\(detection)")
        #expect(daemon.terminate() == 0)
    }

    @Test func workerGetsTheContractEnvironmentAndNoSupervisorDescriptors() throws {
        let daemon = try TestDaemon(devices: ["5"], defaults: "env = { EXTRA = \"x-{device}\" }",
                                    environment: ["NOTIFY_SOCKET": "/nonexistent/notify", "LISTEN_FDS": "0"])
        let doc = try #require(daemon.waitAllReady())
        let pid = try #require(doc.workers[0].pid)
        let fds = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd").sorted()
        #expect(fds == ["0", "1", "2", "3"], "the worker holds only stdin, stdout, stderr and its channel")
        let environ = try String(contentsOfFile: "/proc/\(pid)/environ", encoding: .utf8)
            .split(separator: "\0").map(String.init)
        #expect(environ.contains("NPU_SUPERVISOR_FD=3"))
        #expect(environ.contains("NPU_DEVICE_ID=5"))
        #expect(environ.contains("ASCEND_RT_VISIBLE_DEVICES=5"))
        #expect(environ.contains("EXTRA=x-5"))
        #expect(!environ.contains { $0.hasPrefix("NOTIFY_SOCKET=") || $0.hasPrefix("LISTEN_FDS=") })
        // Own process group, and signals not blocked by inheritance (SIGTERM is blocked by the worker itself
        // for its sigwait thread, so look at SIGHUP and SIGCHLD).
        #expect(getpgid(pid) == pid)
        let status = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
        let blocked = status.split(separator: "\n").first { $0.hasPrefix("SigBlk:") }!
        let mask = UInt64(blocked.split(separator: "\t").last!, radix: 16)!
        #expect(mask & (1 << (SIGHUP - 1)) == 0 && mask & (1 << (SIGCHLD - 1)) == 0)
        #expect(daemon.terminate() == 0)
    }

    @Test func sigkilledWorkerIsReplacedAndReasonShown() throws {
        let daemon = try TestDaemon(devices: ["0", "1"])
        let doc = try #require(daemon.waitAllReady())
        let victim = try #require(doc.workers[0].pid)
        kill(victim, SIGKILL)
        var replaced: WorkerStatus?
        #expect(eventually {
            replaced = daemon.worker("0")
            return replaced?.state == "ready" && replaced?.pid != victim
        })
        #expect(replaced?.restarts == 1)
        #expect(replaced?.lastExit == "signaled(9)")
        #expect(replaced?.exits["signaled"] == 1)
        #expect(daemon.worker("1")?.pid == doc.workers[1].pid, "the other device is untouched")
        #expect(!processExists(victim))
        #expect(daemon.log.contains("reason=signaled(9)"))
        #expect(daemon.terminate() == 0)
    }

    @Test func crashLoopEndsFailedWithBoundedRestarts() throws {
        let daemon = try TestDaemon(
            devices: ["0", "1"], defaults: "restart_limit = 3\nrestart_window = \"60s\"",
            perDevice: ["1": "command = [\"\(Binaries.worker)\", \"--exit-at-start\", \"3\"]"])
        var bad: WorkerStatus?
        #expect(eventually(timeout: .seconds(15)) {
            bad = daemon.worker("1")
            return bad?.state == "failed"
        })
        #expect(bad?.restarts == 3)
        #expect(bad?.lastExit == "exited(3)")
        #expect(bad?.nextRestartInSeconds ?? 0 > 60, "failed devices are re-tried on a slow timer only")
        // Stays failed: no restart storm. A storm would come within backoff_max (1 s); wait until the daemon's
        // own clock has passed that, then look again.
        #expect(daemon.waitForDaemonTime(.milliseconds(1500)), "the daemon stopped answering")
        #expect(daemon.worker("1")?.restarts == 3)
        #expect(daemon.worker("1")?.state == "failed")
        let doc = try #require(daemon.status())
        #expect(doc.state == "degraded")
        #expect(doc.reason.contains("device 1 failed"))
        #expect(try daemon.ctl(["health"]).status == 1)
        #expect(daemon.terminate() == 0)
    }

    @Test func exitCode78IsNotRestarted() throws {
        let daemon = try TestDaemon(devices: ["0"], workerArgs: ["--exit-at-start", "78"])
        var w: WorkerStatus?
        #expect(eventually {
            w = daemon.worker("0")
            return w?.state == "failed"
        })
        #expect(w?.restarts == 0)
        #expect(w?.lastExit == "exited(78)")
        #expect(w?.nextRestartInSeconds == nil)
        let doc = try #require(daemon.status())
        #expect(doc.state == "unavailable")
        #expect(try daemon.ctl(["health"]).status == 2)
        // A request now fails at once with no_workers instead of waiting for its deadline.
        let client = try daemon.client()
        guard case .error(let e) = try client.infer(payload("{\"prompt\":\"Hi\"}")) else {
            Issue.record("expected an error")
            return
        }
        #expect(e.code == "no_workers")
        #expect(daemon.terminate() == 0)
    }

    @Test func startTimeoutKillsAWorkerThatNeverSaysReady() throws {
        let daemon = try TestDaemon(devices: ["0"], workerArgs: ["--never-ready"],
                                    defaults: "start_timeout = \"300ms\"")
        var w: WorkerStatus?
        #expect(eventually {
            w = daemon.worker("0")
            return w?.lastExit == "start_timeout"
        })
        #expect(daemon.log.contains("start_timeout"))
        #expect(daemon.terminate() == 0)
    }

    @Test func stopStartRestartOneDevice() throws {
        let daemon = try TestDaemon(devices: ["0", "1"])
        let doc = try #require(daemon.waitAllReady())
        let first = try #require(doc.workers[0].pid)

        let stop = try daemon.ctl(["stop", "0"])
        #expect(stop.status == 0, "\(stop.stderr)")
        #expect(eventually { daemon.worker("0")?.state == "stopped" })
        #expect(!processExists(first))
        #expect(daemon.worker("0")?.desired == "down")
        #expect(daemon.status()?.state == "ok", "a device stopped on purpose does not degrade health")
        #expect(daemon.worker("1")?.pid == doc.workers[1].pid)

        #expect(try daemon.ctl(["start", "0"]).status == 0)
        #expect(eventually { daemon.worker("0")?.state == "ready" })
        let second = try #require(daemon.worker("0")?.pid)
        #expect(second != first)

        #expect(try daemon.ctl(["restart", "0"]).status == 0)
        #expect(eventually { daemon.worker("0")?.state == "ready" && daemon.worker("0")?.pid != second })
        #expect(daemon.worker("0")?.restarts == 0, "operator restarts are not counted as failures")
        #expect(!processExists(second))

        let pid = try daemon.ctl(["pid", "1"])
        #expect(pid.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "\(doc.workers[1].pid!)")
        let own = try daemon.ctl(["pid"])
        #expect(own.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "\(daemon.pid)")
        let unknown = try daemon.ctl(["stop", "9"])
        #expect(unknown.status == 1)
        #expect(unknown.stderr.contains("unknown device '9'"))
        #expect(daemon.terminate() == 0)
    }

    @Test func tailShowsTheWorkersOutput() throws {
        let daemon = try TestDaemon(devices: ["0"])
        #expect(daemon.waitAllReady() != nil)
        let tail = try daemon.ctl(["tail", "0"])
        #expect(tail.status == 0)
        #expect(tail.stdout.contains("npu-worker[0]: ready"))
        #expect(daemon.log.contains("device=0"))
        #expect(daemon.terminate() == 0)
    }

    @Test func sigtermLeavesNoProcessBehind() throws {
        let daemon = try TestDaemon()
        let doc = try #require(daemon.waitAllReady())
        let pids = doc.workers.compactMap(\.pid)
        #expect(pids.count == 4)
        #expect(daemon.terminate() == 0)
        for pid in pids { #expect(!processExists(pid)) }
        #expect(!FileManager.default.fileExists(atPath: daemon.requestsSocket))
        #expect(!FileManager.default.fileExists(atPath: daemon.statusSocket))
    }

    @Test func shutdownCommandStopsEverything() throws {
        let daemon = try TestDaemon(devices: ["0", "1"])
        let doc = try #require(daemon.waitAllReady())
        let result = try daemon.ctl(["shutdown"])
        #expect(result.status == 0)
        #expect(eventually { !daemon.isRunning })
        #expect(daemon.exitStatus == 0)
        for pid in doc.workers.compactMap(\.pid) { #expect(!processExists(pid)) }
        let after = try daemon.ctl(["status"])
        #expect(after.status == 69)
        #expect(after.stderr.contains("is npu-supervisord running?"))
    }

    @Test func sigkillOfTheSupervisorLeavesNoWorker() throws {
        let daemon = try TestDaemon()
        let doc = try #require(daemon.waitAllReady())
        let pids = doc.workers.compactMap(\.pid)
        kill(daemon.pid, SIGKILL)
        // Every worker sees EOF on fd 3 and leaves by itself, within a second.
        #expect(eventually(timeout: .seconds(1)) { pids.allSatisfy { !processExists($0) } })
    }

    @Test func aSecondInstanceOnTheSameSocketsIsRefused() throws {
        let daemon = try TestDaemon(devices: ["0"])
        #expect(daemon.waitAllReady() != nil)
        let second = try runCommand(Binaries.supervisord, ["--config", daemon.configPath])
        #expect(second.status == 1)
        #expect(second.stderr.contains("another npu-supervisord (pid \(daemon.pid))"))
        #expect(daemon.status()?.state == "ok", "the first instance still serves")
        #expect(daemon.terminate() == 0)
    }
}

@Suite(.serialized, .timeLimit(.minutes(2)))
struct ConfigCheckTests {
    func check(_ toml: String) throws -> CommandResult {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("npu-cfg-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let path = dir.appendingPathComponent("c.toml").path
        try toml.write(toFile: path, atomically: true, encoding: .utf8)
        return try runCommand(Binaries.supervisord, ["--config", path, "--check-config"])
    }

    @Test func theShippedExampleIsValid() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        let result = try runCommand(Binaries.supervisord,
                                    ["--config", root.appendingPathComponent("config/example.toml").path, "--check-config"])
        #expect(result.status == 0, "\(result.stderr)")
        #expect(result.stdout.contains("[[device]]"))
        #expect(result.stdout.components(separatedBy: "\n[[device]]").count == 5, "4 devices (the fallback worker is shown as a comment)")
    }

    @Test(arguments: [
        ("[defaults]\ncommand = [\"/bin/true\"]\nmax_inflight = 0\n[[device]]\nid = \"0\"",
         "defaults.max_inflight", "an integer >= 1"),
        ("[defaults]\ncommand = [\"/bin/true\"]\n[[device]]\nid = \"0\"\nstop_timeout = \"soon\"",
         "device[0].stop_timeout", "a duration"),
        ("[defaults]\ncommand = [\"/bin/true\"]\nrestrat = \"always\"\n[[device]]\nid = \"0\"",
         "defaults.restrat", "unknown key"),
        ("[defaults]\ncommand = [\"/bin/true\"]\n[[device]]\nid = \"0\"\n[[device]]\nid = \"0\"",
         "device[1].id", "not used by another device"),
        ("[defaults]\ncommand = [\"no-such-worker-binary\"]\n[[device]]\nid = \"0\"",
         "device[0].command[0]", "found next to npu-supervisord or on PATH"),
        ("[defaults]\ncommand = [\"/bin/true\"]\n", "device", "at least one [[device]]"),
        ("[supervisor]\nrun_dir = 3 = 4\n", "(syntax)", "valid TOML"),
    ])
    func badConfigIsRefusedWithTheKeyNamed(toml: String, key: String, expected: String) throws {
        let result = try check(toml)
        #expect(result.status == 78)
        #expect(result.stderr.contains("'\(key)'"), "\(result.stderr)")
        #expect(result.stderr.contains(expected), "\(result.stderr)")
    }

    @Test func aBadConfigStartsNothing() throws {
        let daemon = try TestDaemon(devices: ["0"], defaults: "max_inflight = -1", start: false)
        let result = try runCommand(Binaries.supervisord, ["--config", daemon.configPath])
        #expect(result.status == 78)
        #expect(result.stderr.contains("max_inflight"))
        #expect(!FileManager.default.fileExists(atPath: daemon.requestsSocket))
    }
}

@Suite(.serialized, .timeLimit(.minutes(2)))
struct StopEscalationTests {
    @Test func aWorkerIgnoringSIGTERMIsKilledAfterStopTimeout() throws {
        let daemon = try TestDaemon(devices: ["0"], workerArgs: ["--ignore-sigterm"], defaults: "stop_timeout = \"400ms\"")
        let pid = try #require(daemon.waitAllReady()?.workers[0].pid)
        let start = ContinuousClock.now
        #expect(try daemon.ctl(["stop", "0"]).status == 0)
        // Stopped by the SIGKILL at this device's stop_timeout (400 ms): before the harness's default of 3 s could
        // have applied, and (a lower bound, which no slowness of the test machine can break) not earlier.
        #expect(eventually(timeout: .milliseconds(2500)) { daemon.worker("0")?.state == "stopped" },
                "not stopped within 2.5 s of the stop command")
        let took = ContinuousClock.now - start
        #expect(took >= .milliseconds(400), "stopped after \(took), before stop_timeout")
        #expect(!processExists(pid))
        #expect(daemon.worker("0")?.lastExit == "signaled(9)", "the escalation is visible in the exit reason")
        #expect(daemon.log.contains("SIGTERM ignored, as asked"))
        #expect(daemon.log.contains("sent SIGKILL to worker process group"))
        #expect(daemon.terminate() == 0)
    }
}

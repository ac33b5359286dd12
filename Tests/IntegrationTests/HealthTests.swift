import Foundation
import NIOCore
import NPUClient
import TestSupport
import Testing
import WireProtocol

/// Health (docs/PROTOCOL.md 6.3, 6.9, 6.10, 8.1, 8.2) with real processes: liveness, device probes (a fake `npu-smi` on disk), inference probes,
/// the HTTP probes (checked with curl) and CPU fallback.
@Suite(.serialized, .timeLimit(.minutes(3)))
struct HealthTests {
    /// A fake `npu-smi` that prints what `<dir>/state-<id>` says (OK when missing) and hangs on HANG.
    static func fakeNPUSmi(in dir: String) throws -> String {
        let path = dir + "/npu-smi"
        try """
            #!/bin/sh
            # usage as the real one: npu-smi info -t health -i <id>
            state=$(cat "\(dir)/state-$5" 2>/dev/null || echo OK)
            [ "$state" = HANG ] && exec sleep 30
            echo "        Health Status                  : $state"
            echo "        Error Code                     : NA"
            """.write(toFile: path, atomically: true, encoding: .utf8)
        chmod(path, 0o755)
        return path
    }

    static func scratch() throws -> String {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("npu-smi-\(UUID().uuidString.prefix(6))").path
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return path
    }

    static func setDevice(_ dir: String, _ id: String, _ state: String) throws {
        try state.write(toFile: "\(dir)/state-\(id)", atomically: true, encoding: .utf8)
    }

    static func curl(_ url: String) throws -> (code: Int, body: String) {
        let r = try runCommand("/usr/bin/curl", ["-s", "-m", "5", "-w", "\n%{http_code}", url])
        let parts = r.stdout.split(separator: "\n", omittingEmptySubsequences: false)
        return (Int(parts.last ?? "") ?? -1, parts.dropLast().joined(separator: "\n").trimmingCharacters(in: .whitespacesAndNewlines))
    }

    @Test func aHungWorkerIsDetectedWithinTheHeartbeatTimeoutAndReplaced() throws {
        let daemon = try TestDaemon(devices: ["0", "1"], defaults: "heartbeat_timeout = \"600ms\"")
        let doc = try #require(daemon.waitAllReady())
        let client = try daemon.client()
        try client.sendRequest(id: 1, payload: payload("{\"prompt\": \"x\", \"fault\": \"hang\"}"),
                               options: RequestOptions(device: "0"))
        // Within the device's heartbeat_timeout (600 ms) and a few checks, well before the harness's default of 2 s.
        #expect(eventually(timeout: .milliseconds(1500)) { daemon.worker("0")?.lastExit == "hang" },
                "the hang was not detected within 1.5 s")
        let answer = try #require(try client.readFrame())
        #expect(answer.requestID == 1 && answer.errorPayload.code == "worker_lost",
                "a request pinned to the hung device cannot be retried elsewhere")
        #expect(eventually { daemon.worker("0")?.state == "ready" && daemon.worker("0")?.pid != doc.workers[0].pid })
        #expect(!processExists(doc.workers[0].pid!))
        #expect(daemon.terminate() == 0)
    }

    @Test func npuSmiCriticalTakesTheDeviceOutOfRotationAndOKBringsItBack() throws {
        let scratch = try Self.scratch()
        defer { try? FileManager.default.removeItem(atPath: scratch) }
        let smi = try Self.fakeNPUSmi(in: scratch)
        let daemon = try TestDaemon(
            devices: ["0", "1"],
            defaults: "device_probe = { type = \"command\", command = [\"\(smi)\", \"info\", \"-t\", \"health\", \"-i\", \"{device}\"], interval = \"100ms\", timeout = \"400ms\" }",
            http: "127.0.0.1:0")
        #expect(daemon.waitAllReady() != nil)
        #expect(eventually { daemon.worker("1")?.health.device == "ok" })
        let http = try #require(daemon.status()?.supervisor.http)

        try Self.setDevice(scratch, "1", "Critical")
        #expect(eventually { daemon.worker("1")?.health.inRotation == false })
        #expect(daemon.worker("1")?.health.device.contains("Health Status                  : Critical") == true)
        // Restarted once to try to clear the fault, then held failed while the device stays bad.
        #expect(eventually { daemon.worker("1")?.state == "failed" })
        #expect(daemon.worker("1")?.lastExit == "device_unhealthy")
        #expect(daemon.log.contains("device still unhealthy after a worker restart"))
        let client = try daemon.client()
        for _ in 0..<6 {
            #expect(decodeAnswer(try client.infer(payload("{\"prompt\": \"r\"}")))?.device == "0",
                    "only the healthy device serves")
        }
        let health = try Self.curl("http://\(http)/health")
        #expect(health.code == 200)
        #expect(health.body.contains("\"state\" : \"degraded\""))
        #expect(try Self.curl("http://\(http)/readyz").code == 200, "one device still serves")

        try Self.setDevice(scratch, "1", "OK")
        #expect(eventually(timeout: .seconds(45)) { daemon.worker("1")?.state == "ready" && daemon.worker("1")?.health.inRotation == true })
        #expect(daemon.status()?.state == "ok")
        #expect(daemon.terminate() == 0)
    }

    @Test func aHangingNPUSmiIsTimedOut() throws {
        let scratch = try Self.scratch()
        defer { try? FileManager.default.removeItem(atPath: scratch) }
        let smi = try Self.fakeNPUSmi(in: scratch)
        try Self.setDevice(scratch, "0", "HANG")
        let daemon = try TestDaemon(
            devices: ["0"],
            defaults: "device_probe = { type = \"command\", command = [\"\(smi)\", \"info\", \"-t\", \"health\", \"-i\", \"{device}\"], interval = \"200ms\", timeout = \"300ms\" }")
        #expect(eventually { daemon.worker("0")?.health.device.contains("timed out after 300ms") == true })
        // The timed-out probe's process group is gone: no `sleep 30` left behind.
        // (Only this daemon's children: other suites running at the same time may have `sleep 30`s of their own.)
        let leftovers = try runCommand("/usr/bin/pgrep", ["-f", "sleep 30"]).stdout
            .split(separator: "\n").compactMap { Int32($0) }
            .filter { (try? String(contentsOfFile: "/proc/\($0)/cmdline", encoding: .utf8))?.contains("sleep") == true }
            .filter { parentPID(of: $0) == daemon.pid }
        #expect(eventually(timeout: .seconds(2)) { leftovers.allSatisfy { !processExists($0) } })
        #expect(daemon.terminate() == 0)
    }

    @Test func aWorkerAnsweringEmptyTextIsUnhealthyAndRestarted() throws {
        let daemon = try TestDaemon(
            devices: ["0"], workerArgs: ["--empty-output"],
            defaults: "inference_probe = { enabled = true, interval = \"100ms\", timeout = \"1s\", failures = 2 }")
        let first = try #require(daemon.waitAllReady()?.workers[0].pid)
        #expect(eventually { daemon.worker("0")?.lastExit == "unhealthy" })
        #expect(!processExists(first))
        #expect(daemon.log.contains("inference probe failed (1/2): empty text in the answer"))
        #expect(daemon.log.contains("worker unhealthy: 2 inference probes failed in a row"))
        #expect(daemon.terminate() == 0)
    }

    @Test func aHealthyWorkerPassesItsInferenceProbe() throws {
        let daemon = try TestDaemon(devices: ["0"], defaults: "inference_probe = { enabled = true, interval = \"100ms\" }")
        #expect(daemon.waitAllReady() != nil)
        #expect(eventually { daemon.worker("0")?.health.inference == "ok" })
        #expect(daemon.worker("0")?.restarts == 0)
        #expect(daemon.terminate() == 0)
    }

    @Test func readyzAndHealthFollowTheState() throws {
        let daemon = try TestDaemon(devices: ["0"], http: "127.0.0.1:0")
        #expect(daemon.waitAllReady() != nil)
        let http = try #require(daemon.status()?.supervisor.http)
        #expect(try Self.curl("http://\(http)/livez") == (200, "ok"))
        let ready = try Self.curl("http://\(http)/readyz")
        #expect(ready.code == 200 && ready.body.hasPrefix("ready: 1/1 workers ready"))
        #expect(try Self.curl("http://\(http)/health").code == 200)
        let metrics = try Self.curl("http://\(http)/metrics")
        #expect(metrics.body.contains("npu_supervisor_worker_up{device=\"0\"} 1\n"))
        #expect(try daemon.ctl(["stop", "0"]).status == 0)
        #expect(eventually { daemon.worker("0")?.state == "stopped" })
        let notReady = try Self.curl("http://\(http)/readyz")
        #expect(notReady.code == 503)
        #expect(notReady.body.contains("not ready: unavailable"))
        #expect(try Self.curl("http://\(http)/health").code == 503)
        #expect(try Self.curl("http://\(http)/livez").code == 200, "the supervisor itself is alive")
        #expect(try Self.curl("http://\(http)/nope").code == 404)
        #expect(daemon.terminate() == 0)
    }

    /// A probe command that leaves a helper behind in a session of its own, holding its output pipe, exits at
    /// once: the pipe never ends and killing the probe's group cannot reach the helper. The probe still gets its
    /// verdict (timed out) one grace second after its timeout, and the device is judged again and again; before,
    /// that probe never finished and the device was never probed again.
    @Test func aProbeWhoseHelperHoldsItsOutputStillGetsAVerdict() throws {
        let scratch = try Self.scratch()
        let marker = "31\(Int.random(in: 1000...9999))"
        defer {
            _ = try? runCommand("/usr/bin/pkill", ["-f", "sleep \(marker)"])
            try? FileManager.default.removeItem(atPath: scratch)
        }
        let probe = scratch + "/leaky-probe"
        try """
            #!/bin/sh
            setsid sleep \(marker) &
            # Exit only once the helper has its own session: the probe's group kill must not reach it.
            while [ "$(cut -d' ' -f6 /proc/$!/stat 2>/dev/null)" = "$(cut -d' ' -f6 /proc/$$/stat)" ]; do :; done
            echo "        Health Status                  : OK"
            """.write(toFile: probe, atomically: true, encoding: .utf8)
        chmod(probe, 0o755)
        let daemon = try TestDaemon(
            devices: ["0"],
            defaults: "device_probe = { type = \"command\", command = [\"\(probe)\"], interval = \"100ms\", timeout = \"300ms\" }")
        #expect(daemon.waitAllReady() != nil)
        #expect(eventually(timeout: .seconds(10)) { daemon.log.contains("timed out after 300ms") },
                "the probe's verdict: \(daemon.log.suffix(2000))")
        let health = daemon.worker("0")?.health
        #expect(health?.device.contains("timed out after 300ms") == true && health?.inRotation == false,
                "\(String(describing: health))")
        // Judged again after its worker's restart, not stuck on the first probe.
        #expect(eventually(timeout: .seconds(15)) { daemon.log.contains("device still unhealthy after a worker restart") })
        #expect(daemon.terminate() == 0)
    }

    /// Every worker exit sweeps adopted orphans, reaping those that died. A probe command that has just exited
    /// is a zombie whose environment can no longer be read: the sweep took it for an orphan and reaped it, and
    /// the probe's owner then got no exit status (an `exited(-1)` verdict on a healthy device with pidfds; a
    /// probe stuck for good with the waitid thread). Here each probe kills the worker and exits healthy at once,
    /// so a sweep runs while the probe is a zombie, again and again: every verdict must stay healthy.
    @Test func theOrphanSweepLeavesExitedProbesToTheirOwner() throws {
        let scratch = try Self.scratch()
        defer { try? FileManager.default.removeItem(atPath: scratch) }
        let probe = scratch + "/killing-probe"
        try """
            #!/bin/sh
            pkill -KILL -P $PPID -x npu-worker
            echo "        Health Status                  : OK"
            """.write(toFile: probe, atomically: true, encoding: .utf8)
        chmod(probe, 0o755)
        let daemon = try TestDaemon(
            devices: ["0"],
            defaults: "device_probe = { type = \"command\", command = [\"\(probe)\"], interval = \"50ms\" }\n"
                + "backoff_initial = \"10ms\"\nbackoff_max = \"20ms\"\nbackoff_reset_after = \"10ms\"")
        #expect(eventually { (daemon.worker("0")?.restarts ?? 0) >= 20 }, "the probes kill the worker")
        #expect(!daemon.log.contains("probe `"), "no probe verdict other than healthy: \(daemon.log.suffix(3000))")
        #expect(daemon.terminate() == 0)
    }

    @Test func cpuFallbackServesWhileDevicesAreDownAndStopsWhenTheyReturn() throws {
        let scratch = try Self.scratch()
        defer { try? FileManager.default.removeItem(atPath: scratch) }
        let smi = try Self.fakeNPUSmi(in: scratch)
        let daemon = try TestDaemon(
            devices: ["0", "1"],
            defaults: "device_probe = { type = \"command\", command = [\"\(smi)\", \"info\", \"-t\", \"health\", \"-i\", \"{device}\"], interval = \"100ms\" }",
            extra: """
                [fallback]
                count = 1
                when_fewer_than = 1
                stop_after = "500ms"
                command = ["\(Binaries.worker)", "--token-ms", "5"]
                """)
        #expect(daemon.waitAllReady() != nil)
        #expect(daemon.status()?.fallbackActive == false, "no fallback while the devices serve")

        for id in ["0", "1"] { try Self.setDevice(scratch, id, "Critical") }
        #expect(eventually { daemon.status()?.fallbackActive == true })
        #expect(eventually { daemon.worker("cpu0")?.state == "ready" })
        let client = try daemon.client()
        for _ in 0..<3 {
            let answer = try #require(decodeAnswer(try client.infer(payload("{\"prompt\": \"slow but served\", \"max_new_tokens\": 2}"))))
            #expect(answer.device == "cpu0")
        }
        #expect(daemon.status()?.state == "degraded")
        #expect(daemon.status()?.reason.contains("CPU fallback active") == true)

        for id in ["0", "1"] { try Self.setDevice(scratch, id, "OK") }
        #expect(eventually(timeout: .seconds(45)) { daemon.status()?.fallbackActive == false })
        #expect(eventually { daemon.worker("cpu0")?.state == "stopped" })
        #expect(decodeAnswer(try client.infer(payload("{\"prompt\": \"back\"}")))?.device != "cpu0")
        #expect(daemon.log.contains("starting 1 CPU fallback worker(s)"))
        #expect(daemon.terminate() == 0)
    }
}

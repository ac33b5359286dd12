import Foundation
import Logging
import SystemdSupport
import TestSupport
import Testing
import WireProtocol

/// sd_notify as systemd would receive it, without systemd: the test binds its own NOTIFY_SOCKET, starts the real
/// daemon with it, and reads the datagrams (with the sender's pid).
@Suite(.serialized, .timeLimit(.minutes(2)))
struct NotifyTests {
    @Test func readyOnlyAfterWorkersAreReadyThenStatusReloadStopping() throws {
        let dir = try Paths.scratch("notify")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let notify = try NotifyListener(path: dir + "/notify.sock")
        let config = dir + "/config.toml"
        // Two workers that take 700 ms to load; both must be ready (min_ready = 2) before READY=1.
        try TestConfig.make(runDir: dir + "/run", loadMS: 700, minReady: 2)
            .write(toFile: config, atomically: true, encoding: .utf8)
        let launched = wallClock()
        // WATCHDOG_PID names another process: sd_watchdog_enabled says no, and no WATCHDOG=1 may be sent.
        let daemon = try DaemonProcess(arguments: ["--config", config],
                                       environment: ["NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000",
                                                     "WATCHDOG_PID": "1"],
                                       logPath: dir + "/daemon.log")
        let ready = try #require(notify.waitFor { $0.has("READY=1") }, "no READY=1; log:\n\(daemon.log)")
        // At READY=1 both workers are ready (they stay ready: nothing kills them in this test).
        let doc = try #require(readStatus(dir + "/run/status.sock"))
        daemon.remember(doc)
        #expect(doc.workers.allSatisfy { $0.state == "ready" }, "READY=1 before the workers were ready: \(doc)")
        #expect(ready.sent - launched >= 0.7, "READY=1 came before the 700 ms model load could end")
        #expect(ready.pid == daemon.pid, "READY=1 must come from the main process (NotifyAccess=main)")
        #expect(ready.value("MAINPID") == "\(daemon.pid)")
        #expect(ready.value("STATUS") == "2/2 workers ready")
        let before = notify.messages.prefix { !$0.has("READY=1") }
        #expect(before.contains { $0.value("STATUS")?.hasPrefix("unavailable: 0/2 workers ready") == true },
                "STATUS= should report start-up progress: \(before.map(\.text))")
        #expect(!before.contains { $0.value("STATUS")?.contains("stopped") == true },
                "no half-way state (a worker not started yet) may be told: \(before.map(\.text))")
        #expect(before.contains { $0.value("EXTEND_TIMEOUT_USEC") != nil },
                "start-up should be extended while workers load: \(before.map(\.text))")

        // SIGHUP: RELOADING=1 (with MONOTONIC_USEC=), then READY=1 again.
        let beforeReload = notify.messages.count
        kill(daemon.pid, SIGHUP)
        _ = try #require(notify.waitFor(from: beforeReload) { $0.has("READY=1") },
                         "no READY=1 after SIGHUP: \(notify.messages.map(\.text))")
        let reload = notify.messages[beforeReload...].map(\.text)
        let reloading = try #require(reload.firstIndex { $0.contains("RELOADING=1") }, "no RELOADING=1: \(reload)")
        #expect(reload[reloading].contains("MONOTONIC_USEC="))
        #expect(reloading < reload.firstIndex { $0.contains("READY=1") }!, "RELOADING=1 first: \(reload)")

        // SIGTERM: STOPPING=1, then a clean exit.
        #expect(daemon.terminate() == 0)
        notify.drain(timeout: .milliseconds(100))
        let stopping = try #require(notify.messages.first { $0.has("STOPPING=1") })
        #expect(stopping.value("STATUS")?.hasPrefix("stopping") == true)
        #expect(notify.messages.allSatisfy { $0.pid == daemon.pid })
        #expect(!notify.messages.contains { $0.has("WATCHDOG=1") }, "WATCHDOG_PID was not ours: no pings")
        let afterReady = notify.messages.drop { !$0.has("READY=1") }
        #expect(!afterReady.contains { $0.value("EXTEND_TIMEOUT_USEC") != nil }, "no extension after READY=1")
        #expect(notify.messages.filter { $0.has("READY=1") }.count == 2)
    }

    @Test func watchdogPingsAtHalfTheWatchdogPeriod() throws {
        let dir = try Paths.scratch("watchdog")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let notify = try NotifyListener(path: dir + "/notify.sock")
        let config = dir + "/config.toml"
        try TestConfig.make(runDir: dir + "/run", devices: ["0"], loadMS: 0)
            .write(toFile: config, atomically: true, encoding: .utf8)
        // WATCHDOG_PID must be the daemon's own pid: a shell sets it to its own and execs the daemon.
        let daemon = try DaemonProcess(
            executable: "/bin/sh",
            arguments: ["-c", "WATCHDOG_PID=$$ exec \"$0\" --config \"$1\"", Binaries.supervisord, config],
            environment: ["NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"], logPath: dir + "/daemon.log")
        _ = try #require(notify.waitFor { $0.has("READY=1") }, "no READY=1; log:\n\(daemon.log)")
        daemon.remember(readStatus(dir + "/run/status.sock"))
        let start = wallClock()
        func pingTimes() -> [Double] {
            notify.messages.filter { $0.has("WATCHDOG=1") && $0.sent >= start }.map(\.sent)
        }
        // Every 500 ms (half of 1 s): 6 pings take about 3 s (kernel arrival times); never a gap of a whole
        // period, which is what would make systemd kill the service.
        #expect(notify.waitUntil(timeout: .seconds(10)) { _ in pingTimes().count >= 6 },
                "\(pingTimes().count) WATCHDOG=1 in 10 s")
        let pings = pingTimes()
        let gaps = zip(pings.dropFirst(), pings).map { $0 - $1 }.sorted()
        #expect(gaps.allSatisfy { $0 < 1.0 }, "gaps between pings: \(gaps)")
        let median = gaps.isEmpty ? 0 : gaps[gaps.count / 2]
        #expect(median > 0.4 && median < 0.75, "median gap \(median) s, expected about 0.5 s")
        #expect(notify.messages.allSatisfy { $0.pid == daemon.pid })
        #expect(daemon.log.contains("systemd watchdog on: WATCHDOG=1 every 500ms"))
        #expect(daemon.terminate() == 0)
    }

    @Test func readyTimeoutSendsReadyWithTheStateExplained() throws {
        let dir = try Paths.scratch("grace")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let notify = try NotifyListener(path: dir + "/notify.sock")
        let config = dir + "/config.toml"
        try TestConfig.make(runDir: dir + "/run", devices: ["0"], supervisorExtra: "ready_timeout = \"1s\"",
                            workerArgs: ["--never-ready"])
            .write(toFile: config, atomically: true, encoding: .utf8)
        let launched = wallClock()
        let daemon = try DaemonProcess(arguments: ["--config", config], environment: ["NOTIFY_SOCKET": notify.path],
                                       logPath: dir + "/daemon.log")
        let ready = try #require(notify.waitFor { $0.has("READY=1") }, "no READY=1; log:\n\(daemon.log)")
        daemon.remember(readStatus(dir + "/run/status.sock"))
        #expect(ready.sent - launched >= 1.0)
        let status = try #require(ready.value("STATUS"))
        #expect(status.contains("ready_timeout (1s) passed") && status.contains("0/1 workers ready"), "\(status)")
        #expect(daemon.log.contains("ready_timeout (1s) passed"))
        #expect(daemon.terminate() == 0)
    }

    @Test func withoutJournalTheLogIsPlainLinesOnStderr() throws {
        let dir = try Paths.scratch("stderr")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let config = dir + "/config.toml"
        try TestConfig.make(runDir: dir + "/run", devices: ["0"], loadMS: 0)
            .write(toFile: config, atomically: true, encoding: .utf8)
        // JOURNAL_STREAM that does not name our stderr (the log file): a wrapper redirected it. Stay on stderr.
        let daemon = try DaemonProcess(arguments: ["--config", config], environment: ["JOURNAL_STREAM": "1:1"],
                                       logPath: dir + "/daemon.log")
        #expect(eventually { readStatus(dir + "/run/status.sock")?.workers.first?.state == "ready" })
        daemon.remember(readStatus(dir + "/run/status.sock"))
        #expect(daemon.terminate() == 0)
        let log = daemon.log
        #expect(log.contains("npu-supervisord") && log.contains("worker ready after"), "\(log)")
        #expect(log.contains("device=0"))
    }
}

/// The journald handler's pure parts: destination choice, field names, priorities, the fields of a record.
@Suite struct JournalFieldTests {
    @Test func journalStreamMustNameStderr() {
        #expect(LogDestination.journalStreamMatches("8:12345", device: 8, inode: 12345))
        #expect(!LogDestination.journalStreamMatches("8:12345", device: 8, inode: 12346))
        #expect(!LogDestination.journalStreamMatches("", device: 0, inode: 0))
        #expect(!LogDestination.journalStreamMatches("8:", device: 8, inode: 0))
        #expect(!LogDestination.journalStreamMatches("x:1", device: 0, inode: 1))
    }

    @Test func metadataKeysBecomeJournalFields() {
        #expect(JournalLogHandler.fieldName(forMetadataKey: "device") == "DEVICE")
        #expect(JournalLogHandler.fieldName(forMetadataKey: "worker_pid") == "WORKER_PID")
        #expect(JournalLogHandler.fieldName(forMetadataKey: "reason") == "REASON")
        #expect(JournalLogHandler.fieldName(forMetadataKey: "stream") == "STREAM")
        #expect(JournalLogHandler.fieldName(forMetadataKey: "request-id") == "REQUEST_ID")
        #expect(JournalLogHandler.fieldName(forMetadataKey: "_pid") == "PID", "no trusted (underscore) fields")
        #expect(JournalLogHandler.fieldName(forMetadataKey: "9lives") == "META_9LIVES")
        #expect(JournalLogHandler.fieldName(forMetadataKey: "priority") == "META_PRIORITY")
        #expect(JournalLogHandler.fieldName(forMetadataKey: String(repeating: "k", count: 100)).count == 64)
    }

    @Test func prioritiesFollowSyslog() {
        let levels: [(Logger.Level, Int)] = [(.trace, 7), (.debug, 7), (.info, 6), (.notice, 5), (.warning, 4),
                                              (.error, 3), (.critical, 2)]
        for (level, priority) in levels { #expect(JournalLogHandler.priority(level) == priority) }
    }

    @Test func aRecordCarriesMessagePriorityIdentifierAndMetadata() {
        let fields = JournalLogHandler.fields(
            level: .error, message: "worker exited", metadata: ["device": "2", "worker_pid": "4242", "reason": "hang"],
            identifier: "npu-supervisord", file: "S/x.swift", function: "f()", line: 7)
        #expect(fields == [
            "MESSAGE=device=2 reason=hang worker_pid=4242: worker exited", "PRIORITY=3",
            "SYSLOG_IDENTIFIER=npu-supervisord", "CODE_FILE=S/x.swift", "CODE_LINE=7", "CODE_FUNC=f()",
            "DEVICE=2", "REASON=hang", "WORKER_PID=4242",
        ])
        let output = JournalLogHandler.fields(
            level: .info, message: "loading", metadata: ["device": "0", "worker_pid": "9", "stream": "output"],
            identifier: "npu-supervisord", file: "f", function: "g", line: 1)
        #expect(output.first == "MESSAGE=device=0 worker_pid=9: loading")
        #expect(output.contains("STREAM=output"))
    }
}

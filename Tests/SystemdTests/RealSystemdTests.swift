import Foundation
import NIOCore
import NPUClient
import TestSupport
import Testing
import WireProtocol

/// A real systemd (PID 1 of its own namespaces), booted per test by scripts/systemd-sandbox.sh with a whitelist of
/// units, the host's filesystems read-only, and always torn down. The test's scratch folder is shared with it
/// read-write: the daemon's config and sockets live there, so the test talks to the sockets directly.
final class SystemdSandbox {
    /// Whether a sandbox can be booted here (root, namespaces, systemd, util-linux), and if not why.
    static let availability: (ok: Bool, reason: String) = {
        guard getuid() == 0 else { return (false, "needs root to boot systemd in namespaces (uid \(getuid()))") }
        guard let r = try? runCommand(Paths.sandboxScript, ["check"], timeout: 30) else {
            return (false, "cannot run \(Paths.sandboxScript)")
        }
        return (r.status == 0, r.stderr.trimmingCharacters(in: .whitespacesAndNewlines))
    }()

    let dir: String
    var unitsDir: String { dir + "/units" }
    var runDir: String { dir + "/run" }
    var configPath: String { dir + "/config.toml" }
    private var boot: DaemonProcess?
    private(set) var initPID: Int32 = 0
    private var isDown = false

    init(name: String, memoryCgroup: Bool = false) throws {
        dir = try Paths.scratch(name)
        try FileManager.default.createDirectory(atPath: unitsDir, withIntermediateDirectories: true)
        // Ask for the host's v1 memory hierarchy inside (rooted at the sandbox's own memory cgroup).
        if memoryCgroup { _ = FileManager.default.createFile(atPath: dir + "/with-memory-cgroup", contents: nil) }
    }

    deinit { down() }

    /// Installs the shipped units (paths pointed at this build, this config and `runDir`) and optional drop-ins.
    func installUnits(dropIns: [String: String] = [:]) throws {
        for (name, text) in try UnitFileTests.units(config: configPath, runDir: runDir) {
            try text.write(toFile: unitsDir + "/" + name, atomically: true, encoding: .utf8)
        }
        // The unit's PrivateTmp=yes hides the host's /tmp from the service: a checkout built under /tmp (a CI
        // clone, say) would then have no binaries to run. Test-only: production binaries live in /usr.
        let tree = URL(fileURLWithPath: Paths.sandboxScript).deletingLastPathComponent().deletingLastPathComponent().path
        if tree.hasPrefix("/tmp/") || tree.hasPrefix("/var/tmp/") || dir.hasPrefix("/tmp/") || dir.hasPrefix("/var/tmp/") {
            let folder = unitsDir + "/npu-supervisord.service.d"
            try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
            try "[Service]\nPrivateTmp=no\n".write(toFile: folder + "/00-tree-in-tmp.conf", atomically: true, encoding: .utf8)
        }
        var dropIns = dropIns.mapValues { ["test.conf": $0] }
        // PrivateTmp=yes gives the service a /tmp of its own: a checkout below /tmp or /var/tmp (binaries, this
        // scratch folder) must be bound into it. Installed binaries live in /usr/local/bin and need nothing.
        let below = { (p: String) in p.hasPrefix("/tmp/") || p.hasPrefix("/var/tmp/") }
        let readOnly = [PackagePaths.root, Binaries.directory].filter(below)
        if !readOnly.isEmpty || below(dir) {
            var conf = "[Service]\n"
            if !readOnly.isEmpty { conf += "BindReadOnlyPaths=" + readOnly.joined(separator: " ") + "\n" }
            if below(dir) { conf += "BindPaths=\(dir)\n" }
            dropIns["npu-supervisord.service", default: [:]]["checkout-in-tmp.conf"] = conf
        }
        for (unit, files) in dropIns {
            let folder = unitsDir + "/\(unit).d"
            try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
            for (name, text) in files { try text.write(toFile: folder + "/" + name, atomically: true, encoding: .utf8) }
        }
    }

    /// Boots systemd and waits until it is running.
    func start() throws {
        boot = try DaemonProcess(executable: Paths.sandboxScript, arguments: ["boot", dir, "\(getpid())"],
                                 logPath: dir + "/boot.log")
        let ready = try runCommand(Paths.sandboxScript, ["ready", dir], timeout: 40)
        guard ready.status == 0, let pid = Int32(ready.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) else {
            throw SandboxError(description: "systemd did not come up: \(ready.stderr)")
        }
        initPID = pid
    }

    /// Switches the manager's log to debug: the journal then shows each notification it receives ("Got
    /// notification message from PID ... (READY=1, ...)"). Not before a service starts if its own records are
    /// to be found by unit: at debug the forked child logs before it execs, and journald keeps attributing that
    /// pid to init.scope for a few seconds.
    func debugLog() throws {
        #expect(try exec(["systemd-analyze", "log-level", "debug"]).status == 0)
    }

    /// `systemctl exit` inside, SIGKILL of its PID 1 if need be, cgroup removed, scratch folder removed.
    func down() {
        guard !isDown else { return }
        isDown = true
        _ = try? runCommand(Paths.sandboxScript, ["down", dir], timeout: 30)
        if let boot { _ = eventually(timeout: .seconds(10)) { !boot.isRunning } }
        try? FileManager.default.removeItem(atPath: dir)
    }

    /// Runs a command inside (all of the sandbox's namespaces).
    func exec(_ arguments: [String], timeout: Int = 60) throws -> CommandResult {
        try runCommand("/usr/bin/nsenter", ["-t", "\(initPID)", "-a"] + arguments, timeout: timeout)
    }

    func systemctl(_ arguments: String...) throws -> CommandResult { try exec(["systemctl", "--no-pager"] + arguments) }

    /// `kill -SIGNAL PID` inside, for one real process only (`kill -STOP 0` would stop the test's own helpers).
    func signal(_ name: String, _ pid: String) throws -> CommandResult {
        guard let n = Int32(pid), n > 1 else { throw SandboxError(description: "refusing to signal pid '\(pid)'") }
        return try exec(["kill", "-\(name)", "\(n)"])
    }

    func property(_ unit: String, _ name: String) throws -> String {
        try exec(["systemctl", "show", "-p", name, "--value", unit]).stdout
            .trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// Journal records as JSON objects (`journalctl -o json`), optionally filtered by `journalctl` matches.
    func journal(_ matches: [String]) throws -> [[String: Any]] {
        let out = try exec(["journalctl", "--no-pager", "-o", "json"] + matches).stdout
        return out.split(separator: "\n").compactMap {
            try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]
        }
    }

    /// MESSAGE= texts of PID 1's own records.
    func managerLog() throws -> [String] {
        try journal(["_PID=1"]).compactMap { $0["MESSAGE"] as? String }
    }

    /// Host pids of every process in a unit's cgroup (including delegated sub-cgroups).
    func hostPIDs(ofUnit unit: String) -> [Int32] {
        guard let root = try? String(contentsOfFile: dir + "/cgroup.path", encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines) else { return [] }
        let base = root + "/payload/system.slice/" + unit
        var pids: [Int32] = []
        if let walker = FileManager.default.enumerator(atPath: base) {
            var files = ["cgroup.procs"]
            while let item = walker.nextObject() as? String {
                if item.hasSuffix("/cgroup.procs") { files.append(item) }
            }
            for file in files {
                let text = (try? String(contentsOfFile: base + "/" + file, encoding: .utf8)) ?? ""
                pids += text.split(separator: "\n").compactMap { Int32($0) }
            }
        }
        return pids
    }

    func status() -> StatusDocument? { readStatus(runDir + "/status.sock") }

    /// The sandbox's console and manager log, for failure messages.
    var diagnostics: String {
        let console = (try? String(contentsOfFile: dir + "/console.log", encoding: .utf8)) ?? ""
        let journal = (try? exec(["journalctl", "--no-pager", "-n", "80"]).stdout) ?? ""
        return "console:\n\(console.suffix(2000))\njournal:\n\(journal)"
    }
}

struct SandboxError: Error, CustomStringConvertible {
    var description: String
}

func seconds(_ d: Duration) -> String { String(format: "%.3f s", Double(d.components.attoseconds) / 1e18 + Double(d.components.seconds)) }

/// The service and socket units under a real systemd. Skipped only when namespaces cannot be created here.
@Suite(.serialized, .timeLimit(.minutes(3)),
       .enabled(if: SystemdSandbox.availability.ok,
                Comment(rawValue: "real-systemd tests skipped: " + SystemdSandbox.availability.reason)))
struct RealSystemdTests {
    static let service = "npu-supervisord.service"

    /// A sandbox with the shipped units and a config of `devices` simulated devices.
    @Test func reloadRollsAChangedWorkerAndReturnsWhenDoneAndAnInvalidFileFailsIt() throws {
        let rollout = "[rollout]\nmin_ready_time = \"200ms\"\nbake_time = \"500ms\"\nprogress_deadline = \"10s\""
        let sb = try sandbox("reload", loadMS: 300, extra: rollout)
        defer { sb.down() }
        try #require(try sb.systemctl("start", Self.service).status == 0, "\(sb.diagnostics)")
        let before = try #require(sb.status())
        // A new worker command: both devices are rolled, one at a time; `systemctl reload` returns after.
        try TestConfig.make(runDir: sb.runDir, loadMS: 300, workerArgs: ["--model", "sim-llm-v2"], extra: rollout)
            .write(toFile: sb.configPath, atomically: true, encoding: .utf8)
        let reload = try sb.systemctl("reload", Self.service)
        #expect(reload.status == 0, "\(reload.stderr)\n\(sb.diagnostics)")
        let after = try #require(sb.status())
        #expect(after.rollout?.state == "complete", "reload returned before its rollout was done: \(after.rollout as Any)")
        #expect(after.workers.allSatisfy { $0.generation == 2 && $0.state == "ready" })
        #expect(zip(before.workers, after.workers).allSatisfy { $0.pid != $1.pid && $0.revision != $1.revision })
        #expect(try sb.property(Self.service, "ActiveState") == "active")
        #expect(try sb.property(Self.service, "MainPID") == "\(before.supervisor.pid)", "the daemon itself stays")
        // An invalid file: the reload fails, nothing changes, the service keeps serving.
        try "[supervisor]\nrun_dir = 7\n".write(toFile: sb.configPath, atomically: true, encoding: .utf8)
        let bad = try sb.systemctl("reload", Self.service)
        #expect(bad.status != 0, "systemctl reload must fail for an invalid file")
        #expect(try sb.property(Self.service, "ActiveState") == "active")
        let still = try #require(sb.status())
        #expect(still.workers.map(\.pid) == after.workers.map(\.pid) && still.state == "ok")
    }

    func sandbox(_ name: String, devices: [String] = ["0", "1"], loadMS: Int = 300, minReady: Int = 1,
                 defaults: String = "", extra: String = "", dropIns: [String: String] = [:], debug: Bool = false,
                 memoryCgroup: Bool = false) throws -> SystemdSandbox {
        let sb = try SystemdSandbox(name: name, memoryCgroup: memoryCgroup)
        try TestConfig.make(runDir: sb.runDir, devices: devices, loadMS: loadMS, minReady: minReady,
                            defaultsExtra: defaults, extra: extra)
            .write(toFile: sb.configPath, atomically: true, encoding: .utf8)
        try sb.installUnits(dropIns: dropIns)
        try sb.start()
        if debug { try sb.debugLog() }
        return sb
    }

    @Test func startWaitsForReadyWorkersThenReloadAndStopLeaveNothingBehind() throws {
        let sb = try sandbox("lifecycle", loadMS: 1500, minReady: 2)
        defer { sb.down() }
        let before = ContinuousClock.now
        let start = try sb.systemctl("start", Self.service)
        let took = ContinuousClock.now - before
        try #require(start.status == 0, "systemctl start failed: \(start.stderr)\n\(sb.diagnostics)")
        print("measured: systemctl start → active with 2 workers loading 1.5 s: \(seconds(took))")
        // systemctl start returned: READY=1 has arrived, so both workers are ready (min_ready = 2).
        let doc = try #require(sb.status(), "no status.sock answer\n\(sb.diagnostics)")
        #expect(doc.workers.count == 2 && doc.workers.allSatisfy { $0.state == "ready" }, "\(doc.workers)")
        #expect(took >= .milliseconds(1500), "start returned before the 1.5 s model loads could finish")
        #expect(try sb.property(Self.service, "StatusText") == "2/2 workers ready")
        #expect(try sb.property(Self.service, "ActiveState") == "active")
        #expect(try sb.property(Self.service, "SubState") == "running")
        #expect(try sb.property(Self.service, "MainPID") == "\(doc.supervisor.pid)")
        // The sockets came from the socket units (Sockets=), by name.
        let daemonLog = try sb.journal(["-u", Self.service]).compactMap { $0["MESSAGE"] as? String }
        for name in ["requests", "status", "control"] {
            #expect(daemonLog.contains { $0.contains("using \(name) socket passed by systemd") }, "\(daemonLog)")
        }
        // loop_nice under the unit's hardening (RestrictRealtime= refuses sched_setscheduler() with the
        // reset-on-fork policy number): one thread of the daemon at -10, every worker thread at 0.
        #expect(daemonLog.contains { $0.contains("request loop at nice -10; workers start at nice 0") }, "\(daemonLog)")
        let nices = sb.hostPIDs(ofUnit: Self.service).map { pid in (pid, threadNices(of: pid).map(\.nice)) }
        // (Host pids: the daemon is the process with the raised thread.)
        let raised = nices.filter { $0.1.contains(-10) }
        #expect(raised.count == 1 && raised.first?.1.filter { $0 == -10 }.count == 1, "\(nices)")
        let workers = nices.filter { !$0.1.contains(-10) }
        #expect(workers.count == doc.workers.count && workers.allSatisfy { $0.1.allSatisfy { $0 == 0 } }, "\(nices)")

        // Reload: ExecReload runs `npu-supervisorctl reload --wait`; the daemon answers RELOADING=1, then READY=1;
        // same main process.
        try sb.debugLog()
        let mainPID = try sb.property(Self.service, "MainPID")
        let reload = try sb.systemctl("reload", Self.service)
        #expect(reload.status == 0, "\(reload.stderr)")
        #expect(eventually {
            let log = (try? sb.managerLog()) ?? []
            guard let r = log.lastIndex(where: { $0.contains("RELOADING=1") }) else { return false }
            return log[r...].contains { $0.contains("Got notification message") && $0.contains("READY=1") }
        }, "no RELOADING=1 then READY=1 in the manager's log")
        #expect(try sb.property(Self.service, "ActiveState") == "active")
        #expect(try sb.property(Self.service, "MainPID") == mainPID)
        #expect(try sb.property(Self.service, "StatusText") == "2/2 workers ready")

        // Stop: STOPPING=1, workers stopped, the daemon exits 0, nothing left in the unit's cgroup.
        let pids = sb.hostPIDs(ofUnit: Self.service)
        #expect(pids.count == 3, "the daemon and two workers: \(pids)")
        let stopping = ContinuousClock.now
        let stop = try sb.systemctl("stop", Self.service)
        print("measured: systemctl stop with 2 workers: \(seconds(ContinuousClock.now - stopping))")
        #expect(stop.status == 0)
        #expect(try sb.property(Self.service, "ActiveState") == "inactive")
        #expect(try sb.property(Self.service, "Result") == "success")
        #expect(try sb.property(Self.service, "ExecMainStatus") == "0")
        #expect(sb.hostPIDs(ofUnit: Self.service).isEmpty)
        #expect(pids.allSatisfy { !processExists($0) }, "processes left after stop")
        #expect(try sb.managerLog().contains { $0.contains("Got notification message") && $0.contains("STOPPING=1") })
    }

    @Test func aWedgedSupervisorIsKilledByTheWatchdogAndRestartedWithoutItsOldWorkers() throws {
        let sb = try sandbox("watchdog", dropIns: [Self.service: "[Service]\nWatchdogSec=3s\nRestartSec=100ms\n"])
        defer { sb.down() }
        let start = try sb.systemctl("start", Self.service)
        try #require(start.status == 0, "\(start.stderr)\n\(sb.diagnostics)")
        let oldMain = try sb.property(Self.service, "MainPID")
        try #require((Int32(oldMain) ?? 0) > 1, "no main process: MainPID=\(oldMain)")
        let oldPIDs = sb.hostPIDs(ofUnit: Self.service)
        #expect(oldPIDs.count == 3)
        // Never `kill -STOP 0` (that would stop the caller's own process group and hang the suite).
        guard start.status == 0, Int(oldMain) ?? 0 > 1 else { return }
        // Wedge the whole daemon (event loop included): no more WATCHDOG=1.
        let stopped = ContinuousClock.now
        #expect(try sb.signal("STOP", oldMain).status == 0)
        let restarted = eventually(timeout: .seconds(30)) {
            let main = (try? sb.property(Self.service, "MainPID")) ?? oldMain
            return main != oldMain && main != "0" && (try? sb.property(Self.service, "ActiveState")) == "active"
        }
        let took = ContinuousClock.now - stopped
        #expect(restarted, "not restarted\n\(sb.diagnostics)")
        print("measured: SIGSTOP of the supervisor (WatchdogSec=3s) → new instance active: \(seconds(took))")
        #expect(try sb.property(Self.service, "NRestarts") == "1")
        #expect(try sb.managerLog().contains { $0.contains("Watchdog timeout") })
        #expect(eventually { oldPIDs.allSatisfy { !processExists($0) } }, "old processes survived")
        // Active means min_ready (1) serves; the other worker may still be loading on a busy machine.
        #expect(eventually { sb.status()?.workers.allSatisfy { $0.state == "ready" } == true }, "\(sb.status() as Any)")
        let doc = try #require(sb.status())
        #expect("\(doc.supervisor.pid)" != oldMain)
    }

    @Test func theSocketUnitsStartTheServiceForAnEarlyClient() throws {
        let sb = try sandbox("activation", devices: ["0"], loadMS: 500)
        defer { sb.down() }
        let sockets = ["npu-supervisord.socket", "npu-supervisord-status.socket", "npu-supervisord-control.socket"]
        let listen = try sb.exec(["systemctl", "start"] + sockets)
        #expect(listen.status == 0, "\(listen.stderr)\n\(sb.diagnostics)")
        #expect(try sb.property(Self.service, "ActiveState") == "inactive")
        // A client connects and sends before the service exists; systemd starts it; the answer arrives.
        let asked = ContinuousClock.now
        let client = try SupervisorClient(socketPath: sb.runDir + "/requests.sock", timeout: .seconds(30))
        let outcome = try client.infer(ByteBuffer(string: #"{"prompt": "Hi", "max_new_tokens": 3}"#))
        print("measured: first request on an idle socket unit → answer (service start + 0.5 s load): "
              + seconds(ContinuousClock.now - asked))
        guard case .response = outcome else {
            Issue.record("no answer: \(outcome)\n\(sb.diagnostics)")
            return
        }
        #expect(try sb.property(Self.service, "ActiveState") == "active")
        // Stopped, the service leaves the socket files to the socket units, which start it again.
        #expect(try sb.systemctl("stop", Self.service).status == 0)
        for unit in sockets { #expect(try sb.property(unit, "ActiveState") == "active") }
        let again = try #require(sb.status(), "status.sock did not start the service again\n\(sb.diagnostics)")
        #expect(again.supervisor.pid > 0)
        #expect(eventually { (try? sb.property(Self.service, "ActiveState")) == "active" })
    }

    @Test func journalHasStructuredFieldsAndAWorkersOOMKillDoesNotStopTheUnit() throws {
        let sb = try sandbox("journal", defaults: "memory_limit = \"64MiB\"", extra: "[requests]\nretries = 0\n",
                             memoryCgroup: true)
        defer { sb.down() }
        try #require(try sb.systemctl("start", Self.service).status == 0, "\(sb.diagnostics)")
        let mainPID = try sb.property(Self.service, "MainPID")
        let doc = try #require(sb.status())
        let crashPID = try #require(doc.workers.first { $0.device == "0" }?.pid)
        // A worker crash, by fault injection on device 0.
        let client = try SupervisorClient(socketPath: sb.runDir + "/requests.sock", timeout: .seconds(20))
        _ = try client.infer(ByteBuffer(string: #"{"prompt": "x", "fault": "crash"}"#),
                             options: RequestOptions(device: "0"))
        var crash: [String: Any]?
        #expect(eventually {
            crash = (try? sb.journal(["-u", Self.service, "WORKER_PID=\(crashPID)", "PRIORITY=3"]))?
                .first { $0["REASON"] != nil }
            return crash != nil
        }, "no structured record of the crash\n\(sb.diagnostics)")
        if let crash {
            #expect(crash["DEVICE"] as? String == "0")
            #expect(crash["SYSLOG_IDENTIFIER"] as? String == "npu-supervisord")
            #expect(crash["_SYSTEMD_UNIT"] as? String == Self.service)
            #expect((crash["REASON"] as? String).map { $0.hasPrefix("signaled(") || $0.hasPrefix("exited(") } == true,
                    "REASON=\(crash["REASON"] ?? "")")
            print("journal record of the crash: " + ["MESSAGE", "PRIORITY", "DEVICE", "WORKER_PID", "REASON"]
                .map { "\($0)=\(crash[$0] ?? "")" }.joined(separator: " "))
        }
        // Workers' own output lines, tagged.
        let output = try sb.journal(["-u", Self.service, "STREAM=output", "DEVICE=1"])
        #expect(!output.isEmpty && output.allSatisfy { $0["WORKER_PID"] != nil && $0["PRIORITY"] as? String == "6" })

        // A worker's OOM kill. A real one when the daemon could give its workers memory cgroups inside the
        // sandbox (64 MiB limit, the worker allocates 1 GiB); otherwise SIGKILL stands in for it (no memory
        // controller reachable in the sandbox). Either way the unit stays up and systemd restarts nothing.
        #expect(try sb.property(Self.service, "OOMPolicy") == "continue")
        let messages = try sb.journal(["-u", Self.service]).compactMap { $0["MESSAGE"] as? String }
        let realOOM = messages.contains { $0.hasPrefix("per-worker memory cgroups (v") }
        let victim = try #require(doc.workers.first { $0.device == "1" }?.pid)
        if realOOM {
            print("OOM test: a real kernel OOM kill in the worker's memory cgroup")
            _ = try client.infer(ByteBuffer(string: #"{"prompt": "x", "fault": "host_oom", "memory_mb": 1024}"#),
                                 options: RequestOptions(device: "1"))
        } else {
            print("OOM test: SIGKILL as a stand-in (no memory cgroups in the sandbox: "
                  + "\(messages.first { $0.hasPrefix("per-worker memory cgroups") } ?? "?"))")
            #expect(try sb.signal("KILL", "\(victim)").status == 0)
        }
        #expect(eventually {
            guard let w = sb.status()?.workers.first(where: { $0.device == "1" }) else { return false }
            return w.state == "ready" && w.pid != victim && w.restarts >= 1
        }, "the killed worker was not replaced\n\(sb.diagnostics)")
        let replaced = try #require(sb.status()?.workers.first { $0.device == "1" })
        #expect(replaced.lastExit == (realOOM ? "oom_killed" : "signaled(9)"))
        #expect(try sb.property(Self.service, "ActiveState") == "active")
        #expect(try sb.property(Self.service, "NRestarts") == "0")
        #expect(try sb.property(Self.service, "MainPID") == mainPID)
        let killed = try sb.journal(["-u", Self.service, "WORKER_PID=\(victim)", "PRIORITY=3"])
        #expect(killed.contains { $0["REASON"] as? String == (realOOM ? "oom_killed" : "signaled(9)") }, "\(killed)")
    }

    @Test func slowModelLoadsExtendTheStartTimeout() throws {
        // TimeoutStartSec=2s, a model load of 4 s: only EXTEND_TIMEOUT_USEC= lets the start succeed.
        let sb = try sandbox("extend", devices: ["0"], loadMS: 4000,
                             dropIns: [Self.service: "[Service]\nTimeoutStartSec=2s\n"], debug: true)
        defer { sb.down() }
        #expect(try sb.property(Self.service, "TimeoutStartUSec") == "2s")
        let before = ContinuousClock.now
        let start = try sb.systemctl("start", Self.service)
        let took = ContinuousClock.now - before
        try #require(start.status == 0, "\(start.stderr)\n\(sb.diagnostics)")
        #expect(took >= .seconds(4))
        print("measured: start with TimeoutStartSec=2s and a 4 s model load: \(seconds(took))")
        let manager = try sb.managerLog()
        #expect(manager.contains { $0.contains("EXTEND_TIMEOUT_USEC=") })
        // READY=1 came with MAINPID= and the summary, after the worker was ready.
        let ready = try #require(manager.first { $0.contains("Got notification message") && $0.contains("READY=1") })
        #expect(ready.contains("MAINPID=") && ready.contains("STATUS=1/1 workers ready"), "\(ready)")
        #expect(try sb.property(Self.service, "ActiveState") == "active")
    }
}

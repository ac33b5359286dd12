import Foundation
import TestSupport
import Testing

/// The shipped units (systemd/) and the installer, checked without a running systemd.
@Suite(.timeLimit(.minutes(2)))
struct UnitFileTests {
    static let unitNames = ["npu-supervisord.service", "npu-supervisord.socket", "npu-supervisord-status.socket",
                            "npu-supervisord-control.socket", "npu-supervisord-http.socket"]

    /// The shipped units with their paths pointed at this build (ExecStart= must exist at verify time), the
    /// configuration at `config`, the sockets in `runDir`.
    static func units(config: String, runDir: String = "/run/npu-supervisor") throws -> [String: String] {
        var out: [String: String] = [:]
        for name in unitNames {
            let text = try String(contentsOfFile: Paths.unitsFolder + "/" + name, encoding: .utf8)
            out[name] = text.replacing("/usr/local/bin/", with: Binaries.directory + "/")
                .replacing("/etc/npu-supervisor/config.toml", with: config)
                .replacing("/run/npu-supervisor/", with: runDir + "/")
        }
        return out
    }

    static func verify(_ folder: String, _ names: [String]) throws -> CommandResult {
        try runCommand("/usr/bin/env", ["systemd-analyze", "verify", "--man=no"] + names.map { folder + "/" + $0 })
    }

    /// `[Section] Key=value` settings of a unit file, every value of a key in order.
    static func settings(_ text: String) -> [String: [String]] {
        var out: [String: [String]] = [:]
        for raw in text.split(separator: "\n") {
            let line = raw.trimmingCharacters(in: .whitespaces)
            guard !line.hasPrefix("#"), !line.hasPrefix("["), let eq = line.firstIndex(of: "=") else { continue }
            out[String(line[..<eq]), default: []].append(String(line[line.index(after: eq)...]))
        }
        return out
    }

    @Test func shippedUnitsVerifyWithNothingOnStderr() throws {
        let dir = try Paths.scratch("verify")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for (name, text) in try Self.units(config: PackagePaths.root + "/config/example.toml") {
            try text.write(toFile: dir + "/" + name, atomically: true, encoding: .utf8)
        }
        let result = try Self.verify(dir, Self.unitNames)
        #expect(result.status == 0)
        #expect(result.stderr.isEmpty, "systemd-analyze verify complained:\n\(result.stderr)")
        // The check has teeth: verify exits 0 on a misspelt key, but says so on stderr.
        let service = try String(contentsOfFile: dir + "/npu-supervisord.service", encoding: .utf8)
        try service.replacing("KillMode=mixed", with: "KillMode=mixed\nWatchdogSecs=5s")
            .write(toFile: dir + "/npu-supervisord.service", atomically: true, encoding: .utf8)
        let bad = try Self.verify(dir, ["npu-supervisord.service"])
        #expect(bad.stderr.contains("WatchdogSecs"), "a bad key must show on stderr: \(bad)")
    }

    @Test func serviceAndSocketsSayWhatTheDesignAsks() throws {
        let service = Self.settings(try String(contentsOfFile: Paths.unitsFolder + "/npu-supervisord.service",
                                               encoding: .utf8))
        let expected: [String: String] = [
            "Type": "notify", "NotifyAccess": "main", "Restart": "on-failure", "KillMode": "mixed",
            "OOMPolicy": "continue", "Delegate": "yes", "RuntimeDirectory": "npu-supervisor",
            "RuntimeDirectoryPreserve": "yes", "Environment": "SWIFT_BACKTRACE=enable=no",
            "ExecReload": "/usr/local/bin/npu-supervisorctl --config /etc/npu-supervisor/config.toml reload --wait",
            "RestartPreventExitStatus": "78",
            "ExecStart": "/usr/local/bin/npu-supervisord --config /etc/npu-supervisor/config.toml",
            "Sockets": "npu-supervisord.socket npu-supervisord-status.socket npu-supervisord-control.socket",
        ]
        for (key, value) in expected { #expect(service[key] == [value], "\(key)=") }
        #expect(service["WatchdogSec"] != nil)
        // Longer than the default shutdown_timeout (30 s) + stop_timeout (15 s).
        let stop = try #require(service["TimeoutStopSec"]?.first.flatMap { Int($0.dropLast()) })
        #expect(stop > 45)
        // Nothing that would hide /dev/davinci* or /dev/nvidia* from workers.
        for key in ["PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock", "ProtectControlGroups"] {
            #expect(service[key] == nil, "\(key)= would break device access or Delegate=")
        }
        for name in ["requests", "status", "control"] {
            let file = name == "requests" ? "npu-supervisord.socket" : "npu-supervisord-\(name).socket"
            let socket = Self.settings(try String(contentsOfFile: Paths.unitsFolder + "/" + file, encoding: .utf8))
            #expect(socket["ListenStream"] == ["/run/npu-supervisor/\(name).sock"])
            #expect(socket["FileDescriptorName"] == [name])
            #expect(socket["SocketMode"] == ["0660"])
            #expect(socket["Service"] == ["npu-supervisord.service"])
        }
        let http = Self.settings(try String(contentsOfFile: Paths.unitsFolder + "/npu-supervisord-http.socket",
                                            encoding: .utf8))
        #expect(http["FileDescriptorName"] == ["http"])
    }

    @Test func installPutsEverythingInPlaceAndKeepsAnExistingConfig() throws {
        let dir = try Paths.scratch("install")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let env = ["PREFIX": dir + "/prefix", "SYSCONFDIR": dir + "/etc", "UNITDIR": dir + "/units",
                   "BUILD_DIR": Binaries.directory, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"]
        let first = try runCommand(PackagePaths.root + "/scripts/install.sh", [], environment: env)
        #expect(first.status == 0, "\(first)")
        for exe in ["npu-supervisord", "npu-supervisorctl", "npu-worker"] {
            #expect(access(dir + "/prefix/bin/" + exe, X_OK) == 0)
        }
        if access(Binaries.directory + "/npu-cgroup-exec", X_OK) == 0 {
            #expect(access(dir + "/prefix/bin/npu-cgroup-exec", X_OK) == 0, "the cgroup trampoline goes along")
        }
        let config = dir + "/etc/npu-supervisor/config.toml"
        let service = try String(contentsOfFile: dir + "/units/npu-supervisord.service", encoding: .utf8)
        #expect(Self.settings(service)["ExecStart"] == ["\(dir)/prefix/bin/npu-supervisord --config \(config)"])
        // The installed units verify (their paths exist), and the installed configuration is valid, with the
        // sockets where the socket units listen.
        let verify = try Self.verify(dir + "/units", Self.unitNames)
        #expect(verify.status == 0 && verify.stderr.isEmpty, "\(verify.stderr)")
        let check = try runCommand(dir + "/prefix/bin/npu-supervisord", ["--check-config", "--config", config])
        #expect(check.status == 0, "\(check.stderr)")
        #expect(check.stdout.contains("run_dir = \"/run/npu-supervisor\""))
        #expect(FileManager.default.fileExists(atPath: dir + "/prefix/share/doc/npu-supervisor/README.md"))
        // A second install keeps the operator's configuration.
        try "# mine\n".write(toFile: config, atomically: true, encoding: .utf8)
        let second = try runCommand(PackagePaths.root + "/scripts/install.sh", [], environment: env)
        #expect(second.status == 0)
        #expect(try String(contentsOfFile: config, encoding: .utf8) == "# mine\n")
        #expect(FileManager.default.fileExists(atPath: config + ".example"))
        // DESTDIR stages a PREFIX=/usr install without touching the system.
        let staged = try runCommand(PackagePaths.root + "/scripts/install.sh", [], environment: [
            "DESTDIR": dir + "/stage", "PREFIX": "/usr", "BUILD_DIR": Binaries.directory,
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        ])
        #expect(staged.status == 0, "\(staged)")
        let stagedService = try String(contentsOfFile: dir + "/stage/usr/lib/systemd/system/npu-supervisord.service",
                                       encoding: .utf8)
        #expect(Self.settings(stagedService)["ExecStart"]
                    == ["/usr/bin/npu-supervisord --config /etc/npu-supervisor/config.toml"])
        #expect(FileManager.default.fileExists(atPath: dir + "/stage/etc/npu-supervisor/config.toml"))
        #expect(access(dir + "/stage/usr/bin/npu-supervisord", X_OK) == 0)
    }
}

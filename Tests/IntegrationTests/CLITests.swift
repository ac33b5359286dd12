import Foundation
import TestSupport
import Testing

/// npu-supervisorctl as an operator runs it: against a real daemon, finding its sockets from the config file.
@Suite(.serialized, .timeLimit(.minutes(1)))
struct CLITests {
    @Test func theCLIFindsTheSocketsFromTheDaemonsConfigFile() throws {
        let daemon = try TestDaemon(devices: ["0"])
        #expect(daemon.waitAllReady() != nil)
        // Global option before the command, relative `run_dir` resolved against the config file's folder.
        let pid = try runCommand(Binaries.supervisorctl, ["--config", daemon.configPath, "pid"])
        #expect(pid.status == 0, "\(pid.stderr)")
        #expect(pid.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "\(daemon.pid)")
        #expect(daemon.terminate() == 0)
    }

    @Test func theCLIAndTheDaemonReportTheSameRelease() throws {
        let ctl = try runCommand(Binaries.supervisorctl, ["--version"])
        let daemon = try runCommand(Binaries.supervisord, ["--version"])
        #expect(ctl.status == 0 && daemon.status == 0)
        #expect(!ctl.stdout.isEmpty && ctl.stdout == daemon.stdout)
    }

    /// The daemon parses its own options (no swift-argument-parser, see its main): the forms an operator or a unit
    /// file writes are understood, and a usage error says what is wrong, prints the usage and exits 64 without
    /// starting anything.
    @Test func theDaemonsOptionsAndItsUsageErrors() throws {
        let daemon = try TestDaemon(devices: ["0"], start: false)
        for arguments in [["--config", daemon.configPath, "--check-config"], ["-c", daemon.configPath, "--check-config"],
                          ["--config=\(daemon.configPath)", "--log-level=debug", "--check-config"],
                          ["--check-config", "--log-level", "critical", "--config", daemon.configPath],
                          ["-c=\(daemon.configPath)", "--check-config", "--"]] {
            let r = try runCommand(Binaries.supervisord, arguments)
            #expect(r.status == 0, "\(arguments): \(r.stderr)")
            #expect(r.stderr.contains("is valid (1 device(s))"), "\(arguments): \(r.stderr)")
        }
        let help = try runCommand(Binaries.supervisord, ["--help"])
        #expect(help.status == 0 && help.stdout.contains("USAGE: npu-supervisord") && help.stdout.contains("--check-config"))
        for (arguments, why) in [(["--bogus"], "Unknown option '--bogus'"),
                                 (["--config"], "Missing value for '--config'"),
                                 (["--log-level", "loud"], "The value 'loud' is invalid for '--log-level'"),
                                 (["--check-config=yes"], "'--check-config' takes no value"),
                                 (["-c", "--check-config"], "Missing value for '-c'"),
                                 (["--config="], "Missing value for '--config'"),
                                 (["--", "--check-config"], "Unexpected argument '--check-config'"),
                                 (["stray"], "Unexpected argument 'stray'")] {
            let r = try runCommand(Binaries.supervisord, ["--config", daemon.configPath] + arguments)
            #expect(r.status == 64, "\(arguments): \(r.stderr)")
            #expect(r.stderr.hasPrefix("Error: \(why)"), "\(arguments): \(r.stderr)")
            #expect(r.stderr.contains("USAGE: npu-supervisord"), "\(arguments)")
        }
    }
}

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
}

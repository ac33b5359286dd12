import TestSupport
import Testing

/// What a host must have to run the programs (`ldd`), checked here rather than by eye.
@Suite struct LinkageTests {
    /// Workers ship to device hosts: WireProtocol and WorkerKit use FoundationEssentials (JSON without ICU), never
    /// the full Foundation.
    @Test func theWorkerNeedsNoFullFoundation() throws {
        try expectNoFullFoundation(Binaries.worker)
    }

    /// The daemon and the CLI read TOML with toml++ through a Swift wrapper of our own, not TOMLKit (which imports
    /// Foundation): full Foundation with ICU was most of the daemon's resident memory, and a library that brings it
    /// back must not slip in unnoticed.
    @Test(arguments: [Binaries.supervisord, Binaries.supervisorctl])
    func theDaemonAndTheCLINeedNoFullFoundation(_ binary: String) throws {
        try expectNoFullFoundation(binary)
    }

    private func expectNoFullFoundation(_ binary: String) throws {
        let ldd = try runCommand("/usr/bin/ldd", [binary])
        try #require(ldd.status == 0, "\(ldd.stderr)")
        #expect(!ldd.stdout.contains("libFoundation.so"), "\(binary): \(ldd.stdout)")
        #expect(!ldd.stdout.contains("ICU"), "\(binary): \(ldd.stdout)")
        #expect(!ldd.stdout.contains("libFoundationInternationalization"), "\(binary): \(ldd.stdout)")
    }
}

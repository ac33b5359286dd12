import TestSupport
import Testing

/// What a host must have to run the programs (`ldd`), checked here rather than by eye.
@Suite struct LinkageTests {
    /// Workers ship to device hosts: they use FoundationEssentials (through swift-argument-parser), never the full
    /// Foundation.
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

    /// The daemon loads no Foundation at all: its JSON is WireProtocol's own and it parses its command line itself
    /// (swift-argument-parser links FoundationEssentials). That library was 3 MB of its idle RSS (BENCHMARKS.md).
    @Test func theDaemonNeedsNoFoundationEssentials() throws {
        let ldd = try runCommand("/usr/bin/ldd", [Binaries.supervisord])
        try #require(ldd.status == 0, "\(ldd.stderr)")
        #expect(!ldd.stdout.contains("Foundation"), "\(ldd.stdout)")
    }

    private func expectNoFullFoundation(_ binary: String) throws {
        let ldd = try runCommand("/usr/bin/ldd", [binary])
        try #require(ldd.status == 0, "\(ldd.stderr)")
        #expect(!ldd.stdout.contains("libFoundation.so"), "\(binary): \(ldd.stdout)")
        #expect(!ldd.stdout.contains("ICU"), "\(binary): \(ldd.stdout)")
        #expect(!ldd.stdout.contains("libFoundationInternationalization"), "\(binary): \(ldd.stdout)")
    }
}

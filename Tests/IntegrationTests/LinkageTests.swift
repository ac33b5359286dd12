import TestSupport
import Testing

/// What a host must have to run the programs (`ldd`), checked here rather than by eye.
@Suite struct LinkageTests {
    /// Workers ship to device hosts: WireProtocol and WorkerKit use FoundationEssentials (JSON without ICU), never
    /// the full Foundation. (npu-supervisorctl does link it: TOMLKit, which reads `--config`, imports Foundation.)
    @Test func theWorkerNeedsNoFullFoundation() throws {
        let ldd = try runCommand("/usr/bin/ldd", [Binaries.worker])
        try #require(ldd.status == 0, "\(ldd.stderr)")
        #expect(!ldd.stdout.contains("libFoundation.so"), "\(ldd.stdout)")
        #expect(!ldd.stdout.contains("ICU"), "\(ldd.stdout)")
    }
}

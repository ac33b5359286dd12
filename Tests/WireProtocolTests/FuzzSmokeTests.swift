import Foundation
import Testing

/// A short libFuzzer run of every target in Fuzz/ (issue 14): `scripts/fuzz.sh TARGET` with a fixed number of
/// executions over the seed corpus. The long runs are `scripts/fuzz.sh [TARGET] [SECONDS]` (BENCHMARKS.md).
@Suite(.serialized) struct FuzzSmokeTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()

    static func script(_ arguments: [String], runs: Int? = nil) throws -> (status: Int32, output: String) {
        let process = Process()
        process.executableURL = root.appendingPathComponent("scripts/fuzz.sh")
        process.arguments = arguments
        var environment = ProcessInfo.processInfo.environment
        if let runs { environment["FUZZ_RUNS"] = String(runs) }
        // Its own folder: a long run of the same target (in .build/fuzz) may be going on; sharing the binary, the
        // log and the found inputs would break both.
        environment["FUZZ_OUT"] = root.appendingPathComponent(".build/fuzz-smoke").path
        process.environment = environment
        let log = FileManager.default.temporaryDirectory.appendingPathComponent("fuzz-smoke-\(UUID()).log")
        FileManager.default.createFile(atPath: log.path, contents: nil)
        let handle = try FileHandle(forWritingTo: log)  // a file, not a pipe (SWIFT-NOTES: libFuzzer and pipes)
        defer { try? FileManager.default.removeItem(at: log) }
        process.standardOutput = handle
        process.standardError = handle
        try process.run()
        process.waitUntilExit()
        try handle.close()
        return (process.terminationStatus, (try? String(contentsOf: log, encoding: .utf8)) ?? "")
    }

    /// Whether `swiftc -sanitize=fuzzer,address` links here (the script exits 77 where it does not).
    static let hasLibFuzzer: Bool = (try? script(["probe"]).status) == 0

    @Test(.enabled(if: hasLibFuzzer, "this toolchain has no libFuzzer (swiftc -sanitize=fuzzer,address)"),
          .timeLimit(.minutes(10)),
          arguments: ["frame", "options", "control", "config"])
    func shortRunFindsNothing(_ target: String) throws {
        let (status, output) = try Self.script([target], runs: target == "config" ? 3000 : 20000)
        #expect(status == 0, "scripts/fuzz.sh \(target) exited \(status):\n\(output)")
        #expect(output.contains("\(target): "), "\(output)")
    }
}

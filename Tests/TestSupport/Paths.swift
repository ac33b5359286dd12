import Foundation

/// Where `swift build` put the executables: next to the test bundle that is running now (or
/// `$NPU_SUPERVISOR_BIN`).
public enum Binaries {
    public static let directory: String = {
        if let override = ProcessInfo.processInfo.environment["NPU_SUPERVISOR_BIN"] { return override }
        let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? ""
        var dir = URL(fileURLWithPath: exe).deletingLastPathComponent()
        // The runner may live inside an .xctest bundle folder.
        while !FileManager.default.fileExists(atPath: dir.appendingPathComponent("npu-worker").path),
              dir.path != "/" {
            dir = dir.deletingLastPathComponent()
        }
        return dir.path
    }()

    public static var supervisord: String { directory + "/npu-supervisord" }
    public static var supervisorctl: String { directory + "/npu-supervisorctl" }
    public static var worker: String { directory + "/npu-worker" }
}

/// The package's own files.
public enum PackagePaths {
    /// The package root (this file is Tests/TestSupport/Paths.swift).
    public static let root: String = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().path
}

import Foundation
import NPUClient
import WireProtocol

/// A throw-away npu-supervisord for a benchmark run: its own folder, config and sockets.
final class BenchDaemon {
    let directory: String
    let process = Process()
    let binDirectory: String

    var requestsSocket: String { directory + "/run/requests.sock" }
    var statusSocket: String { directory + "/run/status.sock" }
    var pid: Int32 { process.processIdentifier }

    init(devices: Int, workerArgs: [String], defaults: String = "", requests: String = "", cgroups: String = "auto",
         binDirectory: String, environment: [String: String] = [:], logLevel: String = "warning") throws {
        // Absolute: the config lives in a temporary folder, and relative paths in it are taken from there.
        let binDirectory = URL(fileURLWithPath: binDirectory).standardizedFileURL.path
        self.binDirectory = binDirectory
        directory = NSTemporaryDirectory() + "npu-bench-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let argv = ([binDirectory + "/npu-worker"] + workerArgs).map { "\"\($0)\"" }.joined(separator: ", ")
        var toml = """
            [supervisor]
            run_dir = "run"
            log_level = "\(logLevel)"
            [http]
            listen = ""
            [cgroups]
            mode = "\(cgroups)"
            [requests]
            \(requests)
            [defaults]
            command = [\(argv)]
            heartbeat_interval = "1s"
            inference_probe = { enabled = false }
            \(defaults)

            """
        for d in 0..<devices { toml += "[[device]]\nid = \"\(d)\"\n" }
        let config = directory + "/config.toml"
        try toml.write(toFile: config, atomically: true, encoding: .utf8)
        process.executableURL = URL(fileURLWithPath: binDirectory + "/npu-supervisord")
        process.arguments = ["--config", config]
        if !environment.isEmpty {
            process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        }
        _ = FileManager.default.createFile(atPath: directory + "/daemon.log", contents: nil)
        let log = FileHandle(forWritingAtPath: directory + "/daemon.log")!
        process.standardOutput = log
        process.standardError = log
        try process.run()
    }

    func status() -> StatusDocument? { try? readStatusDocument(path: statusSocket) }

    func waitAllReady(timeout: Double = 60) throws -> StatusDocument {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if let doc = status(), doc.workers.allSatisfy({ $0.state == "ready" }) { return doc }
            usleep(5000)
        }
        throw BenchError("workers not ready within \(timeout) s; see \(directory)/daemon.log")
    }

    func stop() {
        kill(pid, SIGTERM)
        process.waitUntilExit()
        try? FileManager.default.removeItem(atPath: directory)
    }
}

struct BenchError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// Monotonic seconds.
func now() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

func percentile(_ values: [Double], _ p: Double) -> Double {
    guard !values.isEmpty else { return .nan }
    let sorted = values.sorted()
    let index = min(sorted.count - 1, max(0, Int((p / 100 * Double(sorted.count)).rounded(.up)) - 1))
    return sorted[index]
}

func ms(_ seconds: Double) -> String { String(format: "%.2f ms", seconds * 1000) }

/// Resident memory figures of a process from /proc (kB).
struct Memory {
    var rssKB: Int
    var anonKB: Int
    var threads: Int
    var fds: Int

    init(pid: Int32) {
        let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
        func field(_ name: String) -> Int {
            guard let line = status.split(separator: "\n").first(where: { $0.hasPrefix(name + ":") }) else { return -1 }
            return Int(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first
                .map { $0.trimmingCharacters(in: .whitespaces) } ?? "") ?? Int(line.split(whereSeparator: { $0 == "\t" || $0 == " " })[1]) ?? -1
        }
        rssKB = field("VmRSS")
        anonKB = field("RssAnon")
        threads = field("Threads")
        fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd").count) ?? -1
    }
}

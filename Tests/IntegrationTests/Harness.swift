import Foundation
import NIOCore
import NPUClient
import Testing
import WireProtocol

/// Where `swift build` put the executables: next to the test bundle that is running now.
enum Binaries {
    static let directory: String = {
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

    static var supervisord: String { directory + "/npu-supervisord" }
    static var supervisorctl: String { directory + "/npu-supervisorctl" }
    static var worker: String { directory + "/npu-worker" }
}

/// Waits for `condition` to hold, checking every 10 ms, for at most `timeout`. Returns whether it held.
func eventually(timeout: Duration = .seconds(10), _ condition: () throws -> Bool) rethrows -> Bool {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if try condition() { return true }
        usleep(10_000)
    }
    return try condition()
}

func processExists(_ pid: Int32) -> Bool {
    // A zombie still "exists" for kill(0); check its state in /proc.
    guard kill(pid, 0) == 0 else { return false }
    guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
          let close = stat.lastIndex(of: ")") else { return false }
    let state = stat[stat.index(close, offsetBy: 2)]
    return state != "Z"
}

/// The result of running a command.
struct CommandResult {
    var status: Int32
    var stdout: String
    var stderr: String
}

func runCommand(_ path: String, _ arguments: [String], environment: [String: String]? = nil) throws -> CommandResult {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: path)
    process.arguments = arguments
    if let environment { process.environment = environment }
    let out = Pipe()
    let err = Pipe()
    process.standardOutput = out
    process.standardError = err
    process.standardInput = FileHandle.nullDevice
    try process.run()
    let outData = out.fileHandleForReading.readDataToEndOfFile()
    let errData = err.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return CommandResult(status: process.terminationStatus, stdout: String(decoding: outData, as: UTF8.self),
                         stderr: String(decoding: errData, as: UTF8.self))
}

/// One npu-supervisord with its own temporary folder, config and sockets. Always torn down: SIGKILL of the
/// daemon and of every worker it ever reported, then the folder is removed.
final class TestDaemon {
    let directory: String
    let configPath: String
    let process = Process()
    let logPath: String
    private var seenWorkerPids: Set<Int32> = []

    var controlSocket: String { directory + "/run/control.sock" }
    var requestsSocket: String { directory + "/run/requests.sock" }
    var statusSocket: String { directory + "/run/status.sock" }

    /// - Parameters:
    ///   - devices: device ids.
    ///   - workerArgs: extra npu-worker arguments (for every device unless `perDevice` overrides).
    ///   - defaults: extra lines for the `[defaults]` table.
    ///   - extra: extra TOML appended at the end (e.g. `[requests]`).
    init(devices: [String] = ["0", "1", "2", "3"], workerArgs: [String] = [], defaults: String = "",
         perDevice: [String: String] = [:], supervisor: String = "", extra: String = "", http: String = "",
         environment: [String: String] = [:], start: Bool = true) throws {
        directory = FileManager.default.temporaryDirectory
            .appendingPathComponent("npu-sv-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        configPath = directory + "/config.toml"
        logPath = directory + "/daemon.log"
        let argv = ([Binaries.worker] + workerArgs).map { "\"\($0)\"" }.joined(separator: ", ")
        var toml = """
            [supervisor]
            run_dir = "run"
            shutdown_timeout = "5s"
            \(supervisor)

            [http]
            listen = "\(http)"

            [defaults]
            command = [\(argv)]

            """
        // Test-friendly defaults; a test's own `defaults` lines win (TOML forbids a key twice).
        let base = ["inference_probe = { enabled = false }", "start_timeout = \"20s\"", "stop_timeout = \"3s\"", "backoff_initial = \"100ms\"",
                    "backoff_max = \"1s\"", "heartbeat_interval = \"100ms\"", "heartbeat_timeout = \"2s\""]
        let overridden = Set(defaults.split(separator: "\n").compactMap {
            $0.split(separator: "=").first.map { $0.trimmingCharacters(in: .whitespaces) }
        })
        for line in base where !overridden.contains(String(line.split(separator: " ")[0])) { toml += line + "\n" }
        toml += defaults + "\n"
        for device in devices {
            toml += "\n[[device]]\nid = \"\(device)\"\n\(perDevice[device] ?? "")\n"
        }
        toml += "\n" + extra + "\n"
        try toml.write(toFile: configPath, atomically: true, encoding: .utf8)
        process.executableURL = URL(fileURLWithPath: Binaries.supervisord)
        process.arguments = ["--config", configPath]
        var env = ProcessInfo.processInfo.environment
        for (k, v) in environment { env[k] = v }
        process.environment = env
        _ = FileManager.default.createFile(atPath: logPath, contents: nil)
        let log = FileHandle(forWritingAtPath: logPath)!
        process.standardOutput = log
        process.standardError = log
        process.standardInput = FileHandle.nullDevice
        if start { try process.run() }
    }

    deinit {
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        for pid in seenWorkerPids where processExists(pid) { kill(-pid, SIGKILL); kill(pid, SIGKILL) }
        try? FileManager.default.removeItem(atPath: directory)
    }

    var pid: Int32 { process.processIdentifier }

    var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    /// The status document from status.sock, or nil when the daemon does not answer (yet).
    func status() -> StatusDocument? {
        guard let doc = try? readStatusDocument(path: statusSocket) else { return nil }
        for w in doc.workers { if let p = w.pid { seenWorkerPids.insert(p) } }
        return doc
    }

    func worker(_ device: String) -> WorkerStatus? { status()?.workers.first { $0.device == device } }

    /// Waits until every configured worker is ready.
    @discardableResult
    func waitAllReady(timeout: Duration = .seconds(20)) -> StatusDocument? {
        var last: StatusDocument?
        let ok = eventually(timeout: timeout) {
            last = status()
            return last.map { $0.workers.allSatisfy { $0.state == "ready" || ($0.fallback && $0.desired == "down") } } ?? false
        }
        return ok ? last : nil
    }

    func ctl(_ arguments: [String]) throws -> CommandResult {
        try runCommand(Binaries.supervisorctl, ["--socket", controlSocket] + arguments)
    }

    func client(timeout: Duration = .seconds(30)) throws -> SupervisorClient {
        try SupervisorClient(socketPath: requestsSocket, timeout: timeout)
    }

    /// SIGTERM and wait for the exit status.
    func terminate(timeout: Duration = .seconds(20)) -> Int32? {
        kill(pid, SIGTERM)
        guard eventually(timeout: timeout, { !process.isRunning }) else { return nil }
        return process.terminationStatus
    }
}

/// JSON helpers for the reference worker's answers.
struct WorkerAnswer: Decodable {
    var text: String
    var tokens: Int
    var device: String
    var pid: Int32
}

func decodeAnswer(_ outcome: InferenceOutcome) -> WorkerAnswer? {
    guard case .response(let body) = outcome else { return nil }
    return try? JSONDecoder().decode(WorkerAnswer.self, from: Data(body.readableBytesView))
}

func payload(_ json: String) -> ByteBuffer { ByteBuffer(string: json) }

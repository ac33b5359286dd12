import Foundation
import NIOCore
import NPUClient
import TestSupport
import Testing
import WireProtocol

/// One npu-supervisord with its own temporary folder, config and sockets. Always torn down: SIGKILL of the
/// daemon and of every worker it ever reported, then the folder is removed.
final class TestDaemon {
    let directory: String
    let configPath: String
    let logPath: String
    /// The running daemon (nil when made with `start: false`).
    private(set) var process: DaemonProcess?

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
         httpExtra: String = "", environment: [String: String] = [:], start: Bool = true) throws {
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
            \(httpExtra)

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
        _ = FileManager.default.createFile(atPath: logPath, contents: nil)
        if start {
            process = try DaemonProcess(arguments: ["--config", configPath], environment: environment,
                                        logPath: logPath)
        }
    }

    deinit {
        process = nil  // SIGKILLs the daemon and every worker it reported, if still running
        try? FileManager.default.removeItem(atPath: directory)
    }

    var pid: Int32 { process?.pid ?? 0 }

    /// False once the daemon has exited (it is reaped then).
    var isRunning: Bool { process?.isRunning ?? false }

    /// The daemon's exit code (128 + signal for a signal), once exited.
    var exitStatus: Int32? { process?.exitStatus }

    var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    /// The status document from status.sock, or nil when the daemon does not answer (yet).
    func status() -> StatusDocument? {
        guard let doc = try? readStatusDocument(path: statusSocket) else { return nil }
        process?.remember(doc)
        return doc
    }

    /// Waits until the daemon's own clock (its uptime, as its status document reports it) has moved on by
    /// `interval`: the daemon has had that much time to act, however the test itself was scheduled.
    @discardableResult
    func waitForDaemonTime(_ interval: Duration, timeout: Duration = .seconds(20)) -> Bool {
        guard let start = status()?.supervisor.uptimeSeconds else { return false }
        let seconds = Double(interval.components.seconds) + Double(interval.components.attoseconds) / 1e18
        return eventually(timeout: timeout) { (status()?.supervisor.uptimeSeconds ?? 0) >= start + seconds }
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

    /// SIGKILLs the daemon (its workers go too: EOF on fd 3, or SIGKILL from the harness) and starts a new one
    /// on the same config and folder, as systemd's Restart= would.
    func restartAfterSIGKILL(environment: [String: String] = [:]) throws {
        process = nil
        process = try DaemonProcess(arguments: ["--config", configPath], environment: environment, logPath: logPath)
    }

    /// SIGTERM and wait for the exit status.
    func terminate(timeout: Duration = .seconds(20)) -> Int32? {
        process?.terminate(timeout: timeout)
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

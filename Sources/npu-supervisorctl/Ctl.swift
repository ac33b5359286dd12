import ArgumentParser
import Glibc
import NIOCore
import NPUClient
import SocketDiscovery
import WireProtocol

/// Exit codes of npu-supervisorctl (also in --help and README).
enum CtlExit {
    static let ok: Int32 = 0
    /// The daemon refused or failed the command (or `health` says degraded).
    static let refused: Int32 = 1
    /// `health`: unavailable.
    static let unavailable: Int32 = 2
    /// Usage error (ArgumentParser's validation errors exit with 64 too).
    static let usage: Int32 = 64
    /// The daemon is not reachable.
    static let unreachable: Int32 = 69
    /// Permission denied for a mutating command.
    static let noPermission: Int32 = 77
}

@main
struct Ctl: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "npu-supervisorctl",
        abstract: "Operate a running npu-supervisord.",
        discussion: """
            Exit codes: 0 ok; 1 refused or failed (health: degraded); 2 health: unavailable; 64 usage error;
            69 npu-supervisord not reachable; 77 permission denied.
            Sockets: --socket (control.sock), else --config (the daemon's config file), else
            $NPU_SUPERVISOR_SOCKET, else /run/npu-supervisor/control.sock.
            """,
        version: npuSupervisorRelease,
        subcommands: [Status.self, Start.self, Stop.self, Restart.self, Drain.self, Undrain.self, Reload.self,
                      Rollout.self, Pid.self, Tail.self, Health.self, Infer.self, Shutdown.self])

    /// `npu-supervisorctl --socket P status` is the supervisorctl habit: global options before the command.
    /// ArgumentParser reads a subcommand's options only after its name, so move them there.
    static func main() {
        var args = Array(CommandLine.arguments.dropFirst())
        var globals: [String] = []
        while let first = args.first, first.hasPrefix("--socket") || first.hasPrefix("--config") {
            globals.append(args.removeFirst())
            if !first.contains("="), !args.isEmpty { globals.append(args.removeFirst()) }
        }
        if !globals.isEmpty, !args.isEmpty {
            args.insert(contentsOf: globals, at: 1)
        } else {
            args = globals + args
        }
        main(args)
    }
}

/// Where the daemon's sockets are.
struct SocketOptions: ParsableArguments {
    @Option(help: "Path of control.sock.") var socket: String?
    @Option(help: "The daemon's configuration file (to find its sockets).") var config: String?

    func paths() throws -> (control: String, requests: String) {
        if let socket {
            let dir = socket.lastIndex(of: "/").map { String(socket[..<$0]) } ?? "."
            return (socket, dir + "/requests.sock")
        }
        if let config {
            do {
                // Only the socket keys are read: the worker programs need not exist where the CLI runs.
                let c = try SocketPaths(configFile: config)
                return (c.control, c.requests)
            } catch {
                fail(CtlExit.usage, "npu-supervisorctl: cannot read \(config): \(error)")
            }
        }
        let control = getenv("NPU_SUPERVISOR_SOCKET").map { String(cString: $0) } ?? "/run/npu-supervisor/control.sock"
        let dir = control.lastIndex(of: "/").map { String(control[..<$0]) } ?? "."
        return (control, dir + "/requests.sock")
    }

    func connect(_ path: String, timeout: Duration? = .seconds(30)) -> SupervisorClient {
        do {
            return try SupervisorClient(socketPath: path, timeout: timeout)
        } catch {
            fail(CtlExit.unreachable, "npu-supervisorctl: \(error)")
        }
    }

    /// Runs a control command; exits with the documented code on an error answer.
    func run(_ command: ControlCommand) -> ByteBuffer {
        let client = connect(try! paths().control)
        let frame: Frame
        do {
            frame = try client.control(command)
        } catch {
            fail(CtlExit.unreachable, "npu-supervisorctl: \(error)")
        }
        if frame.type == .error {
            let e = frame.errorPayload
            fail(e.code == ErrorCode.permissionDenied ? CtlExit.noPermission : CtlExit.refused,
                 "npu-supervisorctl: \(command.command) refused: \(e.message) (\(e.code))")
        }
        return frame.payload
    }
}

func fail(_ code: Int32, _ message: String) -> Never {
    let line = message + "\n"
    _ = line.withCString { write(2, $0, strlen($0)) }
    exit(code)
}

func out(_ text: String) {
    let line = text + "\n"
    _ = line.withCString { write(1, $0, strlen($0)) }
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show the workers (a table, or --json).")
    @OptionGroup var sockets: SocketOptions
    @Flag(help: "Print the status document as JSON (the same as status.sock).") var json = false
    @Argument(help: "Devices to show (default: all).") var devices: [String] = []

    func run() throws {
        let payload = sockets.run(ControlCommand(command: "status", devices: devices))
        if json {
            let doc = try JSONCoding.decode(StatusDocument.self, from: payload)
            out(try JSONCoding.encodeString(doc, pretty: true))
            return
        }
        out(StatusTable.render(try JSONCoding.decode(StatusDocument.self, from: payload)))
    }
}

enum StatusTable {
    static func render(_ doc: StatusDocument) -> String {
        var lines = ["state: \(doc.state) (\(doc.reason)); supervisor pid \(doc.supervisor.pid), up "
            + duration(doc.supervisor.uptimeSeconds) + ", queue \(doc.queueDepth)"]
        if let rollout = doc.rollout, rollout.state != "idle" { lines.append(rolloutLine(rollout)) }
        if let a = doc.availability { lines.append(availabilityLine(a)) }
        let header = ["DEVICE", "KIND", "STATE", "PID", "UPTIME", "RESTARTS", "INFLIGHT", "HEALTH", "LAST EXIT"]
        var rows = [header]
        for w in doc.workers {
            var state = w.state
            if w.desired == "down" && w.state != "stopped" { state += " (stopping)" }
            if let next = w.nextRestartInSeconds { state += " (retry in \(duration(next)))" }
            if let drain = w.drain, drain != "no" { state += " (\(drain))" }
            var name = w.device + (w.fallback ? " (fallback)" : "")
            if let group = w.group, let rank = w.rank { name += " (\(group) rank \(rank))" }
            rows.append([name, w.kind, state, w.pid.map(String.init) ?? "-",
                         w.pid == nil ? "-" : duration(w.uptimeSeconds), String(w.restarts),
                         "\(w.inflight)/\(w.maxInflight)", w.state == "stopped" ? "-" : healthSummary(w.health),
                         w.lastExit ?? "-"])
        }
        lines += table(rows)
        if let groups = doc.groups, !groups.isEmpty {
            let header = ["GROUP", "DEVICES", "STATE", "SERVING", "RESTARTS", "MASTER_PORT", "LAST EXIT"]
            var rows = [header]
            for g in groups {
                var state = g.state
                if g.desired == "down" && g.state != "stopped" { state += " (stopping)" }
                if let next = g.nextRestartInSeconds { state += " (retry in \(duration(next)))" }
                var last = g.lastExit ?? "-"
                if let rank = g.lastExitRank, let device = g.lastExitDevice { last += " (rank \(rank), device \(device))" }
                rows.append([g.id, g.devices.joined(separator: ","), state, g.serving ? "yes" : "no", String(g.restarts),
                             g.masterPort.map(String.init) ?? "-", last])
            }
            lines.append("")
            lines += table(rows)
        }
        return lines.joined(separator: "\n")
    }

    /// Left-aligned columns, two spaces apart; the last column is not padded.
    static func table(_ rows: [[String]]) -> [String] {
        let widths = rows[0].indices.map { i in rows.map { $0[i].count }.max()! }
        return rows.map { row in
            row.enumerated().map { i, cell in
                i == row.count - 1 ? cell : cell + String(repeating: " ", count: widths[i] - cell.count)
            }.joined(separator: "  ")
        }
    }

    /// `rollout: progressing, upgrade 1/4 (canary 0): 0, 1, 2, 3`.
    static func rolloutLine(_ r: RolloutStatus) -> String {
        var line = "rollout: \(r.state)"
        if let kind = r.kind { line += ", \(kind) \(r.progress)" }
        if let canary = r.canary { line += " (canary \(canary))" }
        if !r.devices.isEmpty { line += ": " + r.devices.joined(separator: ", ") }
        if let reason = r.reason { line += "; \(reason)" }
        return line
    }

    /// One line: `availability: 99.9950% since start (19995 ok, 1 failed of 20000 received), objective 99.99%,
    /// budget left 50.0%; last 1h 99.9950%; capacity lost 12.3 device-seconds`.
    static func availabilityLine(_ a: AvailabilityStatus) -> String {
        func percent(_ x: Double) -> String {
            let v = (x * 1_000_000).rounded() / 10_000
            return "\(v)%"
        }
        let s = a.sinceStart
        let failed = s.failed.filter { $0.key != "bad_request" && $0.key != "cancelled" }.values.reduce(0, +)
        let lost = s.capacityLostSeconds.values.flatMap(\.values).reduce(0, +)
        return "availability: \(percent(s.availability)) since start (\(s.succeeded) ok, \(failed) failed of "
            + "\(s.received) received), objective \(percent(a.objective)), budget left "
            + "\(percent(s.errorBudgetRemaining)); last \(duration(a.windowSeconds)) \(percent(a.window.availability)); "
            + "capacity lost \((lost * 10).rounded() / 10) device-seconds"
    }

    /// `ok`, or the first level that is not, e.g. `device: probe ...: Health Status : Critical`.
    static func healthSummary(_ h: WorkerHealthLevels) -> String {
        for (name, value) in [("alive", h.alive), ("device", h.device), ("model", h.model), ("inference", h.inference)]
        where !value.hasPrefix("ok") && value != "unknown" {
            return String("\(name): \(value)".prefix(60))
        }
        return h.inRotation ? "ok" : "-"
    }

    static func duration(_ seconds: Double) -> String {
        let s = Int(seconds)
        if s < 60 { return "\(s)s" }
        if s < 3600 { return "\(s / 60)m\(s % 60)s" }
        if s < 86400 { return "\(s / 3600)h\(s % 3600 / 60)m" }
        return "\(s / 86400)d\(s % 86400 / 3600)h"
    }
}

struct DeviceCommand: ParsableArguments {
    @Argument(help: "Device ids, or all.") var devices: [String] = []

    func validate() throws {
        if devices.isEmpty { throw ValidationError("name one or more devices, or all") }
    }
}

func mutate(_ name: String, _ sockets: SocketOptions, _ devices: [String], rolling: Bool? = nil) throws {
    let payload = sockets.run(ControlCommand(command: name, devices: devices, rolling: rolling))
    let result = try JSONCoding.decode(ControlResult.self, from: payload)
    out(result.message)
}

struct Start: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Start devices' workers (also re-tries failed ones).")
    @OptionGroup var sockets: SocketOptions
    @OptionGroup var target: DeviceCommand
    func run() throws { try mutate("start", sockets, target.devices) }
}

struct Stop: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Stop devices' workers (SIGTERM, then SIGKILL after stop_timeout).")
    @OptionGroup var sockets: SocketOptions
    @OptionGroup var target: DeviceCommand
    func run() throws { try mutate("stop", sockets, target.devices) }
}

struct Restart: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Restart devices' workers.",
        discussion: "--rolling: one device at a time, each drained first and back in rotation before the next "
            + "(a canary first); follow it with `rollout status`.")
    @OptionGroup var sockets: SocketOptions
    @Flag(help: "One device at a time, drained first, without dropping a request.") var rolling = false
    @OptionGroup var target: DeviceCommand
    func run() throws { try mutate("restart", sockets, target.devices, rolling: rolling ? true : nil) }
}

struct Drain: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Take devices out of rotation; their requests finish (bounded by drain_timeout), workers keep running.")
    @OptionGroup var sockets: SocketOptions
    @OptionGroup var target: DeviceCommand
    func run() throws { try mutate("drain", sockets, target.devices) }
}

struct Undrain: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Put drained devices back in rotation.")
    @OptionGroup var sockets: SocketOptions
    @OptionGroup var target: DeviceCommand
    func run() throws { try mutate("undrain", sockets, target.devices) }
}

struct Reload: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Re-read the configuration file and apply it (an invalid file changes nothing).",
        discussion: "Settings that need no new worker process apply at once; devices whose worker must change are "
            + "rolled one at a time (and rolled back if the new revision fails). --wait returns when all of it is "
            + "done and exits 1 if it failed: what systemd's ExecReload= runs.")
    @OptionGroup var sockets: SocketOptions
    @Flag(help: "Return only when the reload is done (its rollout complete or rolled back).") var wait = false
    func run() throws {
        let client = sockets.connect(try sockets.paths().control, timeout: wait ? nil : .seconds(30))
        let frame: Frame
        do {
            frame = try client.control(ControlCommand(command: "reload", wait: wait))
        } catch {
            fail(CtlExit.unreachable, "npu-supervisorctl: \(error)")
        }
        if frame.type == .error {
            let e = frame.errorPayload
            fail(e.code == ErrorCode.permissionDenied ? CtlExit.noPermission : CtlExit.refused,
                 "npu-supervisorctl: \(e.message)")
        }
        out(try JSONCoding.decode(ControlResult.self, from: frame.payload).message)
    }
}

struct Rollout: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show or steer the rolling change: status (default), pause, resume, undo.")
    @OptionGroup var sockets: SocketOptions
    @Flag(help: "Print the rollout as JSON.") var json = false
    @Argument(help: "status, pause, resume or undo.") var action: String = "status"
    func run() throws {
        let payload = sockets.run(ControlCommand(command: "rollout", action: action))
        let status = try JSONCoding.decode(RolloutStatus.self, from: payload)
        if json { return out(try JSONCoding.encodeString(status, pretty: true)) }
        out(StatusTable.rolloutLine(status))
    }
}

struct Pid: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Print the supervisor's pid, or a device worker's.")
    @OptionGroup var sockets: SocketOptions
    @Argument(help: "A device (default: the supervisor itself).") var device: String?
    func run() throws {
        let payload = sockets.run(ControlCommand(command: "pid", devices: device.map { [$0] }))
        let result = try JSONCoding.decode(PidResult.self, from: payload)
        guard let pid = result.pid else { fail(CtlExit.refused, "npu-supervisorctl: device \(device ?? "") has no running worker") }
        out(String(pid))
    }
}

struct Tail: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Print a worker's recent stdout/stderr lines.")
    @OptionGroup var sockets: SocketOptions
    @Flag(name: .shortAndLong, help: "Keep printing new lines.") var follow = false
    @Option(name: [.customShort("n"), .long], help: "How many recent lines.") var lines: Int = 50
    @Argument(help: "The device.") var device: String

    func run() throws {
        let command = ControlCommand(command: "tail", devices: [device], follow: follow, lines: lines)
        guard follow else {
            let result = try JSONCoding.decode(TailResult.self, from: sockets.run(command))
            for line in result.lines { out(line) }
            // Not an error (exit 0), but an empty stdout alone would not say whether the device is silent.
            if result.lines.isEmpty && lines > 0 {
                _ = "npu-supervisorctl: device \(result.device) has no output kept yet\n".withCString { write(2, $0, strlen($0)) }
            }
            return
        }
        let client = sockets.connect(try sockets.paths().control, timeout: nil)
        var frame = try client.control(command)
        while true {
            switch frame.type {
            case .chunk: out(frame.payloadString)
            case .error:
                // The same line as without --follow (SocketOptions.run).
                let e = frame.errorPayload
                fail(CtlExit.refused, "npu-supervisorctl: tail refused: \(e.message) (\(e.code))")
            default: break
            }
            guard let next = try client.readFrame() else { return }
            frame = next
        }
    }
}

struct Health: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print the aggregated health; exit 0 ok, 1 degraded, 2 unavailable (for scripts and probes).")
    @OptionGroup var sockets: SocketOptions
    func run() throws {
        let doc = try JSONCoding.decode(StatusDocument.self, from: sockets.run(ControlCommand(command: "health")))
        // The reason already starts with the state when it is not ok ("degraded: 3/4 workers ready ...").
        out(doc.reason.hasPrefix(doc.state) ? doc.reason : "\(doc.state): \(doc.reason)")
        switch doc.state {
        case "ok": throw ExitCode(CtlExit.ok)
        case "degraded": throw ExitCode(CtlExit.refused)
        default: throw ExitCode(CtlExit.unavailable)
        }
    }
}

struct Infer: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Send one inference request through requests.sock and print the answer.",
        discussion: "Streamed chunks go to stderr as they arrive; the final response goes to stdout.")
    @OptionGroup var sockets: SocketOptions
    @Option(help: "Send to this device's worker only.") var device: String?
    @Option(help: "Deadline in milliseconds (default: the daemon's default_deadline).") var deadlineMs: Int?
    @Option(help: "Path of requests.sock (default: next to control.sock).") var requestsSocket: String?
    @Argument(help: "The payload, e.g. '{\"prompt\": \"Hi\", \"max_new_tokens\": 5}'.") var payload: String

    func run() throws {
        let path = try requestsSocket ?? sockets.paths().requests
        let client = sockets.connect(path, timeout: nil)
        var options: RequestOptions?
        if device != nil || deadlineMs != nil { options = RequestOptions(deadlineMS: deadlineMs, device: device) }
        let outcome: InferenceOutcome
        do {
            outcome = try client.infer(ByteBuffer(string: payload), options: options) { chunk in
                let text = String(buffer: chunk)
                _ = text.withCString { write(2, $0, strlen($0)) }
            }
        } catch {
            fail(CtlExit.unreachable, "npu-supervisorctl: \(error)")
        }
        switch outcome {
        case .response(let body): out(String(buffer: body))
        case .error(let e):
            fail(CtlExit.refused, "npu-supervisorctl: request failed: \(e.code): \(e.message)"
                + (e.retryable ? " (retryable)" : ""))
        }
    }
}

struct Shutdown: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Drain requests, stop every worker and exit the daemon.")
    @OptionGroup var sockets: SocketOptions
    func run() throws {
        let result = try JSONCoding.decode(ControlResult.self, from: sockets.run(ControlCommand(command: "shutdown")))
        out(result.message)
    }
}

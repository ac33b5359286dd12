import ArgumentParser
import Foundation
import NIOCore
import NPUClient
import WireProtocol

/// SIGKILL → the device answering a request again, for npu-supervisord (several configurations) and for other
/// supervisors running `npu-worker --listen SOCKET` (runit's runsv, supervisord), all at once and interleaved:
/// every cycle kills one worker of each target in turn (the order rotates), so noise from the rest of the machine
/// falls on every target alike. Each worker is killed only after it has served `--served-ms` (runit and s6 hold
/// back a service that died within a second of its start; npu-supervisord restarts at once one that served for
/// `backoff_reset_after`).
///
/// How "answering again" is seen:
/// - npu-supervisord: right after the kill, one request pinned to device 0 is sent on requests.sock; the time is
///   taken when its answer arrives (the supervisor holds it until the device serves again; an error answer, such
///   as `worker_lost` when it went to the dying worker, is sent again at once).
/// - a peer: the probe waits (inotify) for the worker's socket file to be created again, then connects until the
///   process that listens there (SO_PEERCRED) is not the victim and answers a request.
struct RestartPeers: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "restart-peers",
        abstract: "Kill → answering again: npu-supervisord vs other supervisors of npu-worker --listen, interleaved.",
        discussion: """
            --ours name=LABEL,cgroups=auto|off,pidfd=on|off[,bin=DIR]   an npu-supervisord with one device (repeatable)
            --peer name=LABEL,socket=PATH                                a worker kept by another supervisor (repeatable)
            """)

    @OptionGroup var bin: BinOption
    @Option(help: "npu-supervisord configuration (repeatable): name=LABEL,cgroups=auto|off,pidfd=on|off[,bin=DIR].")
    var ours: [String] = []
    @Option(help: "Worker under another supervisor (repeatable): name=LABEL,socket=PATH.") var peer: [String] = []
    @Option(help: "Kill cycles (each kills one worker of every target).") var cycles = 30
    @Option(help: "Each worker is killed only after serving this long (ms).") var servedMs = 1100
    @Option(help: "backoff_reset_after of the npu-supervisord targets (ms).") var resetAfterMs = 1000
    @Option(help: "Label of the target the ratios are taken against.") var reference: String?
    @Flag(help: "Also print every sample (one line per target).") var raw = false

    final class Target {
        let name: String
        var daemon: BenchDaemon?
        var client: SupervisorClient?
        var socket: String?
        var servingSince = now()
        var samples: [Double] = []
        var victim: pid_t = 0

        init(name: String) { self.name = name }
    }

    static func fields(_ spec: String) -> [String: String] {
        var out: [String: String] = [:]
        for part in spec.split(separator: ",") {
            let kv = part.split(separator: "=", maxSplits: 1).map(String.init)
            out[kv[0]] = kv.count > 1 ? kv[1] : ""
        }
        return out
    }

    func run() throws {
        var targets: [Target] = []
        defer { for t in targets { t.daemon?.stop() } }
        let defaults = "backoff_initial = \"10ms\"\nbackoff_max = \"10ms\"\nbackoff_jitter = 0\n"
            + "restart_limit = 1000000\nrestart_window = \"1s\"\nbackoff_reset_after = \"\(resetAfterMs)ms\""
        for spec in ours {
            let f = Self.fields(spec)
            let t = Target(name: f["name"] ?? spec)
            var env: [String: String] = [:]
            if f["pidfd"] == "off" { env["NPU_SUPERVISOR_NO_PIDFD"] = "1" }
            t.daemon = try BenchDaemon(devices: 1, workerArgs: ["--load-ms", "0"], defaults: defaults,
                                       cgroups: f["cgroups"] ?? "auto", binDirectory: f["bin"] ?? bin.bin,
                                       environment: env, logLevel: "info")
            targets.append(t)
        }
        for spec in peer {
            let f = Self.fields(spec)
            guard let socket = f["socket"] else { throw ValidationError("--peer needs socket=PATH: \(spec)") }
            let t = Target(name: f["name"] ?? spec)
            t.socket = socket
            targets.append(t)
        }
        guard !targets.isEmpty else { throw ValidationError("give at least one --ours or --peer") }
        for t in targets {
            if let daemon = t.daemon {
                _ = try daemon.waitAllReady()
                t.client = try SupervisorClient(socketPath: daemon.requestsSocket, timeout: .seconds(30))
                guard try probeOurs(t, deadline: now() + 10) != nil else { throw BenchError("\(t.name): no answer") }
                let log = (try? String(contentsOfFile: daemon.directory + "/daemon.log", encoding: .utf8)) ?? ""
                let detection = log.split(separator: "\n").first { $0.contains("exit detection") } ?? "?"
                let cgroups = log.split(separator: "\n").first { $0.contains("memory cgroups") } ?? "?"
                print("# \(t.name): \(detection.suffix(60)) | \(cgroups.suffix(70))")
            } else {
                guard probePeer(t, victim: 0, deadline: now() + 10) != nil else {
                    throw BenchError("\(t.name): nothing answers on \(t.socket!)")
                }
            }
            t.servingSince = now()
        }
        for cycle in 0..<cycles {
            for k in 0..<targets.count {
                let t = targets[(cycle + k) % targets.count]
                let wait = t.servingSince + Double(servedMs) / 1000 - now()
                if wait > 0 { usleep(useconds_t(wait * 1e6)) }
                guard let victim = t.daemon != nil ? t.daemon?.status()?.workers[0].pid : peerPid(t) else {
                    throw BenchError("\(t.name): no worker pid")
                }
                let t0 = now()
                kill(victim, SIGKILL)
                let answered = t.daemon != nil ? try probeOurs(t, deadline: t0 + 30) : probePeer(t, victim: victim, deadline: t0 + 30)
                guard let answered else { throw BenchError("\(t.name): no answer within 30 s of the kill") }
                t.samples.append(answered - t0)
                t.servingSince = answered
            }
        }
        let reference = targets.first { $0.name == self.reference }.map { percentile($0.samples, 50) }
        print("SIGKILL -> answering again, \(cycles) kills per target, interleaved (each worker served \(servedMs) ms first):")
        print("| target | median | p90 | min | max |" + (reference != nil ? " median / \(self.reference!) |" : ""))
        print("|---|---|---|---|---|" + (reference != nil ? "---|" : ""))
        for t in targets {
            let m = percentile(t.samples, 50)
            var line = "| \(t.name) | \(ms(m)) | \(ms(percentile(t.samples, 90))) | \(ms(t.samples.min() ?? .nan)) | \(ms(t.samples.max() ?? .nan)) |"
            if let reference { line += String(format: " %.2f |", m / reference) }
            print(line)
        }
        if raw {
            for t in targets { print("raw \(t.name): " + t.samples.map { String(format: "%.2f", $0 * 1000) }.joined(separator: " ")) }
        }
    }

    /// Sends a request pinned to device 0 until one is answered; the time of that answer.
    func probeOurs(_ t: Target, deadline: Double) throws -> Double? {
        let client = t.client!
        let payload = ByteBuffer(string: "restart-probe")
        let options = RequestOptions(deadlineMS: 20_000, device: "0")
        while now() < deadline {
            let id = client.makeRequestID()
            try client.sendRequest(id: id, payload: payload, options: options)
            while let frame = try client.readFrame() {
                guard frame.requestID == id else { continue }
                if frame.type == .response { return now() }
                if frame.type == .error { break }
            }
        }
        return nil
    }

    /// The pid of the process listening on the peer's socket.
    func peerPid(_ t: Target) -> pid_t? {
        guard let fd = try? connectUnixSocket(path: t.socket!) else { return nil }
        defer { close(fd) }
        return peerCredentialsPid(fd)
    }

    /// Waits until a process other than `victim` listens on the peer's socket and answers; the time of the answer.
    /// The probe does not spin (on 2 CPUs a spinning probe would take CPU from the starting worker): it sleeps on
    /// inotify until the socket file is created again (the worker's bind), then connects; only in the short
    /// window between bind and listen, or while the killed process is still there, it retries every 0.1 ms.
    func probePeer(_ t: Target, victim: pid_t, deadline: Double) -> Double? {
        let payload = ByteBuffer(string: "restart-probe")
        let path = t.socket!
        let directory = (path as NSString).deletingLastPathComponent
        let inotify = inotify_init1(Int32(IN_CLOEXEC | IN_NONBLOCK))
        defer { if inotify >= 0 { close(inotify) } }
        if inotify >= 0 { _ = inotify_add_watch(inotify, directory, UInt32(IN_CREATE)) }
        var created = inotify < 0
        var buffer = [UInt8](repeating: 0, count: 4096)
        while now() < deadline {
            if let fd = try? connectUnixSocket(path: path) {
                defer { close(fd) }
                if let pid = peerCredentialsPid(fd), pid != victim {
                    let io = BlockingFrameIO(fd: fd)
                    do {
                        try io.write(Frame(type: .request, requestID: 1, payload: payload))
                        if let frame = try io.readFrame(), frame.type == .response { return now() }
                    } catch {}
                }
            }
            if created {
                usleep(100)
            } else {
                var pfd = pollfd(fd: inotify, events: Int16(POLLIN), revents: 0)
                _ = poll(&pfd, 1, 2)
                if read(inotify, &buffer, buffer.count) > 0 { created = true }
            }
        }
        return nil
    }
}

/// SO_PEERCRED: the pid of the process that listens on the other end of a connected Unix socket.
func peerCredentialsPid(_ fd: CInt) -> pid_t? {
    var cred: [Int32] = [0, 0, 0]  // struct ucred { pid_t pid; uid_t uid; gid_t gid; } (not in Swift's Glibc)
    var len = socklen_t(12)
    let rc = cred.withUnsafeMutableBytes { getsockopt(fd, SOL_SOCKET, SO_PEERCRED, $0.baseAddress, &len) }
    return rc == 0 ? cred[0] : nil
}

import ArgumentParser
import CSupport
import Glibc
import NIOCore
import WireProtocol
import WorkerKit

/// The reference worker: a simulated accelerator engine that speaks the supervisor protocol on fd 3, for
/// operators' drills and for the tests. Deterministic text, configurable model-load time and per-token delay,
/// and fault injection on request (see docs/PROTOCOL.md, "Reference worker").
@main
struct NPUWorker: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "npu-worker",
        abstract: "Reference inference worker with a simulated device and fault injection.",
        discussion: """
            Started by npu-supervisord with its channel on fd 3 (NPU_SUPERVISOR_FD). A request payload that is
            JSON ({"prompt": "Hi", "max_new_tokens": 5, "stream": false, "fault": "..."}) is generated from;
            any other payload is echoed back unchanged (for benchmarks).
            Faults: crash, abort, exit (exit_code), host_oom (memory_mb), device_oom, hang, sleep (sleep_ms),
            garbage, oversized, stop_heartbeat, empty, spawn_child, device_unhealthy, device_healthy.
            """)

    @Option(help: "Device id (default: NPU_DEVICE_ID).") var device: String?
    @Option(help: "Simulated model-load time before ready, in milliseconds.") var loadMs: Int = 0
    @Option(help: "Simulated time per generated token, in milliseconds.") var tokenMs: Int = 0
    @Option(help: "Model name reported in hello.") var model: String = "sim-llm-7b"
    @Option(help: "Exit with this code right after start (crash-loop and EX_CONFIG drills).") var exitAtStart: Int32?
    @Flag(help: "Never say ready (start_timeout drills).") var neverReady = false
    @Option(help: "Grace period on SIGTERM to finish requests in flight, in milliseconds.") var termGraceMs: Int = 5000
    @Option(help: "Benchmark baseline: echo frames on this Unix socket instead of serving a supervisor.")
    var listen: String?
    @Option(help: "Device health drill: while this file exists, its content is reported as a device fault in health frames.")
    var healthFile: String?
    @Flag(help: "Answer every request with empty text (inference-probe drills).") var emptyOutput = false
    @Flag(help: "Answer every request with a worker_error (a bad release: rollout gate drills).") var failRequests = false
    @Flag(help: "Once ready, write numbered lines to stdout as fast as it can (output flooding drills).")
    var floodOutput = false
    @Flag(help: "Ignore SIGTERM (stop_timeout drills: the supervisor must escalate to SIGKILL).") var ignoreSigterm = false
    @Option(help: "Tensor-parallel ranks (WORLD_SIZE > 1): how long the rendezvous of the group may take before this rank gives up (exit 1), in milliseconds. Keep it below the supervisor's start_timeout.")
    var rendezvousTimeoutMs: Int = 60_000

    func run() throws {
        if let listen { ListenMode.serve(path: listen) }
        // SIGTERM is handled by a thread of its own with sigwait: block it before any thread exists.
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, SIGTERM)
        pthread_sigmask(SIG_BLOCK, &set, nil)
        signal(SIGPIPE, SIG_IGN)

        let connection: WorkerConnection
        do {
            connection = try WorkerConnection.fromEnvironment()
        } catch {
            printErr("npu-worker: \(error)")
            throw ExitCode(78)
        }
        let device = self.device ?? connection.device
        if let code = exitAtStart {
            printErr("npu-worker[\(device)]: exiting at start with code \(code) as asked")
            throw ExitCode(code)
        }
        // Tensor-parallel rank (WORLD_SIZE > 1): inconsistent variables are a configuration error, found before
        // anything else happens (78: restarting would not fix them).
        let rankConfig: RankConfig?
        do {
            rankConfig = try RankConfig.fromEnvironment()
        } catch {
            printErr("npu-worker[\(device)]: \(error)")
            throw ExitCode(78)
        }
        guard rendezvousTimeoutMs > 0 else {
            printErr("npu-worker[\(device)]: --rendezvous-timeout-ms must be at least 1")
            throw ExitCode(78)
        }
        let hello = try connection.awaitHello()
        try connection.hello(workerVersion: "npu-worker 0.1.0", model: model)
        let interval = Duration.milliseconds(hello?.heartbeatIntervalMS ?? 1000)
        let healthFile = self.healthFile
        connection.startHeartbeats(every: interval) {
            if DeviceFault.isSet { return "simulated device fault (fault injection)" }
            guard let healthFile, let text = try? readSmallFile(healthFile) else { return nil }
            return text.isEmpty ? "device fault (\(healthFile))" : text
        }
        let grace = termGraceMs
        let termSet = set
        let ignoreTerm = ignoreSigterm
        Thread.detach {
            var waitSet = termSet
            var sig: Int32 = 0
            sigwait(&waitSet, &sig)
            while ignoreTerm {
                printErr("npu-worker[\(device)]: SIGTERM ignored, as asked")
                sigwait(&waitSet, &sig)
            }
            printErr("npu-worker[\(device)]: SIGTERM; finishing \(connection.inflightCount) request(s)")
            var waited = 0
            while connection.inflightCount > 0 && waited < grace {
                sleepFor(.milliseconds(10))
                waited += 10
            }
            Glibc.exit(0)
        }
        printErr("npu-worker[\(device)]: pid \(getpid()) loading model \(model) (\(loadMs) ms)")
        if loadMs > 0 { sleepFor(.milliseconds(loadMs)) }
        // A rank says ready only once its whole group has formed: before that it could not run one forward pass.
        var group: RankGroup?
        if let rankConfig {
            do {
                group = try RankGroup.rendezvous(rankConfig, timeout: .milliseconds(rendezvousTimeoutMs))
            } catch {
                printErr("\(error)")
                Glibc.exit(1)
            }
        }
        if neverReady {
            printErr("npu-worker[\(device)]: never saying ready, as asked")
        } else {
            try connection.ready()
            printErr("npu-worker[\(device)]: ready")
        }
        if floodOutput {
            Thread.detach {
                // ~100-byte numbered lines, 64 KiB per write, forever.
                var n = 0
                let pad = String(repeating: "x", count: 64)
                while true {
                    var chunk = ""
                    chunk.reserveCapacity(70_000)
                    while chunk.utf8.count < 65_536 {
                        chunk += "npu-worker[\(device)]: flood line \(n) \(pad)\n"
                        n += 1
                    }
                    let ok = chunk.withCString { p -> Bool in
                        var off = 0
                        let len = strlen(p)
                        while off < len {
                            let w = write(1, p + off, len - off)
                            if w <= 0 { return false }
                            off += w
                        }
                        return true
                    }
                    if !ok { return }
                }
            }
        }
        let engine = Engine(device: device, tokenDelay: .milliseconds(tokenMs), connection: connection,
                            emptyOutput: emptyOutput, failRequests: failRequests, group: group)
        do {
            try connection.serve { request in engine.handle(request) }
        } catch {
            printErr("npu-worker[\(device)]: channel error: \(error)")
            Glibc.exit(1)
        }
        // EOF on fd 3: the supervisor is gone. Leave now so the device is freed.
        printErr("npu-worker[\(device)]: supervisor channel closed; exiting")
        Glibc.exit(0)
    }
}

func printErr(_ message: String) {
    let line = message + "\n"
    _ = line.withCString { write(2, $0, strlen($0)) }
}

/// A simulated device fault set by the `device_unhealthy` fault (and cleared by `device_healthy`).
enum DeviceFault {
    nonisolated(unsafe) static var isSet = false
}

func readSmallFile(_ path: String) throws -> String {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw FileMissing() }
    defer { close(fd) }
    var buffer = [UInt8](repeating: 0, count: 4096)
    let n = read(fd, &buffer, buffer.count)
    let text = String(decoding: buffer[0..<max(0, n)], as: UTF8.self)
    return text.split(separator: "\n").first.map(String.init) ?? ""
}

struct FileMissing: Error {}

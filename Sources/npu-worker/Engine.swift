import CSupport
import Glibc
import NIOCore
import WireProtocol
import WorkerKit

/// What a request to the reference worker may ask for.
struct InferenceRequest: Codable {
    var prompt: String?
    var maxNewTokens: Int?
    var stream: Bool?
    var fault: String?
    var exitCode: Int32?
    var sleepMs: Int?
    var memoryMb: Int?

    enum CodingKeys: String, CodingKey {
        case prompt, stream, fault
        case maxNewTokens = "max_new_tokens"
        case exitCode = "exit_code"
        case sleepMs = "sleep_ms"
        case memoryMb = "memory_mb"
    }
}

struct InferenceResponse: Codable {
    var text: String
    var tokens: Int
    var device: String
    var pid: Int32
}

/// The simulated device: deterministic tokens from the prompt, a delay per token, and the faults.
final class Engine: Sendable {
    let device: String
    let tokenDelay: Duration
    let connection: WorkerConnection
    let emptyOutput: Bool
    /// Answer every request with an error (a bad release, for rollout drills).
    let failRequests: Bool
    /// Set in a tensor-parallel group: the leader runs a collective with every rank per request and per token;
    /// a follower refuses requests (the supervisor sends them to rank 0 only).
    let group: RankGroup?

    static let vocabulary = [
        "the", "model", "answers", "quickly", "on", "device", "npu", "tokens", "flow", "steadily", "and",
        "serving", "stays", "up", "while", "workers", "restart", "hello", "world", "ascend",
    ]

    init(device: String, tokenDelay: Duration, connection: WorkerConnection, emptyOutput: Bool,
         failRequests: Bool = false, group: RankGroup? = nil) {
        self.failRequests = failRequests
        self.group = group
        self.device = device
        self.tokenDelay = tokenDelay
        self.connection = connection
        self.emptyOutput = emptyOutput
    }

    /// Deterministic: the same prompt gives the same tokens on every device and every run.
    static func generate(prompt: String, count: Int) -> [String] {
        var hash: UInt64 = 1469598103934665603
        for byte in prompt.utf8 { hash = (hash ^ UInt64(byte)) &* 1099511628211 }
        return (0..<count).map { i in
            hash = hash &* 6364136223846793005 &+ 1442695040888963407 &+ UInt64(i)
            return vocabulary[Int((hash >> 33) % UInt64(vocabulary.count))]
        }
    }

    func handle(_ request: WorkerRequest) {
        if let group, !group.config.isLeader {
            request.fail(code: ErrorCode.workerError,
                         message: "rank \(group.config.rank) of group \(group.config.group) is a follower: only rank 0 serves requests")
            return
        }
        if failRequests {
            request.fail(code: ErrorCode.workerError, message: "npu-worker --fail-requests: failing every request")
            return
        }
        // Not JSON: echo (the benchmark path, answered inline on the reading thread).
        guard request.payload.readableBytes > 0, request.payload.getInteger(at: request.payload.readerIndex,
                                                                              as: UInt8.self) == UInt8(ascii: "{")
        else {
            if let group {
                // Even an echo is a step of the group's work: off the reading thread, since a stalled rank
                // blocks it (cancels must still be read).
                Thread.detach {
                    group.collective(requestID: request.id, step: 0)
                    request.respond(request.payload)
                }
                return
            }
            request.respond(request.payload)
            return
        }
        guard let parsed = try? JSONCoding.decode(InferenceRequest.self, from: request.payload) else {
            request.fail(code: ErrorCode.badRequest, message: "payload is not a valid inference request")
            return
        }
        // Faults that must strike at once, before anything else runs.
        switch parsed.fault {
        case "crash":
            npu_crash_segv()
        case "abort":
            abort()
        case "exit":
            exit(parsed.exitCode ?? 1)
        case "close_channel":
            // Close fd 3 and keep running (heart-beating into nothing): the supervisor must kill it as a protocol
            // violation, the same way every time.
            shutdown(connection.io.fd, Int32(SHUT_RDWR))
            while true { sleep(3600) }
        case "stop_reading":
            // Block the reading thread for good: heartbeats go on (their own thread), nothing more is read.
            while true { sleep(3600) }
        case "garbage":
            var junk = ByteBuffer()
            junk.writeInteger(UInt32(12))
            junk.writeBytes([0xEE, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0x42, 0x42])
            junk.writeString("this is not a frame at all")
            try? connection.io.writeRaw(junk)
            return
        case "oversized":
            var junk = ByteBuffer()
            junk.writeInteger(UInt32.max)
            try? connection.io.writeRaw(junk)
            return
        case "stop_heartbeat":
            connection.stopHeartbeats()
        case "device_unhealthy":
            DeviceFault.isSet = true
        case "device_healthy":
            DeviceFault.isSet = false
        case "hang":
            connection.stopHeartbeats()
            // Wedge the reading thread too: nothing is answered any more.
            while true { sleepFor(.seconds(3600)) }
        default:
            break
        }
        Thread.detach { self.run(parsed, request) }
    }

    func run(_ parsed: InferenceRequest, _ request: WorkerRequest) {
        switch parsed.fault {
        case "device_oom":
            let message = "NPU out of memory. Tried to allocate 2.00 GiB (NPU \(device); 30.00 GiB total capacity)"
            request.fail(code: ErrorCode.deviceOOM, message: message)
            connection.reportError(code: ErrorCode.deviceOOM, message: message)
            printErr("RuntimeError: \(message)")
            exit(1)
        case "host_oom":
            // Touch memory page by page until the kernel's OOM killer (or the cgroup limit) stops us.
            let limit = (parsed.memoryMb ?? Int.max / (1 << 20))
            var blocks: [UnsafeMutableRawPointer] = []
            for _ in 0..<limit {
                guard let block = malloc(1 << 20) else { break }
                memset(block, 0x5A, 1 << 20)
                blocks.append(block)
            }
            request.fail(code: ErrorCode.workerError, message: "allocated \(blocks.count) MiB without being killed")
            return
        case "sleep":
            sleepFor(.milliseconds(parsed.sleepMs ?? 1000))
        case "spawn_child":
            // A helper process in the worker's group that outlives nothing: it must die with the worker.
            var pid: pid_t = 0
            let argv = ["/bin/sleep", "3600"]
            var cArgs: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
            posix_spawn(&pid, "/bin/sleep", nil, nil, &cArgs, nil)
            for p in cArgs { free(p) }
            request.respond(ByteBuffer(string: "{\"child_pid\": \(pid)}"))
            return
        case "spawn_escaped":
            // A helper that escapes the worker's process group and session (double fork + setsid), as some
            // tokenizer servers and data loaders do: only a subreaper (or a cgroup) can still catch it.
            var pid: pid_t = 0
            let argv = ["/bin/sh", "-c", "setsid /bin/sleep 3600 </dev/null >/dev/null 2>&1 & echo $!"]
            var cArgs: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
            var out: [Int32] = [-1, -1]
            _ = pipe(&out)
            var actions = posix_spawn_file_actions_t()
            posix_spawn_file_actions_init(&actions)
            posix_spawn_file_actions_adddup2(&actions, out[1], 1)
            posix_spawn(&pid, "/bin/sh", &actions, nil, &cArgs, npu_environ())  // it inherits the worker's environment
            posix_spawn_file_actions_destroy(&actions)
            close(out[1])
            for p in cArgs { free(p) }
            var buffer = [UInt8](repeating: 0, count: 32)
            let n = read(out[0], &buffer, buffer.count)
            close(out[0])
            var status: Int32 = 0
            waitpid(pid, &status, 0)  // the shell exits at once: its child is an orphan now
            let escaped = String(decoding: buffer.prefix(max(0, n)), as: UTF8.self).filter(\.isNumber)
            request.respond(ByteBuffer(string: "{\"escaped_pid\": \(escaped)}"))
            return
        default:
            break
        }
        // Prefill: every rank takes part before the first token (a stopped rank stalls the request here).
        group?.collective(requestID: request.id, step: 0)
        let count = max(0, min(parsed.maxNewTokens ?? 16, 4096))
        let tokens = parsed.fault == "empty" || emptyOutput ? [] : Self.generate(prompt: parsed.prompt ?? "", count: count)
        var text = ""
        for (i, token) in tokens.enumerated() {
            if request.isCancelled {
                request.fail(code: ErrorCode.cancelled, message: "cancelled")
                return
            }
            if tokenDelay > .zero { sleepFor(tokenDelay) }
            // One decode step: in a real tensor-parallel engine, all-reduces across the ranks.
            group?.collective(requestID: request.id, step: UInt32(truncatingIfNeeded: i + 1))
            let piece = (i == 0 ? "" : " ") + token
            text += piece
            if parsed.stream == true { request.chunk(ByteBuffer(string: piece)) }
        }
        let response = InferenceResponse(text: text, tokens: tokens.count, device: device, pid: getpid())
        do {
            request.respond(try JSONCoding.encode(response))
        } catch {
            request.fail(code: ErrorCode.workerError, message: "answer unencodable: \(error)")
        }
    }
}

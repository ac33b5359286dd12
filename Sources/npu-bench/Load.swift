import ArgumentParser
import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NPUClient
import WireProtocol

/// Load generator and chaos drill: closed-loop clients with a fixed number of requests in flight each.
struct Load: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "load",
        abstract: "Closed-loop load on a frame socket; optional chaos (SIGKILL a random worker every T seconds).",
        discussion: """
            Reports requests sent, answered ok, answered with each error code, never answered (must be 0),
            throughput and latency percentiles. --socket may be given several times (connections are spread
            over them round-robin: the direct-to-worker baseline).
            """)

    @Option(help: "Frame socket(s) to send to (requests.sock, a proxy, or workers' own sockets).") var socket: [String]
    @Option(help: "Concurrent client connections.") var clients = 8
    @Option(help: "Requests kept in flight per connection (pipelining depth).") var depth = 1
    @Option(help: "Payload size in bytes (echo payload) when --json is not given.") var size = 64
    @Option(help: "Send this JSON payload instead of an echo payload (e.g. a reference-worker request).") var json: String?
    @Option(help: "Seconds to run.") var duration: Double = 5
    @Option(help: "Per-request deadline in ms (request options); none by default.") var deadlineMs: Int?
    @Option(help: "Chaos: SIGKILL a random worker every this many seconds (needs --status).") var killEvery: Double?
    @Option(help: "status.sock, to find worker pids for --kill-every and the supervisor pid for --rss.") var status: String?
    @Flag(help: "Print one line of JSON instead of text.") var machine = false

    func run() throws {
        let payload: ByteBuffer = json.map { ByteBuffer(string: $0) } ?? ByteBuffer(repeating: UInt8(ascii: "x"), count: size)
        let stats = LoadStats()
        let stopAt = now() + duration
        let group = DispatchGroup()
        let sockets = socket
        let depth = self.depth
        let deadline = deadlineMs
        for c in 0..<clients {
            group.enter()
            Thread.detachNewThread {
                defer { group.leave() }
                do {
                    let client = try SupervisorClient(socketPath: sockets[c % sockets.count], timeout: .seconds(120))
                    var sentAt: [UInt64: Double] = [:]
                    let options = deadline.map { RequestOptions(deadlineMS: $0) }
                    func send() throws {
                        let id = client.makeRequestID()
                        sentAt[id] = now()
                        try client.sendRequest(id: id, payload: payload, options: options)
                        stats.sent()
                    }
                    for _ in 0..<depth { try send() }
                    while !sentAt.isEmpty {
                        guard let frame = try client.readFrame() else {
                            stats.lost(sentAt.count, why: "connection closed")
                            return
                        }
                        switch frame.type {
                        case .chunk: continue
                        case .response:
                            guard let t = sentAt.removeValue(forKey: frame.requestID) else { continue }
                            stats.ok(latency: now() - t)
                        case .error:
                            if frame.requestID == 0 {
                                stats.lost(sentAt.count, why: frame.errorPayload.code)
                                return
                            }
                            guard sentAt.removeValue(forKey: frame.requestID) != nil else { continue }
                            stats.error(frame.errorPayload.code)
                        default: continue
                        }
                        if now() < stopAt { try send() }
                    }
                } catch {
                    stats.failure("\(error)")
                }
            }
        }
        var kills = 0
        var rssSamples: [Int] = []
        if let status {
            var nextKill = killEvery.map { now() + $0 }
            while group.wait(timeout: .now() + 0.05) == .timedOut {
                if let doc = readStatus(status) {
                    rssSamples.append(Memory(pid: doc.supervisor.pid).rssKB)
                    if let due = nextKill, now() >= due, now() < stopAt {
                        let pids = doc.workers.compactMap(\.pid)
                        if let victim = pids.randomElement() {
                            kill(victim, SIGKILL)
                            kills += 1
                        }
                        nextKill = due + (killEvery ?? 1)
                    }
                }
            }
        } else {
            group.wait()
        }
        stats.report(kills: kills, rssKB: rssSamples, clients: clients, depth: depth,
                     size: json == nil ? size : payload.readableBytes, duration: duration, machine: machine)
        if stats.neverAnswered > 0 || !stats.failures.isEmpty { throw ExitCode(1) }
    }
}

func readStatus(_ path: String) -> StatusDocument? { try? readStatusDocument(path: path) }

/// What the load generator's client threads count.
final class LoadStats: Sendable {
    private struct Counts {
        var sent = 0
        var ok = 0
        var errors: [String: Int] = [:]
        var neverAnswered = 0
        var failures: [String] = []
        var latencies: [Double] = []
    }

    private let counts = NIOLockedValueBox(Counts())

    var neverAnswered: Int { counts.withLockedValue { $0.neverAnswered } }
    var failures: [String] { counts.withLockedValue { $0.failures } }

    func sent() { counts.withLockedValue { $0.sent += 1 } }
    func ok(latency: Double) { counts.withLockedValue { $0.ok += 1; $0.latencies.append(latency) } }
    func error(_ code: String) { counts.withLockedValue { $0.errors[code, default: 0] += 1 } }
    func lost(_ n: Int, why: String) { counts.withLockedValue { $0.neverAnswered += n; $0.failures.append(why) } }
    func failure(_ why: String) { counts.withLockedValue { $0.failures.append(why) } }

    func report(kills: Int, rssKB: [Int], clients: Int, depth: Int, size: Int, duration: Double, machine: Bool) {
        let c = counts.withLockedValue { $0 }
        let (sentCount, okCount, errors, failures, latencies) = (c.sent, c.ok, c.errors, c.failures, c.latencies)
        do {
            let answered = okCount + errors.values.reduce(0, +)
            let unanswered = sentCount - answered
            let rps = Double(okCount) / duration
            let p50 = percentile(latencies, 50), p99 = percentile(latencies, 99)
            let rss = rssKB.isEmpty ? "" : String(format: ", supervisor RSS %.1f..%.1f MB", Double(rssKB.min()!) / 1024,
                                                  Double(rssKB.max()!) / 1024)
            if machine {
                let errs = errors.sorted { $0.key < $1.key }.map { "\"\($0.key)\": \($0.value)" }.joined(separator: ", ")
                print("{\"clients\": \(clients), \"depth\": \(depth), \"size\": \(size), \"sent\": \(sentCount), "
                    + "\"ok\": \(okCount), \"errors\": {\(errs)}, \"never_answered\": \(unanswered), "
                    + String(format: "\"rps\": %.0f, \"p50_ms\": %.3f, \"p99_ms\": %.3f, ", rps, p50 * 1000, p99 * 1000)
                    + "\"kills\": \(kills), \"rss_max_kb\": \(rssKB.max() ?? 0)}")
                return
            }
            print("clients \(clients) x depth \(depth), payload \(size) B, \(duration) s, workers killed: \(kills)\(rss)")
            print("  sent \(sentCount), ok \(okCount), errors \(errors.isEmpty ? "none" : errors.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")), never answered \(unanswered)")
            print(String(format: "  throughput %.0f req/s, latency p50 %.3f ms, p90 %.3f ms, p99 %.3f ms, max %.3f ms", rps,
                         p50 * 1000, percentile(latencies, 90) * 1000, p99 * 1000, (latencies.max() ?? 0) * 1000))
            if !failures.isEmpty { print("  failures: \(Set(failures).sorted().joined(separator: "; "))") }
        }
    }
}

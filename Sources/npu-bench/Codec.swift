import ArgumentParser
import Foundation
import NIOCore
import WireProtocol

/// The protocol's JSON coder (WireProtocol's own, JSON.swift) beside Foundation's JSONEncoder/JSONDecoder, in one
/// process: the status document (what status.sock, `/health` and `npu-supervisorctl status` carry) and an error
/// payload (every refused request's answer). Medians of ROUNDS rounds, the two alternated in each.
struct Codec: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "codec", abstract: "JSON encode/decode cost: the protocol's coder vs Foundation's.")
    @Option(help: "Workers in the status document.") var workers = 8
    @Option(help: "Operations per round.") var iterations = 20_000
    @Option(help: "Rounds (the figure is the median).") var rounds = 5

    func run() throws {
        let document = Self.statusDocument(workers: workers)
        let error = ErrorPayload(code: ErrorCode.overloaded, message: "queue is full (1024 waiting); try again later",
                                 retryable: true)
        let foundationEncoder = JSONEncoder()
        foundationEncoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        let documentText = try JSONCoding.encode(document)
        let documentData = Data(documentText.readableBytesView)
        guard try foundationEncoder.encode(document) == documentData else {
            throw BenchError("the two coders wrote different bytes for the status document")
        }
        print("status document: \(workers) workers, \(documentText.readableBytes) bytes; \(iterations) operations per round, median of \(rounds) rounds")
        let cases: [(String, () throws -> Void, () throws -> Void)] = [
            ("encode status document",
             { _ = try JSONCoding.encode(document) },
             { _ = try foundationEncoder.encode(document) }),
            ("decode status document",
             { _ = try JSONCoding.decode(StatusDocument.self, from: documentText) },
             { _ = try JSONDecoder().decode(StatusDocument.self, from: documentData) }),
            ("encode error payload",
             { _ = try JSONCoding.encode(error) },
             { _ = try foundationEncoder.encode(error) }),
        ]
        print("case                          ours µs/op   Foundation µs/op   ours/Foundation")
        for (name, ours, theirs) in cases {
            var a: [Double] = []
            var b: [Double] = []
            for _ in 0..<rounds {
                a.append(try time(ours))
                b.append(try time(theirs))
            }
            let ma = median(a), mb = median(b)
            print(name.padding(toLength: 30, withPad: " ", startingAt: 0)
                  + String(format: "%10.2f   %16.2f   %15.2f", ma, mb, ma / mb))
        }
    }

    private func time(_ body: () throws -> Void) throws -> Double {
        let start = DispatchTime.now().uptimeNanoseconds
        for _ in 0..<iterations { try body() }
        return Double(DispatchTime.now().uptimeNanoseconds - start) / 1000 / Double(iterations)
    }

    private func median(_ values: [Double]) -> Double { values.sorted()[values.count / 2] }

    static func statusDocument(workers: Int) -> StatusDocument {
        let health = WorkerHealthLevels(alive: "ok", device: "ok", model: "ok", inference: "ok", inRotation: true)
        var list: [WorkerStatus] = []
        for i in 0..<workers {
            let killed = i % 2 == 1
            let exits: [String: Int] = killed ? ["signaled": 1] : [:]
            let uptime = 3600.25 + Double(i)
            list.append(WorkerStatus(
                device: String(i), kind: "npu", state: "ready", desired: "up", pid: Int32(1000 + i), restarts: i,
                lastExit: killed ? "signaled(9)" : nil, lastExitDetail: nil, uptimeSeconds: uptime,
                inflight: 3, maxInflight: 16, exits: exits, nextRestartInSeconds: nil, health: health, fallback: false,
                memoryBytes: 1 << 30, memoryLimitBytes: nil, revision: "a1b2c3d4e5f6", generation: 1, drain: "no"))
        }
        let span = AvailabilitySpan(seconds: 3600, received: 1_000_000, accepted: 999_000, refused: 1000,
                                    answered: 999_000, abandoned: 0, succeeded: 998_900, failed: ["overloaded": 1000],
                                    availability: 0.9999, errorBudgetRemaining: 0.5,
                                    capacityLostSeconds: ["1": ["down": 0.5]], capacityAvailability: 0.99999)
        return StatusDocument(
            state: "ok", reason: "\(workers)/\(workers) workers ready",
            supervisor: SupervisorInfo(pid: 1, version: "0.1.0", uptimeSeconds: 3600, config: "/etc/npu-supervisor/config.toml",
                                       http: "127.0.0.1:8087"),
            queueDepth: 0, fallbackActive: false, workers: list,
            rollout: RolloutStatus(state: "idle", kind: nil, devices: [], progress: "0/0", canary: nil, reason: nil),
            availability: AvailabilityStatus(objective: 0.9999, windowSeconds: 300, sinceStart: span, window: span),
            groups: [])
    }
}

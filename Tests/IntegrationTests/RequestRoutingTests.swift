import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NPUClient
import TestSupport
import Testing
import WireProtocol

@Suite(.serialized, .timeLimit(.minutes(2)))
struct RequestRoutingTests {
    @Test func concurrentClientsAllGetCorrectAnswers() throws {
        let daemon = try TestDaemon()
        #expect(daemon.waitAllReady() != nil)
        let clients = 8, perClient = 25
        let results = ResultsBox()
        let socket = daemon.requestsSocket
        DispatchQueue.concurrentPerform(iterations: clients) { c in
            do {
                let client = try SupervisorClient(socketPath: socket, timeout: .seconds(30))
                // Pipeline everything, then read: many requests in flight on one connection.
                var expected: [UInt64: Int] = [:]
                for i in 0..<perClient {
                    let id = client.makeRequestID()
                    let tokens = 1 + (i % 7)
                    expected[id] = tokens
                    try client.sendRequest(id: id, payload: payload(
                        "{\"prompt\": \"client \(c) request \(i % 3)\", \"max_new_tokens\": \(tokens)}"))
                }
                while !expected.isEmpty, let frame = try client.readFrame() {
                    guard let tokens = expected.removeValue(forKey: frame.requestID) else {
                        results.add(error: "unexpected id \(frame.requestID)")
                        continue
                    }
                    guard frame.type == .response,
                          let answer = try? JSONDecoder().decode(WorkerAnswer.self, from: Data(frame.payload.readableBytesView))
                    else {
                        results.add(error: "request \(frame.requestID): \(frame.type) \(frame.payloadString)")
                        continue
                    }
                    results.add(answer: answer, key: "\(c)-\(tokens)", tokens: tokens)
                }
                if !expected.isEmpty { results.add(error: "\(expected.count) unanswered") }
            } catch {
                results.add(error: "\(error)")
            }
        }
        #expect(results.errors == [])
        #expect(results.count == clients * perClient)
        #expect(results.devices.count == 4, "load is spread over every worker")
        #expect(daemon.terminate() == 0)
    }

    @Test func workerKilledMidRequestIsRetriedElsewhere() throws {
        let daemon = try TestDaemon(devices: ["0", "1", "2", "3"])
        let doc = try #require(daemon.waitAllReady())
        let client = try daemon.client()
        var ids: [UInt64] = []
        for _ in 0..<8 {
            let id = client.makeRequestID()
            ids.append(id)
            try client.sendRequest(id: id, payload: payload("{\"prompt\": \"slow\", \"fault\": \"sleep\", \"sleep_ms\": 600}"))
        }
        // Wait until device 0 holds requests, then kill it.
        #expect(eventually { (daemon.worker("0")?.inflight ?? 0) > 0 })
        let victim = try #require(doc.workers[0].pid)
        kill(victim, SIGKILL)
        var answers: [UInt64: Frame] = [:]
        while answers.count < ids.count, let frame = try client.readFrame() { answers[frame.requestID] = frame }
        #expect(Set(answers.keys) == Set(ids), "every request got exactly one final answer")
        for frame in answers.values {
            #expect(frame.type == .response, "\(frame.payloadString)")
            if let answer = try? JSONDecoder().decode(WorkerAnswer.self, from: Data(frame.payload.readableBytesView)) {
                #expect(answer.pid != victim)
            }
        }
        #expect(daemon.log.contains("re-dispatching"))
        #expect(daemon.terminate() == 0)
    }

    /// A retry goes out in the turn that learned of the death, not with the other worker's next heartbeat.
    @Test func aRetryIsSentAtOnce() throws {
        let daemon = try TestDaemon(devices: ["0", "1"], defaults: "heartbeat_interval = \"10s\"\nheartbeat_timeout = \"30s\"")
        #expect(daemon.waitAllReady() != nil)
        let client = try daemon.client()
        try client.sendRequest(id: 1, payload: payload("{\"prompt\": \"r\", \"fault\": \"sleep\", \"sleep_ms\": 300}"))
        #expect(eventually { daemon.status()?.workers.map(\.inflight).reduce(0, +) == 1 })
        let holder = try #require(daemon.status()?.workers.first { $0.inflight == 1 })
        let victim = try #require(holder.pid)
        let killed = ContinuousClock.now
        kill(victim, SIGKILL)
        let frame = try #require(try client.readFrame())
        let waited = ContinuousClock.now - killed
        #expect(frame.type == .response, "\(frame.payloadString)")
        // The retry sleeps 300 ms on the other worker; a retry left unflushed waited for a heartbeat (10 s).
        #expect(waited < .seconds(3), "answered \(waited) after the kill")
        #expect(daemon.terminate() == 0)
    }

    @Test func retriesExhaustedGiveWorkerLost() throws {
        // A request that kills every worker it touches: with retries = 1 it is tried twice, then worker_lost
        // (after the second crash it is also a poison suspect, which says so).
        let daemon = try TestDaemon(devices: ["0", "1"])
        #expect(daemon.waitAllReady() != nil)
        let client = try daemon.client()
        let outcome = try client.infer(payload("{\"prompt\": \"x\", \"fault\": \"crash\"}"))
        guard case .error(let e) = outcome else {
            Issue.record("expected worker_lost, got \(outcome)")
            return
        }
        #expect(e.code == "worker_lost")
        #expect(e.message.contains("in flight on 2 workers that crashed"), "\(e.message)")
        #expect(eventually { daemon.status()?.workers.allSatisfy { $0.lastExit == "signaled(11)" } ?? false })
        #expect(daemon.terminate() == 0)
    }

    @Test func streamedChunksArriveInOrderBeforeTheResponse() throws {
        let daemon = try TestDaemon(devices: ["0"])
        #expect(daemon.waitAllReady() != nil)
        let client = try daemon.client()
        var chunks: [String] = []
        let outcome = try client.infer(payload("{\"prompt\": \"stream me\", \"max_new_tokens\": 12, \"stream\": true}")) {
            chunks.append(String(buffer: $0))
        }
        let answer = try #require(decodeAnswer(outcome))
        #expect(chunks.count == 12)
        #expect(chunks.joined() == answer.text)
        #expect(daemon.terminate() == 0)
    }

    /// Six requests in one write are one burst: spread over both workers by default, on one worker with
    /// `burst_affinity` (the worker says which device answered).
    @Test(arguments: [(0, 2), (8, 1)])
    func aBurstIsSpreadOrKeptTogetherAsConfigured(affinity: Int, devicesUsed: Int) throws {
        let daemon = try TestDaemon(devices: ["0", "1"], defaults: "max_inflight = 16",
                                    extra: "[requests]\nburst_affinity = \(affinity)")
        #expect(daemon.waitAllReady() != nil)
        let devices = try Self.devicesAnsweringABurst(try daemon.client())
        #expect(devices.count == devicesUsed, "answered by \(devices)")
        if affinity == 0 { #expect(devices.values.sorted() == [3, 3], "least loaded, in turn: \(devices)") }
        #expect(daemon.terminate() == 0)
    }

    /// A reload changes `burst_affinity` in place: the same connection's next burst follows the new value.
    @Test func aReloadTurnsBurstAffinityOn() throws {
        let daemon = try TestDaemon(devices: ["0", "1"], defaults: "max_inflight = 16",
                                    extra: "[requests]\nburst_affinity = 0")
        let before = try #require(daemon.waitAllReady())
        let client = try daemon.client()
        #expect(try Self.devicesAnsweringABurst(client).count == 2)
        let config = try String(contentsOfFile: daemon.configPath, encoding: .utf8)
        try config.replacingOccurrences(of: "burst_affinity = 0", with: "burst_affinity = 8")
            .write(toFile: daemon.configPath, atomically: true, encoding: .utf8)
        let reload = try daemon.ctl(["reload", "--wait"])
        #expect(reload.status == 0, "\(reload.stdout) \(reload.stderr)")
        #expect(try Self.devicesAnsweringABurst(client).count == 1)
        #expect(daemon.status()?.workers.map(\.pid) == before.workers.map(\.pid), "no worker was restarted")
        #expect(daemon.terminate() == 0)
    }

    /// Sends six requests in one write and counts the answers by the device that gave them.
    static func devicesAnsweringABurst(_ client: SupervisorClient) throws -> [String: Int] {
        var burst = ByteBuffer()
        var ids: Set<UInt64> = []
        for _ in 0..<6 {
            let id = client.makeRequestID()
            ids.insert(id)
            Frame(type: .request, requestID: id, payload: payload("{\"prompt\": \"b\", \"max_new_tokens\": 2}"))
                .write(to: &burst)
        }
        try client.io.writeRaw(burst)
        var devices: [String: Int] = [:]
        while !ids.isEmpty {
            let frame = try #require(try client.readFrame(), "the connection closed with \(ids.count) unanswered")
            if frame.type == .chunk { continue }
            #expect(frame.type == .response, "\(frame.type) \(frame.payloadString)")
            ids.remove(frame.requestID)
            let answer = try JSONDecoder().decode(WorkerAnswer.self, from: Data(frame.payload.readableBytesView))
            devices[answer.device, default: 0] += 1
        }
        return devices
    }

    @Test func pinnedDeviceAndUnknownDevice() throws {
        let daemon = try TestDaemon(devices: ["0", "1"])
        let doc = try #require(daemon.waitAllReady())
        let client = try daemon.client()
        for _ in 0..<4 {
            let answer = try #require(decodeAnswer(try client.infer(payload("{\"prompt\": \"p\"}"),
                                                                   options: RequestOptions(device: "1"))))
            #expect(answer.device == "1")
            #expect(answer.pid == doc.workers[1].pid)
        }
        guard case .error(let e) = try client.infer(payload("{}"), options: RequestOptions(device: "7")) else {
            Issue.record("expected bad_request")
            return
        }
        #expect(e.code == "bad_request")
        #expect(e.message.contains("unknown device '7'"))
        let cli = try daemon.ctl(["infer", "--device", "0", "{\"prompt\": \"Hi\", \"max_new_tokens\": 5}"])
        #expect(cli.status == 0, "\(cli.stderr)")
        #expect(cli.stdout.contains("\"device\":\"0\""))
        #expect(daemon.terminate() == 0)
    }

    @Test func oversizedClientFrameIsRefusedBeforeAllocation() throws {
        let daemon = try TestDaemon(devices: ["0"], supervisor: "max_frame_bytes = \"64KiB\"")
        #expect(daemon.waitAllReady() != nil)
        let client = try daemon.client()
        var header = ByteBuffer()
        header.writeInteger(UInt32(1 << 30))  // announces 1 GiB, sends nothing more
        try client.io.writeRaw(header)
        let frame = try #require(try client.readFrame())
        #expect(frame.type == .error)
        #expect(frame.errorPayload.code == "protocol_error")
        #expect(frame.errorPayload.message.contains("exceeds the maximum of 65536"))
        #expect(try client.readFrame() == nil, "the connection is closed after a protocol error")
        // Other clients are unaffected.
        let other = try daemon.client()
        #expect(decodeAnswer(try other.infer(payload("{\"prompt\": \"ok\"}"))) != nil)
        #expect(daemon.terminate() == 0)
    }

    @Test(arguments: ["garbage", "oversized"])
    func workerBreakingTheProtocolIsRestarted(fault: String) throws {
        let daemon = try TestDaemon(devices: ["0"], defaults: "max_inflight = 1")
        let doc = try #require(daemon.waitAllReady())
        let client = try daemon.client()
        let outcome = try client.infer(payload("{\"prompt\": \"x\", \"fault\": \"\(fault)\"}"),
                                       options: RequestOptions(deadlineMS: 10_000))
        // The worker is killed; the request is retried on the restarted worker, which breaks it again.
        guard case .error(let e) = outcome else {
            Issue.record("expected an error, got \(outcome)")
            return
        }
        #expect(e.code == "worker_lost")
        #expect(eventually { daemon.worker("0")?.lastExit == "protocol_error" })
        #expect(daemon.worker("0")?.pid != doc.workers[0].pid)
        #expect(daemon.log.contains("broke the protocol"))
        #expect(daemon.terminate() == 0)
    }

    @Test func workerThatStopsHeartbeatingIsKilledAsHang() throws {
        let daemon = try TestDaemon(devices: ["0"], defaults: "heartbeat_timeout = \"500ms\"")
        let doc = try #require(daemon.waitAllReady())
        let client = try daemon.client()
        _ = try client.infer(payload("{\"prompt\": \"x\", \"fault\": \"stop_heartbeat\"}"))
        #expect(eventually { daemon.worker("0")?.lastExit == "hang" })
        #expect(!processExists(doc.workers[0].pid!))
        #expect(daemon.terminate() == 0)
    }

    @Test func deadlineExceededAndTheWorkerIsFreed() throws {
        let daemon = try TestDaemon(devices: ["0"], defaults: "max_inflight = 1")
        #expect(daemon.waitAllReady() != nil)
        let client = try daemon.client()
        let slow = try client.infer(payload("{\"prompt\": \"x\", \"fault\": \"sleep\", \"sleep_ms\": 2000}"),
                                    options: RequestOptions(deadlineMS: 150))
        guard case .error(let e) = slow else {
            Issue.record("expected deadline_exceeded, got \(slow)")
            return
        }
        #expect(e.code == "deadline_exceeded")
        #expect(daemon.worker("0")?.inflight == 0, "the place is freed at once")
        #expect(daemon.terminate() == 0)
    }

    /// Deadlines are kept in a ring per timeout value whose entries of answered requests are dropped lazily
    /// (compacted past twice the live ones): a request whose deadline comes after hundreds of answered requests
    /// with the same timeout still gets `deadline_exceeded`, on time, and the others are not touched.
    /// The timer that expires a request frees its worker's place, and the request queued behind it is sent at
    /// once, not when something else next makes the loop flush (here: nothing for 6 s, no heartbeats for 10 s).
    @Test func aRequestQueuedBehindAnExpiredOneIsSentAtOnce() throws {
        let daemon = try TestDaemon(devices: ["0"], defaults: "max_inflight = 1\nheartbeat_interval = \"10s\"\n"
                                        + "heartbeat_timeout = \"30s\"")
        #expect(daemon.waitAllReady() != nil)
        let client = try daemon.client()
        try client.sendRequest(id: 1, payload: payload("{\"prompt\": \"a\", \"fault\": \"sleep\", \"sleep_ms\": 6000}"),
                               options: RequestOptions(deadlineMS: 300))
        try client.sendRequest(id: 2, payload: payload("{\"prompt\": \"b\", \"max_new_tokens\": 1}"),
                               options: RequestOptions(deadlineMS: 20_000))
        let start = ContinuousClock.now
        var answered: [UInt64: (MessageType, Duration)] = [:]
        while answered.count < 2, let frame = try client.readFrame() {
            if frame.type != .chunk { answered[frame.requestID] = (frame.type, ContinuousClock.now - start) }
        }
        #expect(answered[1]?.0 == .error, "the first one expired")
        let second = try #require(answered[2])
        #expect(second.0 == .response)
        #expect(second.1 < .seconds(3), "the queued request waited \(second.1) after its worker's place was freed")
        #expect(daemon.terminate() == 0)
    }

    @Test func aDeadlineOutlivesHundredsOfAnsweredRequestsWithTheSameTimeout() throws {
        let daemon = try TestDaemon(devices: ["0", "1"], defaults: "max_inflight = 4")
        #expect(daemon.waitAllReady() != nil)
        let slowClient = try daemon.client()
        let sent = ContinuousClock.now
        try slowClient.sendRequest(id: 1, payload: payload("{\"fault\": \"sleep\", \"sleep_ms\": 6000}"),
                                   options: RequestOptions(deadlineMS: 1500, device: "0"))
        let client = try daemon.client()
        for _ in 0..<300 {
            let answer = try client.infer(payload("{\"prompt\": \"quick\"}"),
                                          options: RequestOptions(deadlineMS: 1500, device: "1"))
            guard decodeAnswer(answer) != nil else {
                Issue.record("a quick request was not answered: \(answer)")
                return
            }
        }
        let frame = try #require(try slowClient.readFrame())
        let waited = ContinuousClock.now - sent
        #expect(frame.requestID == 1)
        #expect(frame.type == .error && frame.errorPayload.code == "deadline_exceeded", "\(frame)")
        #expect(waited >= .milliseconds(1400) && waited < .milliseconds(4000), "answered after \(waited)")
        #expect(daemon.terminate() == 0)
    }

    @Test func sigtermDrainsRequestsInFlight() throws {
        let daemon = try TestDaemon(devices: ["0", "1"])
        #expect(daemon.waitAllReady() != nil)
        let client = try daemon.client()
        var ids: Set<UInt64> = []
        for _ in 0..<4 {
            let id = client.makeRequestID()
            ids.insert(id)
            try client.sendRequest(id: id, payload: payload("{\"prompt\": \"d\", \"fault\": \"sleep\", \"sleep_ms\": 400}"))
        }
        #expect(eventually { (daemon.status()?.workers.map(\.inflight).reduce(0, +) ?? 0) == 4 })
        kill(daemon.pid, SIGTERM)
        var answered: Set<UInt64> = []
        while answered.count < 4, let frame = try client.readFrame() {
            #expect(frame.type == .response, "\(frame.payloadString)")
            answered.insert(frame.requestID)
        }
        #expect(answered == ids)
        #expect(eventually { !daemon.isRunning })
        #expect(daemon.exitStatus == 0)
    }
}

/// What the load test's client threads report.
final class ResultsBox: Sendable {
    private struct Results {
        var errors: [String] = []
        var count = 0
        var devices: Set<String> = []
    }

    private let results = NIOLockedValueBox(Results())

    var errors: [String] { results.withLockedValue { $0.errors } }
    var count: Int { results.withLockedValue { $0.count } }
    var devices: Set<String> { results.withLockedValue { $0.devices } }

    func add(error: String) { results.withLockedValue { $0.errors.append(error) } }

    func add(answer: WorkerAnswer, key: String, tokens: Int) {
        results.withLockedValue {
            $0.count += 1
            $0.devices.insert(answer.device)
            if answer.tokens != tokens { $0.errors.append("asked \(tokens) tokens, got \(answer.tokens)") }
            if answer.text.split(separator: " ").count != tokens { $0.errors.append("text has the wrong length") }
        }
    }
}

/// Workers that misbehave without dying: they must not hurt the supervisor or its other devices.
@Suite(.serialized, .timeLimit(.minutes(2)))
struct MisbehavingWorkerTests {
    @Test func aWorkerThatStopsReadingItsChannelIsJudgedHungAndTheSupervisorStaysSmall() throws {
        let daemon = try TestDaemon(devices: ["0", "1"], defaults: "heartbeat_timeout = \"2s\"\nmax_inflight = 64",
                                    extra: "[requests]\nretries = 0\nmax_inflight_per_connection = 4")
        #expect(daemon.waitAllReady() != nil)
        let victim = try #require(daemon.worker("0")?.pid)
        let rssBefore = rssKB(daemon.pid)
        let client = try daemon.client()
        try client.sendRequest(id: 1, payload: payload("{\"fault\": \"stop_reading\"}"), options: RequestOptions(device: "0"))
        // 4 MiB requests pinned to it with short deadlines: they expire, and the ones not yet written must not
        // pile up in the supervisor's memory (the client may have 4 in flight: 16 MiB of payloads at most).
        let big = ByteBuffer(repeating: UInt8(ascii: "x"), count: 4 << 20)
        // Sent from another thread: the supervisor reads at most 4 at a time from this connection, so the
        // writes block while this thread reads the answers.
        let sender = client
        DispatchQueue.global().async {
            for id in UInt64(2)...41 {
                try? sender.sendRequest(id: id, payload: big, options: RequestOptions(deadlineMS: 300, device: "0"))
            }
        }
        var answered = Set<UInt64>()
        while answered.count < 41, let frame = try client.readFrame() { answered.insert(frame.requestID) }
        #expect(answered.count == 41, "every request got its one final answer")
        // Bound: what the client may have in flight (4 x 4 MiB), what one write to the worker holds, and
        // allocator slack; without the bound it grew by hundreds of MiB (656 MiB in 15 s in the report).
        #expect(rssKB(daemon.pid) - rssBefore < 128 * 1024, "RSS grew \(rssKB(daemon.pid) - rssBefore) KiB")
        #expect(eventually(timeout: .seconds(10)) { daemon.worker("0")?.pid != victim && daemon.worker("0")?.state == "ready" },
                "a worker that reads nothing while requests wait is stuck: replaced")
        #expect(daemon.worker("0")?.exits["hang"] == 1 || daemon.worker("0")?.exits["unhealthy"] == 1,
                "\(daemon.worker("0")?.exits as Any)")
        #expect(decodeAnswer(try client.infer(payload("{\"prompt\": \"other\"}"), options: RequestOptions(device: "1"))) != nil)
        #expect(daemon.terminate() == 0)
    }

    @Test func aWorkerThatHeartbeatsButAnswersNothingIsMadeUnhealthy() throws {
        let daemon = try TestDaemon(devices: ["0", "1"],
                                    defaults: "inference_probe = { enabled = false, failures = 3 }",
                                    extra: "[requests]\nretries = 0")
        #expect(daemon.waitAllReady() != nil)
        let victim = try #require(daemon.worker("0")?.pid)
        let client = try daemon.client()
        // The worker sleeps far past every deadline but keeps heart-beating.
        for id in UInt64(1)...3 {
            try client.sendRequest(id: id, payload: payload("{\"fault\": \"sleep\", \"sleep_ms\": 30000}"),
                                   options: RequestOptions(deadlineMS: 200, device: "0"))
        }
        var codes: [String] = []
        while codes.count < 3, let frame = try client.readFrame() { codes.append(frame.errorPayload.code) }
        #expect(codes == ["deadline_exceeded", "deadline_exceeded", "deadline_exceeded"])
        #expect(eventually(timeout: .seconds(5)) { daemon.worker("0")?.exits["unhealthy"] == 1 },
                "3 deadlines in a row on one worker make it unhealthy")
        #expect(eventually { daemon.worker("0")?.pid != victim && daemon.worker("0")?.state == "ready" })
        #expect(daemon.log.contains("3 requests in a row got no answer within their deadline"))
        #expect(daemon.terminate() == 0)
    }

    @Test func aWorkerThatClosesItsChannelIsReportedTheSameWayEveryTime() throws {
        let daemon = try TestDaemon(devices: ["0"], defaults: "heartbeat_timeout = \"300ms\"\nheartbeat_interval = \"100ms\"")
        #expect(daemon.waitAllReady() != nil)
        let client = try daemon.client()
        _ = try? client.infer(payload("{\"fault\": \"close_channel\"}"))
        #expect(eventually(timeout: .seconds(5)) { daemon.worker("0")?.lastExit == "protocol_error" },
                "\(daemon.worker("0") as Any)")
        #expect(daemon.worker("0")?.exits["hang"] == nil, "not judged by its silence: its channel is closed")
        #expect(daemon.terminate() == 0)
    }
}

/// Retries are for the request's sake: deaths that were not its doing spend none; a request that crashes the
/// workers it runs on is quarantined after the second.
@Suite(.serialized, .timeLimit(.minutes(2)))
struct RetryAttributionTests {
    @Test func aPoisonRequestIsQuarantinedAfterTheSecondCrash() throws {
        let daemon = try TestDaemon(devices: ["0", "1", "2", "3"], extra: "[requests]\nretries = 3")
        #expect(daemon.waitAllReady() != nil)
        let client = try daemon.client()
        guard case .error(let e) = try client.infer(payload("{\"prompt\": \"x\", \"fault\": \"crash\"}")) else {
            Issue.record("a poison request must not succeed")
            return
        }
        #expect(e.code == "worker_lost")
        #expect(e.message.contains("suspected of crashing workers"), "\(e.message)")
        let crashed = daemon.status()?.workers.map { $0.exits["signaled"] ?? 0 }.reduce(0, +) ?? 0
        #expect(crashed == 2, "two workers crashed, not four (retries = 3): \(crashed)")
        #expect(daemon.log.contains("quarantined"))
        #expect(daemon.terminate() == 0)
    }

    @Test func killsFromOutsideSpendNoRetry() throws {
        // retries = 1 and a SIGKILL every 0.3 s: without attribution, a request on two killed workers would fail.
        let daemon = try TestDaemon(devices: ["0", "1", "2", "3"], workerArgs: ["--token-ms", "1"],
                                    defaults: "restart_limit = 1000\nbackoff_initial = \"20ms\"",
                                    extra: "[requests]\nretries = 1")
        #expect(daemon.waitAllReady() != nil)
        let result = try runCommand(Binaries.directory + "/npu-bench", [
            "load", "--socket", daemon.requestsSocket, "--status", daemon.statusSocket, "--clients", "8",
            "--depth", "2", "--duration", "3", "--kill-every", "0.3", "--machine",
            "--json", "{\"prompt\": \"chaos\", \"max_new_tokens\": 4}",
        ])
        #expect(result.status == 0, "\(result.stdout) \(result.stderr)")
        let line = try #require(result.stdout.split(separator: "\n").last)
        let report = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        #expect(report["never_answered"] as? Int == 0)
        #expect((report["kills"] as? Int ?? 0) >= 5)
        #expect((report["errors"] as? [String: Any])?.isEmpty == true, "SIGKILLs from outside fail no request: \(line)")
        #expect(daemon.terminate() == 0)
    }
}

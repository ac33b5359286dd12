import Foundation
import NIOCore
import NPUClient
import TestSupport
import Testing
import WireProtocol

/// Every error code of the request path produced by a real scenario and seen by a real client; back-pressure,
/// cancellation, half-close and the chaos drill.
@Suite(.serialized, .timeLimit(.minutes(3)))
struct RequestPathTests {
    static let sleepy = "{\"prompt\": \"s\", \"fault\": \"sleep\", \"sleep_ms\": 1500}"
    /// Longer than any wait in these tests: a request that completes meanwhile did not wait behind it.
    static let stuck = "{\"prompt\": \"s\", \"fault\": \"sleep\", \"sleep_ms\": 20000}"

    @Test func overloadedWhenEveryWorkerAndTheQueueAreFull() throws {
        let daemon = try TestDaemon(devices: ["0"], defaults: "max_inflight = 1", extra: "[requests]\nmax_queue = 1")
        #expect(daemon.waitAllReady() != nil)
        let client = try daemon.client()
        try client.sendRequest(id: 1, payload: payload(Self.sleepy))  // on the worker
        try client.sendRequest(id: 2, payload: payload(Self.sleepy))  // in the queue
        try client.sendRequest(id: 3, payload: payload(Self.sleepy))  // nowhere: refused at once
        let first = try #require(try client.readFrame())
        #expect(first.requestID == 3)
        #expect(first.errorPayload.code == "overloaded")
        #expect(first.errorPayload.retryable)
        #expect(daemon.status()?.queueDepth == 1)
        var rest: [UInt64: Frame] = [:]
        while rest.count < 2, let frame = try client.readFrame() { rest[frame.requestID] = frame }
        #expect(rest[1]?.type == .response && rest[2]?.type == .response, "the queued request is served later")
        #expect(daemon.terminate() == 0)
    }

    @Test func requestsCancelledWhileQueuedLeaveTheQueueAndTheOthersKeepTheirOrder() throws {
        // Queued requests that are answered (here: cancelled) stay behind as tombstones that dispatch skips, and
        // the queue is compacted once they outnumber the waiting: the depth must count only the waiting, and the
        // waiting must still be served oldest first.
        let daemon = try TestDaemon(devices: ["0"], workerArgs: ["--term-grace-ms", "0"], defaults: "max_inflight = 1",
                                    extra: "[requests]\nmax_queue = 1000")
        #expect(daemon.waitAllReady() != nil)
        let client = try daemon.client()
        try client.sendRequest(id: 1, payload: payload(Self.stuck))  // holds the only place until cancelled
        #expect(eventually { daemon.worker("0")?.inflight == 1 })
        for id in 2...201 { try client.sendRequest(id: UInt64(id), payload: ByteBuffer(string: "echo \(id)")) }
        #expect(eventually { daemon.status()?.queueDepth == 200 })
        for id in 2...201 where id % 20 != 0 { try client.cancel(id: UInt64(id)) }
        var cancelled: [UInt64] = []
        while cancelled.count < 190, let frame = try client.readFrame() {
            let code = frame.errorPayload.code
            #expect(frame.type == .error && code == "cancelled")
            cancelled.append(frame.requestID)
        }
        let cancelledIDs: [UInt64] = (2...201).filter { $0 % 20 != 0 }.map { UInt64($0) }
        #expect(cancelled == cancelledIDs)
        #expect(daemon.status()?.queueDepth == 10)
        try client.cancel(id: 1)  // frees the worker: the ten left are served one by one
        var served: [UInt64] = []
        while served.count < 11, let frame = try client.readFrame() {
            if frame.requestID == 1 {
                #expect(frame.errorPayload.code == "cancelled")
                continue
            }
            let text = frame.payloadString
            #expect(frame.type == .response && text == "echo \(frame.requestID)")
            served.append(frame.requestID)
            if served.count == 10 { break }
        }
        let keptIDs: [UInt64] = (2...201).filter { $0 % 20 == 0 }.map { UInt64($0) }
        #expect(served == keptIDs, "the waiting are served in the order they came")
        #expect(daemon.status()?.queueDepth == 0)
        #expect(daemon.terminate() == 0)
    }

    @Test func cancelFreesTheWorkerAtOnce() throws {
        // The worker exits at once on SIGTERM (no grace for the cancelled request it is still sleeping through).
        let daemon = try TestDaemon(devices: ["0"], workerArgs: ["--term-grace-ms", "0"], defaults: "max_inflight = 1")
        #expect(daemon.waitAllReady() != nil)
        let client = try daemon.client()
        try client.sendRequest(id: 7, payload: payload(Self.stuck))
        #expect(eventually { daemon.worker("0")?.inflight == 1 })
        try client.cancel(id: 7)
        let answer = try #require(try client.readFrame())
        #expect(answer.requestID == 7 && answer.errorPayload.code == "cancelled")
        #expect(daemon.worker("0")?.inflight == 0)
        // The worker's place is free: the next request is answered while the cancelled one still has most of its
        // 20 s to sleep (an answer that waited behind it would miss this 10 s read timeout).
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(client.io.fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        #expect(decodeAnswer(try client.infer(payload("{\"prompt\": \"next\"}"))) != nil)
        #expect(daemon.terminate() == 0)
    }

    @Test func disconnectCancelsAndFreesItsRequests() throws {
        let daemon = try TestDaemon(devices: ["0"], workerArgs: ["--term-grace-ms", "0"], defaults: "max_inflight = 2")
        #expect(daemon.waitAllReady() != nil)
        do {
            let client = try daemon.client()
            try client.sendRequest(id: 1, payload: payload(Self.stuck))
            try client.sendRequest(id: 2, payload: payload(Self.stuck))
            #expect(eventually { daemon.worker("0")?.inflight == 2 })
        }  // the client is closed here
        // Freed by the disconnect, not by the worker finishing: it has 20 s of sleep left.
        #expect(eventually(timeout: .seconds(10)) { daemon.worker("0")?.inflight == 0 })
        #expect(daemon.terminate() == 0)
    }

    @Test func shuttingDownRefusesNewRequestsWhileDraining() throws {
        let daemon = try TestDaemon(devices: ["0"])
        #expect(daemon.waitAllReady() != nil)
        let busy = try daemon.client()
        try busy.sendRequest(id: 1, payload: payload(Self.sleepy))
        #expect(eventually { daemon.worker("0")?.inflight == 1 })
        let late = try daemon.client()
        kill(daemon.pid, SIGTERM)
        var outcome: InferenceOutcome?
        #expect(eventually {
            outcome = try? late.infer(payload("{\"prompt\": \"late\"}"))
            if case .error(let e) = outcome, e.code == "shutting_down" { return true }
            return false
        })
        if case .error(let e) = outcome { #expect(e.retryable) }
        let drained = try #require(try busy.readFrame())
        #expect(drained.type == .response, "the request in flight still completes")
        #expect(eventually { !daemon.isRunning })
    }

    @Test func connectionLimit() throws {
        let daemon = try TestDaemon(devices: ["0"], extra: "[requests]\nmax_connections = 2")
        #expect(daemon.waitAllReady() != nil)
        let a = try daemon.client(), b = try daemon.client()
        #expect(decodeAnswer(try a.infer(payload("{}"))) != nil)
        #expect(decodeAnswer(try b.infer(payload("{}"))) != nil)
        let c = try daemon.client()
        let refusal = try #require(try c.readFrame())
        #expect(refusal.requestID == 0 && refusal.errorPayload.code == "too_many_connections")
        #expect(try c.readFrame() == nil)
        #expect(daemon.terminate() == 0)
    }

    @Test func unsupportedTypesAndBadRequestsKeepTheConnection() throws {
        let daemon = try TestDaemon(devices: ["0"])
        #expect(daemon.waitAllReady() != nil)
        let client = try daemon.client()
        try client.io.write(Frame(type: .ready, requestID: 5))
        let unsupported = try #require(try client.readFrame())
        #expect(unsupported.requestID == 5 && unsupported.errorPayload.code == "unsupported")
        // Options prefix that is not JSON.
        try client.io.write(Frame(type: .request, flags: .hasOptions, requestID: 6, payload: ByteBuffer(bytes: [0, 2, 0x7B, 0x7B])))
        let bad = try #require(try client.readFrame())
        #expect(bad.requestID == 6 && bad.errorPayload.code == "bad_request")
        // Request id 0 is reserved; a duplicate id in flight is refused on id 0 (the first keeps its answer).
        try client.sendRequest(id: 0, payload: payload("{}"))
        #expect(try client.readFrame()?.errorPayload.code == "bad_request")
        try client.sendRequest(id: 9, payload: payload("{\"prompt\": \"d\", \"fault\": \"sleep\", \"sleep_ms\": 200}"))
        try client.sendRequest(id: 9, payload: payload("{}"))
        let duplicate = try #require(try client.readFrame())
        #expect(duplicate.requestID == 0 && duplicate.errorPayload.message.contains("already in flight"))
        let first = try #require(try client.readFrame())
        #expect(first.requestID == 9 && first.type == .response)
        // Still usable.
        #expect(decodeAnswer(try client.infer(payload("{\"prompt\": \"ok\"}"))) != nil)
        #expect(daemon.terminate() == 0)
    }

    @Test func halfClosedClientStillGetsItsAnswers() throws {
        let daemon = try TestDaemon(devices: ["0", "1"])
        #expect(daemon.waitAllReady() != nil)
        let client = try daemon.client()
        for id in UInt64(1)...3 { try client.sendRequest(id: id, payload: payload("{\"prompt\": \"h\"}")) }
        shutdown(client.io.fd, Int32(SHUT_WR))
        var ids: Set<UInt64> = []
        while let frame = try client.readFrame() {
            #expect(frame.type == .response)
            ids.insert(frame.requestID)
        }
        #expect(ids == [1, 2, 3], "all answered, then the supervisor closed")
        #expect(daemon.terminate() == 0)
    }

    @Test func requestsForDevicesThatCannotComeBackAreAnsweredAtOnce() throws {
        let daemon = try TestDaemon(devices: ["0"], defaults: "max_inflight = 1")
        #expect(daemon.waitAllReady() != nil)
        let client = try daemon.client()
        try client.sendRequest(id: 1, payload: payload(Self.sleepy))
        try client.sendRequest(id: 2, payload: payload("{}"))  // queued behind it
        #expect(eventually { daemon.status()?.queueDepth == 1 })
        #expect(try daemon.ctl(["stop", "0"]).status == 0)
        var codes: [UInt64: String] = [:]
        while codes.count < 2, let frame = try client.readFrame() {
            codes[frame.requestID] = frame.type == .response ? "ok" : frame.errorPayload.code
        }
        #expect(codes[2] == "no_workers", "\(codes)")
        #expect(daemon.terminate() == 0)
    }

    @Test func aClientThatNeverReadsCannotGrowTheSupervisorsMemory() throws {
        let daemon = try TestDaemon(devices: ["0", "1"], defaults: "max_inflight = 64",
                                    extra: "[requests]\nmax_client_buffer = \"4MiB\"\nmax_inflight_per_connection = 64")
        let doc = try #require(daemon.waitAllReady())
        let before = rssKB(doc.supervisor.pid)
        let client = try daemon.client()
        var timeout = timeval(tv_sec: 1, tv_usec: 0)
        setsockopt(client.io.fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        // 1 MiB echo payloads, never reading the 1 MiB answers: 200 of them would be 200 MiB.
        let big = ByteBuffer(repeating: UInt8(ascii: "z"), count: 1 << 20)
        var sent = 0
        for id in UInt64(1)...200 {
            do { try client.sendRequest(id: id, payload: big) } catch { break }  // back-pressure: writes time out
            sent += 1
        }
        #expect(sent < 200, "the supervisor stopped reading from a client that does not read")
        let after = rssKB(doc.supervisor.pid)
        #expect(after - before < 80 * 1024, "RSS grew \(after - before) KiB")
        // Everyone else is still served.
        #expect(decodeAnswer(try daemon.client().infer(payload("{\"prompt\": \"x\"}"))) != nil)
        #expect(eventually { daemon.status()?.workers.allSatisfy { $0.inflight == 0 } ?? false })
        #expect(daemon.terminate() == 0)
    }

    /// One flush of more than NIO's 64 KiB high-water mark that the socket takes at once: NIO says "not writable"
    /// and "writable" again from inside the write, and the connection, seeing its buffer still full, wrote the
    /// same bytes a second time (a 150 KB echo came back as two answers).
    @Test(arguments: [100_000, 150_000, 1 << 20])
    func anAnswerLargerThanTheHighWaterMarkIsSentOnce(size: Int) throws {
        let daemon = try TestDaemon(devices: ["0"])
        #expect(daemon.waitAllReady() != nil)
        let client = try daemon.client(timeout: .seconds(10))
        let big = ByteBuffer(repeating: UInt8(ascii: "q"), count: size)  // not JSON: echoed back
        try client.sendRequest(id: 1, payload: big)
        var answers: [UInt64: Int] = [:]
        let deadline = ContinuousClock.now + .seconds(10)
        while ContinuousClock.now < deadline, let frame = try client.readFrame() {
            answers[frame.requestID, default: 0] += 1
            if frame.requestID == 1 { #expect(frame.type == .response && frame.payload == big) }
            // Once the answer is in, a heartbeat: its echo comes after anything the supervisor wrote before it,
            // a second copy of the answer (written by the same flush) included.
            if frame.requestID == 1 && answers[1] == 1 { try client.io.write(Frame(type: .heartbeat, requestID: 2)) }
            if frame.requestID == 2 { break }
        }
        #expect(answers[1] == 1, "answers by id: \(answers)")
        #expect(answers[2] == 1)
        #expect(daemon.terminate() == 0)
    }

    @Test func aClientThatDoesNotReadAStreamIsCutOffAtItsBufferLimit() throws {
        let daemon = try TestDaemon(devices: ["0", "1"], defaults: "max_inflight = 64",
                                    extra: "[requests]\nmax_client_buffer = \"64KiB\"")
        #expect(daemon.waitAllReady() != nil)
        let flood = try daemon.client()
        for id in UInt64(1)...64 {
            try flood.sendRequest(id: id, payload: payload("{\"prompt\": \"f\", \"max_new_tokens\": 4096, \"stream\": true}"))
        }
        #expect(eventually { daemon.log.contains("client does not read its answers") })
        #expect(eventually { daemon.status()?.workers.allSatisfy { $0.inflight == 0 } ?? false },
                "its requests were cancelled when it was cut off")
        #expect(decodeAnswer(try daemon.client().infer(payload("{\"prompt\": \"x\"}"))) != nil)
        #expect(daemon.terminate() == 0)
    }

    /// A client that stops reading while its streams go on: the supervisor holds its unread bytes, in one buffer,
    /// not a buffer per write queued in NIO (small chunks, each write in its own 4 KiB or larger buffer, held
    /// many times the bytes); when the client reads again it gets every chunk and every answer.
    @Test func aStreamToAClientThatStopsReadingHoldsItsBytesNotABufferPerWrite() throws {
        // A token a millisecond per stream: many small writes, as a model streams.
        let daemon = try TestDaemon(devices: ["0", "1"], workerArgs: ["--token-ms", "1"], defaults: "max_inflight = 64",
                                    extra: "[requests]\nmax_client_buffer = \"256MiB\"")
        #expect(daemon.waitAllReady() != nil)
        let rssBefore = rssKB(daemon.pid)
        let flood = try daemon.client()
        for id in UInt64(1)...64 {
            try flood.sendRequest(id: id, payload: payload("{\"prompt\": \"f\", \"max_new_tokens\": 1500, \"stream\": true}"))
        }
        // Every stream ends (the workers are idle again) while the client reads nothing.
        #expect(eventually(timeout: .seconds(60)) { daemon.status()?.workers.allSatisfy { $0.inflight == 0 } ?? false })
        let grown = rssKB(daemon.pid) - rssBefore
        print("measured: RSS grew \(grown) KiB holding 64 x 1500 unread chunks")
        #expect(grown < 32 * 1024, "RSS grew \(grown) KiB for about 2 MB of unread chunks")
        var chunks = 0
        var answers = 0
        while answers < 64, let frame = try flood.readFrame() {
            if frame.type == .chunk { chunks += 1 } else if frame.type == .response { answers += 1 }
        }
        #expect(answers == 64)
        #expect(chunks == 64 * 1500, "every chunk arrived")
        #expect(daemon.terminate() == 0)
    }

    @Test func chaosDrillLosesNoRequest() throws {
        let daemon = try TestDaemon(devices: ["0", "1", "2", "3"], workerArgs: ["--token-ms", "1"],
                                    defaults: "restart_limit = 100\nbackoff_initial = \"50ms\"")
        #expect(daemon.waitAllReady() != nil)
        let result = try runCommand(Binaries.directory + "/npu-bench", [
            "load", "--socket", daemon.requestsSocket, "--status", daemon.statusSocket, "--clients", "8",
            "--depth", "2", "--duration", "4", "--kill-every", "1", "--machine",
            "--json", "{\"prompt\": \"chaos\", \"max_new_tokens\": 4}",
        ])
        #expect(result.status == 0, "\(result.stdout) \(result.stderr)")
        let line = try #require(result.stdout.split(separator: "\n").last)
        let report = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        #expect(report["never_answered"] as? Int == 0)
        #expect((report["kills"] as? Int ?? 0) >= 3)
        #expect((report["errors"] as? [String: Any])?.isEmpty == true, "with retries = 1 no request fails: \(line)")
        #expect((report["ok"] as? Int ?? 0) > 100)
        #expect(daemon.terminate() == 0)
    }
}

func rssKB(_ pid: Int32) -> Int {
    let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
    let line = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") } ?? ""
    return Int(line.split(whereSeparator: { $0 == " " || $0 == "\t" })[safe: 1] ?? "0") ?? 0
}

extension Array {
    subscript(safe index: Int) -> Element? { indices.contains(index) ? self[index] : nil }
}

/// `max_inflight_per_connection` is a bound even within one read: frames beyond it stay buffered.
@Suite(.serialized, .timeLimit(.minutes(1)))
struct BackPressureTests {
    @Test func oneWriteOfManyRequestsNeverPutsMoreThanTheLimitInFlight() throws {
        let daemon = try TestDaemon(devices: ["0", "1"], defaults: "max_inflight = 64",
                                    extra: "[requests]\nmax_inflight_per_connection = 2")
        #expect(daemon.waitAllReady() != nil)
        let client = try daemon.client()
        // 200 requests of 300 ms each, in one write.
        var burst = ByteBuffer()
        for id in UInt64(1)...200 {
            Frame(type: .request, requestID: id,
                  payload: payload("{\"prompt\": \"b\", \"fault\": \"sleep\", \"sleep_ms\": 300}")).write(to: &burst)
        }
        try client.io.writeRaw(burst)
        // Sample what the workers hold for a second (without the bound it would be dozens at once).
        var most = 0
        let until = ContinuousClock.now + .seconds(1)
        while ContinuousClock.now < until {
            most = max(most, daemon.status()?.workers.map(\.inflight).reduce(0, +) ?? 0)
        }
        #expect(most >= 1 && most <= 2, "at most 2 in flight for this connection, saw \(most)")
        // Every request is still answered, two at a time.
        var seen = Set<UInt64>()
        while seen.count < 8, let frame = try client.readFrame() {
            #expect(frame.type == .response)
            seen.insert(frame.requestID)
        }
        #expect(seen.count == 8)
        #expect(daemon.terminate() == 0)
    }
}

/// status.sock and the status document as docs/PROTOCOL.md section 8 says.
@Suite(.serialized, .timeLimit(.minutes(1)))
struct StatusSocketTests {
    @Test func aClientThatWritesFirstStillGetsTheDocumentAndACleanEOF() throws {
        let daemon = try TestDaemon(devices: ["0"])
        #expect(daemon.waitAllReady() != nil)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            daemon.statusSocket.utf8CString.withUnsafeBytes { raw.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0.prefix(raw.count))) }
        }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        #expect(connected == 0)
        _ = "hello?\n".withCString { write(fd, $0, 7) }  // bytes the daemon never reads
        var data: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        var lastError: Int32 = 0
        while true {
            let n = read(fd, &chunk, chunk.count)
            if n < 0 { lastError = errno; break }
            if n == 0 { break }
            data += chunk[0..<n]
        }
        #expect(lastError == 0, "the document ends with EOF, not \(String(cString: strerror(lastError)))")
        let text = String(decoding: data, as: UTF8.self)
        #expect(text.contains("\"workers\""))
        // Every nullable field is present: the HTTP listener is off here, so `http` is null, not missing.
        #expect(text.contains("\"http\" : null"), "\(text.prefix(400))")
        #expect(daemon.terminate() == 0)
    }

    /// A client polling status.sock in a loop (a dashboard, a probe gone wrong) costs nothing that stays: each
    /// connection's memory is freed when it closes. Each one used to be held for a second by its close timer,
    /// ~2,000 at a time, which left the daemon 16 MB larger after 10,000 polls (BENCHMARKS.md).
    @Test func pollingInALoopLeavesTheDaemonNoLarger() throws {
        let daemon = try TestDaemon(devices: ["0"])
        #expect(daemon.waitAllReady() != nil)
        for _ in 0..<200 { _ = daemon.status() }  // warm up: lazy allocations, the allocator's first arenas
        let before = rssKB(daemon.pid)
        var answered = 0
        for _ in 0..<4000 where daemon.status() != nil { answered += 1 }
        #expect(answered == 4000)
        let grown = rssKB(daemon.pid) - before
        #expect(grown < 2048, "RSS grew \(grown) KiB over 4,000 status connections")
        #expect(daemon.terminate() == 0)
    }
}

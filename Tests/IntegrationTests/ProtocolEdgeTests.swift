import Foundation
import NIOCore
import NPUClient
import TestSupport
import Testing
import WireProtocol

/// docs/PROTOCOL.md against the server on the points of issue 14 item 7: a half-close inside a frame on
/// requests.sock and control.sock, the `tail` errors, and what a request pinned to a device whose worker
/// exited 78 gets. Real daemon, real sockets.
@Suite(.serialized, .timeLimit(.minutes(3)))
struct ProtocolEdgeTests {
    /// The first `count` bytes of an encoded request frame: the start of a frame that never ends.
    static func partialFrame(_ count: Int) -> ByteBuffer {
        var whole = Frame(type: .request, requestID: 99, payload: ByteBuffer(string: "{\"prompt\": \"cut\"}")).encoded()
        return whole.readSlice(length: count)!
    }

    /// Reads until EOF (a read timeout is a failure: the server did not close).
    static func readToEOF(_ client: SupervisorClient) throws -> [Frame] {
        var frames: [Frame] = []
        while let frame = try client.readFrame() { frames.append(frame) }
        return frames
    }

    @Test func requestsSockHalfClosedInsideAFrameAnswersWhatWasWholeThenSaysThePartOneWasDiscarded() throws {
        // max_inflight_per_connection = 1: the three whole frames arrive in one write and are admitted one by one
        // as answers make room, after the input has ended; the cut frame must neither be mistaken for one of them
        // nor keep the connection open.
        let daemon = try TestDaemon(devices: ["0", "1"], extra: "[requests]\nmax_inflight_per_connection = 1")
        #expect(daemon.waitAllReady() != nil)
        for cut in [2, 12] {  // inside the length field; inside the header
            let client = try daemon.client(timeout: .seconds(20))
            var bytes = ByteBuffer()
            for id in UInt64(1)...3 {
                Frame(type: .request, requestID: id, payload: payload("{\"prompt\": \"h\"}")).write(to: &bytes)
            }
            var partial = Self.partialFrame(cut)
            bytes.writeBuffer(&partial)
            try client.io.writeRaw(bytes)
            shutdown(client.io.fd, Int32(SHUT_WR))
            let frames = try Self.readToEOF(client)
            #expect(Set(frames.prefix(3).map(\.requestID)) == [1, 2, 3] && frames.prefix(3).allSatisfy { $0.type == .response },
                    "every whole request answered first: \(frames.map { ($0.type, $0.requestID) })")
            let last = try #require(frames.last)
            #expect(frames.count == 4 && last.type == .error && last.requestID == 0)
            #expect(last.errorPayload.code == "protocol_error")
            #expect(last.errorPayload.message == FrameDecodingError.partialFrameDiscarded(bytes: cut))
        }
        // A clean half-close (no partial frame) ends with the answers alone.
        let clean = try daemon.client(timeout: .seconds(20))
        try clean.sendRequest(id: 5, payload: payload("{\"prompt\": \"h\"}"))
        shutdown(clean.io.fd, Int32(SHUT_WR))
        let frames = try Self.readToEOF(clean)
        #expect(frames.map(\.requestID) == [5] && frames.first?.type == .response)
        #expect(daemon.terminate() == 0)
    }

    /// A bad length after more than 64 KiB of answers in the same read: the last flush before the close passes
    /// NIO's high-water mark and, the socket taking it at once, comes back under it from inside the write, which
    /// resumed reading; the frames still buffered were decoded again and the error sent twice. One `protocol_error`,
    /// then EOF; and the same for a half-close inside a frame after as many answers.
    @Test func aProtocolErrorAfterALargeFlushIsSentOnce() throws {
        let daemon = try TestDaemon(devices: ["0"])
        #expect(daemon.waitAllReady() != nil)
        for halfClose in [false, true] {
            let client = try daemon.client(timeout: .seconds(20))
            var bytes = ByteBuffer()
            for id in UInt64(1)...8000 { Frame(type: .heartbeat, requestID: id).write(to: &bytes) }  // 96 KB of echoes
            if halfClose {
                var partial = Self.partialFrame(12)
                bytes.writeBuffer(&partial)
            } else {
                bytes.writeInteger(UInt32.max)  // a length past max_frame_bytes
                bytes.writeRepeatingByte(0, count: 8)
            }
            try client.io.writeRaw(bytes)
            if halfClose { shutdown(client.io.fd, Int32(SHUT_WR)) }
            let frames = try Self.readToEOF(client)
            let errors = frames.filter { $0.type == .error }
            #expect(frames.filter { $0.type == .heartbeat }.count == 8000)
            #expect(errors.count == 1, "half-close \(halfClose): \(errors.map { $0.errorPayload.message })")
            #expect(errors.first?.errorPayload.code == "protocol_error" && frames.last?.type == .error)
        }
        #expect(daemon.terminate() == 0)
    }

    @Test func aLargeAnswerIsWrittenWholeBeforeAHalfClosedConnectionCloses() throws {
        let daemon = try TestDaemon(devices: ["0"])
        #expect(daemon.waitAllReady() != nil)
        let client = try daemon.client(timeout: .seconds(20))
        // 2 MiB echoed back: far more than the socket buffers hold, so most of the answer is still waiting in the
        // supervisor when the request is finished and the connection is due to close.
        let big = ByteBuffer(repeating: UInt8(ascii: "z"), count: 2 << 20)
        try client.sendRequest(id: 1, payload: big)
        shutdown(client.io.fd, Int32(SHUT_WR))
        // Read nothing until the request is answered (counted in the same event-loop turn as its answer is handed
        // to the connection), so that the close is decided while the answer waits to be written.
        #expect(eventually { daemon.status()?.availability?.sinceStart.answered == 1 })
        let frames = try Self.readToEOF(client)
        #expect(frames.count == 1, "\(frames.map { ($0.type, $0.requestID, $0.payload.readableBytes) })")
        #expect(frames.first?.type == .response && frames.first?.payload.readableBytes == 2 << 20)
        #expect(daemon.terminate() == 0)
    }

    @Test func controlSockHalfClosedInsideAFrameDoesTheSame() throws {
        let daemon = try TestDaemon(devices: ["0"])
        #expect(daemon.waitAllReady() != nil)
        let client = try SupervisorClient(socketPath: daemon.controlSocket, timeout: .seconds(20))
        var bytes = ByteBuffer()
        Frame(type: .request, requestID: 1, payload: try JSONCoding.encode(ControlCommand(command: "pid"))).write(to: &bytes)
        Frame(type: .request, requestID: 2, payload: try JSONCoding.encode(ControlCommand(command: "health"))).write(to: &bytes)
        var partial = Self.partialFrame(12)
        bytes.writeBuffer(&partial)
        try client.io.writeRaw(bytes)
        shutdown(client.io.fd, Int32(SHUT_WR))
        let frames = try Self.readToEOF(client)
        #expect(frames.map(\.requestID) == [1, 2, 0], "\(frames.map { ($0.type, $0.requestID) })")
        #expect(frames.prefix(2).allSatisfy { $0.type == .response })
        #expect(frames.last?.errorPayload.code == "protocol_error")
        #expect(frames.last?.errorPayload.message == FrameDecodingError.partialFrameDiscarded(bytes: 12))
        // Without a partial frame: the answers, then EOF.
        let clean = try SupervisorClient(socketPath: daemon.controlSocket, timeout: .seconds(20))
        try clean.io.write(Frame(type: .request, requestID: 3, payload: try JSONCoding.encode(ControlCommand(command: "pid"))))
        shutdown(clean.io.fd, Int32(SHUT_WR))
        let answers = try Self.readToEOF(clean)
        #expect(answers.map(\.requestID) == [3] && answers.first?.type == .response)
        // Section 2.5 on control.sock: another type is `unsupported`, a payload that is no command `bad_request`,
        // both keeping the connection; a length out of bounds is `protocol_error` (id 0), then EOF.
        let rude = try SupervisorClient(socketPath: daemon.controlSocket, timeout: .seconds(20))
        try rude.io.write(Frame(type: .ready, requestID: 4))
        let unsupported = try #require(try rude.readFrame())
        #expect(unsupported.requestID == 4 && unsupported.errorPayload.code == "unsupported")
        try rude.io.write(Frame(type: .request, requestID: 5, payload: ByteBuffer(string: "{{")))
        let bad = try #require(try rude.readFrame())
        #expect(bad.requestID == 5 && bad.errorPayload.code == "bad_request"
                && bad.errorPayload.message.hasPrefix("not a control command: "))
        var tooShort = ByteBuffer()
        tooShort.writeInteger(UInt32(3))
        try rude.io.writeRaw(tooShort)
        let rest = try Self.readToEOF(rude)
        #expect(rest.count == 1 && rest.first?.requestID == 0 && rest.first?.errorPayload.code == "protocol_error")
        #expect(daemon.terminate() == 0)
    }

    @Test func aHalfClosedControlConnectionGetsItsReloadWaitAnswerBeforeEOF() throws {
        // A reload that rolls the device: its answer comes seconds after the command was read.
        let daemon = try TestDaemon(devices: ["0"], extra: RolloutIntegrationTests.rollout)
        #expect(daemon.waitAllReady() != nil)
        try RolloutIntegrationTests.setWorkerArguments(daemon, ["--model", "sim-llm-7b-v2"])
        let client = try SupervisorClient(socketPath: daemon.controlSocket, timeout: .seconds(30))
        try client.io.write(Frame(type: .request, requestID: 1,
                                  payload: try JSONCoding.encode(ControlCommand(command: "reload", wait: true))))
        try client.io.writeRaw(Self.partialFrame(5))
        shutdown(client.io.fd, Int32(SHUT_WR))
        let frames = try Self.readToEOF(client)
        #expect(frames.map(\.requestID) == [1, 0], "\(frames.map { ($0.type, $0.requestID, $0.payloadString) })")
        #expect(frames.first?.type == .response && frames.first?.payloadString.contains("rollout complete") == true)
        #expect(frames.last?.errorPayload.message == FrameDecodingError.partialFrameDiscarded(bytes: 5))
        #expect(daemon.status()?.rollout?.state == "complete")
        #expect(daemon.terminate() == 0)
    }

    @Test func tailErrorsSayWhatIsWrong() throws {
        // Device "q" runs a process that writes nothing (and never says ready): a device with no output yet.
        let daemon = try TestDaemon(devices: ["0", "q"], perDevice: ["q": "command = [\"/bin/sleep\", \"60\"]"])
        #expect(eventually { daemon.worker("0")?.state == "ready" && daemon.worker("q")?.pid != nil })
        func refusal(_ devices: [String]?, lines: Int? = nil) throws -> String {
            let client = try SupervisorClient(socketPath: daemon.controlSocket, timeout: .seconds(20))
            let frame = try client.control(ControlCommand(command: "tail", devices: devices, lines: lines))
            #expect(frame.type == .error && frame.errorPayload.code == "bad_request")
            return frame.errorPayload.message
        }
        #expect(try refusal(nil) == "tail takes exactly one device; none named")
        #expect(try refusal([]) == "tail takes exactly one device; none named")
        #expect(try refusal(["all"]) == "tail takes exactly one device, not all")
        #expect(try refusal(["0", "q"]) == "tail takes exactly one device; 2 named (0, q)")
        #expect(try refusal(["9"]) == "unknown device '9'; configured: 0, q")
        #expect(try refusal([""]) == "unknown device ''; configured: 0, q")
        #expect(try refusal(["0"], lines: -1) == "tail: lines must be 0 or more (got -1)")

        // The CLI prints the same message, with the code, with and without -f; exit 1.
        for arguments in [["tail", "9"], ["tail", "-f", "9"]] {
            let r = try daemon.ctl(arguments)
            #expect(r.status == 1)
            #expect(r.stderr == "npu-supervisorctl: tail refused: unknown device '9'; configured: 0, q (bad_request)\n")
        }
        // No output yet: an empty answer (not an error), and the CLI says so on stderr.
        let client = try SupervisorClient(socketPath: daemon.controlSocket, timeout: .seconds(20))
        let answer = try client.control(ControlCommand(command: "tail", devices: ["q"]))
        #expect(answer.type == .response)
        #expect(try JSONCoding.decode(TailResult.self, from: answer.payload) == TailResult(device: "q", lines: []))
        let silent = try daemon.ctl(["tail", "q"])
        #expect(silent.status == 0 && silent.stdout.isEmpty)
        #expect(silent.stderr == "npu-supervisorctl: device q has no output kept yet\n")

        // A device a reload removed is named as such, not as unknown.
        var config = try String(contentsOfFile: daemon.configPath, encoding: .utf8)
        let block = try #require(config.range(of: "[[device]]\nid = \"q\""))
        config.removeSubrange(block.lowerBound...)
        try config.write(toFile: daemon.configPath, atomically: true, encoding: .utf8)
        #expect(try daemon.ctl(["reload", "--wait"]).status == 0)
        #expect(eventually { daemon.worker("q") == nil })
        #expect(try refusal(["q"]) == "device 'q' was removed from the configuration by a reload; configured: 0")
        #expect(try refusal(["9"]) == "unknown device '9'; configured: 0")
        #expect(try daemon.ctl(["tail", "0"]).stdout.contains("npu-worker[0]: ready"))
        #expect(daemon.terminate() == 0)
    }

    @Test func aRequestPinnedToADeviceThatExited78SaysWhyAndHowToBringItBack() throws {
        let daemon = try TestDaemon(devices: ["0", "1"],
                                    perDevice: ["1": "command = [\"\(Binaries.worker)\", \"--exit-at-start\", \"78\"]"])
        #expect(eventually { daemon.worker("0")?.state == "ready" && daemon.worker("1")?.state == "failed" })
        let failed = try #require(daemon.worker("1"))
        #expect(failed.desired == "up", "the operator still wants it: it counts against ok")
        #expect(failed.lastExit == "exited(78)" && failed.nextRestartInSeconds == nil && failed.restarts == 0)
        let note = "not restarted: fix its configuration, then `npu-supervisorctl start 1`"
        let client = try daemon.client()
        let outcome = try client.infer(payload("{\"prompt\": \"Hi\"}"), options: RequestOptions(device: "1"))
        guard case .error(let e) = outcome else {
            Issue.record("expected no_workers, got \(outcome)")
            return
        }
        #expect(e.code == "no_workers" && e.retryable)
        #expect(e.message == "no worker can serve: device 1 failed (worker \(failed.lastExitDetail ?? "?"); \(note))")
        #expect(daemon.log.contains(note), "the log line says the same")
        #expect(daemon.status()?.reason.contains("device 1 failed (exited(78))") == true)
        // Unpinned requests go to the device that serves.
        #expect(decodeAnswer(try client.infer(payload("{\"prompt\": \"Hi\"}")))?.device == "0")
        #expect(daemon.terminate() == 0)
    }
}

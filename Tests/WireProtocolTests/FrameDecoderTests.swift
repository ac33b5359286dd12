import NIOCore
import NIOTestUtils
import Testing
import WireProtocol

struct FrameDecoderTests {
    static let frames = [
        Frame(type: .request, requestID: 1, string: "{\"prompt\": \"Hi\"}"),
        Frame(type: .chunk, requestID: .max, string: "x"),
        Frame(type: .heartbeat),
        Frame(type: .response, flags: .hasOptions, requestID: 0x0102_0304_0506_0708, payload: ByteBuffer(repeating: 7, count: 3000)),
        Frame(type: MessageType(rawValue: 0xEE), requestID: 9, string: "unknown types still decode"),
    ]

    @Test func everySplitPointDecodesTheSameFrames() throws {
        var input = ByteBuffer()
        for f in Self.frames { f.write(to: &input) }
        try ByteToMessageDecoderVerifier.verifyDecoder(
            inputOutputPairs: [(input, Self.frames)],
            decoderFactory: { FrameDecoder(maximumFrameLength: 1 << 20) })
    }

    @Test func layoutIsBigEndianLengthTypeFlagsID() {
        let bytes = Array(Frame(type: .request, flags: .hasOptions, requestID: 0x0102, string: "ab").encoded().readableBytesView)
        #expect(bytes == [0, 0, 0, 12, 0x03, 0x01, 0, 0, 0, 0, 0, 0, 0x01, 0x02, 0x61, 0x62])
    }

    @Test func oversizedLengthIsRejectedBeforeTheBodyArrives() throws {
        var decoder = FrameDecoder(maximumFrameLength: 1024)
        var buffer = ByteBuffer()
        buffer.writeInteger(UInt32(1025))  // only the length: no body bytes at all
        #expect(throws: FrameDecodingError.frameTooLarge(length: 1025, maximum: 1024)) {
            _ = try decoder.decode(buffer: &buffer)
        }
        var max = ByteBuffer()
        max.writeInteger(UInt32.max)
        #expect(throws: FrameDecodingError.frameTooLarge(length: .max, maximum: 1024)) {
            _ = try decoder.decode(buffer: &max)
        }
    }

    @Test func lengthShorterThanTheHeaderIsRejected() {
        var decoder = FrameDecoder()
        var buffer = ByteBuffer(bytes: [0, 0, 0, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9])
        #expect(throws: FrameDecodingError.frameTooShort(length: 9)) { _ = try decoder.decode(buffer: &buffer) }
    }

    @Test func endOfStreamInsideAFrameIsAnError() throws {
        var decoder = FrameDecoder()
        var buffer = Frame(type: .request, requestID: 1, string: "hello").encoded()
        buffer.moveWriterIndex(to: buffer.writerIndex - 2)
        #expect(try decoder.decode(buffer: &buffer) == nil)
        #expect(throws: FrameDecodingError.truncated(bufferedBytes: 17)) {
            _ = try decoder.decodeLast(buffer: &buffer, seenEOF: true)
        }
    }

    @Test func requestOptionsRoundTrip() throws {
        let options = RequestOptions(deadlineMS: 250, device: "3")
        let body = try options.prefixing(ByteBuffer(string: "{\"prompt\": \"Hi\"}"))
        let (decoded, rest) = try RequestOptions.split(body)
        #expect(decoded == options)
        #expect(String(buffer: rest) == "{\"prompt\": \"Hi\"}")
    }

    @Test(arguments: [[UInt8](), [0, 5, 0x7B], [0, 3, 0x61, 0x62, 0x63]])
    func malformedOptionsAreRejected(bytes: [UInt8]) {
        #expect(throws: RequestOptionsError.self) { _ = try RequestOptions.split(ByteBuffer(bytes: bytes)) }
    }

    @Test func errorPayloadOfGarbageIsStillAnError() {
        let frame = Frame(type: .error, requestID: 1, string: "not json")
        #expect(frame.errorPayload == ErrorPayload(code: "worker_error", message: "not json"))
        let good = Frame.error(requestID: 2, code: "overloaded", message: "full", retryable: true)
        #expect(good.errorPayload == ErrorPayload(code: "overloaded", message: "full", retryable: true))
    }

    /// What a read leaves is never a whole frame, except frames held back on purpose (`read(_:while:_:)`):
    /// requests.sock tells a partial frame at end of input from held-back ones by this (docs/PROTOCOL.md 1.1).
    @Test func hasWholeFrameTellsHeldBackFramesFromAPartialOne() throws {
        var stream = ByteBuffer()
        for id in UInt64(1)...3 { Frame(type: .request, requestID: id, payload: ByteBuffer(string: "abc")).write(to: &stream) }
        let whole = stream.readableBytes
        Frame(type: .request, requestID: 4, payload: ByteBuffer(string: "cut")).write(to: &stream)
        let partial = stream.getSlice(at: 0, length: whole + 7)!
        var reader = FrameReader(maximumFrameLength: 1024)
        var seen: [UInt64] = []
        var budget = 1
        try reader.read(partial, while: { budget > 0 }) { seen.append($0.requestID); budget -= 1 }
        #expect(seen == [1] && reader.hasWholeFrame, "two whole frames held back")
        budget = 2
        try reader.resume(while: { budget > 0 }) { seen.append($0.requestID); budget -= 1 }
        #expect(seen == [1, 2, 3] && !reader.hasWholeFrame && reader.bufferedBytes == 7, "only the cut frame is left")
        #expect(throws: FrameDecodingError.truncated(bufferedBytes: 7)) { try reader.finish() }
        // Its rest completes it, also after the read bytes were dropped from the buffer.
        try reader.read(stream.getSlice(at: whole + 7, length: stream.readableBytes - whole - 7)!) { seen.append($0.requestID) }
        #expect(seen == [1, 2, 3, 4] && reader.bufferedBytes == 0)
        // A length the decoder rejects counts as whole: the next read throws, nothing more is awaited.
        var bad = FrameReader(maximumFrameLength: 1024)
        var header = ByteBuffer()
        header.writeInteger(UInt32(3))
        budget = 0
        try bad.read(header, while: { budget > 0 }) { _ in }
        #expect(bad.hasWholeFrame)
    }
}

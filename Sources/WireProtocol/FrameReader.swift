import NIOCore

/// Incremental frame splitting for handlers that receive raw `ByteBuffer`s. Unlike a `ByteToMessageHandler`, it
/// hands frames to a closure instead of through the pipeline, so that the hot path does not box every frame
/// into an `NIOAny` (an allocation each). Frames' payloads are slices of the received buffers: no copy.
public struct FrameReader {
    private var decoder: FrameDecoder
    private var pending: ByteBuffer?

    public init(maximumFrameLength: Int) {
        decoder = FrameDecoder(maximumFrameLength: maximumFrameLength)
    }

    /// Bytes received but not yet a whole frame.
    public var bufferedBytes: Int { pending?.readableBytes ?? 0 }

    /// Decodes every complete frame in `incoming` (after what was buffered before) and passes it to `body`.
    /// - Throws: ``FrameDecodingError`` (the stream is unusable afterwards), or what `body` throws.
    public mutating func read(_ incoming: ByteBuffer, _ body: (Frame) throws -> Void) throws {
        if var buffer = pending, buffer.readableBytes > 0 {
            // Drop our own reference first: appending to a buffer that `pending` still shares would copy all of
            // it on every read (quadratic for a large frame arriving in pieces; found by fuzzing).
            pending = nil
            var incoming = incoming
            buffer.writeBuffer(&incoming)
            while let frame = try decoder.decode(buffer: &buffer) { try body(frame) }
            keep(buffer)
        } else {
            var buffer = incoming
            while let frame = try decoder.decode(buffer: &buffer) { try body(frame) }
            keep(buffer)
        }
    }

    /// Like ``read(_:_:)``, but decodes the next frame only while `more()` says so: the rest stays buffered
    /// (back-pressure inside one read: a client that writes hundreds of requests at once gets only as many in
    /// flight as it may). Call again with an empty buffer, or ``resume(while:_:)``, when there is room.
    /// - Throws: ``FrameDecodingError``, or what `body` throws.
    public mutating func read(_ incoming: ByteBuffer, while more: () -> Bool, _ body: (Frame) throws -> Void) throws {
        var buffer = incoming
        if var held = pending, held.readableBytes > 0 {
            // Unshared before appending (see read(_:_:)): no copy of what is held.
            pending = nil
            var incoming = incoming
            if incoming.readableBytes > 0 { held.writeBuffer(&incoming) }
            buffer = held
        }
        pending = nil
        defer { keep(buffer) }
        while more(), let frame = try decoder.decode(buffer: &buffer) { try body(frame) }
    }

    /// Keeps what is left of `buffer` for the next read. When that is part of a frame, the bytes already read go
    /// first: the frames handed out are slices of the same storage, so while any is alive (a request in flight)
    /// the storage is shared, and the next append would copy it from its start, already-read bytes included (up
    /// to 64 KiB of them per read). Dropping them now copies only the partial frame, once; a frame that keeps
    /// arriving reads nothing, so it is not copied again. Whole frames held back (``read(_:while:_:)``) are not
    /// moved for each one taken: only past 64 KiB of read bytes, which amortizes.
    private mutating func keep(_ buffer: ByteBuffer) {
        guard buffer.readableBytes > 0 else {
            pending = nil
            return
        }
        var buffer = buffer
        if buffer.readerIndex > 1 << 16 || (buffer.readerIndex > 0 && !Self.holdsWholeFrame(buffer, decoder)) {
            buffer.discardReadBytes()
        }
        pending = buffer
    }

    /// Whether `buffer` starts with a whole frame, or with a length the decoder rejects (it throws on the next
    /// read: nothing more is awaited).
    private static func holdsWholeFrame(_ buffer: ByteBuffer, _ decoder: FrameDecoder) -> Bool {
        guard let length = buffer.getInteger(at: buffer.readerIndex, as: UInt32.self) else { return false }
        if length < Frame.headerLength || length > decoder.maximumFrameLength { return true }
        return buffer.readableBytes >= 4 + Int(length)
    }

    /// Decodes buffered frames while `more()` says so (see ``read(_:while:_:)``).
    public mutating func resume(while more: () -> Bool, _ body: (Frame) throws -> Void) throws {
        guard pending != nil else { return }
        try read(ByteBuffer(), while: more, body)
    }

    /// Whether a whole frame (or part of one) waits in the buffer.
    public var hasBufferedBytes: Bool { (pending?.readableBytes ?? 0) > 0 }

    /// Whether what is buffered holds at least one whole frame (or a length field that the next read rejects):
    /// when not, the buffered bytes are part of a frame that only more input can complete, so at end of input
    /// they are a partial frame to discard.
    public var hasWholeFrame: Bool { pending.map { Self.holdsWholeFrame($0, decoder) } ?? false }

    /// Call at end of stream: a partial frame left over is an error.
    public func finish() throws {
        if let pending, pending.readableBytes > 0 {
            throw FrameDecodingError.truncated(bufferedBytes: pending.readableBytes)
        }
    }
}

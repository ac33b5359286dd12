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
            if buffer.readableBytes > 0 {
                if buffer.readerIndex > 1 << 16 { buffer.discardReadBytes() }
                pending = buffer
            }
        } else {
            var buffer = incoming
            while let frame = try decoder.decode(buffer: &buffer) { try body(frame) }
            pending = buffer.readableBytes > 0 ? buffer : nil
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
        defer {
            if buffer.readableBytes > 0 {
                if buffer.readerIndex > 1 << 16 { buffer.discardReadBytes() }
                pending = buffer
            }
        }
        while more(), let frame = try decoder.decode(buffer: &buffer) { try body(frame) }
    }

    /// Decodes buffered frames while `more()` says so (see ``read(_:while:_:)``).
    public mutating func resume(while more: () -> Bool, _ body: (Frame) throws -> Void) throws {
        guard pending != nil else { return }
        try read(ByteBuffer(), while: more, body)
    }

    /// Whether a whole frame (or part of one) waits in the buffer.
    public var hasBufferedBytes: Bool { (pending?.readableBytes ?? 0) > 0 }

    /// Call at end of stream: a partial frame left over is an error.
    public func finish() throws {
        if let pending, pending.readableBytes > 0 {
            throw FrameDecodingError.truncated(bufferedBytes: pending.readableBytes)
        }
    }
}

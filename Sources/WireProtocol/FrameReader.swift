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
            var incoming = incoming
            buffer.writeBuffer(&incoming)
            pending = nil
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

    /// Call at end of stream: a partial frame left over is an error.
    public func finish() throws {
        if let pending, pending.readableBytes > 0 {
            throw FrameDecodingError.truncated(bufferedBytes: pending.readableBytes)
        }
    }
}

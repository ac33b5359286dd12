import NIOCore

/// Why a byte stream could not be decoded into frames. Every case is fatal for the stream: after it the
/// reader cannot know where the next frame starts.
public enum FrameDecodingError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The length field announced more than the configured maximum; nothing was allocated for it.
    case frameTooLarge(length: UInt32, maximum: Int)
    /// The length field is smaller than the fixed header (type, flags, request id).
    case frameTooShort(length: UInt32)
    /// The stream ended in the middle of a frame.
    case truncated(bufferedBytes: Int)

    public var description: String {
        switch self {
        case .frameTooLarge(let length, let maximum):
            "frame length \(length) exceeds the maximum of \(maximum) bytes"
        case .frameTooShort(let length):
            "frame length \(length) is shorter than the \(Frame.headerLength)-byte header"
        case .truncated(let bytes):
            "stream ended inside a frame (\(bytes) bytes buffered)"
        }
    }

    /// The `protocol_error` message requests.sock and control.sock send, as their last frame, when a client's
    /// input ends (half-close or close) inside a frame (docs/PROTOCOL.md 1.1). One text for both sockets, so a
    /// client sees the same thing wherever it cut a frame short.
    public static func partialFrameDiscarded(bytes: Int) -> String {
        "input ended inside a frame: the \(bytes) bytes received of an incomplete frame were discarded"
    }
}

/// Splits a byte stream into ``Frame``s. The length is checked against `maximumFrameLength` as soon as its four
/// bytes are in, before a single byte of the body is waited for, so a hostile length costs nothing.
public struct FrameDecoder: NIOSingleStepByteToMessageDecoder, Sendable {
    public typealias InboundOut = Frame

    public let maximumFrameLength: Int

    public init(maximumFrameLength: Int = Frame.defaultMaximumLength) {
        self.maximumFrameLength = maximumFrameLength
    }

    public mutating func decode(buffer: inout ByteBuffer) throws -> Frame? {
        guard let length = buffer.getInteger(at: buffer.readerIndex, as: UInt32.self) else { return nil }
        guard length >= Frame.headerLength else { throw FrameDecodingError.frameTooShort(length: length) }
        guard length <= maximumFrameLength else {
            throw FrameDecodingError.frameTooLarge(length: length, maximum: maximumFrameLength)
        }
        guard buffer.readableBytes >= 4 + Int(length) else { return nil }
        buffer.moveReaderIndex(forwardBy: 4)
        let type = buffer.readInteger(as: UInt8.self)!
        let flags = buffer.readInteger(as: UInt8.self)!
        let requestID = buffer.readInteger(as: UInt64.self)!
        // A slice shares storage with the read buffer: no copy of the payload on the hot path.
        let payload = buffer.readSlice(length: Int(length) - Frame.headerLength)!
        return Frame(type: MessageType(rawValue: type), flags: FrameFlags(rawValue: flags), requestID: requestID,
                     payload: payload)
    }

    public mutating func decodeLast(buffer: inout ByteBuffer, seenEOF: Bool) throws -> Frame? {
        if let frame = try decode(buffer: &buffer) { return frame }
        if seenEOF && buffer.readableBytes > 0 {
            throw FrameDecodingError.truncated(bufferedBytes: buffer.readableBytes)
        }
        return nil
    }
}

/// Writes ``Frame``s as one contiguous buffer each (header and payload together, so one frame is one write).
public struct FrameEncoder: MessageToByteEncoder {
    public typealias OutboundIn = Frame
    public init() {}
    public func encode(data: Frame, out: inout ByteBuffer) throws {
        data.write(to: &out)
    }
}

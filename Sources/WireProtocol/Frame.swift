import NIOCore

/// One protocol frame. On the wire (all integers big-endian):
///
/// ```
///  0                   1                   2                   3
///  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
/// +---------------------------------------------------------------+
/// |                        length N (u32)                         |
/// +---------------+---------------+-------------------------------+
/// |   type (u8)   |  flags (u8)   |                               |
/// +---------------+---------------+                               +
/// |                       request id (u64)                        |
/// +                               +-------------------------------+
/// |                               |  payload (N - 10 bytes) ...   |
/// +-------------------------------+-------------------------------+
/// ```
/// `N` counts everything after the length field, so it is at least ``Frame/headerLength`` (10).
public struct Frame: Sendable, Equatable {
    /// Bytes after the length field that every frame carries: type, flags and request id.
    public static let headerLength = 10
    /// Default upper bound on `N` (16 MiB), `max_frame_bytes` in the config.
    public static let defaultMaximumLength = 16 * 1024 * 1024

    public var type: MessageType
    public var flags: FrameFlags
    public var requestID: UInt64
    public var payload: ByteBuffer

    public init(type: MessageType, flags: FrameFlags = [], requestID: UInt64 = 0, payload: ByteBuffer = ByteBuffer()) {
        self.type = type
        self.flags = flags
        self.requestID = requestID
        self.payload = payload
    }

    /// Convenience for tests and tools: a frame whose payload is the UTF-8 of `string`.
    public init(type: MessageType, flags: FrameFlags = [], requestID: UInt64 = 0, string: String) {
        self.init(type: type, flags: flags, requestID: requestID, payload: ByteBuffer(string: string))
    }

    /// The payload as a UTF-8 string (lossy for invalid UTF-8).
    public var payloadString: String { String(buffer: payload) }

    /// Appends the encoded frame to `buffer`.
    @inlinable public func write(to buffer: inout ByteBuffer) {
        Self.write(type: type, flags: flags, requestID: requestID, payload: payload, to: &buffer)
    }

    /// Appends a frame to `buffer` without building a ``Frame`` first (the request path's re-encoding: one
    /// capacity check for the header, and the payload copied without retaining its storage).
    ///
    /// The bytes are stored through one pointer: ByteBuffer's integer and buffer writers each go through
    /// `_setBytes`, whose storage accesses NIO's release build checks for exclusivity at run time (five checked
    /// accesses per frame; 11 of the 16 `swift_beginAccess` calls a request cost, BENCHMARKS.md).
    @inlinable public static func write(type: MessageType, flags: FrameFlags = [], requestID: UInt64,
                                        payload: ByteBuffer, to buffer: inout ByteBuffer) {
        let count = payload.readableBytes
        let total = 4 + headerLength + count
        buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: total) { out in
            let base = out.baseAddress!
            base.storeBytes(of: UInt32(headerLength + count).bigEndian, as: UInt32.self)
            base.storeBytes(of: type.rawValue, toByteOffset: 4, as: UInt8.self)
            base.storeBytes(of: flags.rawValue, toByteOffset: 5, as: UInt8.self)
            // Unaligned: the frame starts wherever the buffer's writer index is.
            withUnsafeBytes(of: requestID.bigEndian) { (base + 6).copyMemory(from: $0.baseAddress!, byteCount: 8) }
            if count > 0 {
                payload.withUnsafeReadableBytes { (base + 14).copyMemory(from: $0.baseAddress!, byteCount: count) }
            }
            return total
        }
    }

    /// The encoded frame in a new buffer.
    public func encoded(allocator: ByteBufferAllocator = ByteBufferAllocator()) -> ByteBuffer {
        var buffer = allocator.buffer(capacity: 4 + Self.headerLength + payload.readableBytes)
        write(to: &buffer)
        return buffer
    }
}

/// Per-frame flag bits. Unknown bits are ignored by receivers (reserved for later versions).
public struct FrameFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }

    /// On a `request` from a client: the payload starts with a u16 length L and L bytes of JSON request
    /// options (`deadline_ms`, `device`), followed by the opaque inference payload.
    public static let hasOptions = FrameFlags(rawValue: 1 << 0)
}

import Glibc
import NIOCore

/// Frames over a blocking file descriptor, for programs that are not event-driven (workers, the CLI, tests).
/// Reads go through the same bounded ``FrameDecoder`` as the daemon's; writes are serialised by a mutex so that
/// several threads can answer requests at once without interleaving bytes.
public final class BlockingFrameIO: @unchecked Sendable {
    public let fd: CInt
    private var decoder: FrameDecoder
    private var buffer = ByteBuffer()
    private var writeLock = pthread_mutex_t()
    private var scratch = [UInt8](repeating: 0, count: 64 * 1024)
    /// Frames written by the reading thread itself while it still has buffered input: sent in one write just
    /// before the next blocking read (a worker answering a burst of pipelined requests inline makes one
    /// syscall, not one per answer). Writes from other threads go out at once.
    private var batch = ByteBuffer()
    private var readerThread: pthread_t?

    /// The largest frame accepted (a worker adopts the supervisor's `max_frame_bytes` from its hello).
    public var maximumFrameLength: Int {
        get { decoder.maximumFrameLength }
        set { decoder = FrameDecoder(maximumFrameLength: newValue) }
    }

    public init(fd: CInt, maximumFrameLength: Int = Frame.defaultMaximumLength) {
        self.fd = fd
        self.decoder = FrameDecoder(maximumFrameLength: maximumFrameLength)
        pthread_mutex_init(&writeLock, nil)
    }

    deinit { pthread_mutex_destroy(&writeLock) }

    /// The next frame, or nil at a clean end of stream.
    /// - Throws: ``FrameDecodingError`` for a malformed stream, ``FrameIOError`` for a failed read.
    public func readFrame() throws -> Frame? {
        if readerThread == nil { readerThread = pthread_self() }
        while true {
            if let frame = try decoder.decode(buffer: &buffer) {
                if buffer.readerIndex > 1 << 16 { buffer.discardReadBytes() }
                return frame
            }
            buffer.discardReadBytes()
            if batch.readableBytes > 0 {
                let pending = batch
                batch.clear()
                try writeRaw(pending)
            }
            let n = scratch.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw FrameIOError(call: "read", errno: errno)
            }
            if n == 0 {
                if buffer.readableBytes > 0 { throw FrameDecodingError.truncated(bufferedBytes: buffer.readableBytes) }
                return nil
            }
            buffer.writeBytes(scratch[0..<n])
        }
    }

    /// Writes one frame atomically with respect to other writers.
    /// - Throws: ``FrameIOError`` (EPIPE when the peer is gone).
    public func write(_ frame: Frame) throws {
        if let reader = readerThread, pthread_equal(reader, pthread_self()) != 0 {
            frame.write(to: &batch)
            if batch.readableBytes >= 1 << 16 {
                let pending = batch
                batch.clear()
                try writeRaw(pending)
            }
            return
        }
        try writeRaw(frame.encoded())
    }

    /// Writes raw bytes (fault injection writes garbage this way).
    public func writeRaw(_ bytes: ByteBuffer) throws {
        pthread_mutex_lock(&writeLock)
        defer { pthread_mutex_unlock(&writeLock) }
        var offset = 0
        try bytes.withUnsafeReadableBytes { raw in
            while offset < raw.count {
                let n = Glibc.send(fd, raw.baseAddress! + offset, raw.count - offset, Int32(MSG_NOSIGNAL))
                if n < 0 {
                    if errno == EINTR { continue }
                    if errno == ENOTSOCK {
                        let m = Glibc.write(fd, raw.baseAddress! + offset, raw.count - offset)
                        if m < 0 { throw FrameIOError(call: "write", errno: errno) }
                        offset += m
                        continue
                    }
                    throw FrameIOError(call: "send", errno: errno)
                }
                offset += n
            }
        }
    }
}

/// A failed read or write.
public struct FrameIOError: Error, CustomStringConvertible, Sendable {
    public var call: String
    public var errno: Int32
    public var description: String { "\(call): \(String(cString: strerror(errno)))" }
}

import Glibc
import NIOConcurrencyHelpers
import NIOCore

/// Frames over a blocking file descriptor, for programs that are not event-driven (workers, the CLI, tests).
/// Reads go through the same bounded ``FrameDecoder`` as the daemon's; writes are serialised by a lock so that
/// several threads can answer requests at once without interleaving bytes.
///
/// Thread safety is checked, not promised: the read side (decoder, buffer) is a locked value held for a whole
/// ``readFrame()``, so two threads reading at once take turns instead of corrupting the stream; the write side
/// (which thread reads, the batch of its answers) is a locked value of its own; bytes go out under a third lock.
/// Locks are always taken in that order (read side, write side, fd).
public final class BlockingFrameIO: Sendable {
    public let fd: CInt
    private let readSide: NIOLockedValueBox<ReadSide>
    private let writeSide = NIOLockedValueBox(WriteSide())
    private let fdLock = NIOLock()

    private struct ReadSide {
        var decoder: FrameDecoder
        var buffer = ByteBuffer()
        var scratch = [UInt8](repeating: 0, count: 64 * 1024)
    }

    private struct WriteSide {
        /// The thread inside ``readFrame()`` now, or the last one that was (a worker answering inline writes
        /// from it between two reads).
        var readerThread: pthread_t?
        /// Frames written by the reading thread itself while it still has buffered input: sent in one write
        /// just before the next blocking read (a worker answering a burst of pipelined requests inline makes
        /// one syscall, not one per answer). Writes from other threads go out at once.
        var batch = ByteBuffer()
    }

    /// The largest frame accepted (a worker adopts the supervisor's `max_frame_bytes` from its hello).
    public var maximumFrameLength: Int {
        get { readSide.withLockedValue { $0.decoder.maximumFrameLength } }
        set { readSide.withLockedValue { $0.decoder = FrameDecoder(maximumFrameLength: newValue) } }
    }

    public init(fd: CInt, maximumFrameLength: Int = Frame.defaultMaximumLength) {
        self.fd = fd
        self.readSide = NIOLockedValueBox(ReadSide(decoder: FrameDecoder(maximumFrameLength: maximumFrameLength)))
    }

    /// The next frame, or nil at a clean end of stream.
    /// - Throws: ``FrameDecodingError`` for a malformed stream, ``FrameIOError`` for a failed read.
    public func readFrame() throws -> Frame? {
        try readSide.withLockedValue { state in
            let me = pthread_self()
            writeSide.withLockedValue { $0.readerThread = me }
            while true {
                if let frame = try state.decoder.decode(buffer: &state.buffer) {
                    if state.buffer.readerIndex > 1 << 16 { state.buffer.discardReadBytes() }
                    return frame
                }
                state.buffer.discardReadBytes()
                try flushBatch()
                let n = state.scratch.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if n < 0 {
                    if errno == EINTR { continue }
                    throw FrameIOError(call: "read", errno: errno)
                }
                if n == 0 {
                    if state.buffer.readableBytes > 0 {
                        throw FrameDecodingError.truncated(bufferedBytes: state.buffer.readableBytes)
                    }
                    return nil
                }
                state.buffer.writeBytes(state.scratch[0..<n])
            }
        }
    }

    /// Writes one frame atomically with respect to other writers.
    /// - Throws: ``FrameIOError`` (EPIPE when the peer is gone).
    public func write(_ frame: Frame) throws {
        let me = pthread_self()
        let full: ByteBuffer?? = writeSide.withLockedValue { state in
            guard let reader = state.readerThread, pthread_equal(reader, me) != 0 else { return .none }
            frame.write(to: &state.batch)
            guard state.batch.readableBytes >= 1 << 16 else { return .some(nil) }
            defer { state.batch.clear() }
            return .some(state.batch)
        }
        switch full {
        case .none: try writeRaw(frame.encoded())
        case .some(nil): return
        case .some(.some(let pending)): try writeRaw(pending)
        }
    }

    /// Sends at once whatever the reading thread has batched (see ``write(_:)``): for frames that must not wait
    /// for the next read, e.g. a worker's hello before it spends minutes loading its model.
    public func flush() throws {
        try flushBatch()
    }

    /// Sends the reading thread's batched answers.
    private func flushBatch() throws {
        let pending: ByteBuffer? = writeSide.withLockedValue { state in
            guard state.batch.readableBytes > 0 else { return nil }
            defer { state.batch.clear() }
            return state.batch
        }
        if let pending { try writeRaw(pending) }
    }

    /// Writes raw bytes (fault injection writes garbage this way).
    public func writeRaw(_ bytes: ByteBuffer) throws {
        try fdLock.withLock { try sendAll(bytes) }
    }

    private func sendAll(_ bytes: ByteBuffer) throws {
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

import NIOCore
@testable import SupervisorRuntime
import Testing

/// The outbound buffers' hand-over to NIO (`ByteBuffer.takeForWrite` / `reuse`, in WorkerIO.swift): the bytes
/// leave the buffer before the write, frames queued from inside the write stay queued, and with nothing queued the
/// storage comes back (no allocation per write). RequestPathTests and ProtocolEdgeTests check the same end to end.
struct OutboundBufferTests {
    let allocator = ByteBufferAllocator()

    @Test func theBytesLeaveBeforeTheWriteAndTheStorageComesBack() {
        var outbound = allocator.buffer(capacity: 4096)
        outbound.writeString("answer")
        let storage = outbound.withVeryUnsafeBytes { $0.baseAddress }
        let bytes = outbound.takeForWrite()
        #expect(outbound.readableBytes == 0, "code called back from inside the write finds nothing to write again")
        #expect(bytes.getString(at: bytes.readerIndex, length: bytes.readableBytes) == "answer")
        outbound.reuse(consume bytes, allocator: allocator)  // the write took it all: nobody else holds it
        #expect(outbound.readableBytes == 0 && outbound.capacity >= 4096)
        #expect(outbound.withVeryUnsafeBytes { $0.baseAddress } == storage, "the same storage, no allocation")
    }

    @Test func framesQueuedFromInsideTheWriteStayQueued() {
        var outbound = allocator.buffer(capacity: 4096)
        outbound.writeString("first")
        let bytes = outbound.takeForWrite()
        outbound.writeString("queued meanwhile")  // what a writability call-back queued
        outbound.reuse(consume bytes, allocator: allocator)
        #expect(outbound.getString(at: outbound.readerIndex, length: outbound.readableBytes) == "queued meanwhile")
    }

    @Test func aStorageStillHeldOrGrownLargeIsNotReused() {
        var outbound = allocator.buffer(capacity: 4096)
        outbound.writeString("held")
        let held = outbound.takeForWrite()
        let stillInNIO = held  // NIO has not written it all yet
        outbound.reuse(consume held, allocator: allocator)
        #expect(outbound.readableBytes == 0)
        #expect(stillInNIO.getString(at: stillInNIO.readerIndex, length: stillInNIO.readableBytes) == "held",
                "the bytes NIO still holds are untouched")
        var large = allocator.buffer(capacity: 1 << 17)
        large.writeRepeatingByte(1, count: 1 << 17)
        let big = large.takeForWrite()
        large.reuse(consume big, allocator: allocator)
        #expect(large.readableBytes == 0 && large.capacity < 1 << 16, "a large answer's storage is not kept")
    }
}

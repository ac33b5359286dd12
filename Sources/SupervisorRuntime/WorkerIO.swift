@preconcurrency import Dispatch
import Glibc
import Logging
import NIOConcurrencyHelpers
import NIOCore
import SupervisorCore
import WireProtocol

/// The I/O of one worker slot: while a process runs, its frame channel (fd 3), output pipe, exit watcher and
/// memory cgroup. Its decisions (state, health, restarts) are in ``SupervisorMachine/Worker``; this holds only
/// what the driver needs to move bytes. Touched only on the supervisor's event loop.
final class WorkerIO {
    let index: Int
    /// The spec of the current process (copied from the machine at each spawn).
    #if DEBUG
    var spec: WorkerSpec
    #else
    @exclusivity(unchecked) var spec: WorkerSpec
    #endif
    /// The current process, 0 between processes. Frames and exits of an older process are ignored.
    #if DEBUG
    var pid: pid_t = 0
    #else
    @exclusivity(unchecked) var pid: pid_t = 0
    #endif
    /// The frame channel to the current process (its fd 3), nil between processes.
    #if DEBUG
    var channel: (any Channel)? { didSet { hasChannel = channel != nil } }
    #else
    @exclusivity(unchecked) var channel: (any Channel)? { didSet { hasChannel = channel != nil } }
    #endif
    /// `channel != nil`, kept as a flag: testing the existential for nil retains and releases it, per request.
    #if DEBUG
    private(set) var hasChannel = false
    #else
    @exclusivity(unchecked) private(set) var hasChannel = false
    #endif
    var outputChannel: (any Channel)?
    var exitWatch: (any DispatchSourceRead)?
    /// When the current process was started (wall-clock for uptime).
    var spawnedAt: NIODeadline?
    var hello: HelloFromWorker?
    /// The process was reaped; its exit has been handed to the machine.
    var isReaped = false
    /// The worker's output, kept by the output thread (``OutputSink``); read here for `tail`.
    let output: OutputSink
    /// Frames for the worker, written once per burst (``flush()``).
    #if DEBUG
    var outbound = ByteBuffer()
    #else
    @exclusivity(unchecked) var outbound = ByteBuffer()
    #endif
    #if DEBUG
    var isDirty = false
    #else
    @exclusivity(unchecked) var isDirty = false
    #endif
    /// The current process's memory cgroup, when cgroups are in use.
    var cgroup: CgroupManager.WorkerCgroup?
    /// The next process, started ahead of need in its own cgroup (cgroups on only; ``StandbyWorker``).
    var standby: StandbyWorker?

    init(index: Int, spec: WorkerSpec, outputLines: Int) {
        self.index = index
        self.spec = spec
        self.output = OutputSink(capacity: outputLines)
    }

    var isChannelOpen: Bool { hasChannel }

    /// Queues a frame for the worker.
    @inline(__always) func send(_ frame: Frame) {
        guard hasChannel else { return }
        frame.write(to: &outbound)
    }

    /// Queues a request for the worker (the hot path: no ``Frame`` built).
    @inline(__always) func sendRequest(id: UInt64, payload: ByteBuffer) {
        guard hasChannel else { return }
        Frame.write(type: .request, requestID: id, payload: payload, to: &outbound)
    }

    func flush() {
        isDirty = false
        guard let channel, outbound.readableBytes > 0 else { return }
        // Taken out before the write, which can call back into the supervisor (``ByteBuffer/takeForWrite()``).
        let bytes = outbound.takeForWrite()
        channel.writeAndFlush(bytes, promise: nil)
        outbound.reuse(consume bytes, allocator: channel.allocator)
    }

    func closeChannel() {
        channel?.close(promise: nil)
        channel = nil
        outbound.clear()
    }

    func metadata(reason: String? = nil) -> Logger.Metadata {
        var m: Logger.Metadata = ["device": "\(spec.device)"]
        if pid > 0 { m["worker_pid"] = "\(pid)" }
        if let reason { m["reason"] = "\(reason)" }
        return m
    }
}

/// The last N lines of a worker's output, for `tail`.
struct LineRing {
    let capacity: Int
    private var lines: [String] = []
    private var start = 0

    init(capacity: Int) { self.capacity = capacity }

    mutating func append(_ line: String) {
        guard capacity > 0 else { return }
        if lines.count < capacity {
            lines.append(line)
        } else {
            lines[start] = line
            start = (start + 1) % capacity
        }
    }

    func last(_ n: Int) -> [String] {
        let ordered = Array(lines[start...] + lines[..<start])
        return Array(ordered.suffix(max(0, n)))
    }
}

/// A worker's kept output, shared by the output thread (which appends, see ``OutputLineHandler``) and the
/// supervisor's event loop (which reads it for `tail`): a ring under a lock, and a line count so that a `tail -f`
/// reader registered between two batches gets each line exactly once.
final class OutputSink: @unchecked Sendable {  // all state under `lock`
    private let lock = NIOLock()
    private var ring: LineRing
    /// Lines appended since the start (the sequence number of the next line).
    private var appended: UInt64 = 0
    private var followed = false

    init(capacity: Int) { self.ring = LineRing(capacity: capacity) }

    /// Output thread: keeps a batch; answers the sequence number of its first line when a `tail -f` reader
    /// wants it (the caller then hops it to the event loop), nil when nobody follows.
    func append(_ lines: [String]) -> UInt64? {
        lock.withLock {
            let first = appended
            for line in lines { ring.append(line) }
            appended += UInt64(lines.count)
            return followed ? first : nil
        }
    }

    /// Event loop: the last `n` lines and the sequence number of the next line.
    func last(_ n: Int) -> (lines: [String], next: UInt64) {
        lock.withLock { (ring.last(n), appended) }
    }

    /// Event loop: whether any `tail -f` reader follows this device (batches are hopped to it only then).
    func setFollowed(_ value: Bool) {
        lock.withLock { followed = value }
    }
}

/// A `tail -f` client on control.sock.
struct OutputFollower {
    let device: String
    let requestID: UInt64
    let channel: any Channel
    /// Lines numbered below this were in its first answer (``OutputSink``).
    var from: UInt64 = 0
    var dropped = 0
}

extension ByteBuffer {
    /// Takes an outbound buffer's bytes for `writeAndFlush`, leaving it empty (no allocation: the empty buffer
    /// shares one zero-capacity storage). They leave the buffer *before* the write because NIO calls back from
    /// inside it: a write past the channel's high-water mark that the socket takes at once reports "not writable"
    /// and "writable" again, and what runs then (a client's held answers re-flushed, its reading resumed and
    /// requests answered at once; a worker writable again offered queued requests) must find only what it queued
    /// itself: neither these bytes, to be written a second time, nor a buffer to be cleared with new frames in it.
    @inline(__always) mutating func takeForWrite() -> ByteBuffer {
        var bytes = ByteBuffer()
        swap(&bytes, &self)
        return bytes
    }

    /// After the write of `written` (from ``takeForWrite()``): when nothing was queued from inside the write, its
    /// storage becomes this buffer's again for the next burst. When the socket took it all (the usual case), NIO
    /// has let go of it and it is reused: no allocation per write. While NIO still holds it, a new 4 KiB storage
    /// is started; one that grew past 64 KiB (a large answer) is not kept.
    @inline(__always) mutating func reuse(_ written: consuming ByteBuffer, allocator: ByteBufferAllocator) {
        guard readableBytes == 0 else { return }
        if written.capacity > 1 << 16 {
            self = allocator.buffer(capacity: 4096)
        } else {
            // Owned here alone once NIO is done with it (the caller consumed its copy), so cleared in place; a
            // storage NIO still holds is not copied: a new one of 4 KiB is started (not one as large).
            written.clear(minimumCapacity: 4096)
            self = written
        }
    }
}

@preconcurrency import Dispatch
import Glibc
import Logging
import NIOCore
import NIOPosix
import SupervisorCore
import WireProtocol

/// Worker processes as I/O: spawning, the frame channel, the output pipe, exit watching and reaping. What to do
/// about any of it is the machine's (``SupervisorMachine``); this file only turns it into events.
extension Supervisor {
    func spawn(_ slot: WorkerIO) {
        // The machine's spec is the one to run (a reload or a rollout may have replaced it).
        slot.spec = machine.workers[slot.index].spec
        let spawned: SpawnedWorker
        do {
            var procsFD: CInt = -1
            slot.cgroup = nil
            // With cgroups, the process is usually started already, in its cgroup: no cgroup work and no spawn
            // left on the critical path (StandbyWorker.swift). It sets slot.cgroup.
            let standby = takeStandby(slot)
            if standby == nil, let cgroups {
                do {
                    let cgroup = try cgroups.create(device: slot.spec.device, limit: slot.spec.memoryLimit)
                    procsFD = try cgroups.openProcs(cgroup)
                    slot.cgroup = cgroup
                } catch {
                    logger.error("cannot give the worker its memory cgroup (\(error)); starting it without one",
                                 metadata: slot.metadata())
                }
            }
            defer { if procsFD >= 0 { Glibc.close(procsFD) } }
            spawned = try standby ?? ProcessSpawner.spawn(slot.spec, cgroupProcsFD: procsFD, trampoline: cgroups?.trampoline,
                                                          extraEnvironment: rankEnvironment(slot.index))
        } catch let error as SystemError {
            feed(.spawnFailed(slot: slot.index, errno: error.errno, message: "\(error)", jitter: Double.random(in: 0..<1)))
            return
        } catch {
            preconditionFailure("ProcessSpawner.spawn throws only SystemError")
        }
        feed(.spawned(slot: slot.index, pid: spawned.pid))
        guard machine.workers[slot.index].lifecycle.pid == spawned.pid else {
            // Refused (no longer wanted): the machine had it SIGKILLed. Collect it so it leaves no zombie.
            for fd in [spawned.channelFD, spawned.outputFD, spawned.pidFD] where fd >= 0 { Glibc.close(fd) }
            var status: Int32 = 0
            _ = waitpid(spawned.pid, &status, 0)
            if let cgroups, let cgroup = slot.cgroup {
                cgroups.killAll(cgroup.path)
                cgroups.remove(cgroup.path)
                slot.cgroup = nil
            }
            return
        }
        slot.pid = spawned.pid
        slot.isReaped = false
        slot.spawnedAt = .now()
        slot.hello = nil
        // The exit watch first: the timer never polls for a process a pidfd already watches.
        watchExit(slot, pid: spawned.pid, pidFD: spawned.pidFD)
        attachChannel(slot, pid: spawned.pid, fd: spawned.channelFD)
        attachOutput(slot, pid: spawned.pid, fd: spawned.outputFD)
        scheduleStandby(slot, after: spawned.pid)
    }

    func attachChannel(_ slot: WorkerIO, pid: pid_t, fd: CInt) {
        let maxFrame = config.maxFrameBytes
        let hello = HelloFromSupervisor(
            device: slot.spec.device,
            heartbeatIntervalMS: Int(slot.spec.heartbeatInterval.nanoseconds / 1_000_000),
            maxFrameBytes: maxFrame)
        // Closures name the slot by index (they may outlive this process; `pid` tells them apart).
        let index = slot.index
        ClientBootstrap(group: eventLoop)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        WorkerChannelHandler(supervisor: self, slot: self.slots[index], pid: pid, maxFrame: maxFrame))
                }
            }
            .withConnectedSocket(fd)
            .whenComplete { result in
                let slot = self.slots[index]
                switch result {
                case .success(let channel):
                    guard slot.pid == pid, !slot.isReaped else {
                        channel.close(promise: nil)
                        return
                    }
                    slot.channel = channel
                    slot.outbound = channel.allocator.buffer(capacity: 4096)
                    do {
                        slot.send(Frame(type: .hello, payload: try JSONCoding.encode(hello)))
                    } catch {
                        self.feed(.channelFailed(slot: slot.index, pid: pid, message: "hello unencodable: \(error)"))
                        return
                    }
                    slot.flush()
                    // A write that failed may have closed it already: then its close is the news.
                    if slot.channel != nil { self.feed(.channelOpened(slot: slot.index, pid: pid)) }
                case .failure(let error):
                    Glibc.close(fd)
                    self.feed(.channelFailed(slot: slot.index, pid: pid, message: "\(error)"))
                }
            }
    }

    /// The output pipe is served by the output thread (``outputLoop``): lines are split, rate-limited, kept in
    /// the slot's ring and logged there; only when a `tail -f` reader follows the device is a batch hopped here.
    func attachOutput(_ slot: WorkerIO, pid: pid_t, fd: CInt) {
        let device = slot.spec.device
        let index = slot.index
        let sink = slot.output
        let logger = self.logger
        let outputLogging = self.outputLogging
        let eventLoop = self.eventLoop
        let rate = slot.spec.outputRateLimit
        NIOPipeBootstrap(group: outputLoop)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(OutputLineHandler(
                        limiter: OutputRateLimiter(bytesPerSecond: rate)) { batch in
                        if case .stderrBatched(let label) = outputLogging {
                            if logger.logLevel <= .info { OutputLog.write(batch, label: label, device: device, pid: pid) }
                        } else {
                            let metadata: Logger.Metadata = ["device": "\(device)", "worker_pid": "\(pid)", "stream": "output"]
                            for line in batch { logger.info("\(line)", metadata: metadata) }
                        }
                        if let first = sink.append(batch) {
                            eventLoop.execute { self.workerOutput(device: device, batch, first: first) }
                        }
                    })
                }
            }
            .takingOwnershipOfDescriptor(input: fd)
            .hop(to: eventLoop)
            .whenComplete { result in
                let slot = self.slots[index]
                switch result {
                case .success(let channel):
                    slot.outputChannel = channel
                case .failure(let error):
                    Glibc.close(fd)
                    self.logger.warning("cannot read worker output: \(error)", metadata: slot.metadata())
                }
            }
    }

    /// The parent learns of a child's death at once: a pidfd becomes readable when the process exits.
    func watchExit(_ slot: WorkerIO, pid: pid_t, pidFD: CInt) {
        guard pidFD >= 0 else {
            // No pidfd on this kernel: the waitid thread tells us (ExitWatcher.swift).
            let index = slot.index
            exitWaiter?.watch(pid) { self.reapIfExited(self.slots[index]) }
            return
        }
        let source = DispatchSource.makeReadSource(fileDescriptor: pidFD, queue: .global())
        let eventLoop = self.eventLoop
        let index = slot.index
        source.setEventHandler {
            source.cancel()
            eventLoop.execute { self.reapIfExited(self.slots[index]) }
        }
        source.setCancelHandler { Glibc.close(pidFD) }
        slot.exitWatch = source
        source.resume()
    }

    /// A batch of a worker's kept output for the `tail -f` readers of its device; `first` numbers its first line.
    func workerOutput(device: String, _ batch: [String], first: UInt64) {
        eventLoop.assertInEventLoop()
        for (key, follower) in outputFollowers where follower.device == device {
            var written = false
            for (offset, line) in batch.enumerated() where first + UInt64(offset) >= follower.from {
                // A `tail -f` reader that does not keep up loses lines (counted) rather than growing our memory.
                guard follower.channel.isWritable else {
                    outputFollowers[key]?.dropped += 1
                    continue
                }
                if let dropped = outputFollowers[key]?.dropped, dropped > 0 {
                    follower.channel.write(Frame(type: .chunk, requestID: follower.requestID,
                                                 string: "[npu-supervisord: \(dropped) line(s) dropped: reader too slow]"),
                                           promise: nil)
                    outputFollowers[key]?.dropped = 0
                }
                follower.channel.write(Frame(type: .chunk, requestID: follower.requestID, string: line), promise: nil)
                written = true
            }
            if written { follower.channel.flush() }
        }
    }

    /// The set of `tail -f` readers changed: tell each slot's output whether its batches must come here.
    func followersChanged() {
        let followed = Set(outputFollowers.values.map(\.device))
        for slot in slots { slot.output.setFollowed(followed.contains(slot.spec.device)) }
    }

    func removeFollower(_ key: ObjectIdentifier) {
        guard outputFollowers.removeValue(forKey: key) != nil else { return }
        followersChanged()
    }

    /// Reaps the slot's process if it has exited, gathers the evidence (the memory cgroup's OOM counter) and
    /// hands the exit to the machine.
    func reapIfExited(_ slot: WorkerIO) {
        let pid = slot.pid
        guard pid > 0, !slot.isReaped, let observed = ProcessSpawner.reap(pid) else { return }
        slot.isReaped = true
        exitWaiter?.forget(pid)
        // Anything still in the group (helpers the worker forked) dies with it.
        _ = kill(-pid, SIGKILL)
        slot.exitWatch?.cancel()
        slot.exitWatch = nil
        var oomKillsRose: Bool?
        if let cgroups, let cgroup = slot.cgroup {
            // The kernel's word, not a guess: the cgroup's oom_kill counter rose while this process lived.
            oomKillsRose = (cgroups.oomKills(cgroup.path) ?? 0) > cgroup.oomKillsAtStart
            cgroups.killAll(cgroup.path)
            cgroups.remove(cgroup.path)
            slot.cgroup = nil
        }
        slot.spawnedAt = nil
        feed(.processExited(slot: slot.index, pid: pid, observed, oomKillsRose: oomKillsRose,
                            jitter: Double.random(in: 0..<1)))
        // Helpers it left outside its group are ours now (subreaper): they go with it (after the restart, off its
        // critical path; the start-time rule keeps the new worker's own). Some are re-parented a moment later
        // (when their own parent dies of the group kill): a second sweep catches those.
        sweepOrphans()
        eventLoop.scheduleTask(in: .milliseconds(250)) { self.sweepOrphans() }
    }

    // MARK: Frames from a worker

    /// One frame from the worker's channel. Answers and chunks go straight to their requests (the hot path);
    /// everything else is an event for the machine.
    func workerFrame(_ slot: WorkerIO, pid: pid_t, _ frame: Frame, now: MonotonicInstant) {
        eventLoop.assertInEventLoop()
        guard slot.pid == pid else { return }
        let index = slot.index
        machine.frameReceived(slot: index, now: now)
        switch frame.type {
        case .response where frame.requestID != 0, .error where frame.requestID != 0:
            if frame.type == .error {
                let payload = frame.errorPayload
                if payload.code == ErrorCode.deviceOOM {
                    feed(.workerError(slot: index, pid: pid, code: payload.code, message: payload.message, onRequest: true))
                }
            }
            guard let request = requests[frame.requestID], request.worker == index else { return }
            machine.workerAnswered(slot: index)
            if frame.type == .response && !request.isProbe { machine.requestSucceeded(slot: index, now: now) }
            finishAnswered(request, type: frame.type, flags: frame.flags, payload: frame.payload,
                           at: .uptimeNanoseconds(UInt64(now.nanoseconds)))
            if !queue.isEmpty { dispatchQueued() }
        case .chunk:
            guard let request = requests[frame.requestID], request.worker == index else { return }
            if !request.streamed && !request.isProbe {
                metrics.firstChunk(slot: index, afterNanoseconds: (NIODeadline.now() - (request.deadline - request.timeout)).nanoseconds)
            }
            request.streamed = true
            request.client?.send(Frame(type: .chunk, flags: frame.flags, requestID: request.clientID,
                                       payload: frame.payload))
            request.http?.chunk(frame.payload)
        case .heartbeat:
            break
        case .health:
            struct Report: Decodable {
                var device: String?
                var detail: String?
            }
            if let report = try? JSONCoding.decode(Report.self, from: frame.payload) {
                feed(.workerHealth(slot: index, pid: pid, ok: (report.device ?? "ok") == "ok",
                                   detail: report.detail ?? report.device ?? ""))
            } else {
                feed(.workerHealth(slot: index, pid: pid, ok: false,
                                   detail: "unreadable health report: \(frame.payloadString.prefix(200))"))
            }
        case .error:
            let payload = frame.errorPayload
            feed(.workerError(slot: index, pid: pid, code: payload.code, message: payload.message, onRequest: false))
        case .hello:
            do {
                let hello = try JSONCoding.decode(HelloFromWorker.self, from: frame.payload)
                if hello.protocolVersion == wireProtocolVersion {
                    slot.hello = hello
                    logger.info("worker hello: version \(hello.workerVersion ?? "?"), model \(hello.model ?? "?")",
                                metadata: slot.metadata())
                }
                feed(.workerMessage(slot: index, pid: pid, .hello(protocolVersion: hello.protocolVersion)))
            } catch {
                feed(.workerMessage(slot: index, pid: pid, .unreadableHello(JSONCoding.describe(error))))
            }
        case .ready:
            feed(.workerMessage(slot: index, pid: pid, .ready))
        default:
            feed(.workerMessage(slot: index, pid: pid, .forbidden("\(frame.type)")))
        }
    }

    /// The worker's channel closed (EOF, error, or closed by us).
    func workerChannelClosed(_ slot: WorkerIO, pid: pid_t) {
        guard slot.pid == pid else { return }
        slot.channel = nil
        slot.outbound.clear()
        feed(.channelClosed(slot: slot.index, pid: pid))
    }
}

/// Frames from one worker process to the supervisor (decoded here, without a pipeline hop per frame).
final class WorkerChannelHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    let supervisor: Supervisor
    let slot: WorkerIO
    let pid: pid_t
    #if DEBUG
    var reader: FrameReader
    #else
    @exclusivity(unchecked) var reader: FrameReader
    #endif

    init(supervisor: Supervisor, slot: WorkerIO, pid: pid_t, maxFrame: Int) {
        self.supervisor = supervisor
        self.slot = slot
        self.pid = pid
        self.reader = FrameReader(maximumFrameLength: maxFrame)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        // One clock read per burst of frames: liveness needs no finer time.
        let now = Supervisor.now()
        do {
            try reader.read(unwrapInboundIn(data)) { frame in supervisor.workerFrame(slot, pid: pid, frame, now: now) }
        } catch {
            supervisor.feed(.undecodable(slot: slot.index, pid: pid, message: "\(error)"))
            context.close(promise: nil)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        supervisor.flushAtEndOfTick()
    }

    /// The worker stopped (or resumed) reading what the supervisor writes to it: no new request goes to a
    /// worker whose channel backs up, so what is queued for it stays bounded (see SupervisorMachine).
    func channelWritabilityChanged(context: ChannelHandlerContext) {
        guard slot.pid == pid else { return }
        supervisor.feed(.channelWritability(slot: slot.index, pid: pid, writable: context.channel.isWritable))
    }

    func channelInactive(context: ChannelHandlerContext) {
        supervisor.workerChannelClosed(slot, pid: pid)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // ECONNRESET and friends when the worker dies: the exit path reports the real reason.
        context.close(promise: nil)
    }
}

/// Splits a worker's stdout/stderr into lines (capped at 16 KiB each, so a worker printing without newlines
/// cannot grow the supervisor's memory), judges each against the worker's output rate limit
/// (``OutputRateLimiter``: what is over it is counted and replaced by a marker) and hands on what is kept, one
/// batch per read. Runs on the output thread.
final class OutputLineHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    static let maximumLine = 16 * 1024
    let onBatch: ([String]) -> Void
    var limiter: OutputRateLimiter
    var pending = ByteBuffer()
    var batch: [String] = []

    init(limiter: OutputRateLimiter, onBatch: @escaping ([String]) -> Void) {
        self.limiter = limiter
        self.onBatch = onBatch
    }

    private func judge(_ bytes: UnsafeRawBufferPointer, suffix: String = "", now: Int64) {
        switch limiter.admit(lineBytes: bytes.count, nowNanoseconds: now) {
        case .drop: return
        case .keep: break
        case .keepAfterMarker(let marker): batch.append(marker)
        }
        batch.append(String(decoding: bytes, as: UTF8.self) + suffix)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        let now = Int64(NIODeadline.now().uptimeNanoseconds)
        if pending.readableBytes == 0 {
            // The usual case: split the read buffer itself; only an unfinished last line is copied.
            split(&buffer, now: now)
            if buffer.readableBytes > 0 { pending.writeBuffer(&buffer) }
        } else {
            pending.writeBuffer(&buffer)
            split(&pending, now: now)
        }
        while pending.readableBytes > Self.maximumLine {
            pending.withUnsafeReadableBytes { judge(UnsafeRawBufferPointer(rebasing: $0.prefix(Self.maximumLine)),
                                                    suffix: " [line truncated]", now: now) }
            pending.moveReaderIndex(forwardBy: Self.maximumLine)
        }
        pending.discardReadBytes()
        if batch.count >= 4096 { deliver() }
    }

    /// Takes every complete line off the front of `buffer`.
    private func split(_ buffer: inout ByteBuffer, now: Int64) {
        let consumed = buffer.withUnsafeReadableBytes { bytes -> Int in
            guard let base = bytes.baseAddress else { return 0 }
            var start = 0
            while start < bytes.count,
                  let hit = memchr(base + start, Int32(UInt8(ascii: "\n")), bytes.count - start) {
                let end = base.distance(to: UnsafeRawPointer(hit))
                judge(UnsafeRawBufferPointer(rebasing: bytes[start..<end]), now: now)
                start = end + 1
            }
            return start
        }
        buffer.moveReaderIndex(forwardBy: consumed)
    }

    private func deliver() {
        guard !batch.isEmpty else { return }
        let lines = batch
        batch.removeAll(keepingCapacity: true)
        onBatch(lines)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        deliver()
    }

    func channelInactive(context: ChannelHandlerContext) {
        if pending.readableBytes > 0 {
            pending.withUnsafeReadableBytes { judge($0, now: Int64(NIODeadline.now().uptimeNanoseconds)) }
            pending.clear()
        }
        if let marker = limiter.flushMarker() { batch.append(marker) }
        deliver()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}

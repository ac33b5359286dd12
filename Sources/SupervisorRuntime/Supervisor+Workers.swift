@preconcurrency import Dispatch
import Glibc
import Logging
import NIOCore
import NIOPosix
import SupervisorCore
import WireProtocol

extension Supervisor {
    /// Carries out what the state machine decided, then re-arms the slot's timer.
    func perform(_ action: WorkerStateMachine.Action?, on slot: WorkerSlot) {
        switch action {
        case .spawn?:
            spawn(slot)
        case .signalGroup(let signal)?:
            if let pid = slot.machine.pid, pid > 0 {
                // The whole group: a worker's helpers (tokenizer servers, data loaders) go with it.
                if kill(-pid, signal) != 0 && errno == ESRCH { _ = kill(pid, signal) }
                logger.info("sent \(signalName(signal)) to worker process group", metadata: slot.metadata())
            }
        case nil:
            break
        }
        rearmTimer(slot)
        healthChanged()
    }

    func rearmTimer(_ slot: WorkerSlot) {
        slot.timer?.cancel()
        slot.timer = nil
        guard let deadline = slot.machine.nextDeadline else { return }
        slot.timer = eventLoop.scheduleTask(deadline: Self.deadline(deadline)) { [weak slot] in
            guard let slot else { return }
            slot.timer = nil
            let before = slot.machine.stateName
            let action = slot.machine.timerFired(now: Self.now())
            if case .starting = slot.machine.state, action != nil {
                self.logger.error("worker not ready within start_timeout (\(slot.spec.policy.startTimeout.configString)); killing it",
                                  metadata: slot.metadata(reason: "start_timeout"))
            }
            if before == "failed", action == .spawn {
                self.logger.notice("retrying failed device", metadata: slot.metadata())
            }
            self.perform(action, on: slot)
        }
    }

    func spawn(_ slot: WorkerSlot) {
        let now = Self.now()
        let spawned: SpawnedWorker
        do {
            var procsFD: CInt = -1
            slot.cgroup = nil
            if let cgroups {
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
            spawned = try ProcessSpawner.spawn(slot.spec, cgroupProcsFD: procsFD, trampoline: cgroups?.trampoline)
        } catch let error as SystemError {
            logger.error("could not start worker: \(error)", metadata: slot.metadata(reason: "spawn_failed"))
            let action = slot.machine.spawnFailed(errno: error.errno, now: now, jitter: Double.random(in: 0..<1))
            logTransition(slot, to: slot.machine)
            perform(action, on: slot)
            return
        } catch {
            preconditionFailure("ProcessSpawner.spawn throws only SystemError")
        }
        slot.machine.spawned(pid: spawned.pid, now: now)
        slot.spawnedAt = .now()
        slot.lastFrameAt = now
        slot.hello = nil
        logger.info("started worker: \(slot.spec.command.joined(separator: " "))", metadata: slot.metadata())
        attachChannel(slot, pid: spawned.pid, fd: spawned.channelFD)
        attachOutput(slot, pid: spawned.pid, fd: spawned.outputFD)
        watchExit(slot, pid: spawned.pid, pidFD: spawned.pidFD)
    }

    func attachChannel(_ slot: WorkerSlot, pid: pid_t, fd: CInt) {
        let maxFrame = config.maxFrameBytes
        let hello = HelloFromSupervisor(
            device: slot.spec.device,
            heartbeatIntervalMS: Int(slot.spec.heartbeatInterval.nanoseconds / 1_000_000),
            maxFrameBytes: maxFrame)
        ClientBootstrap(group: eventLoop)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        WorkerChannelHandler(supervisor: self, slot: slot, pid: pid, maxFrame: maxFrame))
                }
            }
            .withConnectedSocket(fd)
            .whenComplete { result in
                switch result {
                case .success(let channel):
                    guard slot.machine.pid == pid else {
                        channel.close(promise: nil)
                        return
                    }
                    slot.channel = channel
                    slot.outbound = channel.allocator.buffer(capacity: 4096)
                    slot.send(Frame(type: .hello, payload: JSONCoding.encode(hello)))
                    slot.flush()
                case .failure(let error):
                    Glibc.close(fd)
                    self.logger.error("could not adopt worker channel: \(error)", metadata: slot.metadata())
                    self.perform(slot.machine.fault(.protocolError("channel setup failed"), now: Self.now()),
                                 on: slot)
                }
            }
    }

    func attachOutput(_ slot: WorkerSlot, pid: pid_t, fd: CInt) {
        let device = slot.spec.device
        NIOPipeBootstrap(group: eventLoop)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        OutputLineHandler { line in self.workerOutput(slot, pid: pid, device: device, line: line) })
                }
            }
            .takingOwnershipOfDescriptor(input: fd)
            .whenComplete { result in
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
    func watchExit(_ slot: WorkerSlot, pid: pid_t, pidFD: CInt) {
        guard pidFD >= 0 else { return }  // no pidfd: the housekeeping tick reaps instead
        let source = DispatchSource.makeReadSource(fileDescriptor: pidFD, queue: .global())
        let eventLoop = self.eventLoop
        source.setEventHandler {
            source.cancel()
            eventLoop.execute { self.reapIfExited(slot) }
        }
        source.setCancelHandler { Glibc.close(pidFD) }
        slot.exitWatch = source
        source.resume()
    }

    func workerOutput(_ slot: WorkerSlot, pid: pid_t, device: String, line: String) {
        slot.output.append(line)
        logger.info("\(line)", metadata: ["device": "\(device)", "worker_pid": "\(pid)", "stream": "output"])
        for (key, follower) in outputFollowers where follower.device == device {
            // A `tail -f` reader that does not keep up loses lines (counted) rather than growing our memory.
            guard follower.channel.isWritable else {
                outputFollowers[key]?.dropped += 1
                continue
            }
            if follower.dropped > 0 {
                follower.channel.write(Frame(type: .chunk, requestID: follower.requestID,
                                             string: "[npu-supervisord: \(follower.dropped) line(s) dropped: reader too slow]"),
                                       promise: nil)
                outputFollowers[key]?.dropped = 0
            }
            follower.channel.writeAndFlush(Frame(type: .chunk, requestID: follower.requestID, string: line),
                                           promise: nil)
        }
    }

    /// Reaps the slot's process if it has exited and hands the exit to the state machine.
    func reapIfExited(_ slot: WorkerSlot) {
        guard let pid = slot.machine.pid, pid > 0, slot.reapedExit == nil,
              let observed = ProcessSpawner.reap(pid) else { return }
        // Anything still in the group (helpers the worker forked) dies with it.
        _ = kill(-pid, SIGKILL)
        slot.exitWatch?.cancel()
        slot.exitWatch = nil
        slot.channelClosedCheck?.cancel()
        if let channel = slot.channel {
            // Frames the worker wrote just before it exited (its last answers, a device_oom report) are still
            // in the socket: read them up to the EOF before deciding anything, or an answered request would be
            // run again and the exit misattributed. The EOF is immediate now that the process is gone; the
            // timer only guards against a descendant that escaped the group and still holds fd 3.
            slot.reapedExit = observed
            slot.exitDrain = eventLoop.scheduleTask(in: .milliseconds(500)) { channel.close(promise: nil) }
            return
        }
        completeExit(slot, pid: pid, observed: observed)
    }

    /// The process is reaped and its channel drained: hand the exit to the state machine.
    func completeExit(_ slot: WorkerSlot, pid: pid_t, observed: ExitReason) {
        var observed = observed
        var note: String?
        if let cgroups, let cgroup = slot.cgroup {
            // The kernel's word, not a guess: the cgroup's oom_kill counter rose while this process lived.
            if let kills = cgroups.oomKills(cgroup.path), kills > cgroup.oomKillsAtStart {
                observed = .oomKilled
            } else if observed == .signaled(signal: 9, coreDumped: false) {
                note = "not the kernel OOM killer: its memory cgroup's oom_kill counter did not rise"
            }
            cgroups.killAll(cgroup.path)
            cgroups.remove(cgroup.path)
            slot.cgroup = nil
        }
        slot.reapedExit = nil
        slot.exitDrain?.cancel()
        slot.exitDrain = nil
        slot.channel?.close(promise: nil)
        slot.channel = nil
        slot.outbound.clear()
        slot.spawnedAt = nil
        slot.lastFrameAt = nil
        workerGone(slot)
        failInflight(of: slot, code: ErrorCode.workerLost)
        let action = slot.machine.exited(observed, now: Self.now(), jitter: Double.random(in: 0..<1))
        logTransition(slot, to: slot.machine, pid: pid, note: note)
        if let last = slot.machine.lastExit, last != .stopped {
            metrics.workerExited(device: slot.spec.device, reason: last.kind)
        }
        perform(action, on: slot)
        answerHopelessQueued()
        dispatchQueued()
        flushAll()
        checkStopped()
    }

    func logTransition(_ slot: WorkerSlot, to machine: WorkerStateMachine, pid: pid_t? = nil, note: String? = nil) {
        guard let reason = machine.lastExit else { return }
        var metadata = slot.metadata(reason: reason.description)
        if let pid { metadata["worker_pid"] = "\(pid)" }
        // A SIGKILL while a memory cgroup watched the worker: say what the counter proves instead of "possibly OOM".
        let detail = reason == .signaled(signal: 9, coreDumped: false) ? note.map { "killed by SIGKILL (\($0))" } : nil
        var message = "worker \(detail ?? reason.detail) → \(machine.stateName)"
        switch machine.state {
        case .backoff(let until):
            message += String(format: "; restart #%d in %.2fs", machine.restarts, (until - Self.now()).seconds)
        case .failed(let retry?):
            message += "; too many restarts (\(machine.policy.maxRestarts) in \(machine.policy.restartWindow.configString)), "
                + "device marked failed, next try in \(Int((retry - Self.now()).seconds))s or on `npu-supervisorctl start`"
        case .failed(nil):
            if case .deviceUnhealthy = reason {
                message += "; held failed while the device probe fails (its worker was already restarted once)"
            } else {
                message += "; not restarted (exit code 78: fix the worker's configuration, then `npu-supervisorctl start`)"
            }
        default:
            break
        }
        if case .stopped = reason { logger.info("\(message)", metadata: metadata) }
        else if machine.desired == .down { logger.info("\(message)", metadata: metadata) }
        else { logger.error("\(message)", metadata: metadata) }
    }

    // MARK: Frames from a worker

    func workerFrame(_ slot: WorkerSlot, pid: pid_t, _ frame: Frame) {
        guard slot.machine.pid == pid else { return }
        let now = Self.now()
        slot.lastFrameAt = now
        switch frame.type {
        case .response where frame.requestID != 0, .error where frame.requestID != 0:
            if frame.type == .error {
                let payload = frame.errorPayload
                if payload.code == ErrorCode.deviceOOM { slot.machine.attribute(.deviceOOM, until: now + .seconds(5)) }
            }
            guard let request = requests[frame.requestID], request.worker === slot else { return }
            if frame.type == .response && !request.isProbe { slot.lastRealSuccess = .now() }
            finish(request, with: Frame(type: frame.type, flags: frame.flags, requestID: request.clientID,
                                        payload: frame.payload))
            if !queue.isEmpty { dispatchQueued() }
        case .chunk:
            guard let request = requests[frame.requestID], request.worker === slot else { return }
            request.streamed = true
            request.client?.send(Frame(type: .chunk, flags: frame.flags, requestID: request.clientID,
                                       payload: frame.payload))
        case .heartbeat:
            break
        case .health:
            workerHealthReport(slot, frame)
        case .error:
            let payload = frame.errorPayload
            if payload.code == ErrorCode.deviceOOM {
                slot.machine.attribute(.deviceOOM, until: now + .seconds(5))
            }
            logger.warning("worker error: \(payload.code): \(payload.message)", metadata: slot.metadata())
        case .hello:
            do {
                let hello = try JSONCoding.decode(HelloFromWorker.self, from: frame.payload)
                guard hello.protocolVersion == wireProtocolVersion else {
                    protocolViolation(slot, "speaks protocol \(hello.protocolVersion), supervisor speaks \(wireProtocolVersion)")
                    return
                }
                slot.hello = hello
                logger.info("worker hello: version \(hello.workerVersion ?? "?"), model \(hello.model ?? "?")",
                            metadata: slot.metadata())
            } catch {
                protocolViolation(slot, "hello payload is not valid JSON: \(error)")
            }
        case .ready:
            guard slot.hello != nil else {
                protocolViolation(slot, "sent ready before hello (the protocol version was never agreed)")
                return
            }
            if slot.machine.readyReceived(now: now) {
                let startup = slot.spawnedAt.map { Double((NIODeadline.now() - $0).nanoseconds) / 1e9 } ?? 0
                logger.notice("worker ready after \(String(format: "%.3f", startup))s", metadata: slot.metadata())
                workerBecameReady(slot)
                rearmTimer(slot)
                healthChanged()
                dispatchQueued()
                flushAll()
            }
        default:
            protocolViolation(slot, "sent a \(frame.type) frame, which workers may not send")
        }
    }

    func protocolViolation(_ slot: WorkerSlot, _ why: String) {
        logger.error("worker broke the protocol: \(why); killing it", metadata: slot.metadata(reason: "protocol_error"))
        perform(slot.machine.fault(.protocolError(why), now: Self.now()), on: slot)
    }

    /// The worker's channel closed. Its requests cannot be answered any more: re-dispatch them at once. If the
    /// process does not exit by itself shortly, it is a worker that closed fd 3 and kept running: kill it.
    func workerChannelClosed(_ slot: WorkerSlot, pid: pid_t) {
        guard slot.machine.pid == pid else { return }
        if let observed = slot.reapedExit {
            completeExit(slot, pid: pid, observed: observed)
            return
        }
        slot.channel = nil
        slot.outbound.clear()
        failInflight(of: slot, code: ErrorCode.workerLost)
        healthChanged()
        dispatchQueued()
        flushAll()
        slot.channelClosedCheck = eventLoop.scheduleTask(in: .seconds(1)) {
            self.reapIfExited(slot)
            guard slot.machine.pid == pid else { return }
            if case .stopping = slot.machine.state { return }
            self.protocolViolation(slot, "closed its channel (fd 3) but kept running")
        }
    }
}

/// Frames from one worker process to the supervisor (decoded here, without a pipeline hop per frame).
final class WorkerChannelHandler: ChannelInboundHandler, @unchecked Sendable {  // confined to the event loop
    typealias InboundIn = ByteBuffer
    let supervisor: Supervisor
    let slot: WorkerSlot
    let pid: pid_t
    var reader: FrameReader

    init(supervisor: Supervisor, slot: WorkerSlot, pid: pid_t, maxFrame: Int) {
        self.supervisor = supervisor
        self.slot = slot
        self.pid = pid
        self.reader = FrameReader(maximumFrameLength: maxFrame)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        do {
            try reader.read(unwrapInboundIn(data)) { frame in supervisor.workerFrame(slot, pid: pid, frame) }
        } catch {
            supervisor.protocolViolation(slot, "\(error)")
            context.close(promise: nil)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        supervisor.flushAll()
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
/// cannot grow the supervisor's memory) and hands them on.
final class OutputLineHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    static let maximumLine = 16 * 1024
    let onLine: (String) -> Void
    var pending = ByteBuffer()

    init(onLine: @escaping (String) -> Void) { self.onLine = onLine }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        pending.writeBuffer(&buffer)
        while let newline = pending.readableBytesView.firstIndex(of: UInt8(ascii: "\n")) {
            let length = newline - pending.readerIndex
            let line = pending.readString(length: length) ?? ""
            pending.moveReaderIndex(forwardBy: 1)
            onLine(line)
        }
        if pending.readableBytes > Self.maximumLine {
            onLine((pending.readString(length: Self.maximumLine) ?? "") + " [line truncated]")
        }
        pending.discardReadBytes()
    }

    func channelInactive(context: ChannelHandlerContext) {
        if pending.readableBytes > 0, let rest = pending.readString(length: pending.readableBytes) { onLine(rest) }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}

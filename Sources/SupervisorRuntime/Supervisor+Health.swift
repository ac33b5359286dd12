@preconcurrency import Dispatch
import Glibc
import Logging
import NIOCore
import NIOPosix
import SupervisorCore
import WireProtocol

/// Probes as I/O: the machine decides when a device probe or an inference probe is due and what its result
/// means (``DeviceHealth``, ``InferenceProbe``); this file runs them and reports back.
extension Supervisor {
    /// Runs a `path` probe (at once) or a `command` probe (a process with a timeout).
    func runDeviceProbe(_ slot: WorkerIO) {
        let probe = slot.spec.deviceProbe
        let index = slot.index
        switch probe.kind {
        case .none, .worker:
            // The machine judges `worker` probes itself and never asks to run `none`.
            preconditionFailure("runDeviceProbe for a \(probe.kind) probe")
        case .path:
            var failure: String?
            for path in probe.paths {
                let fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC)
                if fd < 0 {
                    failure = "cannot open \(path): \(String(cString: strerror(errno)))"
                    break
                }
                Glibc.close(fd)
            }
            feed(.deviceProbeFinished(slot: index, failure: failure))
        case .command:
            if let stuck = probePids.first(where: { $0.value == index })?.key {
                // Its last probe outlived its timeout's SIGKILL (a process stuck in the kernel, e.g. on a wedged
                // driver): one such process per device at most, not one more per interval.
                feed(.deviceProbeFinished(slot: index, failure: "probe `\(probe.command.joined(separator: " "))` "
                    + "(pid \(stuck)) is still running after its timeout's SIGKILL, stuck in the kernel (check the "
                    + "device and its driver, e.g. dmesg); no new probe until it exits"))
                return
            }
            let pid = ProbeCommand.run(probe.command, environment: ["NPU_DEVICE_ID": slot.spec.device],
                                       timeout: probe.timeout, on: eventLoop, logger: logger, exitWaiter: exitWaiter,
                                       onReaped: { self.probePids.removeValue(forKey: $0) }) { result in
                // For npu_supervisor_device_healthy: a probe that could not run or timed out says nothing of the device.
                self.metrics.probeCouldNotRun(slot: index, result.spawnError != nil || result.timedOut != nil)
                self.feed(.deviceProbeFinished(slot: index, failure: result.failure(healthy: probe.healthy)))
            }
            // Ours to reap, also once it is a zombie, whose environment (`NPU_SUPERVISOR_PROBE`) can no longer be
            // read: the orphan sweep must not take it for an adopted helper (Orphans.swift).
            if let pid { probePids[pid] = index }
        }
    }

    /// Sends the inference probe as an ordinary request pinned to the worker; its answer is judged here and
    /// the verdict handed to the machine.
    func sendInferenceProbe(_ slot: WorkerIO) {
        let probe = slot.spec.inferenceProbe
        let index = slot.index
        let request = PendingRequest(id: requests.nextID, sequence: nextSequence, clientID: 0, client: nil,
                                     payload: ByteBuffer(string: probe.payload), pinned: index,
                                     timeout: .nanoseconds(probe.timeout.nanoseconds), now: .now())
        nextSequence &+= 1
        request.isProbe = true
        let textField = probe.textField
        request.onFinish = { frame in
            let failure = InferenceProbe.judge(Self.probeAnswer(frame, textField: textField), textField: textField)
            self.feed(.inferenceProbeFinished(slot: index, failure: failure))
        }
        let inserted = requests.insert(request)
        assert(inserted == request.id, "the request table changed between nextID and insert")
        guard dispatchNow(request) else {
            requests.remove(request.id)
            feed(.inferenceProbeNotSent(slot: index))
            return
        }
        trackDeadline(request)
        flushAll()
    }

    /// What the probe judge needs of an answer (decoding is I/O's; the verdict is the core's).
    static func probeAnswer(_ frame: Frame?, textField: String) -> InferenceProbe.Answer {
        guard let frame else { return .none }
        if frame.type == .error {
            let e = frame.errorPayload
            return .error(code: e.code, message: e.message)
        }
        if frame.payload.getInteger(at: frame.payload.readerIndex, as: UInt8.self) == UInt8(ascii: "{"),
           let object = try? JSONCoding.decode([String: JSONScalar].self, from: frame.payload) {
            guard let field = object[textField] else { return .json(textField: nil) }
            if case .string(let text) = field { return .json(textField: .some(text)) }
            return .json(textField: .some(nil))
        }
        return .bytes(frame.payload.readableBytes)
    }
}

/// Any JSON value, reduced to what the probe judge needs.
enum JSONScalar: Decodable {
    case string(String)
    case other

    init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        if let s = try? c.decode(String.self) { self = .string(s) } else { self = .other }
    }
}


/// One run of a probe command with a timeout: output (bounded), exit status.
struct ProbeCommand {
    struct Result {
        var command: [String]
        var exit: ExitReason?
        var output: String
        var timedOut: Duration?
        var spawnError: String?

        /// nil when healthy: exit 0 and the output matches `healthy`.
        func failure(healthy: String) -> String? {
            let name = command.joined(separator: " ")
            if let spawnError { return "probe `\(name)` could not start: \(spawnError)" }
            if let timedOut { return "probe `\(name)` timed out after \(timedOut.configString)" }
            let line = Self.relevantLine(output)
            guard case .exited(0)? = exit else {
                return "probe `\(name)` \(exit?.description ?? "?")" + (line.isEmpty ? "" : ": \(line)")
            }
            if let regex = try? Regex(healthy), output.firstMatch(of: regex) != nil { return nil }
            return "probe `\(name)`: \(line.isEmpty ? "no output" : line)"
        }

        /// The line worth quoting: npu-smi's "Health Status" line, else the last non-empty line.
        static func relevantLine(_ output: String) -> String {
            let lines = output.split(separator: "\n").map { String($0).trimmingWhitespace() }.filter { !$0.isEmpty }
            let line = lines.first { $0.contains("Health") || $0.contains("health") } ?? lines.last ?? ""
            return String(line.prefix(200))
        }
    }

    static let maximumOutput = 64 * 1024

    /// Runs the probe; returns its pid (nil when it could not start). `onReaped` gets the pid once its process
    /// is reaped, which may be after `completion` (a probe given up on after its timeout).
    @discardableResult
    static func run(_ command: [String], environment: [String: String], timeout: Duration, on loop: any EventLoop,
                    logger: Logger, exitWaiter: ExitWaiter? = nil, onReaped: @escaping (pid_t) -> Void = { _ in },
                    completion: @escaping (Result) -> Void) -> pid_t? {
        let state = ProbeState(result: Result(command: command, exit: nil, output: "", timedOut: nil, spawnError: nil),
                               completion: completion)
        state.exitWaiter = exitWaiter
        state.onReaped = onReaped
        state.loop = loop
        let spawned: SpawnedWorker
        do {
            spawned = try ProcessSpawner.spawnProbe(command, extraEnvironment: environment)
        } catch {
            state.result.spawnError = "\(error)"
            completion(state.result)
            return nil
        }
        state.pid = spawned.pid
        // Everything below runs on `loop`; NIOLoopBound checks it.
        let bound = NIOLoopBound(state, eventLoop: loop)
        state.timeoutTask = loop.scheduleTask(in: .nanoseconds(timeout.nanoseconds)) {
            let state = bound.value
            state.result.timedOut = timeout
            // The pidfd then wakes us for the reap; the pipe closes as the group dies. Not once reaped: the pid
            // may belong to someone else by now.
            if !state.reaped { _ = kill(-spawned.pid, SIGKILL) }
            // Unless a descendant left the group and holds the pipe (a helper daemon the command started), or the
            // exit is never reported: the verdict must come anyway, or the device would never be judged again.
            state.graceTask = loop.scheduleTask(in: Self.gracePeriod) { bound.value.finishRegardless() }
        }
        NIOPipeBootstrap(group: loop)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(CollectingHandler { bytes, closed in
                        let state = bound.value
                        state.append(bytes)
                        if closed {
                            state.outputClosed = true
                            state.reap()
                            state.finishIfDone()
                        }
                    })
                }
            }
            .takingOwnershipOfDescriptor(input: spawned.outputFD)
            .whenComplete { outcome in
                let state = bound.value
                switch outcome {
                case .success(let channel):
                    state.outputChannel = channel
                    if state.completed { channel.close(promise: nil) }
                case .failure:
                    close(spawned.outputFD)
                    state.outputClosed = true
                    state.finishIfDone()
                }
            }
        if spawned.pidFD < 0 {
            exitWaiter?.watch(spawned.pid) { bound.value.reap() }
        } else {
            let source = DispatchSource.makeReadSource(fileDescriptor: spawned.pidFD, queue: .global())
            source.setEventHandler {
                source.cancel()
                loop.execute { bound.value.reap() }
            }
            source.setCancelHandler { close(spawned.pidFD) }
            source.resume()
        }
        return spawned.pid
    }

    /// After a timeout's SIGKILL, how long the exit and the pipe's end are waited for before the verdict is
    /// given without them.
    static let gracePeriod: TimeAmount = .seconds(1)

    final class ProbeState {
        var result: Result
        let completion: (Result) -> Void
        var pid: pid_t = 0
        var output: [UInt8] = []
        var exited = false
        /// Reaped: apart from `exited`, which a probe given up on after its timeout sets without the reap (the
        /// process is still reaped when its exit is reported).
        var reaped = false
        var outputClosed = false
        var completed = false
        var timeoutTask: Scheduled<Void>?
        var graceTask: Scheduled<Void>?
        var outputChannel: (any Channel)?
        var exitWaiter: ExitWaiter?
        var onReaped: (pid_t) -> Void = { _ in }
        var loop: (any EventLoop)?

        init(result: Result, completion: @escaping (Result) -> Void) {
            self.result = result
            self.completion = completion
        }

        func append(_ bytes: [UInt8]) {
            if output.count < maximumOutput { output += bytes.prefix(maximumOutput - output.count) }
        }

        func reap() {
            guard !reaped, pid > 0, let exit = ProcessSpawner.reap(pid) else { return }
            reaped = true
            exited = true
            exitWaiter?.forget(pid)
            onReaped(pid)
            result.exit = exit
            _ = kill(-pid, SIGKILL)  // helpers it left behind, and their hold on the pipe
            finishIfDone()
        }

        func finishIfDone() {
            guard !completed, exited, outputClosed else { return }
            completed = true
            timeoutTask?.cancel()
            graceTask?.cancel()
            result.output = String(decoding: output, as: UTF8.self)
            completion(result)
        }

        /// The grace after a timeout is over: the probe has timed out whether or not its exit and the pipe's end
        /// were seen. The pipe is closed (a descendant may still hold its other end); an exit not seen yet stays
        /// watched, and reaped when it is reported.
        func finishRegardless() {
            guard !completed else { return }
            reap()
            guard !completed else { return }
            exited = true
            outputClosed = true
            outputChannel?.close(promise: nil)
            finishIfDone()
            retryReap()
        }

        /// Reaps once the process exits, whatever reports its exit (or nothing does: a probe without a pidfd or
        /// an exit watcher, its pipe already closed here).
        private func retryReap() {
            guard !reaped, let loop else { return }
            let bound = NIOLoopBound(self, eventLoop: loop)
            loop.scheduleTask(in: .seconds(1)) {
                let state = bound.value
                state.reap()
                state.retryReap()
            }
        }
    }
}

/// Collects a pipe's bytes and reports its end.
final class CollectingHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    let onData: ([UInt8], Bool) -> Void

    init(onData: @escaping ([UInt8], Bool) -> Void) { self.onData = onData }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        onData(Array(buffer.readableBytesView), false)
    }

    func channelInactive(context: ChannelHandlerContext) { onData([], true) }

    func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }
}

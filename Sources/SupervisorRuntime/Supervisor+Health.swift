@preconcurrency import Dispatch
import Glibc
import Logging
import NIOCore
import NIOPosix
import SupervisorCore
import WireProtocol

/// DESIGN section 5: per worker, liveness (heartbeats, in `tick()`), device (a probe), model (`ready`) and
/// inference (a periodic short request); CPU fallback workers while device workers cannot serve.
extension Supervisor {
    func startHealthProbes() {
        for slot in slots where slot.spec.deviceProbe.kind != .none {
            scheduleDeviceProbe(slot, in: .zero)
        }
    }

    // MARK: Device level

    func scheduleDeviceProbe(_ slot: WorkerSlot, in delay: Duration) {
        slot.deviceProbeTimer?.cancel()
        guard !isShuttingDown else { return }
        slot.deviceProbeTimer = eventLoop.scheduleTask(in: .nanoseconds(delay.nanoseconds)) {
            slot.deviceProbeTimer = nil
            self.runDeviceProbe(slot)
        }
    }

    func runDeviceProbe(_ slot: WorkerSlot) {
        let probe = slot.spec.deviceProbe
        guard !slot.deviceProbeRunning else { return }
        switch probe.kind {
        case .none:
            return
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
            deviceProbeResult(slot, failure: failure)
        case .worker:
            if slot.machine.isHeldFailed, case .deviceUnhealthy? = slot.machine.lastExit, slot.machine.desired == .up {
                // Only a running worker can report on its device: start one on trial. If the device is still
                // bad, the first verdict holds it failed again (it was already restarted for this fault).
                logger.notice("re-probing the device with a trial worker", metadata: slot.metadata())
                perform(slot.machine.start(now: Self.now()), on: slot)
                slot.restartedForDevice = true
                scheduleDeviceProbe(slot, in: probe.failedInterval)
                return
            }
            guard slot.machine.isReady else {
                // Nothing to ask yet: the worker's own report only exists while it runs.
                scheduleDeviceProbe(slot, in: probe.interval)
                return
            }
            let staleAfter = max(probe.interval * 2, slot.spec.heartbeatTimeout)
            if slot.workerReport == nil, let since = slot.readyAt, NIODeadline.now() - since < .nanoseconds(staleAfter.nanoseconds) {
                // Just became ready: its first report may not have come yet. No verdict.
                scheduleDeviceProbe(slot, in: probe.interval)
                return
            }
            if let report = slot.workerReport, NIODeadline.now() - report.at <= .nanoseconds(staleAfter.nanoseconds) {
                deviceProbeResult(slot, failure: report.ok ? nil : "worker reports: \(report.detail)")
            } else {
                deviceProbeResult(slot, failure: "no health report from the worker within \(staleAfter.configString)")
            }
        case .command:
            slot.deviceProbeRunning = true
            let command = probe.command
            ProbeCommand.run(command, environment: ["NPU_DEVICE_ID": slot.spec.device], timeout: probe.timeout,
                             on: eventLoop, logger: logger) { result in
                slot.deviceProbeRunning = false
                self.deviceProbeResult(slot, failure: result.failure(healthy: probe.healthy))
            }
        }
    }

    /// A probe verdict: nil is healthy, else what is wrong.
    func deviceProbeResult(_ slot: WorkerSlot, failure: String?) {
        let probe = slot.spec.deviceProbe
        defer {
            scheduleDeviceProbe(slot, in: slot.machine.isHeldFailed ? probe.failedInterval : probe.interval)
        }
        guard let failure else {
            slot.deviceFailures = 0
            if case .bad = slot.deviceHealth {
                logger.notice("device healthy again; back in rotation", metadata: slot.metadata())
            }
            slot.deviceHealth = .ok
            slot.restartedForDevice = false
            if slot.machine.isHeldFailed, case .deviceUnhealthy = slot.machine.lastExit, slot.machine.desired == .up {
                logger.notice("device recovered: starting its worker again", metadata: slot.metadata())
                perform(slot.machine.start(now: Self.now()), on: slot)
            } else {
                healthChanged()
                dispatchQueued()
                flushAll()
            }
            return
        }
        slot.deviceFailures += 1
        guard slot.deviceFailures >= probe.failures else {
            logger.warning("device probe failed (\(slot.deviceFailures)/\(probe.failures)): \(failure)",
                           metadata: slot.metadata())
            return
        }
        let wasBad: Bool = if case .bad = slot.deviceHealth { true } else { false }
        slot.deviceHealth = .bad(failure)
        if !wasBad {
            logger.error("device unhealthy, out of rotation: \(failure)", metadata: slot.metadata(reason: "device_unhealthy"))
        }
        let now = Self.now()
        switch slot.machine.state {
        case .starting, .ready:
            if !slot.restartedForDevice {
                // A restart sometimes clears a device fault (a wedged context, a leaked allocation): try once.
                slot.restartedForDevice = true
                logger.warning("restarting the worker once to try to clear the device fault", metadata: slot.metadata())
                perform(slot.machine.fault(.deviceUnhealthy(failure), now: now), on: slot)
            } else if slot.machine.isReady {
                holdDeviceFailed(slot, failure, now: now)
            } else {
                healthChanged()
            }
        case .backoff where slot.restartedForDevice:
            holdDeviceFailed(slot, failure, now: now)
        default:
            healthChanged()
        }
    }

    func holdDeviceFailed(_ slot: WorkerSlot, _ failure: String, now: MonotonicInstant) {
        let every = slot.spec.deviceProbe.failedInterval.configString
        logger.error("device still unhealthy after a worker restart: worker stopped, device marked failed, re-probed every \(every)",
                     metadata: slot.metadata(reason: "device_unhealthy"))
        perform(slot.machine.holdFailed(.deviceUnhealthy(failure), now: now), on: slot)
    }

    func workerHealthReport(_ slot: WorkerSlot, _ frame: Frame) {
        struct Report: Decodable {
            var device: String?
            var detail: String?
        }
        guard let report = try? JSONCoding.decode(Report.self, from: frame.payload) else {
            slot.workerReport = (false, "unreadable health report: \(frame.payloadString.prefix(200))", .now())
            return
        }
        let ok = (report.device ?? "ok") == "ok"
        slot.workerReport = (ok, report.detail ?? report.device ?? "", .now())
    }

    // MARK: Model and inference levels

    func workerBecameReady(_ slot: WorkerSlot) {
        slot.hasBeenReady = true
        slot.readyAt = .now()
        slot.inferenceFailures = 0
        slot.inferenceVerdict = "unknown"
        scheduleInferenceProbe(slot)
        // A device out of rotation gets its verdict soon after a fresh worker is up, not a whole interval later.
        if case .bad = slot.deviceHealth, slot.spec.deviceProbe.kind != .none {
            scheduleDeviceProbe(slot, in: max(slot.spec.heartbeatInterval * 2, .milliseconds(50)))
        }
    }

    func workerGone(_ slot: WorkerSlot) {
        slot.inferenceProbeTimer?.cancel()
        slot.inferenceProbeTimer = nil
        slot.inferenceProbeInFlight = false
        slot.workerReport = nil
        slot.lastRealSuccess = nil
    }

    func scheduleInferenceProbe(_ slot: WorkerSlot) {
        let probe = slot.spec.inferenceProbe
        slot.inferenceProbeTimer?.cancel()
        guard probe.enabled, !isShuttingDown else { return }
        slot.inferenceProbeTimer = eventLoop.scheduleTask(in: .nanoseconds(probe.interval.nanoseconds)) {
            slot.inferenceProbeTimer = nil
            self.runInferenceProbe(slot)
        }
    }

    func runInferenceProbe(_ slot: WorkerSlot) {
        let probe = slot.spec.inferenceProbe
        guard slot.machine.isReady, slot.channel != nil, !slot.inferenceProbeInFlight else { return }
        // Real traffic that succeeds says more than a probe would: skip it.
        if let last = slot.lastRealSuccess, NIODeadline.now() - last < .nanoseconds(probe.interval.nanoseconds) {
            inferenceProbeResult(slot, failure: nil, skipped: true)
            return
        }
        guard slot.inflight < slot.spec.maxInflight else {
            scheduleInferenceProbe(slot)  // busy: try again next period
            return
        }
        let timeout = TimeAmount.nanoseconds(probe.timeout.nanoseconds)
        let request = PendingRequest(id: nextRequestID, clientID: 0, client: nil,
                                     payload: ByteBuffer(string: probe.payload), pinnedSlot: slot, timeout: timeout,
                                     now: .now())
        nextRequestID &+= 1
        request.isProbe = true
        slot.inferenceProbeInFlight = true
        let textField = probe.textField
        request.onFinish = { frame in
            slot.inferenceProbeInFlight = false
            self.inferenceProbeResult(slot, failure: Self.judgeProbeAnswer(frame, textField: textField), skipped: false)
        }
        requests[request.id] = request
        guard dispatchNow(request) else {
            requests.removeValue(forKey: request.id)
            slot.inferenceProbeInFlight = false
            scheduleInferenceProbe(slot)
            return
        }
        trackDeadline(request)
        flushAll()
    }

    /// nil when the answer is a real answer (non-empty text), else why not.
    static func judgeProbeAnswer(_ frame: Frame?, textField: String) -> String? {
        guard let frame else { return "no answer" }
        if frame.type == .error {
            let e = frame.errorPayload
            return "\(e.code): \(e.message)"
        }
        guard frame.payload.readableBytes > 0 else { return "empty answer" }
        if frame.payload.getInteger(at: frame.payload.readerIndex, as: UInt8.self) == UInt8(ascii: "{"),
           let object = try? JSONCoding.decode([String: JSONScalar].self, from: frame.payload),
           let field = object[textField] {
            if case .string(let text) = field, !text.isEmpty { return nil }
            return "empty \(textField) in the answer"
        }
        return nil
    }

    func inferenceProbeResult(_ slot: WorkerSlot, failure: String?, skipped: Bool) {
        let probe = slot.spec.inferenceProbe
        defer { if slot.machine.isReady { scheduleInferenceProbe(slot) } }
        guard let failure else {
            if slot.inferenceFailures > 0 {
                logger.notice("inference probe passes again", metadata: slot.metadata())
            }
            slot.inferenceFailures = 0
            slot.inferenceVerdict = skipped ? "ok (real traffic)" : "ok"
            return
        }
        // A probe lost with its worker says nothing about inference: the worker's exit reason speaks for it.
        guard slot.machine.isReady, !failure.hasPrefix(ErrorCode.workerLost), slot.channel != nil else { return }
        slot.inferenceFailures += 1
        slot.inferenceVerdict = "failing (\(slot.inferenceFailures)/\(probe.failures)): \(failure)"
        logger.warning("inference probe failed (\(slot.inferenceFailures)/\(probe.failures)): \(failure)",
                       metadata: slot.metadata())
        if slot.inferenceFailures >= probe.failures {
            logger.error("worker unhealthy: \(probe.failures) inference probes failed in a row; restarting it",
                         metadata: slot.metadata(reason: "unhealthy"))
            perform(slot.machine.fault(.unhealthy, now: Self.now()), on: slot)
        }
    }

    func healthLevels(_ slot: WorkerSlot, now: MonotonicInstant) -> WorkerHealthLevels {
        var alive = "down"
        if slot.machine.pid != nil, slot.channel != nil {
            alive = "ok"
            if slot.machine.isReady, let last = slot.lastFrameAt, now - last > slot.spec.heartbeatInterval * 3 {
                alive = "no heartbeat for \(String(format: "%.1f", (now - last).seconds))s"
            }
        }
        let device: String = switch (slot.spec.deviceProbe.kind, slot.deviceHealth) {
        case (.none, _): "ok (not probed)"
        case (_, .unknown): "unknown"
        case (_, .ok): "ok"
        case (_, .bad(let why)): why
        }
        let model: String = switch slot.machine.state {
        case .ready: "ok"
        case .starting: "loading"
        default: "down"
        }
        let inference = slot.spec.inferenceProbe.enabled ? slot.inferenceVerdict : "ok (not probed)"
        return WorkerHealthLevels(alive: alive, device: device, model: model,
                                  inference: slot.machine.isReady ? inference : "unknown", inRotation: slot.isServing)
    }

    // MARK: Graceful degradation

    func evaluateFallback() {
        guard var controller = fallbackController, !isShuttingDown else { return }
        let devices = slots[..<deviceSlotCount]
        // Workers still on their very first model load count as coming: start-up is not an outage.
        let serving = devices.filter { $0.isServing || (!$0.hasBeenReady && $0.machine.stateName == "starting") }.count
        let wanted = devices.filter { $0.machine.desired == .up }.count
        let now = Self.now()
        let decision = controller.evaluate(servingDeviceWorkers: serving, wantedDeviceWorkers: wanted, now: now)
        fallbackController = controller
        switch decision {
        case .start:
            let count = slots.count - deviceSlotCount
            logger.error("only \(serving) device worker(s) can serve: starting \(count) CPU fallback worker(s); requests will be slow, not refused",
                         metadata: ["reason": "fallback"])
            for slot in slots[deviceSlotCount...] { perform(slot.machine.start(now: now), on: slot) }
        case .stop:
            logger.notice("device workers serve again: stopping the CPU fallback", metadata: ["reason": "fallback"])
            for slot in slots[deviceSlotCount...] { perform(slot.machine.stop(now: now), on: slot) }
        case .none:
            break
        }
        fallbackTimer?.cancel()
        fallbackTimer = nil
        if let check = controller.nextCheck {
            fallbackTimer = eventLoop.scheduleTask(deadline: Self.deadline(check)) {
                self.fallbackTimer = nil
                self.healthChanged()
            }
        }
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

    static func run(_ command: [String], environment: [String: String], timeout: Duration, on loop: any EventLoop,
                    logger: Logger, completion: @escaping (Result) -> Void) {
        let state = ProbeState(result: Result(command: command, exit: nil, output: "", timedOut: nil, spawnError: nil),
                               completion: completion)
        let spawned: SpawnedWorker
        do {
            spawned = try ProcessSpawner.spawnProbe(command, extraEnvironment: environment)
        } catch {
            state.result.spawnError = "\(error)"
            completion(state.result)
            return
        }
        state.pid = spawned.pid
        state.timeoutTask = loop.scheduleTask(in: .nanoseconds(timeout.nanoseconds)) {
            state.result.timedOut = timeout
            _ = kill(-spawned.pid, SIGKILL)  // the pidfd then wakes us for the reap; the pipe closes as the group dies
        }
        NIOPipeBootstrap(group: loop)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(CollectingHandler { bytes, closed in
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
            .whenFailure { _ in
                close(spawned.outputFD)
                state.outputClosed = true
            }
        if spawned.pidFD >= 0 {
            let source = DispatchSource.makeReadSource(fileDescriptor: spawned.pidFD, queue: .global())
            source.setEventHandler {
                source.cancel()
                loop.execute { state.reap() }
            }
            source.setCancelHandler { close(spawned.pidFD) }
            source.resume()
        }
    }

    final class ProbeState: @unchecked Sendable {  // confined to the event loop
        var result: Result
        let completion: (Result) -> Void
        var pid: pid_t = 0
        var output: [UInt8] = []
        var exited = false
        var outputClosed = false
        var completed = false
        var timeoutTask: Scheduled<Void>?

        init(result: Result, completion: @escaping (Result) -> Void) {
            self.result = result
            self.completion = completion
        }

        func append(_ bytes: [UInt8]) {
            if output.count < maximumOutput { output += bytes.prefix(maximumOutput - output.count) }
        }

        func reap() {
            guard !exited, pid > 0, let exit = ProcessSpawner.reap(pid) else { return }
            exited = true
            result.exit = exit
            _ = kill(-pid, SIGKILL)  // helpers it left behind, and their hold on the pipe
            finishIfDone()
        }

        func finishIfDone() {
            guard !completed, exited, outputClosed else { return }
            completed = true
            timeoutTask?.cancel()
            result.output = String(decoding: output, as: UTF8.self)
            completion(result)
        }
    }
}

/// Collects a pipe's bytes and reports its end.
final class CollectingHandler: ChannelInboundHandler, @unchecked Sendable {
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

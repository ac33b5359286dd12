@preconcurrency import Dispatch
import Glibc
import Logging
import NIOCore
import NIOPosix
import SupervisorCore
import SystemdSupport
import WireProtocol

/// The daemon's heart. Every piece of mutable state (workers, requests, clients) lives on one NIO event loop
/// and is touched only from it: the event loop is the lock. Channels of clients and workers are bound to the
/// same loop, so a request travels client → worker → client without a single thread hop.
public final class Supervisor: @unchecked Sendable {
    public static let version = "0.1.0"

    let eventLoop: any EventLoop
    let group: MultiThreadedEventLoopGroup
    var config: SupervisorConfiguration
    let configPath: String?
    var logger: Logger
    let notifier: SystemdNotifier
    let startedAt = NIODeadline.now()

    var slots: [WorkerSlot] = []
    var requests: [UInt64: PendingRequest] = [:]
    var queue = CircularBuffer<PendingRequest>()
    var clients: [ObjectIdentifier: ClientConnection] = [:]
    var nextRequestID: UInt64 = 1
    var roundRobin = 0
    var servers: [any Channel] = []
    var housekeeping: RepeatedTask?
    var lockFD: CInt = -1
    var isShuttingDown = false
    var hasSentReady = false
    /// Sockets are bound but the workers not started yet: a request arriving now (a client that woke a
    /// socket-activated service) waits in the queue instead of being refused with `no_workers`.
    var isBooting = true
    var hasStopped = false
    var lastStatusLine = ""
    var shutdownPromise: EventLoopPromise<Void>
    var outputFollowers: [ObjectIdentifier: OutputFollower] = [:]
    var dirtyClients: [ClientConnection] = []
    var dirtyWorkers: [WorkerSlot] = []
    /// Requests by timeout value, each list in deadline order (see ``DeadlineList``).
    var deadlineLists: [Int64: DeadlineList] = [:]
    var deadlineTimer: Scheduled<Void>?
    var deadlineTimerAt: NIODeadline?
    /// Slots `0..<deviceSlotCount` are device workers, the rest CPU fallback workers.
    var deviceSlotCount = 0
    var fallbackController: FallbackController?
    var fallbackTimer: Scheduled<Void>?
    var httpAddress: String?
    let metrics = SupervisorMetrics()
    /// Per-worker memory cgroups, nil when unavailable or off.
    var cgroups: CgroupManager?

    /// - Parameters:
    ///   - config: a validated configuration.
    ///   - configPath: shown in status; used by `reload` later.
    public init(config: SupervisorConfiguration, configPath: String?, logger: Logger,
                notifier: SystemdNotifier = SystemdNotifier()) {
        self.group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        self.eventLoop = group.next()
        self.config = config
        self.configPath = configPath
        self.logger = logger
        self.notifier = notifier
        self.shutdownPromise = eventLoop.makePromise(of: Void.self)
        for (index, spec) in config.workers.enumerated() {
            slots.append(WorkerSlot(index: index, spec: spec, outputLines: config.outputLines))
        }
        // CPU fallback workers come after the device workers (routing relies on it); they start stopped.
        deviceSlotCount = slots.count
        for spec in config.fallback?.workers ?? [] {
            slots.append(WorkerSlot(index: slots.count, spec: spec, outputLines: config.outputLines))
        }
        fallbackController = config.fallback.map {
            FallbackController(whenFewerThan: $0.whenFewerThan, stopAfter: $0.stopAfter)
        }
    }

    static func now() -> MonotonicInstant { MonotonicInstant(nanoseconds: Int64(NIODeadline.now().uptimeNanoseconds)) }

    static func deadline(_ instant: MonotonicInstant) -> NIODeadline {
        .uptimeNanoseconds(UInt64(max(0, instant.nanoseconds)))
    }

    // MARK: Lifecycle

    /// Takes the instance lock, binds the sockets and starts every worker. Completes once listening.
    /// - Throws: ``SystemError`` (lock held by another instance, socket bind failures).
    public func start() async throws {
        do {
            try await bindAndSpawn()
        } catch {
            // Nothing was started: undo what was set up (sockets bound so far, the instance lock), complete the
            // promise so that a failed start does not leak it, and release the loop thread.
            try? await eventLoop.submit {
                for channel in self.servers { channel.close(promise: nil) }
                if self.lockFD >= 0 {
                    unlink(self.config.requestsSocket + ".lock")
                    Glibc.close(self.lockFD)
                    self.lockFD = -1
                }
            }.get()
            shutdownPromise.fail(error)
            await close()
            throw error
        }
    }

    private func bindAndSpawn() async throws {
        try await eventLoop.flatSubmit { () -> EventLoopFuture<Void> in
            do {
                try self.acquireLock()
            } catch {
                return self.eventLoop.makeFailedFuture(error)
            }
            return self.bindServers()
        }.get()
        try await eventLoop.submit {
            switch CgroupManager.setUp(settings: self.config.cgroups) {
            case .success(let manager):
                self.cgroups = manager
                self.logger.info("per-worker memory cgroups (\(manager.version.rawValue)) under \(manager.base)")
            case .failure(let why) where self.config.cgroups.mode == .off:
                self.logger.info("per-worker memory cgroups: \(why)")
            case .failure(let why):
                self.logger.warning("per-worker memory cgroups unavailable: \(why). Workers run without them: memory_limit is not enforced and a SIGKILL is reported as signaled(9) (possibly OOM), not oom_killed")
            }
            self.logger.info("npu-supervisord \(Self.version) listening", metadata: [
                "requests": "\(self.config.requestsSocket)", "status": "\(self.config.statusSocket)",
                "control": "\(self.config.controlSocket)", "workers": "\(self.slots.count)",
            ])
            let now = Self.now()
            for slot in self.slots where !slot.isFallback {
                self.perform(slot.machine.start(now: now), on: slot)
            }
            self.isBooting = false
            self.startHealthProbes()
            let tick = self.housekeepingInterval()
            self.housekeeping = self.eventLoop.scheduleRepeatedTask(initialDelay: tick, delay: tick) { _ in
                self.tick()
            }
            self.healthChanged()
        }.get()
    }

    /// Waits until shutdown has completed (every worker gone, sockets closed).
    public func waitUntilStopped() async {
        try? await shutdownPromise.futureResult.get()
    }

    /// Starts a graceful shutdown from any thread: drain requests (bounded), stop workers, close sockets.
    public func beginShutdown(reason: String) {
        eventLoop.execute { self.shutdown(reason: reason) }
    }

    /// Releases the event loop thread. Call after ``waitUntilStopped()``.
    public func close() async {
        try? await group.shutdownGracefully()
    }

    func housekeepingInterval() -> TimeAmount {
        let smallest = slots.map(\.spec.heartbeatInterval).min() ?? .seconds(1)
        let ns = min(max(smallest.nanoseconds / 2, 20_000_000), 500_000_000)
        return .nanoseconds(ns)
    }

    /// Periodic duties: heartbeat checks, a safety-net reap, systemd watchdog.
    func tick() {
        let now = Self.now()
        for slot in slots {
            reapIfExited(slot)
            if slot.machine.isReady, let last = slot.lastFrameAt,
               now - last > slot.spec.heartbeatTimeout {
                logger.error("worker missed heartbeats; killing it", metadata: slot.metadata(reason: "hang"))
                perform(slot.machine.fault(.hang, now: now), on: slot)
            }
        }
        systemdTick()
    }

    func acquireLock() throws {
        try makeDirectories(for: config.requestsSocket)
        try makeDirectories(for: config.statusSocket)
        try makeDirectories(for: config.controlSocket)
        let path = config.requestsSocket + ".lock"
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw SystemError(call: "open \(path)", errno: errno) }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            let other = (try? readFile(path))?.trimmingWhitespace() ?? "?"
            Glibc.close(fd)
            throw SupervisorError(
                "another npu-supervisord (pid \(other)) already serves \(config.requestsSocket); "
                    + "stop it first or give this one another run_dir")
        }
        _ = ftruncate(fd, 0)
        let pid = "\(getpid())\n"
        _ = pid.withCString { write(fd, $0, strlen($0)) }
        lockFD = fd
    }

    func shutdown(reason: String) {
        guard !isShuttingDown else { return }
        isShuttingDown = true
        logger.notice("shutting down: \(reason); draining \(requests.count) request(s)")
        systemdStopping(reason: reason)
        let drainDeadline = NIODeadline.now() + TimeAmount.nanoseconds(config.shutdownTimeout.nanoseconds)
        drainThenStop(until: drainDeadline)
    }

    func drainThenStop(until deadline: NIODeadline) {
        let serving = slots.contains { $0.machine.isReady }
        if requests.isEmpty || NIODeadline.now() >= deadline || !serving {
            for request in Array(requests.values) {
                cancelOnWorker(request)
                finish(request, with: .error(requestID: request.clientID, code: ErrorCode.shuttingDown,
                                             message: "the supervisor is shutting down; shutdown_timeout "
                                                 + "(\(config.shutdownTimeout.configString)) passed before an answer",
                                             retryable: true))
            }
            flushAll()
            let now = Self.now()
            for slot in slots {
                perform(slot.machine.stop(now: now), on: slot)
            }
            checkStopped()
            return
        }
        eventLoop.scheduleTask(in: .milliseconds(20)) { self.drainThenStop(until: deadline) }
    }

    /// Completes shutdown once every worker is gone.
    func checkStopped() {
        guard isShuttingDown, slots.allSatisfy({ $0.machine.pid == nil }) else { return }
        guard !hasStopped else { return }
        hasStopped = true
        housekeeping?.cancel()
        deadlineTimer?.cancel()
        fallbackTimer?.cancel()
        for slot in slots {
            slot.timer?.cancel()
            slot.deviceProbeTimer?.cancel()
            slot.inferenceProbeTimer?.cancel()
        }
        let closes = servers.map { $0.close() } + clients.values.map { $0.channel.close() }
            + outputFollowers.values.map { $0.channel.close() }
        EventLoopFuture.andAllComplete(closes, on: eventLoop).whenComplete { _ in
            // Socket files passed by systemd stay: the socket unit listens on and starts us again.
            for path in [self.config.requestsSocket, self.config.statusSocket, self.config.controlSocket]
            where !ListenFDs.shared.isPassed(path: path) {
                unlink(path)
            }
            if self.lockFD >= 0 {
                unlink(self.config.requestsSocket + ".lock")
                Glibc.close(self.lockFD)
                self.lockFD = -1
            }
            self.cgroups?.tearDown(devices: self.slots.map(\.spec.device))
            self.logger.notice("stopped; no worker left")
            self.shutdownPromise.succeed()
        }
    }

    // MARK: Health

    func healthInputs() -> [WorkerHealthInput] {
        slots.map { slot in
            WorkerHealthInput(
                device: slot.spec.device, state: slot.machine.stateName, desiredUp: slot.machine.desired == .up,
                isServing: slot.isServing, lastExit: slot.machine.lastExit?.description,
                restarts: slot.machine.restarts, isFallback: slot.isFallback,
                outOfRotation: { if case .bad(let why) = slot.deviceHealth { return why } else { return nil } }())
        }
    }

    func aggregate() -> (OverallHealth, String) {
        HealthAggregator.aggregate(healthInputs(), minReady: config.minReady)
    }

    /// Called after any change of a worker's state.
    func healthChanged() {
        evaluateFallback()
        let (health, line) = aggregate()
        systemdHealthChanged(health: health, summary: line)
    }

    func statusDocument(devices: [String]? = nil) -> StatusDocument {
        let (health, reason) = aggregate()
        let now = NIODeadline.now()
        let mono = Self.now()
        let all = devices == nil || devices!.isEmpty || devices! == ["all"]
        let workers = slots.filter { all || devices!.contains($0.spec.device) }
            .map { slot -> WorkerStatus in
                var next: Double?
                if let d = slot.machine.nextDeadline {
                    switch slot.machine.state {
                    case .backoff, .failed: next = max(0, (d - mono).seconds)
                    default: break
                    }
                }
                return WorkerStatus(
                    device: slot.spec.device, kind: slot.spec.kind.rawValue, state: slot.machine.stateName,
                    desired: slot.machine.desired.rawValue, pid: slot.machine.pid.flatMap { $0 > 0 ? $0 : nil },
                    restarts: slot.machine.restarts, lastExit: slot.machine.lastExit?.description,
                    lastExitDetail: slot.machine.lastExit?.detail,
                    uptimeSeconds: slot.spawnedAt.map { Double((now - $0).nanoseconds) / 1e9 } ?? 0,
                    inflight: slot.inflight, maxInflight: slot.spec.maxInflight,
                    exits: slot.machine.exitCounts, nextRestartInSeconds: next, health: healthLevels(slot, now: mono),
                    fallback: slot.isFallback, memoryBytes: slot.cgroup.flatMap { cgroups?.memoryUsage($0.path) },
                    memoryLimitBytes: slot.cgroup == nil ? nil : slot.spec.memoryLimit)
            }
        return StatusDocument(
            state: health.rawValue, reason: reason,
            supervisor: SupervisorInfo(pid: getpid(), version: Self.version,
                                       uptimeSeconds: Double((now - startedAt).nanoseconds) / 1e9,
                                       config: configPath.map { resolve($0, against: currentDirectory()) },
                                       http: httpAddress),
            queueDepth: queue.count, fallbackActive: fallbackController?.isActive ?? false, workers: workers)
    }
}

/// An error the supervisor reports to its operator as a sentence.
public struct SupervisorError: Error, CustomStringConvertible, Sendable {
    public var description: String
    public init(_ description: String) { self.description = description }
}

func makeDirectories(for socketPath: String) throws {
    guard let slash = socketPath.lastIndex(of: "/"), slash != socketPath.startIndex else { return }
    let dir = String(socketPath[..<slash])
    var path = ""
    for part in dir.split(separator: "/") {
        path += "/" + part
        if mkdir(path, 0o755) != 0 && errno != EEXIST {
            throw SystemError(call: "mkdir \(path)", errno: errno)
        }
    }
}


extension Supervisor {
    /// SIGHUP. Applying a changed configuration (rolling replacement) is not implemented yet: say so instead
    /// of dying (an untrapped SIGHUP terminates a process).
    public func reloadRequested() {
        eventLoop.execute {
            self.systemdReloadBegan()  // RELOADING=1 ... READY=1 (Supervisor+Systemd.swift) around the reload
            self.logger.warning("SIGHUP received: configuration reload is not supported by this version; ignored")
            self.systemdReloadFinished()
        }
    }
}

@preconcurrency import Dispatch
import CSupport
import Glibc
import Logging
import NIOCore
import NIOPosix
import SupervisorCore
import SystemdSupport
import WireProtocol

/// The I/O driver (docs/ARCHITECTURE.md): it turns sockets, pidfds, timers and probe processes into events for
/// the pure ``SupervisorMachine``, and carries out the machine's actions. It decides nothing of its own beyond
/// moving bytes: every rule (restarts, health verdicts, routing, readiness, shutdown) is in SupervisorCore.
///
/// Every piece of mutable state lives on one NIO event loop and is touched only from it (checked with
/// `assertInEventLoop` where entered from outside). Channels of clients and workers are bound to the same loop,
/// so a request travels client → worker → client without a thread hop. One timer is armed at the earliest of
/// the machine's ``SupervisorMachine/nextDeadline`` and the request deadlines.
///
/// The properties the request path touches (here and in ClientConnection, WorkerIO, PendingRequest, Metrics) are
/// `@exclusivity(unchecked)` in release builds: being loop-confined, no two accesses to them can overlap across
/// threads, and Swift's dynamic exclusivity check on every access to a class's stored property was 7.5% of the
/// request path's CPU (BENCHMARKS.md). Debug builds, which run the test suites, keep the check, so an
/// overlapping access within the loop still traps there.
public final class Supervisor: @unchecked Sendable {  // loop-confined: checked by assertInEventLoop at every entry
    public static let version = npuSupervisorRelease

    let eventLoop: any EventLoop
    /// Workers' stdout/stderr are read, split, rate-limited, kept and logged on a thread of their own, so that a
    /// worker flooding its output does not compete with the request path (only `tail -f` batches hop here).
    let outputLoop: any EventLoop
    let group: MultiThreadedEventLoopGroup
    #if DEBUG
    var config: SupervisorConfiguration
    #else
    @exclusivity(unchecked) var config: SupervisorConfiguration
    #endif
    let configPath: String?
    var logger: Logger
    let notifier: SystemdNotifier
    let startedAt = NIODeadline.now()

    /// Every decision.
    #if DEBUG
    var machine: SupervisorMachine
    #else
    @exclusivity(unchecked) var machine: SupervisorMachine
    #endif
    /// The I/O of each worker slot (same indices as `machine.workers`).
    #if DEBUG
    var slots: [WorkerIO] = []
    #else
    @exclusivity(unchecked) var slots: [WorkerIO] = []
    #endif
    #if DEBUG
    var requests = SlotTable<PendingRequest>()
    #else
    @exclusivity(unchecked) var requests = SlotTable<PendingRequest>()
    #endif
    #if DEBUG
    var queue = CircularBuffer<PendingRequest>()
    #else
    @exclusivity(unchecked) var queue = CircularBuffer<PendingRequest>()
    #endif
    var clients: [ObjectIdentifier: ClientConnection] = [:]
    #if DEBUG
    var nextSequence: UInt64 = 1
    #else
    @exclusivity(unchecked) var nextSequence: UInt64 = 1
    #endif
    var servers: [any Channel] = []
    var lockFD: CInt = -1
    var shutdownPromise: EventLoopPromise<Void>
    var outputFollowers: [ObjectIdentifier: OutputFollower] = [:]
    #if DEBUG
    var dirtyClients: [ClientConnection] = []
    #else
    @exclusivity(unchecked) var dirtyClients: [ClientConnection] = []
    #endif
    #if DEBUG
    var dirtyWorkers: [WorkerIO] = []
    #else
    @exclusivity(unchecked) var dirtyWorkers: [WorkerIO] = []
    #endif
    /// The deadlines of the requests in flight, a ring per timeout value (see ``DeadlineRing``).
    #if DEBUG
    var deadlineRings: [DeadlineRing] = []
    #else
    @exclusivity(unchecked) var deadlineRings: [DeadlineRing] = []
    #endif
    /// Timeout value (ns) → its ring in `deadlineRings`.
    var deadlineRingIndex: [Int64: Int] = [:]
    /// Requests waiting in `queue` (which also holds tombstones of requests answered while queued: ``finish``).
    var queuedCount = 0
    /// Pinned requests in `queue` (while there are none, a pass over the queue stops at the first request it
    /// cannot place: ``dispatchQueued()``).
    var queuedPinned = 0
    /// The ring the latest request went to (``trackDeadline(_:)``), -1 for none.
    #if DEBUG
    var lastDeadlineRing = -1
    #else
    @exclusivity(unchecked) var lastDeadlineRing = -1
    #endif
    /// The one timer, and when it fires.
    var timer: Scheduled<Void>?
    #if DEBUG
    var timerAt: NIODeadline?
    #else
    @exclusivity(unchecked) var timerAt: NIODeadline?
    #endif
    var healthPublishPending = false
    /// A flush of every dirty channel is scheduled for the end of this event-loop turn (``flushAtEndOfTick()``).
    #if DEBUG
    var flushScheduled = false
    #else
    @exclusivity(unchecked) var flushScheduled = false
    #endif
    /// The text of the configuration in effect (kept so that an upgrade can be resumed or undone after a
    /// restart of the supervisor: see Supervisor+Reload.swift).
    var appliedConfigText: String?
    /// `reload --wait` callers, answered when the reload is done.
    var reloadWaiters: [(channel: any Channel, requestID: UInt64)] = []
    /// Shutdown completed: nothing is armed any more.
    var hasStopped = false
    var httpAddress: String?
    /// Per-slot request counters, rendered at scrape time (Supervisor+Metrics.swift).
    let metrics: SupervisorMetrics
    /// Per-worker memory cgroups, nil when unavailable or off.
    var cgroups: CgroupManager?
    /// Exit detection without pidfds (see ExitWatcher.swift); nil when pidfds work.
    var exitWaiter: ExitWaiter?
    /// Device probe commands not reaped yet, and their slots (the orphan sweep leaves them alone: Orphans.swift;
    /// a slot whose probe outlived its SIGKILL gets no second one).
    var probePids: [pid_t: Int] = [:]
    /// Per tensor-parallel group: the `MASTER_PORT` and rank table of its current start (Supervisor+Groups.swift).
    var groupRuntime: [GroupRuntime] = []
    /// A request's `device` option → the slot it is pinned to (``rebuildPinTargets()``).
    #if DEBUG
    var pinTargets: [String: Int] = [:]
    #else
    @exclusivity(unchecked) var pinTargets: [String: Int] = [:]
    #endif

    /// - Parameters:
    ///   - config: a validated configuration.
    ///   - configPath: shown in status; used by `reload` later.
    /// How workers' output lines are logged (``WorkerOutputLogging``).
    let outputLogging: WorkerOutputLogging

    public init(config: SupervisorConfiguration, configPath: String?, logger: Logger,
                notifier: SystemdNotifier = SystemdNotifier(), outputLogging: WorkerOutputLogging = .perLine) {
        self.outputLogging = outputLogging
        self.group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        self.eventLoop = group.next()
        self.outputLoop = group.next()
        self.config = config
        self.configPath = configPath
        self.logger = logger
        self.notifier = notifier
        self.shutdownPromise = eventLoop.makePromise(of: Void.self)
        self.appliedConfigText = configPath.flatMap { try? readFile($0) }
        self.machine = SupervisorMachine(
            config: config, protocolVersion: wireProtocolVersion,
            watchdogInterval: notifier.watchdogInterval.map { .nanoseconds(Int64($0)) })
        // CPU fallback workers come after the device workers (the machine's slot order).
        for (index, worker) in machine.workers.enumerated() {
            slots.append(WorkerIO(index: index, spec: worker.spec, outputLines: config.outputLines))
        }
        metrics = SupervisorMetrics(slotCount: slots.count)
        groupRuntime = machine.groups.map { _ in GroupRuntime() }
        rebuildPinTargets()
    }

    /// Gives this event-loop thread `loop_nice`. It routes every request and keeps every timer (heartbeat
    /// silence, the watchdog), so on a host whose workers keep the CPUs busy it must not wait behind the
    /// processes it feeds: woken by its writes, they preempted it (BENCHMARKS.md). Workers, spawned from this
    /// thread, start at nice 0 (SCHED_RESET_ON_FORK). Without CAP_SYS_NICE the thread keeps its nice value and
    /// the log says so once.
    func applyLoopNice(changed: Bool) {
        eventLoop.assertInEventLoop()
        let wanted = config.loopNice
        guard wanted != 0 || changed else { return }
        let rc = npu_set_thread_nice(Int32(wanted))
        if rc == 0 {
            logger.info("request loop at nice \(wanted); workers start at nice 0")
        } else {
            logger.info("request loop left at nice \(npu_thread_nice()): nice \(wanted) was refused (\(String(cString: strerror(rc)))); it needs CAP_SYS_NICE (grant it, or set [supervisor] loop_nice = 0 to leave the loop alone)")
        }
    }

    /// The monotonic clock, the only one the driver reads; the machine gets it as `now`.
    @inline(__always) static func now() -> MonotonicInstant {
        MonotonicInstant(nanoseconds: Int64(NIODeadline.now().uptimeNanoseconds))
    }

    static func deadline(_ instant: MonotonicInstant) -> NIODeadline {
        .uptimeNanoseconds(UInt64(max(0, instant.nanoseconds)))
    }

    /// Read through stored properties only: a computed property or method of `machine` would copy the whole
    /// machine on every request (measured with perf).
    var isShuttingDown: Bool { machine.shutdown.state != .running }

    /// Why no worker can serve (rare: the message is built only then), or nil.
    @inline(__always) func noWorkersReason(pinned: Int) -> String? {
        if pinned >= 0 ? machine.router.hopeful[pinned] : machine.router.anyHopeful { return nil }
        return machine.noWorkersReason(pinned: pinned >= 0 ? pinned : nil)
    }

    // MARK: Feeding the machine

    /// Hands one event to the machine and carries out what it decided, in order.
    func feed(_ event: SupervisorMachine.Event) {
        eventLoop.assertInEventLoop()
        let actions = machine.handle(event, now: Self.now())
        // A reload may have added slots: their I/O exists before any action names them.
        while slots.count < machine.workers.count {
            let index = slots.count
            slots.append(WorkerIO(index: index, spec: machine.workers[index].spec, outputLines: config.outputLines))
        }
        for action in actions { execute(action) }
        rearmTimer()
    }

    func execute(_ action: SupervisorMachine.Action) {
        switch action {
        case .spawn(let slot):
            spawn(slots[slot])
        case .signal(_, let pid, let signal):
            // The whole group: a worker's helpers (tokenizer servers, data loaders) go with it.
            if kill(-pid, signal) != 0 && errno == ESRCH { _ = kill(pid, signal) }
        case .closeChannel(let slot):
            slots[slot].closeChannel()
            // A device removed by a reload will not start again: its standby goes now, not at shutdown.
            if machine.workers[slot].isRetired, let cgroups, let standby = slots[slot].standby {
                standby.discard(cgroups: cgroups)
                slots[slot].standby = nil
            }
        case .failInflight(let slot, let cause):
            failInflight(of: slot, code: ErrorCode.workerLost, cause: cause)
        case .runDeviceProbe(let slot):
            runDeviceProbe(slots[slot])
        case .sendInferenceProbe(let slot):
            sendInferenceProbe(slots[slot])
        case .dispatchQueued:
            dispatchQueued()
            flushAll()
        case .answerHopelessQueued:
            answerHopelessQueued()
        case .exitRecorded(let slot, let reason):
            metrics.workerExited(slot: slot, reason: reason.kind)
        case .log(let record):
            log(record)
        case .notify(let message):
            systemdNotify(message)
        case .healthChanged:
            // Changes made in one turn of the loop (starting every worker, a reaped exit and its restart) are
            // told once, at its end: no STATUS= for a state that only existed half-way through.
            guard !healthPublishPending else { return }
            healthPublishPending = true
            eventLoop.execute {
                self.healthPublishPending = false
                self.feed(.publishHealth)
            }
        case .answerAllShuttingDown:
            for request in requests.allValues.sorted(by: { $0.sequence < $1.sequence }) {
                cancelOnWorker(request)
                finish(request, with: .error(requestID: request.clientID, code: ErrorCode.shuttingDown,
                                             message: "the supervisor is shutting down; shutdown_timeout "
                                                 + "(\(config.shutdownTimeout.configString)) passed before an answer",
                                             retryable: true))
            }
            flushAll()
        case .closeSockets:
            closeSockets()
        case .reloadDone(let ok, let message):
            reloadDone(ok: ok, message: message)
        case .rolloutEnded(let state, _):
            metrics.rolloutEnded(result: state.rawValue)
        case .configChanged:
            let old = config
            config = machine.config
            rebuildPinTargets()
            if old.logLevel != config.logLevel, let level = Logger.Level(rawValue: config.logLevel) {
                logger.logLevel = level
            }
            if old.loopNice != config.loopNice { applyLoopNice(changed: true) }
        case .persistRollout:
            persistRollout()
        case .prepareGroup(let group, _):
            prepareGroup(group)
        case .groupExitRecorded(let group, let reason):
            metrics.groupExited(group: group, reason: reason.kind)
        }
    }

    func log(_ record: LogRecord) {
        var metadata: Logger.Metadata = [:]
        if let slot = record.slot { metadata["device"] = "\(slots[slot].spec.device)" }
        if let pid = record.pid, pid > 0 { metadata["worker_pid"] = "\(pid)" }
        if let reason = record.reason { metadata["reason"] = "\(reason)" }
        let level: Logger.Level = switch record.level {
        case .debug: .debug
        case .info: .info
        case .notice: .notice
        case .warning: .warning
        case .error: .error
        }
        logger.log(level: level, "\(record.message)", metadata: metadata.isEmpty ? nil : metadata)
    }

    // MARK: The one timer

    /// Arms the timer at the earliest deadline: the machine's and the oldest request's. A timer armed earlier
    /// is left alone (it fires, finds nothing due, re-arms).
    func rearmTimer() {
        guard !hasStopped else { return }
        var next = machine.nextDeadline.map(Self.deadline)
        for ring in deadlineRings {
            if let oldest = ring.entries.first, next.map({ oldest.deadline < $0 }) ?? true { next = oldest.deadline }
        }
        guard let next else { return }
        if let armed = timerAt, armed <= next { return }
        armTimer(at: next)
    }

    func armTimer(at deadline: NIODeadline) {
        timer?.cancel()
        timerAt = deadline
        timer = eventLoop.scheduleTask(deadline: deadline) { self.timerFired() }
    }

    func timerFired() {
        timer = nil
        timerAt = nil
        // A safety-net reap first: an exit found now is handled before the machine judges silence or a closed
        // channel (a worker that closed fd 3 and exited is not a protocol violation).
        for slot in slots where slot.pid > 0 && !slot.isChannelOpen { reapIfExited(slot) }
        expireRequests()
        feed(.timer)
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
            self.logger.info("exit detection: \(ExitDetection.chosen.description)")
            self.applyLoopNice(changed: false)
            self.becomeSubreaper()
            if !ExitDetection.usesPidfd {
                let waiter = ExitWaiter(loop: self.eventLoop)
                waiter.start()
                self.exitWaiter = waiter
            }
            self.systemdBoot()
            self.restoreRollout()
            self.feed(.boot)
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

    /// SIGHUP, from any thread: re-read the configuration file and apply it (as `npu-supervisorctl reload`).
    public func reloadRequested() {
        eventLoop.execute { _ = self.reload() }
    }

    /// Releases the event loop thread. Call after ``waitUntilStopped()``.
    public func close() async {
        try? await group.shutdownGracefully()
    }

    func shutdown(reason: String) {
        feed(.shutdown(reason: reason, requestsInFlight: requests.count))
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

    /// Every worker is gone after a shutdown: close everything and complete.
    func closeSockets() {
        discardStandbys()
        sweepOrphans(all: true)
        hasStopped = true
        timer?.cancel()
        timer = nil
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

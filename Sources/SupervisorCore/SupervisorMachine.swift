/// Every decision the supervisor makes, as one pure state machine composed of smaller ones (docs/ARCHITECTURE.md):
/// per worker its lifecycle (``WorkerStateMachine``), session (``WorkerSession``), liveness (``Liveness``),
/// device health (``DeviceHealth``) and inference probe (``InferenceProbe``); across workers the routing
/// (``Router``), the CPU fallback (``FallbackController``), what systemd is told (``Readiness``) and the
/// graceful shutdown (``Shutdown``).
///
/// The runtime turns sockets, pidfds, timers and probe processes into ``Event``s, calls ``handle(_:now:)`` and
/// carries out the returned ``Action``s in order; it arms one timer at ``nextDeadline`` and feeds
/// ``Event/timer`` when it fires. Time enters only as `now`; nothing here reads a clock or does I/O, so every
/// rule is tested as a table (Tests/SupervisorCoreTests).
///
/// The request hot path does not go through ``handle(_:now:)``: the runtime calls ``router`` (an integer-indexed
/// policy) and the one-store methods ``frameReceived(slot:now:)`` and ``requestSucceeded(slot:now:)`` directly,
/// so the design costs nothing per request.
public struct SupervisorMachine: Sendable {
    /// One worker slot: a device's (or a CPU fallback's) worker, whatever process currently fills it.
    public struct Worker: Sendable {
        /// The spec of the current (or next) process; replaced in place by a reload or a rollout.
        public internal(set) var spec: WorkerSpec
        /// Rises each time the slot gets a spec with another revision (``WorkerSpec/revision``).
        public internal(set) var generation = 1
        /// Out of rotation on purpose (`drain`, a rollout, shutdown): requests finish, none are sent.
        public internal(set) var drain: Drain = .none
        /// Removed from the configuration by a reload: stopped, hidden, never started again.
        public internal(set) var isRetired = false
        /// Answers since the counters were last reset (a rollout's bake window).
        public internal(set) var stats = RequestStats()
        public internal(set) var lifecycle: WorkerStateMachine
        public internal(set) var session: WorkerSession
        public internal(set) var liveness: Liveness
        public internal(set) var device: DeviceHealth
        public internal(set) var inference: InferenceProbe
        /// The current process's frame channel (its fd 3) is open.
        public internal(set) var isChannelOpen = false
        /// Whether any process of this slot ever said ready (the first model load is not an outage).
        public internal(set) var hasBeenReady = false
        /// When the current process was started.
        public internal(set) var startedAt: MonotonicInstant?
        /// A ``Action/spawn`` was asked for and its outcome not reported yet: counts as starting.
        public internal(set) var isSpawnPending = false
        /// Since when the worker has not read its channel (the supervisor's writes to it are backing up), nil
        /// while it reads. Such a worker gets no new request; after `heartbeat_timeout` it is stuck (`hang`).
        public internal(set) var unwritableSince: MonotonicInstant?
        /// The sentence about the last exit, when the evidence says more than the reason's own ``ExitReason/detail``
        /// (a SIGKILL that the memory cgroup's counter proves was not the OOM killer).
        public var lastExitDetail: String? {
            guard let last = lifecycle.lastExit else { return nil }
            if let note = exitNote, note.reason == last { return note.detail }
            return last.detail
        }
        var exitNote: (reason: ExitReason, detail: String)?
        /// Requests that ended `deadline_exceeded` on this worker in a row (a worker that heartbeats but answers
        /// nothing is judged by them).
        public internal(set) var expiredInARow = 0
        /// The process was reaped while its channel still held frames: they are read before the exit is handled.
        var reapedExit: (reason: ExitReason, note: String?, jitter: Double)?
        var exitDrainDeadline: MonotonicInstant?
        /// The channel closed while the process still ran: it must exit by this time, or it is killed.
        var channelClosedDeadline: MonotonicInstant?

        /// The tensor-parallel group this slot is a rank of (``SupervisorMachine/groups``), nil for a single device.
        public internal(set) var groupIndex: Int?
        /// Whether the slot's group lets it serve: always for a single device; for a group's leader only while
        /// every rank is ready; never for the other ranks (they get no requests). Kept current each turn.
        var gangOpen = true

        init(spec: WorkerSpec, protocolVersion: Int) {
            self.spec = spec
            self.lifecycle = WorkerStateMachine(policy: Self.lifecyclePolicy(spec))
            self.session = WorkerSession(protocolVersion: protocolVersion)
            self.liveness = Liveness(heartbeatInterval: spec.heartbeatInterval, heartbeatTimeout: spec.heartbeatTimeout)
            self.device = DeviceHealth(spec: spec.deviceProbe, heartbeatInterval: spec.heartbeatInterval,
                                       heartbeatTimeout: spec.heartbeatTimeout)
            self.inference = InferenceProbe(spec: spec.inferenceProbe)
        }

        /// In rotation: the process said ready, its channel is open, its device is not known to be bad, it is
        /// not drained, and (a group's leader) every rank of its group is ready.
        public var isServing: Bool {
            lifecycle.isReady && isChannelOpen && unwritableSince == nil && !device.isOutOfRotation && drain == .none
                && !isRetired && gangOpen
        }

        /// A rank other than a group's leader: it runs, but never receives requests.
        public var isFollower: Bool { (spec.rank?.rank ?? 0) > 0 }

        /// A rank's own lifecycle never restarts it: its group decides (``SupervisorMachine/Group``).
        static func lifecyclePolicy(_ spec: WorkerSpec) -> WorkerStateMachine.Policy {
            var policy = spec.policy
            if spec.rank != nil { policy.restart = .never }
            return policy
        }

        mutating func joinGroup(_ index: Int) {
            groupIndex = index
            gangOpen = false
        }

        public var isFallback: Bool { spec.isFallback }

        /// The process id of the running worker (nil between processes).
        public var pid: Int32? { lifecycle.pid.flatMap { $0 > 0 ? $0 : nil } }

        /// Starting, or about to (a spawn was asked for).
        var isStarting: Bool {
            if isSpawnPending { return true }
            if case .starting = lifecycle.state { return true }
            return false
        }

        var isHeldFailedForDevice: Bool {
            guard lifecycle.isHeldFailed, lifecycle.desired == .up, case .deviceUnhealthy? = lifecycle.lastExit
            else { return false }
            return true
        }

        var deviceView: DeviceHealth.WorkerView {
            let state = lifecycle.state
            return DeviceHealth.WorkerView(
                isStarting: { if case .starting = state { true } else { false } }(),
                isReady: lifecycle.isReady,
                isBackoff: { if case .backoff = state { true } else { false } }(),
                isHeldFailedForDevice: isHeldFailedForDevice)
        }
    }

    /// A slot taken out of rotation on purpose.
    public enum Drain: Sendable, Hashable {
        case none
        /// Requests still finish; at `until` it counts as drained whatever it holds.
        case draining(until: MonotonicInstant, byOperator: Bool)
        case drained(byOperator: Bool)

        public var name: String {
            switch self {
            case .none: "no"
            case .draining: "draining"
            case .drained: "drained"
            }
        }
    }

    public enum Event: Sendable {
        /// The sockets are bound: start every device worker, begin probing and telling systemd.
        case boot
        /// `npu-supervisorctl drain` / `undrain` for these slots.
        case drain(slots: [Int])
        case undrain(slots: [Int])
        /// A draining slot holds no request any more.
        case drainSettled(slot: Int)
        /// `npu-supervisorctl restart --rolling`: new processes, one device at a time.
        case rollingRestart(slots: [Int])
        /// A validated configuration from a reload (SIGHUP, `npu-supervisorctl reload`).
        case reload(SupervisorConfiguration)
        /// `npu-supervisorctl rollout pause|resume|undo`.
        case rolloutPause, rolloutResume, rolloutUndo
        /// Before boot: the supervisor restarted during an upgrade. `previous` are the specs of the old
        /// revision for each device the upgrade changes (by slot); `onPrevious` the slots still on it, which
        /// start on it again.
        case restoreRollout(previous: [Int: WorkerSpec], onPrevious: Set<Int>)
        /// A worker process was started for the slot.
        case spawned(slot: Int, pid: Int32)
        /// `posix_spawn` failed. `jitter` is a sample in [0, 1) for the backoff.
        case spawnFailed(slot: Int, errno: Int32, message: String, jitter: Double)
        /// The worker's frame channel is set up (the runtime has sent the supervisor's hello).
        case channelOpened(slot: Int, pid: Int32)
        case channelFailed(slot: Int, pid: Int32, message: String)
        /// A frame from the worker other than an answer to a request.
        case workerMessage(slot: Int, pid: Int32, WorkerSession.Message)
        /// The worker's `health` frame.
        case workerHealth(slot: Int, pid: Int32, ok: Bool, detail: String)
        /// An `error` frame from the worker; `onRequest` when it answered a request (only a `device_oom` code
        /// matters then).
        case workerError(slot: Int, pid: Int32, code: String, message: String, onRequest: Bool)
        /// The worker's byte stream could not be decoded (oversized length, malformed frame).
        case undecodable(slot: Int, pid: Int32, message: String)
        /// The worker's channel reached EOF or failed.
        case channelClosed(slot: Int, pid: Int32)
        /// The worker's channel stopped (false) or resumed (true) taking the supervisor's writes.
        case channelWritability(slot: Int, pid: Int32, writable: Bool)
        /// A request dispatched to the slot's worker ended `deadline_exceeded`.
        case requestExpired(slot: Int)
        /// The process was reaped. `oomKillsRose`: its memory cgroup's `oom_kill` counter rose (nil without
        /// one). `jitter` is a sample in [0, 1) for the backoff.
        case processExited(slot: Int, pid: Int32, ExitReason, oomKillsRose: Bool?, jitter: Double)
        /// A `command` or `path` device probe finished: nil is healthy, else what is wrong.
        case deviceProbeFinished(slot: Int, failure: String?)
        /// The inference probe's answer, judged (``InferenceProbe/judge(_:textField:)``): nil is a pass.
        case inferenceProbeFinished(slot: Int, failure: String?)
        /// The inference probe could not be dispatched after all.
        case inferenceProbeNotSent(slot: Int)
        /// An operator's verb (start, stop, restart, shutdown) for these slots.
        case control(ControlVerb, slots: [Int], requestedBy: UInt32?)
        /// SIGTERM, SIGINT or `shutdown`: drain, then stop. `requestsInFlight` is what there is to drain.
        case shutdown(reason: String, requestsInFlight: Int)
        /// While shutting down: the number of accepted requests not yet answered changed to this.
        case requestsInFlight(Int)
        /// A reload begins (SIGHUP, `npu-supervisorctl reload`): the runtime reads the file next and reports
        /// ``reload(_:)`` or ``reloadFailed(_:)``.
        case reloadRequested
        /// The new file is invalid: nothing changes.
        case reloadFailed(String)
        /// The runtime's coalesced "health changed" (once per event-loop turn): tell systemd what changed.
        case publishHealth
        /// ``nextDeadline`` has (perhaps) passed.
        case timer
    }

    public enum Action: Sendable, Hashable {
        /// Start a worker process for the slot; report ``Event/spawned(slot:pid:)`` or ``Event/spawnFailed(slot:errno:message:jitter:)``.
        case spawn(slot: Int)
        /// Send a signal to the worker's process group.
        case signal(slot: Int, pid: Int32, signal: Int32)
        /// Close the slot's frame channel (its process is gone).
        case closeChannel(slot: Int)
        /// The slot's worker can no longer answer what it holds: retry or answer each (``RetryPolicy``).
        case failInflight(slot: Int, cause: RetryPolicy.LossCause)
        case runDeviceProbe(slot: Int)
        /// Send the inference probe as a request pinned to the slot; report its judged answer.
        case sendInferenceProbe(slot: Int)
        /// Workers may have room: move queued requests to them.
        case dispatchQueued
        /// Answer `no_workers` to queued requests that no worker can serve any more.
        case answerHopelessQueued
        /// Count the exit in the metrics.
        case exitRecorded(slot: Int, reason: ExitReason)
        case log(LogRecord)
        case notify(Readiness.Message)
        /// The aggregated health may have changed: publish it (coalesced) with ``Event/publishHealth``.
        case healthChanged
        /// Shutdown: answer every request still unanswered `shutting_down` (and cancel it on its worker).
        case answerAllShuttingDown
        /// Shutdown is complete: close the sockets, remove the lock, finish.
        case closeSockets
        /// A reload was applied in place (nothing to roll) or its rollout ended: answer waiting `reload --wait`
        /// callers (ok unless it failed) and tell systemd the reload is over.
        case reloadDone(ok: Bool, message: String)
        /// A rollout reached `complete`, `rolled_back` or `paused`.
        case rolloutEnded(Rollout.State, reason: String?)
        /// The configuration changed (a reload): the runtime re-reads what it applies itself (log level,
        /// request limits) from ``config``, and adds I/O for new slots.
        case configChanged
        /// Persist the rollout record (so a restarted supervisor resumes paused, not confused).
        case persistRollout
        /// A tensor-parallel group starts (its ranks' spawns follow): pick its `MASTER_PORT` for this incarnation
        /// and write its rank table.
        case prepareGroup(group: Int, incarnation: Int32)
        /// Count a group's exit (its cause) in the metrics.
        case groupExitRecorded(group: Int, reason: ExitReason)
    }

    public internal(set) var config: SupervisorConfiguration
    public internal(set) var workers: [Worker]
    /// Tensor-parallel groups; their ranks are slots of ``workers``.
    public internal(set) var groups: [Group] = []
    /// Set while a group starts its ranks: their spawns are the group's (any other spawn of a rank is turned
    /// into a start of its group).
    var spawningGroup = false
    /// The time of the event being handled.
    var turnNow = MonotonicInstant(nanoseconds: 0)
    /// The backoff jitter sample of the last exit, for the group whose last rank it was.
    var groupJitter = 0.5
    /// The rolling change in progress, if any.
    public internal(set) var rollout: Rollout
    /// A reload waits for its rollout to end before it is done.
    var reloadInProgress = false
    var lastRefusal: String?
    /// The routing policy and the per-worker load; the runtime uses it directly on the hot path.
    public var router: Router
    public internal(set) var fallback: FallbackController?
    public internal(set) var readiness: Readiness
    public internal(set) var shutdown = Shutdown()
    /// The availability account; the runtime counts requests on it directly (one-store mutating methods).
    public var availability: AvailabilityAccount
    /// Before ``Event/boot``: requests wait instead of being refused (a socket-activated service woken by its
    /// first client has not started its workers yet).
    public internal(set) var isBooting = true
    var requestsInFlight = 0
    let protocolVersion: Int
    var actions: [Action] = []
    var healthDirty = false
    /// Work on the request queue that this event calls for; emitted last (see ``finishTurn(now:)``).
    var queueWork: QueueWork = []

    struct QueueWork: OptionSet {
        let rawValue: UInt8
        static let answerHopeless = QueueWork(rawValue: 1)
        static let dispatch = QueueWork(rawValue: 2)
    }

    /// - Parameters:
    ///   - protocolVersion: the wire protocol version workers must say in their hello.
    ///   - watchdogInterval: half of systemd's `WATCHDOG_USEC`, nil when the watchdog is off.
    public init(config: SupervisorConfiguration, protocolVersion: Int, watchdogInterval: Duration? = nil) {
        self.config = config
        var workers = config.workers.map { Worker(spec: $0, protocolVersion: protocolVersion) }
        workers += (config.fallback?.workers ?? []).map { Worker(spec: $0, protocolVersion: protocolVersion) }
        groups = Self.makeGroups(config, workers: &workers)
        self.workers = workers
        self.protocolVersion = protocolVersion
        router = Router(maxInflight: workers.map(\.spec.maxInflight), isFallback: workers.map(\.spec.isFallback))
        rollout = Rollout(settings: config.rollout)
        fallback = config.fallback.map { FallbackController(whenFewerThan: $0.whenFewerThan, stopAfter: $0.stopAfter) }
        readiness = Readiness(readyTimeout: config.readyTimeout, watchdogInterval: watchdogInterval)
        availability = AvailabilityAccount(objective: config.availability.objective,
                                           window: config.availability.window, devices: config.workers.map(\.device))
    }

    public var isShuttingDown: Bool { shutdown.isShuttingDown }

    // MARK: Hot path (no allocation, no action)

    /// Any frame from the slot's worker proves it alive.
    @inline(__always) public mutating func frameReceived(slot: Int, now: MonotonicInstant) {
        workers[slot].liveness.frameReceived(now: now)
    }

    /// The slot's worker answered a request (ok or error): it is not mute. One store.
    @inline(__always) public mutating func workerAnswered(slot: Int) {
        if workers[slot].expiredInARow != 0 { workers[slot].expiredInARow = 0 }
    }

    /// A real request succeeded on the slot's worker (its inference probe may be skipped).
    @inline(__always) public mutating func requestSucceeded(slot: Int, now: MonotonicInstant) {
        workers[slot].inference.realRequestSucceeded(now: now)
    }

    // MARK: Events

    /// Feeds one event; returns what the runtime must do, in order.
    public mutating func handle(_ event: Event, now: MonotonicInstant) -> [Action] {
        actions.removeAll(keepingCapacity: true)
        turnNow = now
        switch event {
        case .boot: boot(now: now)
        case .spawned(let slot, let pid): spawned(slot, pid: pid, now: now)
        case .spawnFailed(let slot, let errno, let message, let jitter):
            spawnFailed(slot, errno: errno, message: message, jitter: jitter, now: now)
        case .channelOpened(let slot, let pid):
            if workers[slot].lifecycle.pid == pid {
                workers[slot].isChannelOpen = true
                healthDirty = true
            }
        case .channelFailed(let slot, let pid, let message):
            guard workers[slot].lifecycle.pid == pid else { break }
            log(.error, slot, "could not adopt worker channel: \(message)")
            perform(workers[slot].lifecycle.fault(.protocolError("channel setup failed"), now: now), on: slot)
        case .workerMessage(let slot, let pid, let message): workerMessage(slot, pid: pid, message, now: now)
        case .workerHealth(let slot, let pid, let ok, let detail):
            guard workers[slot].lifecycle.pid == pid else { break }
            workers[slot].liveness.frameReceived(now: now)
            workers[slot].device.workerReported(ok: ok, detail: detail, now: now)
        case .workerError(let slot, let pid, let code, let message, let onRequest):
            guard workers[slot].lifecycle.pid == pid else { break }
            workers[slot].liveness.frameReceived(now: now)
            if code == "device_oom" { workers[slot].lifecycle.attribute(.deviceOOM, until: now + .seconds(5)) }
            if !onRequest { log(.warning, slot, "worker error: \(code): \(message)") }
        case .undecodable(let slot, let pid, let message):
            guard workers[slot].lifecycle.pid == pid else { break }
            protocolViolation(slot, message, now: now)
        case .channelClosed(let slot, let pid): channelClosed(slot, pid: pid, now: now)
        case .channelWritability(let slot, let pid, let writable):
            guard workers[slot].lifecycle.pid == pid else { break }
            workers[slot].unwritableSince = writable ? nil : (workers[slot].unwritableSince ?? now)
            if writable { queueWork.insert(.dispatch) }
            healthDirty = true
        case .requestExpired(let slot): requestExpired(slot, now: now)
        case .processExited(let slot, let pid, let observed, let oomKillsRose, let jitter):
            processExited(slot, pid: pid, observed, oomKillsRose: oomKillsRose, jitter: jitter, now: now)
        case .deviceProbeFinished(let slot, let failure): deviceProbeResult(slot, failure: failure, now: now)
        case .inferenceProbeFinished(let slot, let failure): inferenceProbeResult(slot, failure: failure, now: now)
        case .inferenceProbeNotSent(let slot): workers[slot].inference.sendFailed(now: now)
        case .control(let verb, let slots, let uid): control(verb, slots: slots, uid: uid, now: now)
        case .shutdown(let reason, let inFlight): beginShutdown(reason: reason, requestsInFlight: inFlight, now: now)
        case .requestsInFlight(let count): requestsInFlight = count
        case .reloadRequested: reloadBegan(now: now)
        case .reloadFailed(let why): reloadFailed(why, now: now)
        case .publishHealth: publishHealth()
        case .timer: timer(now: now)
        case .drain(let slots): drain(slots, byOperator: true, now: now)
        case .undrain(let slots): undrain(slots, now: now)
        case .drainSettled(let slot): drainSettled(slot)
        case .rollingRestart(let slots): rollingRestart(slots, now: now)
        case .reload(let newConfig): reload(newConfig, now: now)
        case .rolloutPause: rolloutPause(now: now)
        case .rolloutResume: rolloutResume(now: now)
        case .rolloutUndo: rolloutUndo(now: now)
        case .restoreRollout(let previous, let onPrevious): restoreRollout(previous: previous, onPrevious: onPrevious)
        }
        finishTurn(now: now)
        return actions
    }

    /// When ``Event/timer`` must next be fed, or nil when nothing is scheduled.
    public var nextDeadline: MonotonicInstant? {
        var next: MonotonicInstant?
        func consider(_ instant: MonotonicInstant?) {
            if let instant, next.map({ instant < $0 }) ?? true { next = instant }
        }
        for worker in workers {
            consider(worker.lifecycle.nextDeadline)
            consider(worker.liveness.deadline(isReady: worker.lifecycle.isReady && worker.isChannelOpen))
            if let since = worker.unwritableSince { consider(since + worker.spec.heartbeatTimeout) }
            consider(worker.exitDrainDeadline)
            consider(worker.channelClosedDeadline)
            consider(worker.device.nextProbeAt)
            consider(worker.inference.nextProbeAt)
            if case .draining(let until, _) = worker.drain { consider(until) }
        }
        for group in groups { consider(group.lifecycle.nextDeadline) }
        consider(rollout.nextDeadline)
        if !isShuttingDown { consider(fallback?.nextCheck) }
        consider(readiness.nextDeadline)
        consider(shutdown.nextDeadline)
        return next
    }

    // MARK: Reads for status, health and routing

    /// Why no worker can serve a request (pinned to `slot`, or any), or nil when one may. The hot path asks
    /// ``Router/hopeful`` first; this builds the message.
    public func noWorkersReason(pinned slot: Int?) -> String? {
        if isBooting { return nil }
        if slot.map({ router.hopeful[$0] }) ?? router.anyHopeful { return nil }
        let candidates = slot.map { [$0] } ?? workers.indices.filter { !workers[$0].isFollower }
        // A group's leader stands for its group: the group is what can come back.
        return Admission.noWorkersReason(candidates.map { slot in
            if let g = workers[slot].groupIndex { return (groups[g].spec.id, groups[g].lifecycle) }
            return (workers[slot].spec.device, workers[slot].lifecycle)
        }, groups: Set(groups.map(\.spec.id)))
    }

    /// The slot a request pinned to this id goes to: a device's worker, or for a group's id or any of its
    /// devices, the group's leader.
    public func slot(of device: String) -> Int? {
        if let g = groups.firstIndex(where: { $0.spec.id == device }) { return groups[g].leader }
        return workers.firstIndex { $0.spec.device == device }.map { routingSlot($0) }
    }

    /// Device ids by slot; a slot removed by a reload shows as "" (no id matches it).
    public var devices: [String] { workers.map { $0.isRetired ? "" : $0.spec.device } }

    /// A reload is waiting for its rollout to end.
    public var isReloading: Bool { reloadInProgress }

    // MARK: Internals shared by the extensions

    mutating func emit(_ action: Action) { actions.append(action) }

    mutating func log(_ level: LogRecord.Level, _ slot: Int?, _ message: String, reason: String? = nil,
                      pid: Int32? = nil) {
        actions.append(.log(LogRecord(level: level, slot: slot, pid: pid ?? slot.flatMap { workers[$0].pid },
                                      message: message, reason: reason)))
    }

    /// Carries out a lifecycle decision. A spawn asked for earlier in this event that the lifecycle no longer
    /// wants (it was stopped, or held failed, in the same turn) is withdrawn before the runtime sees it.
    mutating func perform(_ action: WorkerStateMachine.Action?, on slot: Int) {
        if action == .spawn, !spawningGroup, let g = workers[slot].groupIndex {
            // A rank cannot start alone (its peers would wait for it forever): a start of any rank (a device that
            // recovered, a trial worker) is a start of its group.
            performGroup(groups[g].lifecycle.start(now: turnNow), group: g, now: turnNow)
            return
        }
        if workers[slot].isSpawnPending, action != .spawn,
           workers[slot].lifecycle.desired == .down || workers[slot].lifecycle.isHeldFailed {
            workers[slot].isSpawnPending = false
            actions.removeAll { $0 == .spawn(slot: slot) }
        }
        switch action {
        case .spawn?:
            workers[slot].isSpawnPending = true
            emit(.spawn(slot: slot))
        case .signalGroup(let signal)?:
            if let pid = workers[slot].pid {
                emit(.signal(slot: slot, pid: pid, signal: signal))
                log(.info, slot, "sent \(signalName(signal)) to worker process group")
            }
        case nil:
            break
        }
        healthDirty = true
    }

    /// End of every event: keep the router's view current, run the fallback rule, finish a drained shutdown,
    /// and only then touch the queue, so that a fallback worker started in this turn counts as coming (its
    /// spawn is carried out before queued requests are judged hopeless).
    mutating func finishTurn(now: MonotonicInstant) {
        for g in groups.indices {
            let open = groupIsOpen(g)
            if workers[groups[g].leader].gangOpen != open { workers[groups[g].leader].gangOpen = open }
        }
        for slot in workers.indices where router.serving[slot] != workers[slot].isServing {
            router.setServing(slot, workers[slot].isServing)
            healthDirty = true
        }
        if case .draining = shutdown.state { drainCheck(now: now) }
        if rollout.isActive { advanceRollout(now: now) }
        for slot in workers.indices where router.serving[slot] != workers[slot].isServing {
            router.setServing(slot, workers[slot].isServing)
            healthDirty = true
        }
        if healthDirty {
            healthDirty = false
            evaluateFallback(now: now)
            for slot in workers.indices where router.serving[slot] != workers[slot].isServing {
                router.setServing(slot, workers[slot].isServing)
            }
            emit(.healthChanged)
        }
        if !isBooting {
            for slot in workers.indices {
                if let g = workers[slot].groupIndex {
                    router.setHopeful(slot, slot == groups[g].leader && (Admission.isHopeful(groups[g].lifecycle)
                        || groups[g].slots.contains { workers[$0].isSpawnPending }))
                } else {
                    router.setHopeful(slot, workers[slot].isSpawnPending || Admission.isHopeful(workers[slot].lifecycle))
                }
            }
        }
        sampleAvailability(now: now)
        if queueWork.contains(.answerHopeless) { emit(.answerHopelessQueued) }
        if queueWork.contains(.dispatch) { emit(.dispatchQueued) }
        queueWork = []
    }
}

/// A line for the log, with the slot it concerns (the runtime adds `device=` and `worker_pid=`).
public struct LogRecord: Sendable, Hashable {
    public enum Level: Sendable, Hashable { case debug, info, notice, warning, error }
    public var level: Level
    public var slot: Int?
    public var pid: Int32?
    public var message: String
    /// `REASON=` in the journal: an exit reason or a verdict (`hang`, `fallback`, ...).
    public var reason: String?
}

/// The aggregated health document: what `status.sock` writes, what `npu-supervisorctl status --json` prints
/// and what `GET /health` returns. Field names are a contract (docs/PROTOCOL.md, "Status document").
public struct StatusDocument: Codable, Sendable, Equatable {
    /// `ok`, `degraded` or `unavailable`.
    public var state: String
    /// One line saying why (`4/4 workers ready`, `degraded: 3/4 workers ready (device 2 backoff (signaled(9) x1))`).
    public var reason: String
    public var supervisor: SupervisorInfo
    public var queueDepth: Int
    /// Whether CPU fallback workers are running because device workers cannot serve.
    public var fallbackActive: Bool
    public var workers: [WorkerStatus]
    /// The rolling change (restart or upgrade), `idle` when none ever ran.
    public var rollout: RolloutStatus?
    /// The availability account (absent from supervisors older than it).
    public var availability: AvailabilityStatus?
    /// Tensor-parallel groups (`[]` when none is configured; absent from supervisors older than them).
    public var groups: [GroupStatus]?

    public init(state: String, reason: String, supervisor: SupervisorInfo, queueDepth: Int, fallbackActive: Bool,
                workers: [WorkerStatus], rollout: RolloutStatus? = nil, availability: AvailabilityStatus? = nil,
                groups: [GroupStatus]? = nil) {
        self.groups = groups
        self.state = state
        self.reason = reason
        self.supervisor = supervisor
        self.queueDepth = queueDepth
        self.fallbackActive = fallbackActive
        self.workers = workers
        self.rollout = rollout
        self.availability = availability
    }

    enum CodingKeys: String, CodingKey {
        case state, reason, supervisor, workers, rollout, availability, groups
        case queueDepth = "queue_depth"
        case fallbackActive = "fallback_active"
    }
}

/// The state of a rolling change (docs/PROTOCOL.md, "Rollouts").
public struct RolloutStatus: Codable, Sendable, Equatable {
    /// `idle`, `progressing`, `paused`, `rolling_back`, `rolled_back` or `complete`.
    public var state: String
    /// `restart` (same specs, new processes) or `upgrade` (new specs from a reload); nil when idle.
    public var kind: String?
    /// The devices in the order they are changed (the first is the canary).
    public var devices: [String]
    /// Devices done of all, e.g. `2/4`.
    public var progress: String
    public var canary: String?
    /// Why it is paused, rolling back or rolled back.
    public var reason: String?

    public init(state: String, kind: String?, devices: [String], progress: String, canary: String?, reason: String?) {
        self.state = state
        self.kind = kind
        self.devices = devices
        self.progress = progress
        self.canary = canary
        self.reason = reason
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(state, forKey: .state)
        try c.encode(kind, forKey: .kind)
        try c.encode(devices, forKey: .devices)
        try c.encode(progress, forKey: .progress)
        try c.encode(canary, forKey: .canary)
        try c.encode(reason, forKey: .reason)
    }

    enum CodingKeys: String, CodingKey { case state, kind, devices, progress, canary, reason }
}

public struct SupervisorInfo: Codable, Sendable, Equatable {
    public var pid: Int32
    public var version: String
    public var uptimeSeconds: Double
    public var config: String?
    /// The HTTP listener's address (`127.0.0.1:8087`), or nil when off.
    public var http: String?

    public init(pid: Int32, version: String, uptimeSeconds: Double, config: String?, http: String?) {
        self.pid = pid
        self.version = version
        self.uptimeSeconds = uptimeSeconds
        self.config = config
        self.http = http
    }

    enum CodingKeys: String, CodingKey {
        case pid, version, config, http
        case uptimeSeconds = "uptime_seconds"
    }

    // Nullable fields are present as null (`"http": null` when the listener is off): part of the contract.
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(pid, forKey: .pid)
        try c.encode(version, forKey: .version)
        try c.encode(uptimeSeconds, forKey: .uptimeSeconds)
        try c.encode(config, forKey: .config)
        try c.encode(http, forKey: .http)
    }
}

public struct WorkerStatus: Codable, Sendable, Equatable {
    public var device: String
    public var kind: String
    /// `stopped`, `starting`, `ready`, `stopping`, `backoff`, `failed`.
    public var state: String
    /// `up` or `down`: what the operator asked for.
    public var desired: String
    public var pid: Int32?
    public var restarts: Int
    /// The last exit reason (`signaled(9)`, `exited(1)`, `oom_killed`, ...), or null before any exit.
    public var lastExit: String?
    /// A sentence about the last exit, for humans.
    public var lastExitDetail: String?
    /// Seconds since the current process was spawned (0 when none runs).
    public var uptimeSeconds: Double
    public var inflight: Int
    public var maxInflight: Int
    /// Exits per reason kind since the supervisor started.
    public var exits: [String: Int]
    /// Seconds until the next restart attempt when in `backoff` or `failed`.
    public var nextRestartInSeconds: Double?
    /// The health levels (docs/PROTOCOL.md 8.1).
    public var health: WorkerHealthLevels
    /// A CPU fallback worker.
    public var fallback: Bool
    /// Memory used by the worker's cgroup (bytes), when it has one.
    public var memoryBytes: Int?
    /// The cgroup's memory limit (bytes), when one is set.
    public var memoryLimitBytes: Int?
    /// The worker spec's revision (a hash of command, env, pinning, working directory, kind, memory limit).
    public var revision: String?
    /// Rises each time the device gets a spec with another revision.
    public var generation: Int?
    /// `no`, `draining` or `drained` (out of rotation on purpose).
    public var drain: String?
    /// The tensor-parallel group this worker is a rank of, null for a single device.
    public var group: String?
    /// Its rank in the group (0 is the leader, which receives the group's requests), null for a single device.
    public var rank: Int?

    public init(device: String, kind: String, state: String, desired: String, pid: Int32?, restarts: Int,
                lastExit: String?, lastExitDetail: String?, uptimeSeconds: Double, inflight: Int, maxInflight: Int,
                exits: [String: Int], nextRestartInSeconds: Double?, health: WorkerHealthLevels, fallback: Bool,
                memoryBytes: Int? = nil, memoryLimitBytes: Int? = nil, revision: String? = nil, generation: Int? = nil,
                drain: String? = nil) {
        self.revision = revision
        self.generation = generation
        self.drain = drain
        self.device = device
        self.kind = kind
        self.state = state
        self.desired = desired
        self.pid = pid
        self.restarts = restarts
        self.lastExit = lastExit
        self.lastExitDetail = lastExitDetail
        self.uptimeSeconds = uptimeSeconds
        self.inflight = inflight
        self.maxInflight = maxInflight
        self.exits = exits
        self.nextRestartInSeconds = nextRestartInSeconds
        self.health = health
        self.fallback = fallback
        self.memoryBytes = memoryBytes
        self.memoryLimitBytes = memoryLimitBytes
    }

    enum CodingKeys: String, CodingKey {
        case device, kind, state, desired, pid, restarts, inflight, exits, health, fallback
        case memoryBytes = "memory_bytes"
        case memoryLimitBytes = "memory_limit_bytes"
        case revision, generation, drain, group, rank
        case lastExit = "last_exit"
        case lastExitDetail = "last_exit_detail"
        case uptimeSeconds = "uptime_seconds"
        case maxInflight = "max_inflight"
        case nextRestartInSeconds = "next_restart_in_seconds"
    }

    // Encode nil optionals as explicit nulls: `"last_exit": null` is part of the contract.
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(device, forKey: .device)
        try c.encode(kind, forKey: .kind)
        try c.encode(state, forKey: .state)
        try c.encode(desired, forKey: .desired)
        try c.encode(pid, forKey: .pid)
        try c.encode(restarts, forKey: .restarts)
        try c.encode(lastExit, forKey: .lastExit)
        try c.encode(lastExitDetail, forKey: .lastExitDetail)
        try c.encode(uptimeSeconds, forKey: .uptimeSeconds)
        try c.encode(inflight, forKey: .inflight)
        try c.encode(maxInflight, forKey: .maxInflight)
        try c.encode(exits, forKey: .exits)
        try c.encode(nextRestartInSeconds, forKey: .nextRestartInSeconds)
        try c.encode(health, forKey: .health)
        try c.encode(fallback, forKey: .fallback)
        try c.encode(memoryBytes, forKey: .memoryBytes)
        try c.encode(memoryLimitBytes, forKey: .memoryLimitBytes)
        try c.encode(revision, forKey: .revision)
        try c.encode(generation, forKey: .generation)
        try c.encode(drain, forKey: .drain)
        try c.encode(group, forKey: .group)
        try c.encode(rank, forKey: .rank)
    }
}

/// One tensor-parallel group (docs/PROTOCOL.md, "Tensor-parallel groups").
public struct GroupStatus: Codable, Sendable, Equatable {
    public var id: String
    /// Its devices in rank order (the first is the leader).
    public var devices: [String]
    /// The group as one unit: `stopped`, `starting`, `ready`, `stopping`, `backoff`, `failed`.
    public var state: String
    /// `up` or `down`: what the operator asked for.
    public var desired: String
    /// In rotation: every rank ready, the leader taking requests.
    public var serving: Bool
    /// Restarts of the whole group.
    public var restarts: Int
    /// Why the group last went down (`exited(1)`, `hang`, ...), null before any.
    public var lastExit: String?
    /// The rank and device that caused it, null when the group was stopped on request or never went down.
    public var lastExitRank: Int?
    public var lastExitDevice: String?
    public var lastExitDetail: String?
    /// The `MASTER_PORT` of the current (or last) start, null before the first.
    public var masterPort: Int?
    /// The rank table file given in `RANK_TABLE_FILE`, null when `rank_table` is off.
    public var rankTableFile: String?
    /// Seconds until the next restart attempt when in `backoff` or `failed`.
    public var nextRestartInSeconds: Double?

    public init(id: String, devices: [String], state: String, desired: String, serving: Bool, restarts: Int,
                lastExit: String?, lastExitRank: Int?, lastExitDevice: String?, lastExitDetail: String?,
                masterPort: Int?, rankTableFile: String?, nextRestartInSeconds: Double?) {
        self.id = id
        self.devices = devices
        self.state = state
        self.desired = desired
        self.serving = serving
        self.restarts = restarts
        self.lastExit = lastExit
        self.lastExitRank = lastExitRank
        self.lastExitDevice = lastExitDevice
        self.lastExitDetail = lastExitDetail
        self.masterPort = masterPort
        self.rankTableFile = rankTableFile
        self.nextRestartInSeconds = nextRestartInSeconds
    }

    enum CodingKeys: String, CodingKey {
        case id, devices, state, desired, serving, restarts
        case lastExit = "last_exit"
        case lastExitRank = "last_exit_rank"
        case lastExitDevice = "last_exit_device"
        case lastExitDetail = "last_exit_detail"
        case masterPort = "master_port"
        case rankTableFile = "rank_table_file"
        case nextRestartInSeconds = "next_restart_in_seconds"
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(id, forKey: .id)
        try c.encode(devices, forKey: .devices)
        try c.encode(state, forKey: .state)
        try c.encode(desired, forKey: .desired)
        try c.encode(serving, forKey: .serving)
        try c.encode(restarts, forKey: .restarts)
        try c.encode(lastExit, forKey: .lastExit)
        try c.encode(lastExitRank, forKey: .lastExitRank)
        try c.encode(lastExitDevice, forKey: .lastExitDevice)
        try c.encode(lastExitDetail, forKey: .lastExitDetail)
        try c.encode(masterPort, forKey: .masterPort)
        try c.encode(rankTableFile, forKey: .rankTableFile)
        try c.encode(nextRestartInSeconds, forKey: .nextRestartInSeconds)
    }
}

/// One worker's health levels: liveness, device, model, inference. Each level is `ok`, `unknown` (not checked
/// yet, or not configured), or a sentence saying what is wrong.
public struct WorkerHealthLevels: Codable, Sendable, Equatable {
    /// Heartbeats arrive (`ok`), or how long they have been missing.
    public var alive: String
    /// The device probe's verdict.
    public var device: String
    /// `ok` once the worker said ready (model loaded), else `loading` or `down`.
    public var model: String
    /// The inference probe's verdict.
    public var inference: String
    /// Whether the worker is in rotation (gets requests).
    public var inRotation: Bool

    public init(alive: String, device: String, model: String, inference: String, inRotation: Bool) {
        self.alive = alive
        self.device = device
        self.model = model
        self.inference = inference
        self.inRotation = inRotation
    }

    enum CodingKeys: String, CodingKey {
        case alive, device, model, inference
        case inRotation = "in_rotation"
    }
}

/// A command on `control.sock`: the JSON payload of a `request` frame.
public struct ControlCommand: Codable, Sendable, Equatable {
    /// `status`, `start`, `stop`, `restart`, `pid`, `tail`, `health`, `shutdown`.
    public var command: String
    /// Device ids, or `["all"]`.
    public var devices: [String]?
    /// `tail`: keep streaming new lines as `chunk` frames.
    public var follow: Bool?
    /// `tail`: how many recent lines.
    public var lines: Int?
    /// `reload`: answer only once the reload is done (its rollout complete, rolled back or paused).
    public var wait: Bool?
    /// `restart`: one device at a time, each drained first (a rolling restart).
    public var rolling: Bool?
    /// `rollout`: `status`, `pause`, `resume` or `undo`.
    public var action: String?

    public init(command: String, devices: [String]? = nil, follow: Bool? = nil, lines: Int? = nil, wait: Bool? = nil,
                rolling: Bool? = nil, action: String? = nil) {
        self.command = command
        self.devices = devices
        self.follow = follow
        self.lines = lines
        self.wait = wait
        self.rolling = rolling
        self.action = action
    }
}

/// The answer to a mutating control command (`start`, `stop`, `restart`, `shutdown`).
public struct ControlResult: Codable, Sendable, Equatable {
    public var ok: Bool
    public var message: String
    public var devices: [String]

    public init(ok: Bool, message: String, devices: [String]) {
        self.ok = ok
        self.message = message
        self.devices = devices
    }
}

/// The answer to `pid`.
public struct PidResult: Codable, Sendable, Equatable {
    public var pid: Int32?
    public init(pid: Int32?) { self.pid = pid }
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(pid, forKey: .pid)
    }
}

/// The answer to `tail`: recent lines of a worker's stdout/stderr (each `chunk` of `tail -f` is one more line).
public struct TailResult: Codable, Sendable, Equatable {
    public var device: String
    public var lines: [String]
    public init(device: String, lines: [String]) {
        self.device = device
        self.lines = lines
    }
}

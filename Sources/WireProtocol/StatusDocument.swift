/// The aggregated health document: what `status.sock` writes, what `npu-supervisorctl status --json` prints
/// and what `GET /health` returns. Field names are a contract (docs/PROTOCOL.md, "Status document").
public struct StatusDocument: Codable, Sendable, Equatable {
    /// `ok`, `degraded` or `unavailable`.
    public var state: String
    /// One line saying why (`4/4 workers ready`, `degraded: 3/4 workers ready (device 2 backoff (signaled(9) x1))`).
    public var reason: String
    public var supervisor: SupervisorInfo
    public var queueDepth: Int
    public var workers: [WorkerStatus]

    public init(state: String, reason: String, supervisor: SupervisorInfo, queueDepth: Int, workers: [WorkerStatus]) {
        self.state = state
        self.reason = reason
        self.supervisor = supervisor
        self.queueDepth = queueDepth
        self.workers = workers
    }

    enum CodingKeys: String, CodingKey {
        case state, reason, supervisor, workers
        case queueDepth = "queue_depth"
    }
}

public struct SupervisorInfo: Codable, Sendable, Equatable {
    public var pid: Int32
    public var version: String
    public var uptimeSeconds: Double
    public var config: String?

    public init(pid: Int32, version: String, uptimeSeconds: Double, config: String?) {
        self.pid = pid
        self.version = version
        self.uptimeSeconds = uptimeSeconds
        self.config = config
    }

    enum CodingKeys: String, CodingKey {
        case pid, version, config
        case uptimeSeconds = "uptime_seconds"
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

    public init(device: String, kind: String, state: String, desired: String, pid: Int32?, restarts: Int,
                lastExit: String?, lastExitDetail: String?, uptimeSeconds: Double, inflight: Int, maxInflight: Int,
                exits: [String: Int], nextRestartInSeconds: Double?) {
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
    }

    enum CodingKeys: String, CodingKey {
        case device, kind, state, desired, pid, restarts, inflight, exits
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

    public init(command: String, devices: [String]? = nil, follow: Bool? = nil, lines: Int? = nil) {
        self.command = command
        self.devices = devices
        self.follow = follow
        self.lines = lines
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

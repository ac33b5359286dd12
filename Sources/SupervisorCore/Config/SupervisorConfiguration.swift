// `resolve(_:against:)` and the socket rule live in SupervisorPaths, which clients use without this module.
@_exported import SupervisorPaths

/// What kind of device a worker is bound to; it chooses the default pinning variable.
public enum DeviceKind: String, Sendable, Hashable, CaseIterable {
    case npu, gpu, cpu

    /// The environment variable that pins a process to one device of this kind.
    public var defaultPinVariable: String? {
        switch self {
        case .npu: "ASCEND_RT_VISIBLE_DEVICES"
        case .gpu: "CUDA_VISIBLE_DEVICES"
        case .cpu: nil
        }
    }
}

/// How one device's worker is run and supervised. Every key of `[defaults]` can be overridden per `[[device]]`.
public struct WorkerSpec: Sendable, Hashable {
    /// The device id (`NPU_DEVICE_ID`, `{device}` in command and env).
    public var device: String
    public var kind: DeviceKind
    /// argv, with `{device}` already substituted. argv[0] without a slash is looked up next to the supervisor's
    /// own executable, then on PATH.
    public var command: [String]
    /// The config's own environment for the worker, `{device}` substituted.
    public var environment: [String: String]
    /// The pinning variable (`ASCEND_RT_VISIBLE_DEVICES`, `CUDA_VISIBLE_DEVICES`), nil for none.
    public var pinVariable: String?
    public var workingDirectory: String?
    public var maxInflight: Int
    public var heartbeatInterval: Duration
    public var heartbeatTimeout: Duration
    public var policy: WorkerStateMachine.Policy
    public var deviceProbe = DeviceProbeSpec()
    public var inferenceProbe = InferenceProbeSpec()
    /// The worker cgroup's memory limit in bytes (`memory_limit`), nil for none.
    public var memoryLimit: Int?
    /// Bytes per second of the worker's stdout/stderr kept (ring, log, `tail -f`); past it lines are dropped
    /// and counted, with a marker (`output_rate_limit`, ``OutputRateLimiter``). nil: no limit.
    public var outputRateLimit: Int? = WorkerSpec.defaultOutputRateLimit
    public static let defaultOutputRateLimit: Int? = 8 << 20
    /// A CPU fallback worker (started only while device workers cannot serve).
    public var isFallback = false
    /// A rank of a tensor-parallel group (`[[group]]`), nil for a single-device worker.
    public var rank: RankInfo?

    public init(device: String, kind: DeviceKind, command: [String], environment: [String: String],
                pinVariable: String?, workingDirectory: String?, maxInflight: Int, heartbeatInterval: Duration,
                heartbeatTimeout: Duration, policy: WorkerStateMachine.Policy,
                deviceProbe: DeviceProbeSpec = DeviceProbeSpec(), inferenceProbe: InferenceProbeSpec = InferenceProbeSpec(),
                isFallback: Bool = false) {
        self.device = device
        self.kind = kind
        self.command = command
        self.environment = environment
        self.pinVariable = pinVariable
        self.workingDirectory = workingDirectory
        self.maxInflight = maxInflight
        self.heartbeatInterval = heartbeatInterval
        self.heartbeatTimeout = heartbeatTimeout
        self.policy = policy
        self.deviceProbe = deviceProbe
        self.inferenceProbe = inferenceProbe
        self.isFallback = isFallback
    }

    /// The full environment contract of docs/PROTOCOL.md 1.2 minus the inherited environment.
    public var contractEnvironment: [String: String] {
        var env = environment
        env["NPU_SUPERVISOR_FD"] = "3"
        env["NPU_DEVICE_ID"] = device
        if let pinVariable {
            env[pinVariable] = rank.map { $0.visibleDevices == .group ? $0.groupDevices.joined(separator: ",") : device }
                ?? device
        }
        if let rank { env.merge(rank.environment) { _, contract in contract } }
        return env
    }
}

/// Request-path settings (`[requests]`).
public struct RequestSettings: Sendable, Hashable {
    /// Requests waiting for a worker beyond every worker's `max_inflight`; beyond this, `overloaded`.
    public var maxQueue: Int = 1024
    /// Deadline for requests that do not bring their own.
    public var defaultDeadline: Duration = .seconds(60)
    /// How many times a request is re-dispatched after its worker died before it streamed anything.
    public var retries: Int = 1
    /// Concurrent client connections on requests.sock.
    public var maxConnections: Int = 1024
    /// Requests in flight on one connection before the supervisor stops reading from it (back-pressure).
    public var maxInflightPerConnection: Int = 256
    /// Answers queued for a client that does not read them; beyond this the client is disconnected.
    public var maxClientBufferBytes: Int = 64 * 1024 * 1024
    /// Requests read together go to one worker while it holds at most this many more than the least-loaded
    /// one (``Router``); 0 spreads every request.
    public var burstAffinity: Int = 0
}

/// The whole validated configuration.
public struct SupervisorConfiguration: Sendable, Hashable {
    public var runDirectory: String = "/run/npu-supervisor"
    public var requestsSocket: String = "/run/npu-supervisor/requests.sock"
    public var statusSocket: String = "/run/npu-supervisor/status.sock"
    public var controlSocket: String = "/run/npu-supervisor/control.sock"
    /// File mode of the three sockets.
    public var socketMode: UInt32 = 0o660
    /// Group allowed to use mutating control commands besides root (checked with SO_PEERCRED).
    public var controlGroup: String?
    public var maxFrameBytes: Int = 16 * 1024 * 1024
    /// How long shutdown waits for in-flight requests before it stops the workers anyway.
    public var shutdownTimeout: Duration = .seconds(30)
    public var logLevel: String = "info"
    /// Lines of each worker's output kept for `tail`.
    public var outputLines: Int = 1000
    /// The nice value of the event-loop thread that routes every request and keeps every timer (`loop_nice`,
    /// -20...0); workers stay at nice 0. 0: the thread is left as it is.
    public var loopNice: Int = -10
    /// Workers that must be ready for the supervisor to count as able to serve (`/readyz`, READY=1).
    public var minReady: Int = 1
    /// Start-up grace under systemd: READY=1 is sent after this even if fewer than `minReady` workers are ready
    /// (STATUS= says so). nil: READY=1 waits for `minReady` workers.
    public var readyTimeout: Duration?
    public var requests = RequestSettings()
    /// Device workers: single devices (`[[device]]`) first, then every group's ranks in rank order.
    public var workers: [WorkerSpec] = []
    /// Tensor-parallel groups (`[[group]]`); their ranks are in ``workers``.
    public var groups: [GroupSpec] = []
    public var fallback: FallbackSpec?
    public var http = HTTPSettings()
    public var cgroups = CgroupSettings()
    /// Drains and rolling changes (`[rollout]`).
    public var rollout = Rollout.Settings()
    public var availability = AvailabilitySettings()

    public init() {}
}

extension SupervisorConfiguration {
    /// Validates a parsed document.
    /// - Parameters:
    ///   - document: the root table.
    ///   - baseDirectory: relative paths (`run_dir`, sockets) are resolved against it (the config file's folder).
    /// - Throws: ``ConfigError`` naming the first bad key.
    public init(parsing document: [String: ConfigValue], baseDirectory: String) throws {
        self.init()
        var root = TableReader(path: "", table: document)

        if let t = try root.table("supervisor") {
            var r = TableReader(path: "supervisor", table: t)
            setSockets(SocketPaths(
                runDirectory: try r.string("run_dir"), requestsSocket: try r.string("requests_socket"),
                statusSocket: try r.string("status_socket"), controlSocket: try r.string("control_socket"),
                baseDirectory: baseDirectory))
            if let mode = try r.string("socket_mode") {
                guard let m = UInt32(mode, radix: 8), m <= 0o777 else {
                    throw ConfigError(key: "supervisor.socket_mode", value: "\"\(mode)\"",
                                      expected: "an octal file mode such as \"0660\"")
                }
                socketMode = m
            }
            controlGroup = try r.string("control_group")
            maxFrameBytes = try r.bytes("max_frame_bytes", min: 1024) ?? maxFrameBytes
            guard maxFrameBytes <= Int(UInt32.max) else {
                throw ConfigError(key: "supervisor.max_frame_bytes", value: "\(maxFrameBytes)",
                                  expected: "at most 4GiB - 1 (the length field is 32 bits)")
            }
            shutdownTimeout = try r.duration("shutdown_timeout") ?? shutdownTimeout
            if let level = try r.string("log_level") {
                let levels = ["trace", "debug", "info", "notice", "warning", "error", "critical"]
                guard levels.contains(level) else {
                    throw ConfigError(key: "supervisor.log_level", value: "\"\(level)\"",
                                      expected: "one of " + levels.joined(separator: ", "))
                }
                logLevel = level
            }
            outputLines = try r.int("output_lines", min: 0, max: 1_000_000) ?? outputLines
            loopNice = try r.int("loop_nice", min: -20, max: 0) ?? loopNice
            minReady = try r.int("min_ready", min: 1) ?? minReady
            readyTimeout = try r.duration("ready_timeout", min: .milliseconds(100))
            try r.rejectUnknownKeys()
        } else {
            setSockets(SocketPaths(baseDirectory: baseDirectory))
        }

        if let t = try root.table("requests") {
            var r = TableReader(path: "requests", table: t)
            requests.maxQueue = try r.int("max_queue", min: 0) ?? requests.maxQueue
            requests.defaultDeadline = try r.duration("default_deadline", min: .milliseconds(1))
                ?? requests.defaultDeadline
            requests.retries = try r.int("retries", min: 0, max: 100) ?? requests.retries
            requests.maxConnections = try r.int("max_connections", min: 1) ?? requests.maxConnections
            requests.maxInflightPerConnection = try r.int("max_inflight_per_connection", min: 1)
                ?? requests.maxInflightPerConnection
            requests.maxClientBufferBytes = try r.bytes("max_client_buffer", min: 4096) ?? requests.maxClientBufferBytes
            requests.burstAffinity = try r.int("burst_affinity", min: 0, max: 1_000_000) ?? requests.burstAffinity
            try r.rejectUnknownKeys()
        }

        if let t = try root.table("http") {
            var r = TableReader(path: "http", table: t)
            if let listen = try r.string("listen") {
                if listen.isEmpty {
                    http.listen = nil
                } else {
                    _ = try HTTPSettings.parse(listen)
                    http.listen = listen
                }
            }
            http.requests = try r.bool("requests") ?? http.requests
            if let file = try r.string("token_file"), !file.isEmpty {
                http.tokenFile = resolve(file, against: baseDirectory)
            }
            if let body = try r.bytes("max_body", min: 1) {
                guard body <= maxFrameBytes - 64 else {
                    throw ConfigError(key: "http.max_body", value: "\(body)",
                                      expected: "at most supervisor.max_frame_bytes - 64 (\(maxFrameBytes - 64)): "
                                          + "a request body travels to the worker in one frame")
                }
                http.maxBodyBytes = body
            }
            if let listen = http.listen, http.requests, http.tokenFile == nil,
               !HTTPFrontPolicy.isLoopback(host: try HTTPSettings.parse(listen).host) {
                throw ConfigError(key: "http.token_file", value: nil,
                                  expected: "required: http.listen (\"\(listen)\") is not a loopback address and the "
                                      + "request front (http.requests) is on; give a file holding a bearer token, "
                                      + "or set http.requests = false to serve only the probes and metrics there")
            }
            if let agent = try r.string("agent_check"), !agent.isEmpty {
                do {
                    _ = try HTTPSettings.parse(agent)
                } catch {
                    throw ConfigError(key: "http.agent_check", value: "\"\(agent)\"",
                                      expected: "host:port such as \"0.0.0.0:8088\" for HAProxy's agent-check, or \"\" for off")
                }
                http.agentCheck = agent
            }
            try r.rejectUnknownKeys()
        }

        if let t = try root.table("availability") {
            var r = TableReader(path: "availability", table: t)
            if let objective = try r.double("objective") {
                guard objective > 0 && objective < 1 else {
                    throw ConfigError(key: "availability.objective", value: "\(objective)",
                                      expected: "a fraction between 0 and 1, such as 0.9999 for 99.99%")
                }
                availability.objective = objective
            }
            availability.window = try r.duration("window", min: .seconds(60)) ?? availability.window
            try r.rejectUnknownKeys()
        }

        if let t = try root.table("cgroups") {
            var r = TableReader(path: "cgroups", table: t)
            if let mode = try r.string("mode") {
                guard let m = CgroupSettings.Mode(rawValue: mode) else {
                    throw ConfigError(key: "cgroups.mode", value: "\"\(mode)\"", expected: "auto or off")
                }
                cgroups.mode = m
            }
            if let parent = try r.string("parent"), !parent.isEmpty {
                guard parent.hasPrefix("/") else {
                    throw ConfigError(key: "cgroups.parent", value: "\"\(parent)\"",
                                      expected: "an absolute cgroup folder such as /sys/fs/cgroup/npu.slice/npu-supervisord.service")
                }
                cgroups.parent = parent
            }
            try r.rejectUnknownKeys()
        }

        if let t = try root.table("rollout") {
            var r = TableReader(path: "rollout", table: t)
            rollout.drainTimeout = try r.duration("drain_timeout") ?? rollout.drainTimeout
            rollout.progressDeadline = try r.duration("progress_deadline", min: .milliseconds(100))
                ?? rollout.progressDeadline
            rollout.minReadyTime = try r.duration("min_ready_time") ?? rollout.minReadyTime
            rollout.bakeTime = try r.duration("bake_time") ?? rollout.bakeTime
            if let rate = try r.double("max_error_rate") {
                guard (0...1).contains(rate) else {
                    throw ConfigError(key: "rollout.max_error_rate", value: "\(rate)", expected: "a fraction from 0 to 1")
                }
                rollout.maxErrorRate = rate
            }
            rollout.minRequests = try r.int("min_requests", min: 1) ?? rollout.minRequests
            if let ratio = try r.double("max_p99_ratio") {
                guard ratio >= 1 else {
                    throw ConfigError(key: "rollout.max_p99_ratio", value: "\(ratio)", expected: "a factor of at least 1")
                }
                rollout.maxP99Ratio = ratio
            }
            try r.rejectUnknownKeys()
        }

        let defaults = try root.table("defaults") ?? [:]
        let deviceValue = root.raw("device")
        let groupValue = root.raw("group")
        guard deviceValue != nil || groupValue != nil else {
            throw ConfigError(key: "device", value: nil,
                              expected: "missing: at least one [[device]] table with an id (or a [[group]]) is required")
        }
        var seen: Set<String> = []
        if let deviceValue {
            guard case .array(let deviceTables) = deviceValue, !deviceTables.isEmpty else {
                throw ConfigError(key: "device", value: deviceValue.description,
                                  expected: "one or more [[device]] tables")
            }
            for (index, item) in deviceTables.enumerated() {
                guard case .table(let t) = item else {
                    throw ConfigError(key: "device[\(index)]", value: item.description, expected: "a table")
                }
                let spec = try WorkerSpec(index: index, device: t, defaults: defaults, baseDirectory: baseDirectory)
                guard seen.insert(spec.device).inserted else {
                    throw ConfigError(key: "device[\(index)].id", value: "\"\(spec.device)\"",
                                      expected: "an id not used by another device")
                }
                workers.append(spec)
            }
        }
        if let groupValue {
            let (groups, ranks) = try Self.parseGroups(groupValue, defaults: defaults, baseDirectory: baseDirectory,
                                                       deviceIds: &seen)
            self.groups = groups
            workers += ranks
        }
        for name in envNames(defaults) where !groups.isEmpty && Self.rankVariables.contains(name) {
            throw ConfigError(key: "defaults.env.\(name)", value: nil,
                              expected: "not settable: the supervisor sets it for each rank of a [[group]]")
        }

        if let t = try root.table("fallback") {
            var r = TableReader(path: "fallback", table: t)
            let count = try r.int("count", min: 0, max: 64) ?? 1
            let whenFewerThan = try r.int("when_fewer_than", min: 1) ?? 1
            let stopAfter = try r.duration("stop_after") ?? .seconds(30)
            var workerTable = t
            for key in ["count", "when_fewer_than", "stop_after"] { workerTable.removeValue(forKey: key) }
            if workerTable["kind"] == nil { workerTable["kind"] = .string("cpu") }
            // Fallback workers get no device probe unless they ask for one.
            if workerTable["device_probe"] == nil { workerTable["device_probe"] = .table(["type": .string("none")]) }
            var specs: [WorkerSpec] = []
            for i in 0..<count {
                var table = workerTable
                table["id"] = .string("cpu\(i)")
                var spec = try WorkerSpec(index: i, device: table, defaults: defaults, baseDirectory: baseDirectory,
                                          path: "fallback")
                spec.isFallback = true
                guard !seen.contains(spec.device), !groups.contains(where: { $0.id == spec.device }) else {
                    throw ConfigError(key: "fallback", value: nil,
                                      expected: "fallback ids cpu0..cpu\(count - 1) collide with a [[device]] or [[group]] id")
                }
                specs.append(spec)
            }
            fallback = FallbackSpec(workers: specs, whenFewerThan: whenFewerThan, stopAfter: stopAfter)
        }
        // Every request accepted is waiting (at most max_queue) or on a worker (at most its max_inflight): the
        // table of requests in flight must hold them all (SlotTable.capacity, with room to spare).
        let held = requests.maxQueue + workers.reduce(0) { $0 + $1.maxInflight }
            + (fallback?.workers.reduce(0) { $0 + $1.maxInflight } ?? 0)
        guard held <= Self.maxRequestsHeld else {
            throw ConfigError(key: "requests.max_queue", value: "\(requests.maxQueue)",
                              expected: "max_queue plus every worker's max_inflight at most \(Self.maxRequestsHeld) "
                                  + "(requests held at once), not \(held)")
        }
        try root.rejectUnknownKeys()
    }

    /// The most requests the configuration may let the supervisor hold at once (queued and in flight).
    public static let maxRequestsHeld = 8_000_000
}

extension WorkerSpec {
    static let keys: Set<String> = [
        "kind", "command", "env", "pin_env", "working_directory", "max_inflight", "heartbeat_interval",
        "heartbeat_timeout", "restart", "backoff_initial", "backoff_max", "backoff_multiplier", "backoff_jitter",
        "backoff_reset_after", "restart_limit", "restart_window", "failed_retry_interval", "start_timeout",
        "stop_timeout", "device_probe", "inference_probe", "memory_limit", "output_rate_limit",
    ]

    init(index: Int, device: [String: ConfigValue], defaults: [String: ConfigValue], baseDirectory: String,
         path tablePath: String? = nil) throws {
        let path = tablePath ?? "device[\(index)]"
        var idReader = TableReader(path: path, table: device)
        guard let id = try idReader.string("id"), !id.isEmpty else {
            throw ConfigError(key: "device[\(index)].id", value: nil, expected: "missing: every device needs an id")
        }
        guard id.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" || $0 == "." }) else {
            throw ConfigError(key: "device[\(index)].id", value: "\"\(id)\"",
                              expected: "letters, digits, '-', '_' or '.' only")
        }
        for key in device.keys where key != "id" && !Self.keys.contains(key) {
            throw ConfigError(key: "\(path).\(key)", value: nil, expected: "unknown key (misspelt?)")
        }
        for key in defaults.keys where !Self.keys.contains(key) {
            throw ConfigError(key: "defaults.\(key)", value: nil, expected: "unknown key (misspelt?)")
        }
        // Per-device values win over [defaults] (key by key inside the probe tables too); errors name where the
        // value came from.
        var merged = defaults
        for (k, v) in device where k != "id" {
            if case .table(let override) = v, case .table(var base)? = merged[k] {
                for (kk, vv) in override { base[kk] = vv }
                merged[k] = .table(base)
            } else {
                merged[k] = v
            }
        }
        var r = TableReader(path: path, table: merged)
        func located(_ e: ConfigError) -> ConfigError {
            let key = String(e.key.dropFirst(path.count + 1))
            // A missing key is missing on the device (and in [defaults]): name the device.
            if e.value == nil && e.expected.hasPrefix("missing") { return e }
            guard device[key.split(separator: ".").first.map(String.init) ?? key] == nil else { return e }
            return ConfigError(key: "defaults." + key, value: e.value, expected: e.expected)
        }
        do {
            let kindName = try r.string("kind") ?? "npu"
            guard let kind = DeviceKind(rawValue: kindName) else {
                throw ConfigError(key: "\(path).kind", value: "\"\(kindName)\"", expected: "one of npu, gpu, cpu")
            }
            let substitute = { (s: String) in s.replacing("{device}", with: id) }
            guard let command = try r.stringArray("command"), !command.isEmpty, !command[0].isEmpty else {
                throw ConfigError(key: "\(path).command", value: nil,
                                  expected: "missing: the worker's argv, e.g. [\"npu-worker\", \"--device\", \"{device}\"]")
            }
            let env = (try r.stringTable("env") ?? [:]).mapValues(substitute)
            for name in env.keys {
                let reserved = ["NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC",
                                "WATCHDOG_PID", "NPU_SUPERVISOR_FD", "NPU_DEVICE_ID"]
                if reserved.contains(name) {
                    throw ConfigError(key: "\(path).env.\(name)", value: nil,
                                      expected: "not settable: the supervisor owns this variable")
                }
            }
            var pin = kind.defaultPinVariable
            if let p = try r.string("pin_env") { pin = p.isEmpty ? nil : p }
            let policy = WorkerStateMachine.Policy(
                restart: try r.string("restart").map { name in
                    guard let p = RestartPolicy(rawValue: name) else {
                        throw ConfigError(key: "\(path).restart", value: "\"\(name)\"",
                                          expected: "one of always, on-failure, never")
                    }
                    return p
                } ?? .always,
                backoff: Backoff(
                    initial: try r.duration("backoff_initial", min: .milliseconds(10)) ?? .seconds(1),
                    maximum: try r.duration("backoff_max", min: .milliseconds(10)) ?? .seconds(30),
                    multiplier: try r.double("backoff_multiplier", min: 1, max: 10) ?? 2,
                    jitter: try r.double("backoff_jitter", min: 0, max: 1) ?? 0.1),
                backoffResetAfter: try r.duration("backoff_reset_after") ?? .seconds(60),
                maxRestarts: try r.int("restart_limit", min: 1) ?? 5,
                restartWindow: try r.duration("restart_window", min: .milliseconds(1)) ?? .seconds(60),
                failedRetryInterval: try r.duration("failed_retry_interval", min: .seconds(1)) ?? .seconds(300),
                startTimeout: try r.duration("start_timeout", min: .milliseconds(100)) ?? .seconds(300),
                stopTimeout: try r.duration("stop_timeout", min: .milliseconds(10)) ?? .seconds(15))
            let heartbeatInterval = try r.duration("heartbeat_interval", min: .milliseconds(10)) ?? .seconds(1)
            let heartbeatTimeout = try r.duration("heartbeat_timeout", min: .milliseconds(10)) ?? .seconds(10)
            guard heartbeatTimeout > heartbeatInterval else {
                throw ConfigError(key: "\(path).heartbeat_timeout", value: heartbeatTimeout.configString,
                                  expected: "longer than heartbeat_interval (\(heartbeatInterval.configString))")
            }
            guard policy.backoff.maximum >= policy.backoff.initial else {
                throw ConfigError(key: "\(path).backoff_max", value: policy.backoff.maximum.configString,
                                  expected: "at least backoff_initial (\(policy.backoff.initial.configString))")
            }
            var deviceProbe = DeviceProbeSpec()
            if let t = try r.table("device_probe") {
                var p = TableReader(path: "\(path).device_probe", table: t)
                let type = try p.string("type") ?? "none"
                guard let kind = DeviceProbeSpec.Kind(rawValue: type) else {
                    throw ConfigError(key: "\(path).device_probe.type", value: "\"\(type)\"",
                                      expected: "one of none, command, path, worker")
                }
                deviceProbe.kind = kind
                deviceProbe.command = (try p.stringArray("command") ?? []).map(substitute)
                deviceProbe.healthy = try p.string("healthy") ?? deviceProbe.healthy
                deviceProbe.paths = (try p.stringArray("paths") ?? []).map(substitute)
                deviceProbe.interval = try p.duration("interval", min: .milliseconds(10)) ?? deviceProbe.interval
                deviceProbe.timeout = try p.duration("timeout", min: .milliseconds(10)) ?? deviceProbe.timeout
                deviceProbe.failures = try p.int("failures", min: 1) ?? deviceProbe.failures
                deviceProbe.failedInterval = try p.duration("failed_interval", min: .milliseconds(10))
                    ?? deviceProbe.interval * 5
                if kind == .command && deviceProbe.command.isEmpty {
                    throw ConfigError(key: "\(path).device_probe.command", value: nil,
                                      expected: "missing: type = \"command\" needs the command's argv")
                }
                if kind == .path && deviceProbe.paths.isEmpty {
                    throw ConfigError(key: "\(path).device_probe.paths", value: nil,
                                      expected: "missing: type = \"path\" needs the device paths")
                }
                do {
                    _ = try Regex(deviceProbe.healthy)
                } catch {
                    throw ConfigError(key: "\(path).device_probe.healthy", value: "\"\(deviceProbe.healthy)\"",
                                      expected: "a regular expression (\(error))")
                }
                try p.rejectUnknownKeys()
            }
            var inferenceProbe = InferenceProbeSpec()
            if let t = try r.table("inference_probe") {
                var p = TableReader(path: "\(path).inference_probe", table: t)
                inferenceProbe.enabled = try p.bool("enabled") ?? inferenceProbe.enabled
                inferenceProbe.payload = try p.string("payload") ?? inferenceProbe.payload
                inferenceProbe.interval = try p.duration("interval", min: .milliseconds(10)) ?? inferenceProbe.interval
                inferenceProbe.timeout = try p.duration("timeout", min: .milliseconds(10)) ?? inferenceProbe.timeout
                inferenceProbe.failures = try p.int("failures", min: 1) ?? inferenceProbe.failures
                inferenceProbe.textField = try p.string("text_field") ?? inferenceProbe.textField
                try p.rejectUnknownKeys()
            }
            self.init(
                device: id, kind: kind, command: command.map(substitute), environment: env, pinVariable: pin,
                workingDirectory: try r.string("working_directory").map { resolve(substitute($0), against: baseDirectory) },
                maxInflight: try r.int("max_inflight", min: 1, max: 100_000) ?? 4,
                heartbeatInterval: heartbeatInterval, heartbeatTimeout: heartbeatTimeout, policy: policy,
                deviceProbe: deviceProbe, inferenceProbe: inferenceProbe)
            self.memoryLimit = try r.bytes("memory_limit", min: 1 << 20)
            if let rate = try r.bytes("output_rate_limit", min: 0) {
                guard rate == 0 || rate >= 64 << 10 else {
                    throw ConfigError(key: "\(path).output_rate_limit", value: "\(rate)",
                                      expected: "0 (no limit) or at least 64KiB (a second's worth must hold a 16 KiB line)")
                }
                self.outputRateLimit = rate == 0 ? nil : rate
            }
        } catch let e as ConfigError {
            throw located(e)
        }
    }
}

extension SupervisorConfiguration {
    /// The socket paths, by the rule clients share (``SocketPaths``).
    mutating func setSockets(_ paths: SocketPaths) {
        runDirectory = paths.runDirectory
        requestsSocket = paths.requests
        statusSocket = paths.status
        controlSocket = paths.control
    }
}


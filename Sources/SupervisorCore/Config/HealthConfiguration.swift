/// How a device's own health is checked (the "device" level; docs/PROTOCOL.md 6.9).
public struct DeviceProbeSpec: Sendable, Hashable {
    public enum Kind: String, Sendable, Hashable, CaseIterable {
        /// No device probe: the device counts as healthy.
        case none
        /// Run a command (e.g. `npu-smi info -t health -i {device}`) with a timeout; healthy when it exits 0 and
        /// its output matches `healthy`.
        case command
        /// Every path in `paths` (device nodes such as `/dev/davinci{device}`) exists and opens.
        case path
        /// The worker's own `health` reports (e.g. a tiny tensor allocated on the device) say `ok`.
        case worker
    }

    public var kind: Kind = .none
    public var command: [String] = []
    /// A regular expression the command's output must contain a match for.
    public var healthy: String = "Health Status\\s*:\\s*OK"
    public var paths: [String] = []
    public var interval: Duration = .seconds(10)
    public var timeout: Duration = .seconds(5)
    /// Consecutive failed probes before the device is taken out of rotation.
    public var failures: Int = 1
    /// How often a device held `failed` (still bad after a worker restart) is probed for recovery.
    public var failedInterval: Duration = .seconds(60)

    public init() {}
}

/// The periodic short inference request (the "inference" level; docs/PROTOCOL.md 6.10).
public struct InferenceProbeSpec: Sendable, Hashable {
    public var enabled = true
    public var payload = "{\"prompt\": \"Hi\", \"max_new_tokens\": 5}"
    public var interval: Duration = .seconds(30)
    public var timeout: Duration = .seconds(10)
    /// Consecutive failures that make the worker `unhealthy` (it is restarted).
    public var failures = 3
    /// When the answer is a JSON object with this field, the field must be a non-empty string (the generated
    /// text); otherwise the answer must simply be non-empty.
    public var textField = "text"

    public init() {}
}

/// CPU fallback workers (graceful degradation; docs/PROTOCOL.md 8.2).
public struct FallbackSpec: Sendable, Hashable {
    /// The fallback workers (kind `cpu`, ids `cpu0`, `cpu1`, ...).
    public var workers: [WorkerSpec]
    /// Start them when fewer device workers than this can serve.
    public var whenFewerThan: Int
    /// Stop them once enough device workers have served again for this long (no flapping).
    public var stopAfter: Duration

    public init(workers: [WorkerSpec], whenFewerThan: Int, stopAfter: Duration) {
        self.workers = workers
        self.whenFewerThan = whenFewerThan
        self.stopAfter = stopAfter
    }
}

/// Per-worker memory cgroups (`[cgroups]`).
public struct CgroupSettings: Sendable, Hashable {
    public enum Mode: String, Sendable, Hashable, CaseIterable {
        /// Use them when the supervisor may create them; otherwise say so once and run without.
        case auto
        case off
    }
    public var mode: Mode = .auto
    /// The cgroup folder under which worker cgroups are created (default: the supervisor's own cgroup).
    public var parent: String?

    public init() {}
}

/// The optional HTTP listener: `/livez`, `/readyz`, `/health`, `/metrics`.
public struct HTTPSettings: Sendable, Hashable {
    /// `host:port` to listen on, or nil when off. Port 0 picks a free port (shown in status).
    public var listen: String? = "127.0.0.1:8087"
    /// `host:port` of the HAProxy agent-check listener (`up NN%`, `drain`, `down`), nil when off.
    public var agentCheck: String?
    /// The request front, `POST /v1/infer` (docs/PROTOCOL.md section 12).
    public var requests = true
    /// File holding the bearer token the request front requires (resolved path); required for a non-loopback
    /// `listen` while `requests` is on.
    public var tokenFile: String?
    /// The token read from `tokenFile` (by the config loader); never printed.
    public var token: String?
    /// Largest request body the front accepts (`413` beyond).
    public var maxBodyBytes = 1 << 20

    public init() {}

    /// Splits `listen` into host and port. - Throws: ``ConfigError``.
    public static func parse(_ text: String) throws -> (host: String, port: Int) {
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]),
              (0...65535).contains(port)
        else {
            throw ConfigError(key: "http.listen", value: "\"\(text)\"",
                              expected: "host:port such as \"127.0.0.1:8087\" (port 0: any free port), or \"\" for off")
        }
        var host = String(text[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        return (host.isEmpty ? "127.0.0.1" : host, port)
    }
}

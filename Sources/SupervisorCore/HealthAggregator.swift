/// The supervisor's one-word health, the answer systemd, Kubernetes, load balancers and `npu-supervisorctl
/// health` all read.
public enum OverallHealth: String, Sendable, Hashable, Codable {
    /// Every worker that should run is serving.
    case ok
    /// Some can serve, some cannot (or requests are served by a CPU fallback).
    case degraded
    /// None can serve.
    case unavailable

    /// `npu-supervisorctl health` exit code: 0 ok, 1 degraded, 2 unavailable.
    public var exitCode: Int32 {
        switch self {
        case .ok: 0
        case .degraded: 1
        case .unavailable: 2
        }
    }
}

/// One worker as the aggregation sees it.
public struct WorkerHealthInput: Sendable, Hashable {
    public var device: String
    public var state: String
    public var desiredUp: Bool
    public var isServing: Bool
    public var lastExit: String?
    public var restarts: Int

    public init(device: String, state: String, desiredUp: Bool, isServing: Bool, lastExit: String?, restarts: Int) {
        self.device = device
        self.state = state
        self.desiredUp = desiredUp
        self.isServing = isServing
        self.lastExit = lastExit
        self.restarts = restarts
    }
}

/// Pure aggregation of per-worker states into ``OverallHealth`` plus a one-line reason.
public enum HealthAggregator {
    /// - Parameter minReady: how many serving workers make the whole "able to serve" (at least 1).
    public static func aggregate(_ workers: [WorkerHealthInput], minReady: Int = 1) -> (OverallHealth, String) {
        let serving = workers.filter(\.isServing)
        let wanted = workers.filter(\.desiredUp)
        let notServing = wanted.filter { !$0.isServing }
        let stoppedByOperator = workers.filter { !$0.desiredUp && !$0.isServing }
        var summary = "\(serving.count)/\(workers.count) workers ready"
        if !stoppedByOperator.isEmpty {
            summary += "; stopped: " + stoppedByOperator.map(\.device).joined(separator: ",")
        }
        if serving.count < max(1, minReady) {
            let why = notServing.prefix(4).map(describe).joined(separator: ", ")
            return (.unavailable, "unavailable: \(summary)" + (why.isEmpty ? "" : " (\(why))"))
        }
        if notServing.isEmpty {
            return (.ok, summary)
        }
        let why = notServing.prefix(4).map(describe).joined(separator: ", ")
        return (.degraded, "degraded: \(summary) (\(why))")
    }

    static func describe(_ w: WorkerHealthInput) -> String {
        var s = "device \(w.device) \(w.state)"
        if let last = w.lastExit, w.state != "starting" || w.restarts > 0 {
            s += " (\(last)" + (w.restarts > 0 ? " x\(w.restarts)" : "") + ")"
        }
        return s
    }
}

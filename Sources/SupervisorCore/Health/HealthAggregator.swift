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
    public var isFallback: Bool
    /// Why a worker that runs is nevertheless out of rotation (its device probe fails), if it is.
    public var outOfRotation: String?
    /// Taken out of rotation on purpose (drain, a rollout): capacity lost by choice, not a fault.
    public var isDrained: Bool

    public init(device: String, state: String, desiredUp: Bool, isServing: Bool, lastExit: String?, restarts: Int,
                isFallback: Bool = false, outOfRotation: String? = nil, isDrained: Bool = false) {
        self.isDrained = isDrained
        self.device = device
        self.state = state
        self.desiredUp = desiredUp
        self.isServing = isServing
        self.lastExit = lastExit
        self.restarts = restarts
        self.isFallback = isFallback
        self.outOfRotation = outOfRotation
    }
}

/// Pure aggregation of per-worker states into ``OverallHealth`` plus a one-line reason.
public enum HealthAggregator {
    /// - Parameter minReady: how many serving workers make the whole "able to serve" (at least 1).
    public static func aggregate(_ workers: [WorkerHealthInput], minReady: Int = 1) -> (OverallHealth, String) {
        let devices = workers.filter { !$0.isFallback }
        let fallback = workers.filter { $0.isFallback && $0.desiredUp }
        let serving = devices.filter(\.isServing)
        let fallbackServing = fallback.filter(\.isServing)
        let notServing = devices.filter { $0.desiredUp && !$0.isServing && !$0.isDrained }
        let stoppedByOperator = devices.filter { !$0.desiredUp && !$0.isServing && !$0.isDrained }
        let drained = devices.filter(\.isDrained)
        var summary = "\(serving.count)/\(devices.count) workers ready"
        if !stoppedByOperator.isEmpty {
            summary += "; stopped: " + stoppedByOperator.map(\.device).joined(separator: ",")
        }
        if !drained.isEmpty {
            summary += "; drained: " + drained.map(\.device).joined(separator: ",")
        }
        if !fallback.isEmpty {
            summary += "; CPU fallback active (\(fallbackServing.count)/\(fallback.count) ready)"
        }
        let why = notServing.prefix(4).map(describe).joined(separator: ", ")
        let detail = why.isEmpty ? "" : " (\(why))"
        if serving.count + fallbackServing.count < max(1, minReady) {
            return (.unavailable, "unavailable: \(summary)\(detail)")
        }
        if notServing.isEmpty && fallbackServing.isEmpty {
            return (.ok, summary)
        }
        return (.degraded, "degraded: \(summary)\(detail)")
    }

    static func describe(_ w: WorkerHealthInput) -> String {
        if let why = w.outOfRotation { return "device \(w.device) out of rotation: \(why)" }
        var s = "device \(w.device) \(w.state)"
        if let last = w.lastExit, w.state != "starting" || w.restarts > 0 {
            s += " (\(last)" + (w.restarts > 0 ? " x\(w.restarts)" : "") + ")"
        }
        return s
    }
}

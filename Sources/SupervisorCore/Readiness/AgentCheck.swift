/// The answer to an HAProxy agent check (`agent-check` on a server line): how much of this host a load
/// balancer should use. `up NN%` weights the host by the share of its device workers that serve; `drain` once
/// the operator drained every device or the supervisor shuts down (existing sessions finish, no new ones);
/// `down` when nothing serves. So a load balancer in front of several hosts shifts traffic before a host loses
/// capacity, not after its requests fail.
public enum AgentCheck {
    public static func answer(serving: Int, wanted: Int, allDrained: Bool, shuttingDown: Bool) -> String {
        if shuttingDown || allDrained { return "drain" }
        guard serving > 0 else { return "down" }
        let percent = max(1, min(100, serving * 100 / max(1, wanted)))
        return "up \(percent)%"
    }
}

extension SupervisorMachine {
    /// The agent-check line for this host now.
    public var agentCheckAnswer: String {
        let devices = workers.filter { !$0.isFallback && !$0.isRetired }
        let wanted = devices.filter { $0.lifecycle.desired == .up || $0.drain != .none }
        let drained = !wanted.isEmpty && wanted.allSatisfy { $0.drain != .none }
        return AgentCheck.answer(serving: devices.filter(\.isServing).count, wanted: wanted.count,
                                 allDrained: drained, shuttingDown: isShuttingDown)
    }
}

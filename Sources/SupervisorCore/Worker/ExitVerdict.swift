/// What a reaped worker died of, once the evidence the runtime gathered is weighed: the kernel's word (the
/// memory cgroup's `oom_kill` counter) beats the plain `signaled(9)` that `waitpid` reports. Pure.
public enum ExitVerdict {
    /// - Parameters:
    ///   - observed: what `waitpid` said.
    ///   - oomKillsRose: whether the worker's memory cgroup counted an OOM kill while it lived; nil without a
    ///     memory cgroup (then nothing proves or disproves an OOM kill).
    /// - Returns: the exit reason, and a note for the log when a SIGKILL is proven not to be the OOM killer's.
    public static func classify(_ observed: ExitReason, oomKillsRose: Bool?) -> (reason: ExitReason, note: String?) {
        guard let rose = oomKillsRose else { return (observed, nil) }
        if rose { return (.oomKilled, nil) }
        if observed == .signaled(signal: 9, coreDumped: false) {
            return (observed, "not the kernel OOM killer: its memory cgroup's oom_kill counter did not rise")
        }
        return (observed, nil)
    }
}

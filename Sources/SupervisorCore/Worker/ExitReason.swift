/// Why a worker process is gone. Shown in status, logs and metrics by its ``description`` (`exited(1)`,
/// `signaled(9)`, `oom_killed`, ...), which is part of the status contract.
public enum ExitReason: Hashable, Sendable, CustomStringConvertible {
    /// Exited on its own with this code.
    case exited(code: Int32)
    /// Killed by a signal that the supervisor did not send for a reason of its own.
    case signaled(signal: Int32, coreDumped: Bool)
    /// Killed by the kernel's OOM killer, proven by its memory cgroup's `oom_kill` counter.
    case oomKilled
    /// The worker reported that the device ran out of memory, then went away.
    case deviceOOM
    /// Stopped heart-beating; the supervisor killed it.
    case hang
    /// Failed its inference probes; the supervisor killed it.
    case unhealthy
    /// Its device failed the device probe (npu-smi, device nodes, the worker's own report); stopped by the
    /// supervisor.
    case deviceUnhealthy(String)
    /// Broke the wire protocol (oversized or malformed frame, wrong message type); the supervisor killed it.
    case protocolError(String)
    /// Did not say `ready` within `start_timeout`; the supervisor killed it.
    case startTimeout
    /// `posix_spawn` failed with this errno; no process ever ran.
    case spawnFailed(errno: Int32)
    /// Stopped on request (operator, reload, shutdown).
    case stopped

    public var description: String {
        switch self {
        case .exited(let code): "exited(\(code))"
        case .signaled(let signal, _): "signaled(\(signal))"
        case .oomKilled: "oom_killed"
        case .deviceOOM: "device_oom"
        case .hang: "hang"
        case .unhealthy: "unhealthy"
        case .deviceUnhealthy: "device_unhealthy"
        case .protocolError: "protocol_error"
        case .startTimeout: "start_timeout"
        case .spawnFailed(let errno): "spawn_failed(\(errno))"
        case .stopped: "stopped"
        }
    }

    /// The label used for metrics and per-reason counters: the description without its argument.
    public var kind: String {
        switch self {
        case .exited: "exited"
        case .signaled: "signaled"
        default: description.split(separator: "(").first.map(String.init) ?? description
        }
    }

    /// A longer explanation for humans (logs, `status` detail), with what an operator may want to check.
    public var detail: String {
        switch self {
        case .exited(0): "exited with code 0"
        case .exited(78): "exited with code 78 (EX_CONFIG: the worker says its configuration is wrong)"
        case .exited(let code): "exited with code \(code)"
        case .signaled(9, _):
            "killed by SIGKILL (the supervisor's own after stop_timeout, another process, or possibly the kernel OOM "
                + "killer: without a memory cgroup nothing proves which)"
        case .signaled(let signal, let core):
            "killed by signal \(signal) (\(signalName(signal)))\(core ? ", core dumped" : "")"
        case .oomKilled: "killed by the kernel OOM killer (memory cgroup oom_kill counter rose)"
        case .deviceOOM: "device out of memory (reported by the worker)"
        case .hang: "stopped heart-beating; killed by the supervisor"
        case .unhealthy: "failed its inference probes; killed by the supervisor"
        case .deviceUnhealthy(let why): "device failed its health probe (\(why)); stopped by the supervisor"
        case .protocolError(let why): "protocol violation: \(why); killed by the supervisor"
        case .startTimeout: "did not become ready within start_timeout; killed by the supervisor"
        case .spawnFailed(let errno): "could not be started: posix_spawn failed with errno \(errno)"
        case .stopped: "stopped on request"
        }
    }

    /// Whether this exit counts as a failure for `restart = "on-failure"`.
    public var isFailure: Bool {
        switch self {
        case .exited(0), .stopped: false
        default: true
        }
    }
}

/// The conventional name of a signal number on Linux, for messages.
public func signalName(_ signal: Int32) -> String {
    let names: [Int32: String] = [
        1: "SIGHUP", 2: "SIGINT", 3: "SIGQUIT", 4: "SIGILL", 5: "SIGTRAP", 6: "SIGABRT", 7: "SIGBUS", 8: "SIGFPE",
        9: "SIGKILL", 10: "SIGUSR1", 11: "SIGSEGV", 12: "SIGUSR2", 13: "SIGPIPE", 14: "SIGALRM", 15: "SIGTERM",
    ]
    return names[signal] ?? "signal \(signal)"
}

import CSupport
import Glibc
import SupervisorCore

/// A freshly spawned worker: its pid and the supervisor's ends of its two descriptors.
struct SpawnedWorker {
    var pid: pid_t
    /// The supervisor's end of the socketpair whose other end is the worker's fd 3.
    var channelFD: CInt
    /// The read end of the pipe that carries the worker's stdout and stderr.
    var outputFD: CInt
    /// A pidfd for the worker (readable once it exits), or -1 where the kernel has none.
    var pidFD: CInt
}

/// Starts worker processes with `posix_spawn` (never fork: the daemon is multi-threaded).
enum ProcessSpawner {
    /// Variables that belong to the supervisor's own supervisor (systemd) and must never reach a worker.
    static let scrubbed: Set<String> = [
        "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID",
    ]

    /// The worker's environment: the supervisor's own minus the systemd variables, plus the config's `env`,
    /// plus the contract variables (which win).
    /// `extra`: variables that change with each start (a group rank's `MASTER_PORT`, `RANK_TABLE_FILE`).
    static func environment(for spec: WorkerSpec, extra: [String: String] = [:]) -> [String] {
        var env: [String: String] = [:]
        var order: [String] = []
        if let environ = npu_environ() {
            var index = 0
            while let entry = environ[index] {
                let pair = String(cString: entry)
                index += 1
                guard let eq = pair.firstIndex(of: "=") else { continue }
                let name = String(pair[..<eq])
                if scrubbed.contains(name) { continue }
                if env[name] == nil { order.append(name) }
                env[name] = String(pair[pair.index(after: eq)...])
            }
        }
        for (name, value) in spec.contractEnvironment.merging(extra, uniquingKeysWith: { _, new in new })
            .sorted(by: { $0.key < $1.key }) {
            if env[name] == nil { order.append(name) }
            env[name] = value
        }
        return order.map { "\($0)=\(env[$0]!)" }
    }

    /// - Throws: ``SystemError`` with the errno of the failing call (socketpair, pipe, posix_spawn).
    /// - Parameter trampoline: with `cgroupProcsFD`, the program that joins the cgroup and execs the worker.
    static func spawn(_ spec: WorkerSpec, cgroupProcsFD: CInt = -1, trampoline: String? = nil,
                      extraEnvironment: [String: String] = [:]) throws -> SpawnedWorker {
        try spawn(spec, cgroupProcsFD: cgroupProcsFD, trampoline: trampoline, goFD: -1, extraEnvironment: extraEnvironment)
    }

    /// Starts a standby (``StandbyWorker``): the trampoline with `--standby`, `goFD` as its fd 5.
    /// - Throws: ``SystemError``.
    static func spawnStandby(_ spec: WorkerSpec, cgroupProcsFD: CInt, trampoline: String, goFD: CInt) throws -> SpawnedWorker {
        try spawn(spec, cgroupProcsFD: cgroupProcsFD, trampoline: trampoline, goFD: goFD, extraEnvironment: [:])
    }

    private static func spawn(_ spec: WorkerSpec, cgroupProcsFD: CInt, trampoline: String?, goFD: CInt,
                              extraEnvironment: [String: String]) throws -> SpawnedWorker {
        var pair: [CInt] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else {
            throw SystemError(call: "socketpair", errno: errno)
        }
        var pipeFDs: [CInt] = [-1, -1]
        guard npu_pipe_cloexec(&pipeFDs) == 0 else {
            let e = errno
            close(pair[0]); close(pair[1])
            throw SystemError(call: "pipe2", errno: e)
        }
        let argv = cgroupProcsFD >= 0 && trampoline != nil
            ? [trampoline!] + (goFD >= 0 ? ["--standby"] : []) + spec.command : spec.command
        let env = environment(for: spec, extra: extraEnvironment)
        var pid: pid_t = 0
        let rc = withCStrings(argv) { cArgv in
            withCStrings(env) { cEnv in
                if let directory = spec.workingDirectory {
                    return npu_spawn_standby(argv[0], cArgv, cEnv, directory, pair[1], pipeFDs[1], cgroupProcsFD, goFD, &pid)
                }
                return npu_spawn_standby(argv[0], cArgv, cEnv, nil, pair[1], pipeFDs[1], cgroupProcsFD, goFD, &pid)
            }
        }
        // The child has its copies (or there is no child): close ours of the child's ends in both cases.
        close(pair[1])
        close(pipeFDs[1])
        guard rc == 0 else {
            close(pair[0]); close(pipeFDs[0])
            throw SystemError(call: "posix_spawn \(argv[0])", errno: rc)
        }
        let pidFD = ExitDetection.usesPidfd ? npu_pidfd_open(pid) : -1
        if pidFD >= 0 { _ = fcntl(pidFD, F_SETFD, FD_CLOEXEC) }
        return SpawnedWorker(pid: pid, channelFD: pair[0], outputFD: pipeFDs[0], pidFD: pidFD)
    }

    /// Starts a probe command (no channel): stdin /dev/null, stdout and stderr into a pipe, its own process
    /// group (a timeout kills the whole group), the supervisor's environment plus `extra`.
    /// - Throws: ``SystemError``.
    static func spawnProbe(_ argv: [String], extraEnvironment extra: [String: String]) throws -> SpawnedWorker {
        var pipeFDs: [CInt] = [-1, -1]
        guard npu_pipe_cloexec(&pipeFDs) == 0 else { throw SystemError(call: "pipe2", errno: errno) }
        var spec = WorkerSpec(device: extra["NPU_DEVICE_ID"] ?? "", kind: .cpu, command: argv, environment: extra,
                              pinVariable: nil, workingDirectory: nil, maxInflight: 1, heartbeatInterval: .seconds(1),
                              heartbeatTimeout: .seconds(2), policy: .init())
        spec.environment.removeValue(forKey: "NPU_DEVICE_ID")
        // NPU_SUPERVISOR_PROBE tells the orphan sweep (Orphans.swift) that this child is a probe, not a helper.
        let env = environment(for: spec).filter { !$0.hasPrefix("NPU_SUPERVISOR_FD=") } + ["NPU_SUPERVISOR_PROBE=1"]
        var pid: pid_t = 0
        let rc = withCStrings(argv) { cArgv in
            withCStrings(env) { cEnv in npu_spawn(argv[0], cArgv, cEnv, nil, -1, pipeFDs[1], -1, &pid) }
        }
        close(pipeFDs[1])
        guard rc == 0 else {
            close(pipeFDs[0])
            throw SystemError(call: "posix_spawn \(argv[0])", errno: rc)
        }
        let pidFD = ExitDetection.usesPidfd ? npu_pidfd_open(pid) : -1
        if pidFD >= 0 { _ = fcntl(pidFD, F_SETFD, FD_CLOEXEC) }
        return SpawnedWorker(pid: pid, channelFD: -1, outputFD: pipeFDs[0], pidFD: pidFD)
    }

    /// Reaps `pid` if it has exited. Returns the exit reason, or nil while it still runs.
    static func reap(_ pid: pid_t) -> ExitReason? {
        var status: Int32 = 0
        while true {
            let r = waitpid(pid, &status, WNOHANG)
            if r == pid { break }
            if r == 0 { return nil }
            if r < 0 && errno == EINTR { continue }
            // ECHILD: already reaped elsewhere; report it as gone with an unknown code.
            return .exited(code: -1)
        }
        if npu_wifexited(status) != 0 { return .exited(code: npu_wexitstatus(status)) }
        if npu_wifsignaled(status) != 0 {
            return .signaled(signal: npu_wtermsig(status), coreDumped: npu_wcoredump(status) != 0)
        }
        return .exited(code: -1)
    }
}

/// Calls `body` with a NULL-terminated array of C strings that lives for the duration of the call.
func withCStrings<R>(_ strings: [String], _ body: (UnsafePointer<UnsafeMutablePointer<CChar>?>) -> R) -> R {
    var pointers: [UnsafeMutablePointer<CChar>?] = strings.map { strdup($0) }
    pointers.append(nil)
    defer { for p in pointers { free(p) } }
    return pointers.withUnsafeBufferPointer { body($0.baseAddress!) }
}

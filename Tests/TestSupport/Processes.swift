import Foundation
import NIOConcurrencyHelpers
import NPUClient
import NIOCore
import WireProtocol

/// Whether `pid` is a live process (a zombie still "exists" for kill(0); its state in /proc says otherwise).
public func processExists(_ pid: Int32) -> Bool {
    guard kill(pid, 0) == 0 else { return false }
    guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
          let close = stat.lastIndex(of: ")") else { return false }
    return stat[stat.index(close, offsetBy: 2)] != "Z"
}

/// Every thread of `pid`: its name and nice value (field 19 of /proc/PID/task/TID/stat).
public func threadNices(of pid: Int32) -> [(name: String, nice: Int)] {
    let folder = "/proc/\(pid)/task"
    let tids = (try? FileManager.default.contentsOfDirectory(atPath: folder)) ?? []
    return tids.compactMap { tid in
        guard let stat = try? String(contentsOfFile: "\(folder)/\(tid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return nil }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        guard fields.count > 16, let nice = Int(fields[16]) else { return nil }
        let name = (try? String(contentsOfFile: "\(folder)/\(tid)/comm", encoding: .utf8))?
            .trimmingCharacters(in: .whitespacesAndNewlines) ?? "?"
        return (name, nice)
    }
}

/// The result of running a command.
public struct CommandResult: Sendable {
    public var status: Int32
    public var stdout: String
    public var stderr: String
}

/// Runs a command to completion, bounded by `timeout` seconds (coreutils `timeout` sends SIGKILL after it).
public func runCommand(_ path: String, _ arguments: [String], environment: [String: String]? = nil,
                       timeout: Int = 60) throws -> CommandResult {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/timeout")
    process.arguments = ["-s", "KILL", "\(timeout)", path] + arguments
    if let environment { process.environment = environment }
    let out = Pipe()
    let err = Pipe()
    process.standardOutput = out
    process.standardError = err
    process.standardInput = FileHandle.nullDevice
    try process.run()
    // Read both pipes at once: a child filling one while we block on the other would deadlock.
    let errData = NIOLockedValueBox<Data?>(nil)
    let errors = err.fileHandleForReading
    let reader = Thread { errData.withLockedValue { $0 = errors.readDataToEndOfFile() } }
    reader.start()
    let outData = out.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    _ = eventually(timeout: .seconds(5)) { errData.withLockedValue { $0 } != nil }
    return CommandResult(status: process.terminationStatus, stdout: String(decoding: outData, as: UTF8.self),
                         stderr: String(decoding: errData.withLockedValue { $0 } ?? Data(), as: UTF8.self))
}

/// Reads the status document from a status.sock (nil when nothing answers, within 10 s).
public func readStatus(_ path: String) -> StatusDocument? {
    guard let fd = try? connectUnixSocket(path: path) else { return nil }
    defer { close(fd) }
    var tv = timeval(tv_sec: 10, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    var data = [UInt8]()
    var buffer = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = read(fd, &buffer, buffer.count)
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { break }
        data += buffer[0..<n]
    }
    return try? JSONCoding.decode(StatusDocument.self, from: ByteBuffer(bytes: data))
}

/// One npu-supervisord (or a launcher that execs it in place) started by a test, with its output in a log file.
/// SIGKILLed (with the workers it was told about) at the end if still running.
///
/// Spawned with posix_spawn and reaped here (waitpid on its own pid), not with Foundation's `Process`: Foundation
/// watches a child through a socket the child inherits, and takes the close of that socket for the child's exit
/// (then blocks in waitpid and stops reaping every other child). systemd-socket-activate closes every inherited fd
/// before it execs the daemon. The child also gets an empty signal mask and default signal dispositions (the
/// test runner's threads block signals, and children inherit that), and none of the systemd variables of the
/// test's own environment.
public final class DaemonProcess {
    public let logPath: String
    public let pid: Int32
    public var workerPids: Set<Int32> = []
    private var status: Int32?

    public init(executable: String = Binaries.supervisord, arguments: [String], environment: [String: String] = [:],
                logPath: String) throws {
        self.logPath = logPath
        var env = ProcessInfo.processInfo.environment
        for key in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                    "JOURNAL_STREAM"] {
            env[key] = nil
        }
        for (k, v) in environment { env[k] = v }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, logPath, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        closeFrom(3, &actions)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var none = sigset_t()
        sigemptyset(&none)
        var all = sigset_t()
        sigfillset(&all)
        posix_spawnattr_setsigmask(&attributes, &none)
        posix_spawnattr_setsigdefault(&attributes, &all)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        let argv = [executable] + arguments
        let envp = env.map { "\($0.key)=\($0.value)" }
        var child: pid_t = 0
        let rc = withCStrings(argv) { cArgv in
            withCStrings(envp) { cEnv in posix_spawn(&child, executable, &actions, &attributes, cArgv, cEnv) }
        }
        guard rc == 0 else { throw POSIXError(POSIXErrorCode(rawValue: rc) ?? .EIO) }
        pid = child
    }

    deinit {
        if isRunning { kill(pid, SIGKILL); _ = waitpid(pid, nil, 0) }
        for pid in workerPids where processExists(pid) { kill(-pid, SIGKILL); kill(pid, SIGKILL) }
    }

    /// Reaps the process if it has exited.
    public var isRunning: Bool {
        if status != nil { return false }
        var raw: Int32 = 0
        guard waitpid(pid, &raw, WNOHANG) == pid else { return true }
        status = (raw & 0x7f) == 0 ? (raw >> 8) & 0xff : 128 + (raw & 0x7f)
        return false
    }

    /// The exit code (128 + signal for a signal), once exited.
    public var exitStatus: Int32? { isRunning ? nil : status }

    public var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    /// Remembers the worker pids of a status document (they are killed at the end too).
    public func remember(_ doc: StatusDocument?) {
        for w in doc?.workers ?? [] { if let p = w.pid { workerPids.insert(p) } }
    }

    /// SIGTERM and wait for the exit status.
    public func terminate(timeout: Duration = .seconds(20)) -> Int32? {
        kill(pid, SIGTERM)
        guard eventually(timeout: timeout, { !isRunning }) else { return nil }
        return status
    }
}

/// posix_spawn_file_actions_addclosefrom_np (glibc 2.34+), which the Glibc module does not import.
public func closeFrom(_ fd: Int32, _ actions: inout posix_spawn_file_actions_t) {
    typealias AddCloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32
    guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "posix_spawn_file_actions_addclosefrom_np")
    else { return }
    _ = unsafeBitCast(symbol, to: AddCloseFrom.self)(&actions, fd)
}

/// Runs `body` with `strings` as a NULL-terminated C array (argv, envp).
public func withCStrings<T>(_ strings: [String], _ body: (UnsafePointer<UnsafeMutablePointer<CChar>?>) -> T) -> T {
    var pointers = strings.map { strdup($0) } + [nil]
    defer { for p in pointers { free(p) } }
    return pointers.withUnsafeMutableBufferPointer { body($0.baseAddress!) }
}

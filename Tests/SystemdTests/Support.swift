import Foundation
import NPUClient
import Testing
import WireProtocol

/// Where things are: the built executables (next to the running test bundle), the package's own files.
enum Paths {
    static let binaries: String = {
        if let override = ProcessInfo.processInfo.environment["NPU_SUPERVISOR_BIN"] { return override }
        let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? ""
        var dir = URL(fileURLWithPath: exe).deletingLastPathComponent()
        while !FileManager.default.fileExists(atPath: dir.appendingPathComponent("npu-worker").path),
              dir.path != "/" {
            dir = dir.deletingLastPathComponent()
        }
        return dir.path
    }()

    static var supervisord: String { binaries + "/npu-supervisord" }
    static var supervisorctl: String { binaries + "/npu-supervisorctl" }
    static var worker: String { binaries + "/npu-worker" }

    /// The package root (this file is Tests/SystemdTests/Support.swift).
    static let packageRoot: String = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().path

    static var sandboxScript: String { packageRoot + "/scripts/systemd-sandbox.sh" }
    static var unitsFolder: String { packageRoot + "/systemd" }

    /// A fresh scratch folder. Under the package's .build (not /tmp): the systemd sandbox mounts its own /tmp.
    static func scratch(_ name: String) throws -> String {
        let dir = packageRoot + "/.build/systemd-tests/\(name)-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }
}

/// Waits for `condition` to hold, checking every 10 ms, for at most `timeout`. Returns whether it held.
func eventually(timeout: Duration = .seconds(10), _ condition: () throws -> Bool) rethrows -> Bool {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if try condition() { return true }
        usleep(10_000)
    }
    return try condition()
}

/// Wall-clock seconds (the clock of SO_TIMESTAMP).
func wallClock() -> Double {
    var tv = timeval()
    gettimeofday(&tv, nil)
    return Double(tv.tv_sec) + Double(tv.tv_usec) / 1e6
}

func processExists(_ pid: Int32) -> Bool {
    guard kill(pid, 0) == 0 else { return false }
    guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
          let close = stat.lastIndex(of: ")") else { return false }
    return stat[stat.index(close, offsetBy: 2)] != "Z"
}

struct CommandResult {
    var status: Int32
    var stdout: String
    var stderr: String
}

/// Runs a command to completion, bounded by `timeout` (coreutils `timeout` sends SIGKILL after it).
func runCommand(_ path: String, _ arguments: [String], environment: [String: String]? = nil,
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
    let errData = LockedData()
    let reader = Thread { errData.set(err.fileHandleForReading.readDataToEndOfFile()) }
    reader.start()
    let outData = out.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    _ = eventually(timeout: .seconds(5)) { errData.get() != nil }
    return CommandResult(status: process.terminationStatus, stdout: String(decoding: outData, as: UTF8.self),
                         stderr: String(decoding: errData.get() ?? Data(), as: UTF8.self))
}

final class LockedData: @unchecked Sendable {
    private let lock = NSLock()
    private var data: Data?
    func set(_ d: Data) { lock.withLock { data = d } }
    func get() -> Data? { lock.withLock { data } }
}

/// Reads the status document from a status.sock.
func readStatus(_ path: String) -> StatusDocument? {
    guard let fd = try? connectUnixSocket(path: path) else { return nil }
    defer { close(fd) }
    var tv = timeval(tv_sec: 10, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    var data = [UInt8]()
    var buffer = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = read(fd, &buffer, buffer.count)
        if n <= 0 { break }
        data += buffer[0..<n]
    }
    return try? JSONDecoder().decode(StatusDocument.self, from: Data(data))
}

/// Test configurations for npu-supervisord.
enum TestConfig {
    /// Whether this build knows `[http] listen` (added by another feature; the HTTP listener is on by default,
    /// and test daemons running side by side must not fight over its port).
    static let knowsHTTP: Bool = {
        guard let dir = try? Paths.scratch("probe") else { return false }
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/c.toml"
        let toml = "[http]\nlisten = \"\"\n[defaults]\ncommand = [\"\(Paths.worker)\"]\n[[device]]\nid = \"0\"\n"
        guard (try? toml.write(toFile: path, atomically: true, encoding: .utf8)) != nil,
              let r = try? runCommand(Paths.supervisord, ["--check-config", "--config", path]) else { return false }
        return r.status == 0
    }()

    /// A config: `devices` simulated devices, sockets in `runDir`.
    static func make(runDir: String, devices: [String] = ["0", "1"], loadMS: Int = 300, minReady: Int = 1,
                     supervisorExtra: String = "", workerArgs: [String] = [], http: String? = nil,
                     defaultsExtra: String = "", extra: String = "") -> String {
        let argv = ([Paths.worker, "--load-ms", "\(loadMS)"] + workerArgs).map { "\"\($0)\"" }
            .joined(separator: ", ")
        var toml = """
            [supervisor]
            run_dir = "\(runDir)"
            shutdown_timeout = "5s"
            min_ready = \(minReady)
            \(supervisorExtra)

            [defaults]
            command = [\(argv)]
            start_timeout = "60s"
            stop_timeout = "3s"
            backoff_initial = "100ms"
            backoff_max = "1s"
            heartbeat_interval = "200ms"
            heartbeat_timeout = "5s"
            \(defaultsExtra)

            """
        if knowsHTTP { toml += "\n[http]\nlisten = \"\(http ?? "")\"\n" }
        for device in devices { toml += "\n[[device]]\nid = \"\(device)\"\n" }
        return toml + "\n" + extra + "\n"
    }
}

/// A test's own NOTIFY_SOCKET: an AF_UNIX datagram socket that records what the daemon sends, with the sender's
/// pid (SO_PASSCRED).
final class NotifyListener {
    struct Message {
        var pid: Int32
        var text: String
        /// When the test read it.
        var at: ContinuousClock.Instant
        /// When the kernel queued it (SO_TIMESTAMP, wall clock seconds): independent of the test's scheduling.
        var sent: Double
        var assignments: [String] { text.split(separator: "\n").map(String.init) }
        func has(_ assignment: String) -> Bool { assignments.contains(assignment) }
        func value(_ key: String) -> String? {
            assignments.first { $0.hasPrefix(key + "=") }.map { String($0.dropFirst(key.count + 1)) }
        }
    }

    let path: String
    let fd: CInt
    private(set) var messages: [Message] = []

    init(path: String) throws {
        self.path = path
        fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw POSIXError(.EIO) }
        var on: CInt = 1
        setsockopt(fd, SOL_SOCKET, SO_PASSCRED, &on, socklen_t(MemoryLayout<CInt>.size))
        setsockopt(fd, SOL_SOCKET, SO_TIMESTAMP, &on, socklen_t(MemoryLayout<CInt>.size))
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            let bytes = Array(path.utf8.prefix(raw.count - 1))
            raw.copyBytes(from: bytes)
        }
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard rc == 0 else { close(fd); throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
    }

    deinit {
        close(fd)
        unlink(path)
    }

    /// Receives what has arrived, waiting up to `timeout` for the first datagram.
    func drain(timeout: Duration = .zero) {
        var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        var waitMS = Int32(timeout.components.seconds * 1000 + timeout.components.attoseconds / 1_000_000_000_000_000)
        while poll(&pfd, 1, waitMS) > 0 {
            waitMS = 0
            var buffer = [UInt8](repeating: 0, count: 4096)
            var control = [UInt8](repeating: 0, count: 128)
            let n = buffer.withUnsafeMutableBytes { data -> Int in
                control.withUnsafeMutableBytes { ctl -> Int in
                    var iov = iovec(iov_base: data.baseAddress, iov_len: data.count)
                    return withUnsafeMutablePointer(to: &iov) { iovPtr -> Int in
                        var msg = msghdr()
                        msg.msg_iov = iovPtr
                        msg.msg_iovlen = 1
                        msg.msg_control = ctl.baseAddress
                        msg.msg_controllen = ctl.count
                        return recvmsg(fd, &msg, 0)
                    }
                }
            }
            guard n >= 0 else { break }
            // Control messages: cmsghdr (len: size_t, level: int, type: int), data at +16, the next header at
            // the 8-aligned end. SCM_CREDENTIALS carries ucred (pid, uid, gid: 32-bit ints), SCM_TIMESTAMP a
            // timeval.
            var pid: Int32 = 0
            var sent = 0.0
            control.withUnsafeBytes { raw in
                var offset = 0
                while offset + 16 <= raw.count {
                    let length = Int(raw.load(fromByteOffset: offset, as: UInt64.self))
                    guard length >= 16 else { break }
                    let type = raw.load(fromByteOffset: offset + 12, as: Int32.self)
                    if type == 2 /* SCM_CREDENTIALS */ { pid = raw.load(fromByteOffset: offset + 16, as: Int32.self) }
                    if type == SO_TIMESTAMP {
                        sent = Double(raw.load(fromByteOffset: offset + 16, as: Int64.self))
                            + Double(raw.load(fromByteOffset: offset + 24, as: Int64.self)) / 1e6
                    }
                    offset += (length + 7) & ~7
                }
            }
            messages.append(Message(pid: pid, text: String(decoding: buffer[0..<n], as: UTF8.self), at: .now,
                                    sent: sent))
        }
    }

    /// Waits until a message satisfying `predicate` has arrived (at index `from` or later); returns it.
    func waitFor(from: Int = 0, timeout: Duration = .seconds(20), _ predicate: (Message) -> Bool) -> Message? {
        let deadline = ContinuousClock.now + timeout
        while true {
            if let m = messages.dropFirst(from).first(where: predicate) { return m }
            let left = deadline - .now
            if left <= .zero { return nil }
            drain(timeout: min(left, .milliseconds(50)))
        }
    }
}

/// One npu-supervisord (or a launcher that execs it in place) started by a test, with its output in a log file.
/// SIGKILLed (with its workers) at the end if still running.
///
/// Spawned with posix_spawn and reaped here (waitpid on its own pid), not with Foundation's `Process`: Foundation
/// watches a child through a socket the child inherits, and takes the close of that socket for the child's exit
/// (then blocks in waitpid and stops reaping every other child). systemd-socket-activate closes every inherited fd
/// before it execs the daemon. The child also gets an empty signal mask and default signal dispositions (the
/// test runner's threads block signals, and children inherit that).
final class DaemonProcess {
    let logPath: String
    let pid: Int32
    var workerPids: Set<Int32> = []
    private var status: Int32?

    init(executable: String = Paths.supervisord, arguments: [String], environment: [String: String] = [:],
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
    var isRunning: Bool {
        if status != nil { return false }
        var raw: Int32 = 0
        guard waitpid(pid, &raw, WNOHANG) == pid else { return true }
        status = (raw & 0x7f) == 0 ? (raw >> 8) & 0xff : 128 + (raw & 0x7f)
        return false
    }

    /// The exit code (128 + signal for a signal), once exited.
    var exitStatus: Int32? { isRunning ? nil : status }

    var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    func remember(_ doc: StatusDocument?) {
        for w in doc?.workers ?? [] { if let p = w.pid { workerPids.insert(p) } }
    }

    /// SIGTERM and wait for the exit status.
    func terminate(timeout: Duration = .seconds(20)) -> Int32? {
        kill(pid, SIGTERM)
        guard eventually(timeout: timeout, { !isRunning }) else { return nil }
        return status
    }
}

/// posix_spawn_file_actions_addclosefrom_np (glibc 2.34+), which the Glibc module does not import.
func closeFrom(_ fd: Int32, _ actions: inout posix_spawn_file_actions_t) {
    typealias AddCloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32
    guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "posix_spawn_file_actions_addclosefrom_np")
    else { return }
    _ = unsafeBitCast(symbol, to: AddCloseFrom.self)(&actions, fd)
}

func withCStrings<T>(_ strings: [String], _ body: (UnsafePointer<UnsafeMutablePointer<CChar>?>) -> T) -> T {
    var pointers = strings.map { strdup($0) } + [nil]
    defer { for p in pointers { free(p) } }
    return pointers.withUnsafeMutableBufferPointer { body($0.baseAddress!) }
}

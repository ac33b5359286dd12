import Foundation
import NPUClient
import TestSupport
import Testing
import WireProtocol

/// The systemd tests' own files and folders (the executables are TestSupport's ``Binaries``).
enum Paths {
    static var sandboxScript: String { PackagePaths.root + "/scripts/systemd-sandbox.sh" }
    static var unitsFolder: String { PackagePaths.root + "/systemd" }

    /// A fresh scratch folder. Under the package's .build (not /tmp): the systemd sandbox mounts its own /tmp.
    static func scratch(_ name: String) throws -> String {
        let dir = PackagePaths.root + "/.build/systemd-tests/\(name)-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }
}

/// Wall-clock seconds (the clock of SO_TIMESTAMP).
func wallClock() -> Double {
    var tv = timeval()
    gettimeofday(&tv, nil)
    return Double(tv.tv_sec) + Double(tv.tv_usec) / 1e6
}

/// Test configurations for npu-supervisord.
enum TestConfig {
    /// Whether this build knows `[http] listen` (added by another feature; the HTTP listener is on by default,
    /// and test daemons running side by side must not fight over its port).
    static let knowsHTTP: Bool = {
        guard let dir = try? Paths.scratch("probe") else { return false }
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/c.toml"
        let toml = "[http]\nlisten = \"\"\n[defaults]\ncommand = [\"\(Binaries.worker)\"]\n[[device]]\nid = \"0\"\n"
        guard (try? toml.write(toFile: path, atomically: true, encoding: .utf8)) != nil,
              let r = try? runCommand(Binaries.supervisord, ["--check-config", "--config", path]) else { return false }
        return r.status == 0
    }()

    /// A config: `devices` simulated devices, sockets in `runDir`.
    static func make(runDir: String, devices: [String] = ["0", "1"], loadMS: Int = 300, minReady: Int = 1,
                     supervisorExtra: String = "", workerArgs: [String] = [], http: String? = nil,
                     defaultsExtra: String = "", extra: String = "") -> String {
        let argv = ([Binaries.worker, "--load-ms", "\(loadMS)"] + workerArgs).map { "\"\($0)\"" }
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

    /// Waits until the messages received so far satisfy `condition`; returns whether they did within `timeout`.
    func waitUntil(timeout: Duration = .seconds(20), _ condition: ([Message]) -> Bool) -> Bool {
        let deadline = ContinuousClock.now + timeout
        while true {
            if condition(messages) { return true }
            let left = deadline - .now
            if left <= .zero { return false }
            drain(timeout: min(left, .milliseconds(50)))
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


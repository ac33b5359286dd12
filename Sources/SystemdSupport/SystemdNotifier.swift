import CSystemd
import Glibc

/// sd_notify(3) for the daemon: READY=1, STATUS=, WATCHDOG=1, STOPPING=1, RELOADING=1, EXTEND_TIMEOUT_USEC=,
/// MAINPID=. A no-op when the daemon does not run under systemd (no `NOTIFY_SOCKET`). `notify` is thread-safe
/// (sd_notify opens a fresh datagram per call). When to send what is decided by SupervisorCore's `Readiness`.
public final class SystemdNotifier: Sendable {
    /// Half of the watchdog period (systemd's advice), nil when no watchdog is asked for.
    public let watchdogInterval: UInt64?
    public let isEnabled: Bool

    public init() {
        isEnabled = getenv("NOTIFY_SOCKET") != nil
        var usec: UInt64 = 0
        // sd_watchdog_enabled checks WATCHDOG_PID against our pid, so a forking wrapper turns it off honestly.
        if sd_watchdog_enabled(0, &usec) > 0 && usec > 0 {
            watchdogInterval = usec * 1000 / 2
        } else {
            watchdogInterval = nil
        }
    }

    /// Sends a notification (newline-separated assignments).
    /// - Returns: false when systemd could not be told (listener gone).
    @discardableResult
    public func notify(_ state: String) -> Bool {
        guard isEnabled else { return true }
        return sd_notify(0, state) >= 0
    }

    /// `STATUS=` text made safe for the one-line protocol (a newline would start a new assignment).
    public static func statusText(_ line: String) -> String {
        String(line.map { $0 == "\n" || $0 == "\r" ? " " : $0 })
    }

    /// CLOCK_MONOTONIC in nanoseconds (the clock systemd's `MONOTONIC_USEC=` and our intervals use).
    public static func monotonicNanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }
}

/// Listening sockets passed by systemd socket activation (`LISTEN_FDS`, named by `FileDescriptorName=`).
/// Read once, the first time ``shared`` is used: touch it early in `main`, before threads start, because
/// reading them unsets `LISTEN_*` (they must not leak into workers) and `unsetenv` is not thread-safe.
public final class ListenFDs: @unchecked Sendable {
    public static let shared = ListenFDs()
    private var byName: [String: CInt] = [:]
    /// Unix socket paths of the fds that were taken, by name (their files belong to systemd: never unlink them).
    private var takenPaths: [String: String] = [:]
    private let lock = NSLockLike()

    private init() {
        var names: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?
        // unset_environment = 1: LISTEN_* must not leak into workers (and not be seen twice).
        let n = sd_listen_fds_with_names(1, &names)
        guard n > 0 else { return }
        for i in 0..<Int(n) {
            let fd = SD_LISTEN_FDS_START + CInt(i)
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            var name = "unknown"
            if let names, let cName = names[i] {
                name = String(cString: cName)
                free(cName)
            }
            if byName[name] != nil { name += "#\(i)" }  // several fds of one socket unit share its name
            byName[name] = fd
        }
        free(names)
    }

    /// The passed fd named `name` (each can be taken once), or nil when systemd passed none by that name.
    public func take(name: String) -> CInt? {
        lock.withLock {
            guard let fd = byName.removeValue(forKey: name) else { return nil }
            if let path = Self.unixPath(of: fd) { takenPaths[name] = path }
            return fd
        }
    }

    /// Names of the passed fds not taken.
    public var remaining: [String] { lock.withLock { byName.keys.sorted() } }

    /// Whether the socket file at `path` came from systemd (the daemon must leave it in place at exit: the
    /// socket unit still listens on it and starts the daemon again on the next connection).
    public func isPassed(path: String) -> Bool { lock.withLock { takenPaths.values.contains(path) } }

    /// The path of the Unix socket taken under `name`, if it was one.
    public func path(ofTaken name: String) -> String? { lock.withLock { takenPaths[name] } }

    /// The filesystem path a listening Unix socket is bound to, nil for other sockets.
    static func unixPath(of fd: CInt) -> String? {
        var address = sockaddr_un()
        var length = socklen_t(MemoryLayout<sockaddr_un>.size)
        let rc = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        guard rc == 0, address.sun_family == sa_family_t(AF_UNIX) else { return nil }
        let path = withUnsafeBytes(of: address.sun_path) { raw -> String in
            let bytes = raw.prefix(max(0, Int(length) - MemoryLayout<sa_family_t>.size)).prefix { $0 != 0 }
            return String(decoding: bytes, as: UTF8.self)
        }
        return path.isEmpty ? nil : path
    }
}

/// A tiny pthread mutex (no Foundation in this module).
final class NSLockLike: @unchecked Sendable {
    private var mutex = pthread_mutex_t()
    init() { pthread_mutex_init(&mutex, nil) }
    deinit { pthread_mutex_destroy(&mutex) }
    func withLock<T>(_ body: () throws -> T) rethrows -> T {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        return try body()
    }
}

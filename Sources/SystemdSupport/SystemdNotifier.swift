import CSystemd
import Glibc

/// sd_notify(3) for the daemon: READY=1, STATUS=, WATCHDOG=1, STOPPING=1, RELOADING=1. A no-op when the daemon
/// does not run under systemd (no `NOTIFY_SOCKET`). Thread-safe (sd_notify opens a fresh datagram per call).
public final class SystemdNotifier: @unchecked Sendable {
    /// Half of the watchdog period (systemd's advice), nil when no watchdog is asked for.
    public let watchdogInterval: UInt64?
    private var lastWatchdog: UInt64 = 0
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

    /// Sends WATCHDOG=1 when half the watchdog period has passed since the last one. Must be called from the
    /// event loop itself, so that a wedged loop misses its ping and systemd restarts the service.
    public func watchdogIfDue() {
        guard let interval = watchdogInterval else { return }
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        let now = UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
        if now &- lastWatchdog >= interval {
            lastWatchdog = now
            notify("WATCHDOG=1")
        }
    }
}

/// Listening sockets passed by systemd socket activation (`LISTEN_FDS`, named by `FileDescriptorName=`).
public final class ListenFDs: @unchecked Sendable {
    public static let shared = ListenFDs()
    private var byName: [String: CInt] = [:]
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
            byName[name] = fd
        }
        free(names)
    }

    /// The passed fd named `name` (each can be taken once), or nil when systemd passed none by that name.
    public func take(name: String) -> CInt? {
        lock.withLock { byName.removeValue(forKey: name) }
    }

    /// Names of the passed fds not taken.
    public var remaining: [String] { lock.withLock { Array(byName.keys) } }
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

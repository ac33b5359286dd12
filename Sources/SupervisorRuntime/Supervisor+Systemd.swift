import Glibc
import Logging
import NIOCore
import SupervisorCore
import SystemdSupport

/// What systemd is told is decided by the machine (``Readiness``: READY once `min_ready` workers serve or
/// `ready_timeout` passed, STATUS= on change, EXTEND_TIMEOUT_USEC= while loading, WATCHDOG=1 from the event
/// loop's own timer so a wedged loop misses it, RELOADING=1/READY=1, STOPPING=1); this file renders its
/// messages for sd_notify and warns about sockets systemd passed that nobody took.
extension Supervisor {
    func systemdNotify(_ message: Readiness.Message) {
        switch message {
        case .ready(let status):
            notifier.notify("READY=1\nMAINPID=\(getpid())\nSTATUS=\(status)")
        case .status(let status):
            notifier.notify("STATUS=\(status)")
        case .extendTimeout(let microseconds):
            notifier.notify("EXTEND_TIMEOUT_USEC=\(microseconds)")
        case .watchdog:
            notifier.notify("WATCHDOG=1")
        case .reloading(let usec):
            notifier.notify("RELOADING=1\nMONOTONIC_USEC=\(usec)\nSTATUS=reloading configuration")
        case .reloaded(let status):
            notifier.notify("READY=1\nSTATUS=\(status)")
        case .stopping(let status):
            notifier.notify("STOPPING=1\nSTATUS=\(status)")
        }
    }

    /// At boot (the sockets are bound): say how the watchdog runs, and warn about passed sockets nobody took.
    func systemdBoot() {
        if let interval = notifier.watchdogInterval {
            logger.info("systemd watchdog on: WATCHDOG=1 every \(interval / 1_000_000)ms")
        }
        let unused = ListenFDs.shared.remaining
        if !unused.isEmpty {
            logger.warning("systemd passed sockets this configuration does not use: \(unused.joined(separator: ", "))")
        }
        // systemd's socket wins over the configured path; clients reading the config would look elsewhere.
        for (name, configured) in [("requests", config.requestsSocket), ("status", config.statusSocket),
                                   ("control", config.controlSocket)] {
            if let passed = ListenFDs.shared.path(ofTaken: name), passed != configured {
                logger.warning("""
                    the \(name) socket passed by systemd is \(passed), the configuration says \(configured); \
                    serving on systemd's (make the two agree so that clients find it)
                    """)
            }
        }
    }
}

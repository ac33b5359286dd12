import Glibc
import Logging
import NIOCore
import SupervisorCore
import SystemdSupport

/// What systemd is told (sd_notify), all from the supervisor's event loop:
/// - `READY=1` (with `MAINPID=`) once the health aggregation says enough workers can serve (`min_ready`), or,
///   with `ready_timeout` configured, once that start-up grace has passed (`STATUS=` then says so);
/// - `STATUS=` the one-line health summary, sent whenever it changes;
/// - `EXTEND_TIMEOUT_USEC=` every few seconds while READY has not been sent and workers are still starting (a
///   model load of minutes must not hit `TimeoutStartSec=`; a wedged loop stops extending and start-up fails);
/// - `WATCHDOG=1` from a timer on the event loop every half `WATCHDOG_USEC` (a wedged loop misses it);
/// - `RELOADING=1` … `READY=1` around a reload; `STOPPING=1` at shutdown.
extension Supervisor {
    /// How often start-up is extended, and by how much (EXTEND_TIMEOUT_USEC is "send again within this").
    static let systemdExtendEvery: UInt64 = 5_000_000_000
    static let systemdExtendByMicroseconds: UInt64 = 20_000_000

    /// Every health change lands here (on the event loop). Changes made in one turn of the loop (starting every
    /// worker, a reaped exit and its restart) are told once, at the end of the turn: no STATUS= for a state that
    /// only existed half-way through.
    func systemdHealthChanged(health: OverallHealth, summary line: String) {
        systemdStartIfNeeded()
        guard !notifier.publishPending else { return }
        notifier.publishPending = true
        eventLoop.execute {
            self.notifier.publishPending = false
            let (health, line) = self.aggregate()
            self.systemdPublish(health: health, line: line)
        }
    }

    private func systemdPublish(health: OverallHealth, line: String) {
        let status = SystemdNotifier.statusText(line)
        if !hasSentReady && health != .unavailable && !isShuttingDown {
            systemdSendReady(status: status)
            logger.notice("ready: \(line)")
        } else if status != lastStatusLine {
            lastStatusLine = status
            notifier.notify("STATUS=\(status)")
        }
    }

    /// The housekeeping tick (on the event loop): start-up extension and start-up grace.
    func systemdTick() {
        guard !hasSentReady, !isShuttingDown else { return }
        if let grace = config.readyTimeout, NIODeadline.now() - startedAt >= .nanoseconds(grace.nanoseconds) {
            let (_, line) = aggregate()
            let status = SystemdNotifier.statusText(
                "start-up grace ready_timeout (\(grace.configString)) passed; \(line)")
            systemdSendReady(status: status)
            logger.warning("\(status)")
            return
        }
        let loading = slots.contains { slot in
            guard slot.machine.desired == .up else { return false }
            switch slot.machine.state {
            case .starting, .backoff: return true
            default: return false
            }
        }
        let now = SystemdNotifier.monotonicNanoseconds()
        if loading && (notifier.lastExtend == 0 || now &- notifier.lastExtend >= Self.systemdExtendEvery) {
            notifier.lastExtend = now
            notifier.notify("EXTEND_TIMEOUT_USEC=\(Self.systemdExtendByMicroseconds)")
        }
    }

    func systemdStopping(reason: String) {
        notifier.notify("STOPPING=1\nSTATUS=" + SystemdNotifier.statusText("stopping: \(reason)"))
    }

    /// Call when a reload begins (before anything is re-read or replaced).
    func systemdReloadBegan() {
        guard hasSentReady, !isShuttingDown, !notifier.reloading else { return }
        notifier.reloading = true
        let usec = SystemdNotifier.monotonicNanoseconds() / 1000
        notifier.notify("RELOADING=1\nMONOTONIC_USEC=\(usec)\nSTATUS=reloading configuration")
    }

    /// Call when the reload is over (applied or refused): systemd goes back to `active`.
    func systemdReloadFinished() {
        guard notifier.reloading else { return }
        notifier.reloading = false
        let (_, line) = aggregate()
        lastStatusLine = SystemdNotifier.statusText(line)
        notifier.notify("READY=1\nSTATUS=\(lastStatusLine)")
    }

    private func systemdSendReady(status: String) {
        hasSentReady = true
        lastStatusLine = status
        notifier.notify("READY=1\nMAINPID=\(getpid())\nSTATUS=\(status)")
    }

    /// One-time set-up on the first health change (the sockets are bound by then): the watchdog timer, a warning
    /// about passed sockets nobody took, the first start-up extension.
    private func systemdStartIfNeeded() {
        guard !notifier.started else { return }
        notifier.started = true
        if let interval = notifier.watchdogInterval {
            notifier.notify("WATCHDOG=1")
            let every = TimeAmount.nanoseconds(Int64(interval))
            eventLoop.scheduleRepeatedTask(initialDelay: every, delay: every) { _ in
                self.notifier.notify("WATCHDOG=1")
            }
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
        systemdTick()
    }
}

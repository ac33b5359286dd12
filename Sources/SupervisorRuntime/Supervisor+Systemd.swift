import Logging
import SupervisorCore
import SystemdSupport

/// What systemd is told (sd_notify): READY=1 once the first health aggregation says the supervisor can serve,
/// STATUS= kept current with the one-line summary, WATCHDOG=1 from the event loop's own tick, STOPPING=1.
extension Supervisor {
    /// Every health change lands here (on the event loop).
    func systemdHealthChanged(health: OverallHealth, summary line: String) {
        if !hasSentReady && health != .unavailable && !isShuttingDown {
            hasSentReady = true
            notifier.notify("READY=1\nSTATUS=\(line)")
            lastStatusLine = line
            logger.notice("ready: \(line)")
        } else if line != lastStatusLine {
            lastStatusLine = line
            notifier.notify("STATUS=\(line)")
        }
    }

    /// The housekeeping tick (on the event loop: a wedged loop misses its watchdog ping).
    func systemdTick() {
        notifier.watchdogIfDue()
    }

    func systemdStopping(reason: String) {
        notifier.notify("STOPPING=1\nSTATUS=stopping: \(reason)")
    }
}

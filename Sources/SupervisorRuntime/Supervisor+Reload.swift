import Glibc
import Logging
import NIOCore
import SupervisorCore
import WireProtocol

/// Reload as I/O: read and validate the file (the machine decides what the new configuration means: in place,
/// rolled, added, removed), answer `reload --wait` callers when it is done, and keep the rollout record on
/// disk.
extension Supervisor {
    /// Re-reads the configuration file and hands it to the machine. An invalid file changes nothing.
    /// - Parameters:
    ///   - waiter: a control connection to answer; nil for SIGHUP.
    ///   - wait: answer only when the reload is done (its rollout ended), not when it has started.
    /// - Returns: whether the reload was accepted for processing.
    @discardableResult
    func reload(waiter: (channel: any Channel, requestID: UInt64)? = nil, wait: Bool = false) -> Bool {
        eventLoop.assertInEventLoop()
        guard !machine.isReloading, !isShuttingDown else {
            let why = isShuttingDown ? "the supervisor is shutting down" : "a reload is already in progress"
            logger.warning("reload refused: \(why)")
            if let waiter { answerReload(waiter, ok: false, message: "reload refused: \(why)") }
            return false
        }
        if let waiter { reloadWaiters.append(waiter) }
        feed(.reloadRequested)
        guard let path = configPath else {
            feed(.reloadFailed("the daemon was started without --config: there is no file to re-read"))
            return false
        }
        let loaded: SupervisorConfiguration
        do {
            loaded = try ConfigLoader.load(path: path)
        } catch {
            feed(.reloadFailed("\(path): \(error)"))
            return false
        }
        feed(.reload(loaded))
        // Without --wait the caller hears that it started; the rollout goes on.
        if let waiter, !wait, machine.isReloading,
           let index = reloadWaiters.firstIndex(where: { $0.channel === waiter.channel && $0.requestID == waiter.requestID }) {
            reloadWaiters.remove(at: index)
            answerReload(waiter, ok: true, message: "reload started: rolling \(machine.rollout.steps.map(\.device).joined(separator: ", ")) "
                + "(canary \(machine.rollout.canary ?? "-")); `npu-supervisorctl rollout status` follows it")
        }
        return true
    }

    func reloadDone(ok: Bool, message: String) {
        if ok { logger.notice("\(message)") }
        let waiters = reloadWaiters
        reloadWaiters.removeAll()
        for waiter in waiters { answerReload(waiter, ok: ok, message: message) }
    }

    func answerReload(_ waiter: (channel: any Channel, requestID: UInt64), ok: Bool, message: String) {
        let frame: Frame
        if ok, let payload = try? JSONCoding.encode(ControlResult(ok: true, message: message, devices: machine.devices.filter { !$0.isEmpty })) {
            frame = Frame(type: .response, requestID: waiter.requestID, payload: payload)
        } else {
            frame = .error(requestID: waiter.requestID, code: ErrorCode.commandFailed, message: message)
        }
        waiter.channel.writeAndFlush(frame, promise: nil)
    }

    /// The rollout as the status document shows it.
    func rolloutStatus() -> RolloutStatus {
        let rollout = machine.rollout
        let idle = rollout.state == .idle
        return RolloutStatus(state: rollout.state.rawValue, kind: idle ? nil : rollout.kind.rawValue,
                             devices: rollout.steps.map(\.device), progress: rollout.progress, canary: rollout.canary,
                             reason: rollout.reason)
    }

    /// Writes the rollout record next to the sockets (atomically: a new file renamed over the old one), so an
    /// operator and a restarted supervisor can see what was in progress.
    func persistRollout() {
        let dir = config.requestsSocket.lastIndex(of: "/").map { String(config.requestsSocket[..<$0]) } ?? "."
        let path = dir + "/rollout.json"
        struct Record: Encodable {
            var rollout: RolloutStatus
            var revisions: [String: String]
            var generations: [String: Int]
        }
        var revisions: [String: String] = [:]
        var generations: [String: Int] = [:]
        for worker in machine.workers where !worker.isRetired {
            revisions[worker.spec.device] = worker.spec.revision
            generations[worker.spec.device] = worker.generation
        }
        guard let buffer = try? JSONCoding.encode(Record(rollout: rolloutStatus(), revisions: revisions,
                                                         generations: generations), pretty: true)
        else { return }
        let temporary = path + ".tmp"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else {
            logger.warning("cannot write \(temporary): \(String(cString: strerror(errno)))")
            return
        }
        let bytes = Array(buffer.readableBytesView) + [UInt8(ascii: "\n")]
        let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        Glibc.close(fd)
        if written == bytes.count { rename(temporary, path) } else { unlink(temporary) }
    }
}

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
        let text: String
        do {
            text = try readFile(path)
            loaded = try ConfigLoader.parse(text, path: path)
        } catch {
            feed(.reloadFailed("\(path): \(error)"))
            return false
        }
        let previous = appliedConfigText
        feed(.reload(loaded))
        if machine.refusal == nil {
            appliedConfigText = text
            if machine.rollout.isActive, machine.rollout.kind == .upgrade, let previous {
                writeAtomically(previous, to: rolloutFolder + "/rollout-previous.toml")
            }
        }
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
        // A client that half-closed while waiting for this answer is closed now that it has it.
        waiter.channel.pipeline.fireUserInboundEventTriggered(ControlHandler.Answered())
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
    var rolloutFolder: String {
        config.requestsSocket.lastIndex(of: "/").map { String(config.requestsSocket[..<$0]) } ?? "."
    }

    struct RolloutRecord: Codable {
        var rollout: RolloutStatus
        var revisions: [String: String]
        var generations: [String: Int]
    }

    /// At start, before the workers: a rollout record left by a supervisor that stopped during an upgrade
    /// brings each device back on the revision it was on, and the rollout back paused.
    func restoreRollout() {
        let folder = rolloutFolder
        guard let recordText = try? readFile(folder + "/rollout.json"),
              let record = try? JSONCoding.decode(RolloutRecord.self, from: recordText),
              ["progressing", "paused", "rolling_back"].contains(record.rollout.state) else { return }
        guard record.rollout.kind == "upgrade" else {
            logger.notice("a rolling restart was interrupted by the supervisor's own restart; every worker starts anew")
            return
        }
        guard let configPath, let previousText = try? readFile(folder + "/rollout-previous.toml"),
              let previous = try? ConfigLoader.parse(previousText, path: configPath) else {
            logger.warning("an upgrade was in progress (\(record.rollout.progress)) but its previous configuration cannot be read back: every device starts on the file's revision")
            return
        }
        var specs: [Int: WorkerSpec] = [:]
        var onPrevious: Set<Int> = []
        for (slot, worker) in machine.workers.enumerated() where !worker.isFallback {
            guard let old = previous.workers.first(where: { $0.device == worker.spec.device }),
                  !old.isSameRevision(as: worker.spec) else { continue }
            specs[slot] = old
            if record.revisions[worker.spec.device] == old.revision { onPrevious.insert(slot) }
        }
        feed(.restoreRollout(previous: specs, onPrevious: onPrevious))
    }

    @discardableResult
    func writeAtomically(_ text: String, to path: String) -> Bool {
        let temporary = path + ".tmp"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else {
            logger.warning("cannot write \(temporary): \(String(cString: strerror(errno)))")
            return false
        }
        let bytes = Array(text.utf8)
        let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        Glibc.close(fd)
        guard written == bytes.count, rename(temporary, path) == 0 else {
            unlink(temporary)
            return false
        }
        return true
    }

    func persistRollout() {
        let path = rolloutFolder + "/rollout.json"
        typealias Record = RolloutRecord
        var revisions: [String: String] = [:]
        var generations: [String: Int] = [:]
        for worker in machine.workers where !worker.isRetired {
            revisions[worker.spec.device] = worker.spec.revision
            generations[worker.spec.device] = worker.generation
        }
        guard let buffer = try? JSONCoding.encode(Record(rollout: rolloutStatus(), revisions: revisions,
                                                         generations: generations), pretty: true)
        else { return }
        writeAtomically(String(buffer: buffer) + "\n", to: path)
    }
}

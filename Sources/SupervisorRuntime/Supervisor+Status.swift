import Glibc
import NIOCore
import SupervisorCore
import WireProtocol

/// The status document (status.sock, `npu-supervisorctl status`, `/health`): a read of the machine's state.
extension Supervisor {
    func aggregate() -> (OverallHealth, String) { machine.aggregate() }

    func statusDocument(devices: [String]? = nil) -> StatusDocument {
        eventLoop.assertInEventLoop()
        let (health, reason) = machine.aggregate()
        let now = NIODeadline.now()
        let mono = Self.now()
        let all = devices == nil || devices!.isEmpty || devices! == ["all"]
        let workers = machine.workers.indices
            .filter { index in
                let worker = machine.workers[index]
                // A group's id names its ranks.
                return !worker.isRetired && (all || devices!.contains(worker.spec.device)
                    || worker.groupIndex.map { devices!.contains(machine.groups[$0].spec.id) } ?? false)
            }
            .map { index -> WorkerStatus in
                let worker = machine.workers[index]
                let lifecycle = worker.lifecycle
                let slot = slots[index]
                var next: Double?
                if let d = lifecycle.nextDeadline {
                    switch lifecycle.state {
                    case .backoff, .failed: next = max(0, (d - mono).seconds)
                    default: break
                    }
                }
                let levels = machine.healthLevels(index, now: mono)
                let group = worker.groupIndex.map { machine.groups[$0] }
                var status = WorkerStatus(
                    device: worker.spec.device, kind: worker.spec.kind.rawValue, state: lifecycle.stateName,
                    desired: lifecycle.desired.rawValue, pid: worker.pid,
                    restarts: lifecycle.restarts, lastExit: lifecycle.lastExit?.description,
                    lastExitDetail: worker.lastExitDetail,
                    uptimeSeconds: slot.spawnedAt.map { Double((now - $0).nanoseconds) / 1e9 } ?? 0,
                    inflight: machine.router.inflight[index], maxInflight: worker.spec.maxInflight,
                    exits: lifecycle.exitCounts, nextRestartInSeconds: next,
                    health: WorkerHealthLevels(alive: levels.alive, device: levels.device, model: levels.model,
                                               inference: levels.inference, inRotation: levels.inRotation),
                    fallback: worker.isFallback, memoryBytes: slot.cgroup.flatMap { cgroups?.memoryUsage($0.path) },
                    memoryLimitBytes: worker.spec.memoryLimit,
                    revision: worker.spec.revision, generation: worker.generation, drain: worker.drain.name)
                if let group {
                    // A rank's restarts and wanted state are its group's: it never restarts alone.
                    status.group = group.spec.id
                    status.rank = worker.spec.rank?.rank
                    status.restarts = group.lifecycle.restarts
                    status.desired = group.lifecycle.desired.rawValue
                }
                return status
            }
        let groups = machine.groups.indices.map { g -> GroupStatus in
            let group = machine.groups[g]
            var next: Double?
            if let d = group.lifecycle.nextDeadline {
                switch group.lifecycle.state {
                case .backoff, .failed: next = max(0, (d - mono).seconds)
                default: break
                }
            }
            let cause = group.lifecycle.lastExit == .stopped ? nil : group.cause
            return GroupStatus(
                id: group.spec.id, devices: group.spec.devices, state: group.lifecycle.stateName,
                desired: group.lifecycle.desired.rawValue, serving: machine.workers[group.leader].isServing,
                restarts: group.lifecycle.restarts, lastExit: group.lifecycle.lastExit?.description,
                lastExitRank: cause?.rank, lastExitDevice: cause?.device, lastExitDetail: cause?.detail,
                masterPort: groupRuntime[g].masterPort, rankTableFile: groupRuntime[g].rankTableFile,
                nextRestartInSeconds: next)
        }
        return StatusDocument(
            state: health.rawValue, reason: reason,
            supervisor: SupervisorInfo(pid: getpid(), version: Self.version,
                                       uptimeSeconds: Double((now - startedAt).nanoseconds) / 1e9,
                                       config: configPath.map { resolve($0, against: currentDirectory()) },
                                       http: httpAddress),
            queueDepth: queuedCount, fallbackActive: machine.isFallbackActive, workers: workers,
            rollout: rolloutStatus(), availability: availabilityStatus(now: mono), groups: groups)
    }
}

import CSupport
import Glibc
import Logging
import NIOCore
import SupervisorCore

/// A device's next worker process, started ahead of need when memory cgroups are on, so that a restart does no
/// cgroup work.
///
/// Joining a cgroup (writing a pid to `cgroup.procs`) takes the kernel's `cgroup_threadgroup_rwsem` for writing,
/// which waits for an RCU grace period after a quiet spell: 6–24 ms measured here (kernel 6.18, v1 memory), while
/// mkdir, the limit and rmdir take ~0.1 ms each. That wait was most of the gap between a restart with cgroups
/// (~25 ms) and without (~11 ms). So, a moment after each spawn, the slot gets a standby: the trampoline
/// (`npu-cgroup-exec --standby`) with the next worker's descriptors (its socketpair end as fd 3, its output pipe)
/// and environment, already in a fresh cgroup with the limit written (`worker-DEVICE` or `worker-DEVICE.next`,
/// the one the running worker does not use), blocked on a "go" socket. A restart with the same spec sends one
/// byte and the trampoline execs the worker: no mkdir, no cgroup join, not even a posix_spawn on the critical
/// path. A standby whose spec no longer matches (reload) is discarded and the worker spawned as before.
final class StandbyWorker {
    let spec: WorkerSpec
    let cgroup: CgroupManager.WorkerCgroup
    /// The process and the supervisor's ends of its descriptors, handed over whole by ``release()``.
    private(set) var process: SpawnedWorker
    /// The supervisor's end of the go socket (the trampoline's fd 5); -1 once used or discarded.
    private var goFD: CInt

    var pid: pid_t { process.pid }

    private init(spec: WorkerSpec, cgroup: CgroupManager.WorkerCgroup, process: SpawnedWorker, goFD: CInt) {
        self.spec = spec
        self.cgroup = cgroup
        self.process = process
        self.goFD = goFD
    }

    /// Creates the cgroup and starts the trampoline in standby.
    /// - Parameter current: the path of the running worker's cgroup (the standby takes the other name).
    /// - Throws: ``SystemError``.
    static func prepare(_ spec: WorkerSpec, cgroups: CgroupManager, current: String?) throws -> StandbyWorker {
        let cgroup = try cgroups.createNext(device: spec.device, limit: spec.memoryLimit, current: current)
        var created = false
        defer { if !created { cgroups.remove(cgroup.path) } }
        let procsFD = try cgroups.openProcs(cgroup)
        defer { Glibc.close(procsFD) }
        var go: [CInt] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &go) == 0 else {
            throw SystemError(call: "socketpair", errno: errno)
        }
        defer { Glibc.close(go[1]) }  // the trampoline has its copy
        let process: SpawnedWorker
        do {
            process = try ProcessSpawner.spawnStandby(spec, cgroupProcsFD: procsFD, trampoline: cgroups.trampoline,
                                                      goFD: go[1])
        } catch {
            Glibc.close(go[0])
            throw error
        }
        created = true
        return StandbyWorker(spec: spec, cgroup: cgroup, process: process, goFD: go[0])
    }

    /// Lets the trampoline exec the worker and hands over its process; nil when the standby died meanwhile
    /// (it is then collected, and the caller spawns as usual).
    func release(cgroups: CgroupManager) -> SpawnedWorker? {
        var byte: UInt8 = 1
        let sent = send(goFD, &byte, 1, Int32(MSG_NOSIGNAL))
        Glibc.close(goFD)
        goFD = -1
        guard sent == 1 else {
            collect(cgroups: cgroups)
            return nil
        }
        return process
    }

    /// Stops the standby (it exits on EOF; SIGKILL makes sure), reaps it and removes its cgroup.
    func discard(cgroups: CgroupManager) {
        if goFD >= 0 {
            Glibc.close(goFD)
            goFD = -1
        }
        collect(cgroups: cgroups)
    }

    private func collect(cgroups: CgroupManager) {
        _ = kill(process.pid, SIGKILL)
        var status: Int32 = 0
        // It exits at once; the waitid thread (no pidfd) may reap it first (ECHILD).
        while waitpid(process.pid, &status, 0) < 0 && errno == EINTR {}
        for fd in [process.channelFD, process.outputFD, process.pidFD] where fd >= 0 { Glibc.close(fd) }
        process = SpawnedWorker(pid: process.pid, channelFD: -1, outputFD: -1, pidFD: -1)
        cgroups.remove(cgroup.path)
    }

    deinit {
        // A slot that went away with its standby (a device removed by a reload): EOF on the go socket makes the
        // trampoline exit; whoever reaps strays collects it (the waitid thread, the orphan sweep).
        if goFD >= 0 {
            Glibc.close(goFD)
            for fd in [process.channelFD, process.outputFD, process.pidFD] where fd >= 0 { Glibc.close(fd) }
        }
    }
}

extension Supervisor {
    /// How long after a spawn the slot's standby is started: off the new worker's own start.
    static let standbyDelay: TimeAmount = .milliseconds(300)

    /// The process for the slot's next worker: its standby when one is ready for this spec, with `slot.cgroup`
    /// set to the standby's (nil: spawn as usual).
    func takeStandby(_ slot: WorkerIO) -> SpawnedWorker? {
        guard let cgroups, let standby = slot.standby else { return nil }
        slot.standby = nil
        guard standby.spec == slot.spec else {
            standby.discard(cgroups: cgroups)
            return nil
        }
        guard let process = standby.release(cgroups: cgroups) else { return nil }
        slot.cgroup = standby.cgroup
        return process
    }

    /// Starts the slot's standby a moment after its worker `pid` was spawned, if that worker still runs then.
    func scheduleStandby(_ slot: WorkerIO, after pid: pid_t) {
        // A rank of a tensor-parallel group gets no standby: its environment (MASTER_PORT, the rank table) is new
        // for each start of its group, so it cannot be fixed ahead of time.
        guard cgroups != nil, slot.spec.rank == nil else { return }
        let index = slot.index
        eventLoop.scheduleTask(in: Self.standbyDelay) {
            guard index < self.slots.count, let cgroups = self.cgroups, !self.hasStopped else { return }
            let slot = self.slots[index]
            guard slot.pid == pid, !slot.isReaped, slot.standby == nil else { return }
            do {
                slot.standby = try StandbyWorker.prepare(slot.spec, cgroups: cgroups, current: slot.cgroup?.path)
            } catch {
                self.logger.warning("cannot prepare the next worker process ahead of need (\(error)); restarts spawn it then",
                                    metadata: slot.metadata())
            }
        }
    }

    /// Every slot's standby stops (shutdown).
    func discardStandbys() {
        guard let cgroups else { return }
        for slot in slots {
            slot.standby?.discard(cgroups: cgroups)
            slot.standby = nil
        }
    }
}

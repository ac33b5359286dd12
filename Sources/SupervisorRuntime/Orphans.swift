import CSupport
import Glibc
import Logging
import NIOCore

/// Helpers that escape a worker's process group (double fork + `setsid`) survive a SIGKILL of the group and,
/// without a memory cgroup, nothing else would find them. The supervisor is therefore a child subreaper
/// (`PR_SET_CHILD_SUBREAPER`): such orphans are re-parented to it. They are told apart by the worker's
/// environment they inherited (`NPU_DEVICE_ID`) and by their start time: an adopted child of a device whose
/// worker is gone, or that started before the device's current worker, belonged to an earlier worker and is
/// killed; adopted children that exit are reaped; at shutdown every adopted child is killed. Probe commands are
/// left to their own reaping: by pid while they run or wait as zombies (`probePids`: a zombie's environment can
/// no longer be read; reaping one here lost the probe's exit), and by the `NPU_SUPERVISOR_PROBE=1` they pass to
/// what they start.
extension Supervisor {
    func becomeSubreaper() {
        if npu_set_child_subreaper() != 0 {
            logger.warning("cannot become a child subreaper (\(String(cString: strerror(errno)))): helpers that escape a worker's process group survive it when cgroups are off")
        }
    }

    /// One adopted child: pid, the device in its environment, its start time in clock ticks since boot.
    struct Adopted {
        var pid: pid_t
        var device: String?
        var started: UInt64
        var isZombie: Bool
    }

    /// The pids of this process's children: `/proc/self/task/*/children` (a few small reads), else a scan of
    /// `/proc` (kernels without CONFIG_PROC_CHILDREN).
    func childPids() -> [pid_t] {
        var pids: [pid_t] = []
        var sawChildrenFile = false
        if let tasks = opendir("/proc/self/task") {
            defer { closedir(tasks) }
            while let entry = readdir(tasks) {
                let tid = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                guard Int(tid) != nil, let text = try? readFile("/proc/self/task/\(tid)/children") else { continue }
                sawChildrenFile = true
                pids += text.split(separator: " ").compactMap { pid_t($0.filter(\.isNumber)) }
            }
        }
        if sawChildrenFile { return pids }
        guard let dir = opendir("/proc") else { return [] }
        defer { closedir(dir) }
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if let pid = pid_t(name) { pids.append(pid) }
        }
        return pids
    }

    /// This process's children that are neither a current worker nor a probe command.
    func adoptedChildren() -> [Adopted] {
        let me = getpid()
        let workers = Set(slots.filter { $0.pid > 0 && !$0.isReaped }.map(\.pid) + slots.compactMap { $0.standby?.pid })
        var found: [Adopted] = []
        for pid in childPids() {
            guard pid != me, !workers.contains(pid), probePids[pid] == nil,
                  let stat = try? readFile("/proc/\(pid)/stat"), let close = stat.lastIndex(of: ")") else { continue }
            // Fields after "comm)": state ppid pgrp session ... starttime is field 22 (index 19 here).
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            guard fields.count > 19, pid_t(fields[1]) == me, let started = UInt64(fields[19]) else { continue }
            let environ = (try? readFile("/proc/\(pid)/environ")) ?? ""
            let variables = environ.split(separator: "\0")
            if variables.contains("NPU_SUPERVISOR_PROBE=1") { continue }
            let device = variables.first { $0.hasPrefix("NPU_DEVICE_ID=") }.map { String($0.dropFirst(14)) }
            found.append(Adopted(pid: pid, device: device, started: started, isZombie: fields[0] == "Z"))
        }
        return found
    }

    /// Kills adopted children that belonged to an earlier worker of their device (or every one, at shutdown)
    /// and reaps those that have exited.
    func sweepOrphans(all: Bool = false) {
        let adopted = adoptedChildren()
        guard !adopted.isEmpty else { return }
        var current: [String: UInt64] = [:]  // device -> start of its running worker
        for slot in slots where slot.pid > 0 && !slot.isReaped {
            if let stat = try? readFile("/proc/\(slot.pid)/stat"), let close = stat.lastIndex(of: ")") {
                let fields = stat[stat.index(after: close)...].split(separator: " ")
                if fields.count > 19, let started = UInt64(fields[19]) { current[slot.spec.device] = started }
            }
        }
        for child in adopted {
            if child.isZombie {
                var status: Int32 = 0
                _ = waitpid(child.pid, &status, WNOHANG)
                continue
            }
            let stale = all || child.device.map { device in current[device].map { child.started < $0 } ?? true } ?? all
            guard stale else { continue }
            logger.warning("killing a helper process left by an earlier worker (it escaped its process group)",
                           metadata: ["device": "\(child.device ?? "?")", "worker_pid": "\(child.pid)", "reason": "orphan"])
            _ = kill(child.pid, SIGKILL)
            var status: Int32 = 0
            _ = waitpid(child.pid, &status, WNOHANG)
        }
    }
}

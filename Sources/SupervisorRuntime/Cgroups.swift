import Glibc
import Logging
import SupervisorCore

/// Per-worker memory cgroups (README "Configuration reference", `[cgroups]`): a `memory_limit` per worker, and certainty about OOM kills
/// (the cgroup's `oom_kill` counter) instead of a guess from SIGKILL. cgroup v2 (`memory.max`,
/// `memory.events`) and v1 (`memory.limit_in_bytes`, `memory.oom_control`). Created only where the supervisor
/// may (root, or systemd's `Delegate=yes`); otherwise it says so once and runs without.
final class CgroupManager: Sendable {  // immutable: every method works on paths it is given
    let version: CgroupLayout.Version
    /// Worker cgroups are created in this folder.
    let base: String
    /// Whether `base` was created by us (and is removed at shutdown).
    let ownsBase: Bool
    /// `npu-cgroup-exec`, which joins the cgroup and execs the worker.
    let trampoline: String

    init(version: CgroupLayout.Version, base: String, ownsBase: Bool, trampoline: String) {
        self.version = version
        self.base = base
        self.ownsBase = ownsBase
        self.trampoline = trampoline
    }

    /// One worker's cgroup for one process.
    struct WorkerCgroup {
        var path: String
        var oomKillsAtStart: Int
        var limit: Int?
    }

    /// Finds the memory hierarchy and prepares the folder for worker cgroups.
    /// - Parameter root: a prefix for every path read or written (tests use a fake tree; "" in production).
    /// - Returns: the manager, or why cgroups cannot be used.
    static func setUp(settings: CgroupSettings, root: String = "") -> Result<CgroupManager, SupervisorError> {
        guard settings.mode != .off else { return .failure(SupervisorError("disabled by configuration")) }
        guard let exeDir = ownExecutableDirectory(), access(exeDir + "/npu-cgroup-exec", X_OK) == 0 else {
            return .failure(SupervisorError("npu-cgroup-exec is not installed next to npu-supervisord"))
        }
        let trampoline = exeDir + "/npu-cgroup-exec"
        let procCgroup = (try? readFile(root + "/proc/self/cgroup")) ?? ""
        let mountinfo = (try? readFile(root + "/proc/self/mountinfo")) ?? ""

        if let parent = settings.parent {
            let dir = root + parent
            let version: CgroupLayout.Version = access(dir + "/cgroup.controllers", F_OK) == 0 ? .v2 : .v1
            if version == .v2 { enableMemoryController(in: dir) }
            guard access(dir, W_OK) == 0 else {
                return .failure(SupervisorError("the configured parent \(parent) is not writable (\(String(cString: strerror(errno))))"))
            }
            return .success(CgroupManager(version: version, base: dir, ownsBase: false, trampoline: trampoline))
        }
        // Prefer the unified hierarchy when it has the memory controller (pure v2 hosts), else v1's memory.
        if let v2 = CgroupLayout.unified(procSelfCgroup: procCgroup, mountinfo: mountinfo).map({ relocate($0, root) }),
           ((try? readFile(v2.mountPoint + "/cgroup.controllers")) ?? "").split(separator: " ")
               .contains(where: { $0.hasPrefix("memory") }) {
            // v2's rule: processes live only in leaves. Move ourselves into a leaf of our own cgroup (systemd's
            // Delegate=yes gives us that subtree), enable the memory controller for its children, and put
            // workers next to us.
            let own = v2.ownDirectory
            let leaf = own + "/supervisor"
            if mkdir(leaf, 0o755) != 0 && errno != EEXIST {
                return .failure(SupervisorError("cannot create \(leaf): \(String(cString: strerror(errno))) (run as root or under systemd with Delegate=yes)"))
            }
            guard writeFile(leaf + "/cgroup.procs", "\(getpid())\n") else {
                return .failure(SupervisorError("cannot move the supervisor into \(leaf): \(String(cString: strerror(errno)))"))
            }
            guard enableMemoryController(in: own) else {
                return .failure(SupervisorError("cannot enable the memory controller in \(own)/cgroup.subtree_control: "
                    + "\(String(cString: strerror(errno))) (other processes share this cgroup; set [cgroups] parent)"))
            }
            return .success(CgroupManager(version: .v2, base: own, ownsBase: false, trampoline: trampoline))
        }
        if let v1 = CgroupLayout.memoryV1(procSelfCgroup: procCgroup, mountinfo: mountinfo).map({ relocate($0, root) }) {
            // v1 has no leaf rule: a folder of our own under our cgroup, per supervisor instance. Folders of
            // instances that died without cleaning up (SIGKILL) are removed first, once empty.
            removeStaleInstances(in: v1.ownDirectory)
            let dir = v1.ownDirectory + "/npu-supervisor-\(getpid())"
            if mkdir(dir, 0o755) != 0 && errno != EEXIST {
                return .failure(SupervisorError("cannot create \(dir): \(String(cString: strerror(errno))) (not root?)"))
            }
            return .success(CgroupManager(version: .v1, base: dir, ownsBase: true, trampoline: trampoline))
        }
        return .failure(SupervisorError("no memory cgroup controller is mounted (neither v2 with memory nor v1 memory)"))
    }

    static func removeStaleInstances(in parent: String) {
        guard let dir = opendir(parent) else { return }
        var stale: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            guard name.hasPrefix("npu-supervisor-"), let pid = pid_t(name.dropFirst("npu-supervisor-".count)),
                  pid != getpid(), kill(pid, 0) != 0, errno == ESRCH else { continue }
            stale.append(parent + "/" + name)
        }
        closedir(dir)
        for path in stale {
            if let sub = opendir(path) {
                var workers: [String] = []
                while let entry = readdir(sub) {
                    let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                        String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
                    }
                    if name.hasPrefix("worker-") { workers.append(path + "/" + name) }
                }
                closedir(sub)
                for worker in workers { _ = rmdir(worker) }
            }
            _ = rmdir(path)
        }
    }

    static func relocate(_ location: CgroupLayout.Location, _ root: String) -> CgroupLayout.Location {
        var l = location
        l.mountPoint = root + l.mountPoint
        l.ownDirectory = root + l.ownDirectory
        return l
    }

    @discardableResult
    static func enableMemoryController(in dir: String) -> Bool {
        if ((try? readFile(dir + "/cgroup.subtree_control")) ?? "").contains("memory") { return true }
        return writeFile(dir + "/cgroup.subtree_control", "+memory\n")
    }

    /// Creates (or reuses) the device's cgroup and sets its limit. - Throws: ``SystemError``.
    func create(device: String, limit: Int?) throws -> WorkerCgroup {
        try create(path: base + "/worker-" + device, limit: limit)
    }

    /// The cgroup for the device's next process, made ahead of need (``StandbyWorker``): `worker-DEVICE` or
    /// `worker-DEVICE.next`, whichever the current process (in `current`) does not use.
    /// - Throws: ``SystemError``.
    func createNext(device: String, limit: Int?, current: String?) throws -> WorkerCgroup {
        let plain = base + "/worker-" + device
        return try create(path: current == plain ? plain + ".next" : plain, limit: limit)
    }

    private func create(path: String, limit: Int?) throws -> WorkerCgroup {
        if mkdir(path, 0o755) != 0 && errno != EEXIST { throw SystemError(call: "mkdir \(path)", errno: errno) }
        if let limit {
            let file = version == .v2 ? "/memory.max" : "/memory.limit_in_bytes"
            guard CgroupManager.writeFile(path + file, "\(limit)\n") else {
                throw SystemError(call: "write \(path + file)", errno: errno)
            }
        }
        // v2: an OOM kill takes the whole worker cgroup (its helpers too), never half a worker.
        if version == .v2 { _ = CgroupManager.writeFile(path + "/memory.oom.group", "1\n") }
        return WorkerCgroup(path: path, oomKillsAtStart: oomKills(path) ?? 0, limit: limit)
    }

    /// Opens `cgroup.procs` for the trampoline (fd 4 in the child). - Throws: ``SystemError``.
    func openProcs(_ cgroup: WorkerCgroup) throws -> CInt {
        let fd = open(cgroup.path + "/cgroup.procs", O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError(call: "open \(cgroup.path)/cgroup.procs", errno: errno) }
        return fd
    }

    func oomKills(_ path: String) -> Int? {
        let file = version == .v2 ? "/memory.events" : "/memory.oom_control"
        return (try? readFile(path + file)).flatMap(CgroupLayout.oomKills(in:))
    }

    func memoryUsage(_ path: String) -> Int? {
        let file = version == .v2 ? "/memory.current" : "/memory.usage_in_bytes"
        return (try? readFile(path + file)).flatMap { Int($0.trimmingWhitespace()) }
    }

    /// SIGKILLs everything left in the cgroup: helpers that escaped the process group (setsid) cannot escape
    /// their cgroup.
    func killAll(_ path: String) {
        if version == .v2 && CgroupManager.writeFile(path + "/cgroup.kill", "1\n") { return }
        let pids = ((try? readFile(path + "/cgroup.procs")) ?? "").split(separator: "\n").compactMap { pid_t($0) }
        for pid in pids { _ = kill(pid, SIGKILL) }
    }

    /// Removes a worker cgroup once empty (best effort: a busy one is reused by the next process).
    func remove(_ path: String) {
        _ = rmdir(path)
    }

    func tearDown(devices: [String]) {
        for device in devices {
            remove(base + "/worker-" + device)
            remove(base + "/worker-" + device + ".next")
        }
        if ownsBase { _ = rmdir(base) }
    }

    static func writeFile(_ path: String, _ text: String) -> Bool {
        let fd = open(path, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        let bytes = Array(text.utf8)
        return bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) } == bytes.count
    }
}

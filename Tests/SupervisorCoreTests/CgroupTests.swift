import Foundation
import SupervisorCore
@testable import SupervisorRuntime
import Testing

/// cgroup discovery from /proc text, and the v2 code path against a test tree (this machine's memory controller
/// is v1; production hosts are pure v2).
struct CgroupTests {
    static let hybridMountinfo = """
        31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
        35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
        41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
        """

    @Test func v1MemoryOnAHybridHost() {
        let location = CgroupLayout.memoryV1(procSelfCgroup: "4:memory:/process_api/abc\n0::/\n",
                                             mountinfo: Self.hybridMountinfo)
        #expect(location?.ownDirectory == "/sys/fs/cgroup/memory/process_api/abc")
        #expect(CgroupLayout.unified(procSelfCgroup: "4:memory:/process_api/abc\n0::/\n", mountinfo: Self.hybridMountinfo)?
            .ownDirectory == "/sys/fs/cgroup/unified")
    }

    @Test func pureV2UnderSystemd() {
        let mountinfo = "30 23 0:27 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n"
        let location = CgroupLayout.unified(procSelfCgroup: "0::/system.slice/npu-supervisord.service\n", mountinfo: mountinfo)
        #expect(location?.ownDirectory == "/sys/fs/cgroup/system.slice/npu-supervisord.service")
        #expect(CgroupLayout.memoryV1(procSelfCgroup: "0::/x\n", mountinfo: mountinfo) == nil)
    }

    @Test func oomCounters() {
        #expect(CgroupLayout.oomKills(in: "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n") == 2)
        #expect(CgroupLayout.oomKills(in: "oom_kill_disable 0\nunder_oom 0\noom_kill 7\n") == 7)
        #expect(CgroupLayout.oomKills(in: "nothing here") == nil)
    }

    @Test func v2CodePathsOnATestTree() throws {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("cgtree-\(UUID().uuidString.prefix(6))").path
        defer { try? FileManager.default.removeItem(atPath: root) }
        let service = root + "/sys/fs/cgroup/system.slice/npu.service"
        try FileManager.default.createDirectory(atPath: root + "/proc/self", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: service, withIntermediateDirectories: true)
        try "0::/system.slice/npu.service\n".write(toFile: root + "/proc/self/cgroup", atomically: true, encoding: .utf8)
        try "30 23 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n".write(toFile: root + "/proc/self/mountinfo",
                                                                           atomically: true, encoding: .utf8)
        try "cpu io memory pids\n".write(toFile: root + "/sys/fs/cgroup/cgroup.controllers", atomically: true, encoding: .utf8)
        try "".write(toFile: service + "/cgroup.subtree_control", atomically: true, encoding: .utf8)
        // In a real v2 tree the kernel creates these in every new folder; a test tree needs them pre-made.
        try FileManager.default.createDirectory(atPath: service + "/supervisor", withIntermediateDirectories: true)
        try "".write(toFile: service + "/supervisor/cgroup.procs", atomically: true, encoding: .utf8)

        let manager = try CgroupManager.setUp(settings: CgroupSettings(), root: root).get()
        #expect(manager.version == .v2)
        #expect(manager.base == service)
        #expect(try String(contentsOfFile: service + "/supervisor/cgroup.procs", encoding: .utf8) == "\(getpid())\n",
                "the supervisor moved itself into a leaf (v2: no processes in inner nodes)")
        #expect(try String(contentsOfFile: service + "/cgroup.subtree_control", encoding: .utf8) == "+memory\n")

        let worker = service + "/worker-3"
        try FileManager.default.createDirectory(atPath: worker, withIntermediateDirectories: true)
        for file in ["memory.max", "memory.oom.group", "cgroup.procs"] {
            try "".write(toFile: worker + "/" + file, atomically: true, encoding: .utf8)
        }
        try "oom 0\noom_kill 0\n".write(toFile: worker + "/memory.events", atomically: true, encoding: .utf8)
        let cgroup = try manager.create(device: "3", limit: 512 << 20)
        #expect(try String(contentsOfFile: worker + "/memory.max", encoding: .utf8) == "\(512 << 20)\n")
        #expect(try String(contentsOfFile: worker + "/memory.oom.group", encoding: .utf8) == "1\n")
        #expect(cgroup.oomKillsAtStart == 0)
        try "oom 1\noom_kill 1\n".write(toFile: worker + "/memory.events", atomically: true, encoding: .utf8)
        #expect(manager.oomKills(cgroup.path) == 1)
    }
}

import Glibc
import SupervisorCore

/// What a tensor-parallel group's start needs from the outside world: a free `MASTER_PORT` on the loopback
/// address and, where asked for, an HCCL rank table file. The decisions (when a group starts, which ranks, what
/// broke it) are the machine's (SupervisorMachine+Groups.swift).
struct GroupRuntime {
    var masterPort: Int?
    var rankTableFile: String?
    /// Ports of recent starts: a restarted group never gets the port its predecessor's sockets may still hold.
    var recentPorts: [Int] = []
}

extension Supervisor {
    /// Where a request pinned to each id goes (a device's worker; a group's leader for the group's id and each of
    /// its devices), rebuilt when the configuration changes: the hot path reads one dictionary entry.
    func rebuildPinTargets() {
        var targets: [String: Int] = [:]
        for (slot, worker) in machine.workers.enumerated() where !worker.isRetired {
            targets[worker.spec.device] = machine.routingSlot(slot)
        }
        for group in machine.groups { targets[group.spec.id] = group.leader }
        pinTargets = targets
    }

    func unknownPinMessage(_ device: String) -> String {
        "unknown device '\(device)'; configured: " + machine.devices.filter { !$0.isEmpty }.joined(separator: ", ")
            + (machine.groups.isEmpty ? "" : "; groups: " + machine.groups.map(\.spec.id).joined(separator: ", "))
    }

    /// A group starts: pick its `MASTER_PORT` and write its rank table before its ranks are spawned.
    func prepareGroup(_ g: Int) {
        let spec = machine.groups[g].spec
        let port = Self.freeLoopbackPort(avoiding: Set(groupRuntime[g].recentPorts))
        groupRuntime[g].masterPort = port
        if let port { groupRuntime[g].recentPorts = Array((groupRuntime[g].recentPorts + [port]).suffix(8)) }
        if port == nil {
            logger.error("group \(spec.id): no free loopback TCP port for MASTER_PORT (errno \(errno)); the ranks start without one")
        }
        guard spec.rankTable else { return }
        let directory = config.runDirectory + "/groups"
        let path = "\(directory)/\(spec.id).rank_table.json"
        do {
            try makeDirectories(for: path)
        } catch {
            logger.error("group \(spec.id): cannot create \(directory): \(error)")
        }
        if writeAtomically(spec.rankTableJSON(host: "127.0.0.1"), to: path) {
            groupRuntime[g].rankTableFile = path
        } else {
            groupRuntime[g].rankTableFile = nil
            logger.error("group \(spec.id): cannot write its rank table \(path); the ranks start without RANK_TABLE_FILE")
        }
    }

    /// The variables of a rank that change with each start of its group.
    func rankEnvironment(_ slot: Int) -> [String: String] {
        guard let g = machine.workers[slot].groupIndex, g < groupRuntime.count else { return [:] }
        var env: [String: String] = [:]
        if let port = groupRuntime[g].masterPort { env["MASTER_PORT"] = String(port) }
        if let file = groupRuntime[g].rankTableFile { env["RANK_TABLE_FILE"] = file }
        return env
    }

    /// A TCP port on 127.0.0.1 that nothing is bound to now (the kernel's choice for port 0, which also skips
    /// ports held by sockets in TIME_WAIT), other than those in `avoiding`.
    static func freeLoopbackPort(avoiding: Set<Int>) -> Int? {
        for _ in 0..<16 {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { return nil }
            defer { Glibc.close(fd) }
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_port = 0
            address.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
            let bound = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            guard bound == 0 else { return nil }
            var length = socklen_t(MemoryLayout<sockaddr_in>.size)
            let named = withUnsafeMutablePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.getsockname(fd, $0, &length) }
            }
            guard named == 0 else { return nil }
            let port = Int(UInt16(bigEndian: address.sin_port))
            if !avoiding.contains(port) { return port }
        }
        return nil
    }
}

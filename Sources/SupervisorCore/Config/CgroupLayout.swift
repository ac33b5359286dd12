/// Where the memory controller lives, read from `/proc/self/cgroup` and `/proc/self/mountinfo` (pure parsing;
/// the runtime reads the files). cgroup v2 hosts (production) use one unified hierarchy; v1 hosts (and hybrid
/// ones like these CI machines) have a separate `memory` hierarchy.
public enum CgroupLayout {
    public enum Version: String, Sendable, Hashable { case v1, v2 }

    /// A hierarchy and this process's folder in it.
    public struct Location: Sendable, Hashable {
        public var version: Version
        /// The mount point of the hierarchy (`/sys/fs/cgroup`, `/sys/fs/cgroup/memory`).
        public var mountPoint: String
        /// This process's own cgroup folder (mount point + its path in the hierarchy).
        public var ownDirectory: String
    }

    struct Mount {
        var root: String
        var mountPoint: String
        var fsType: String
        var superOptions: [String]
    }

    static func parseMountinfo(_ text: String) -> [Mount] {
        text.split(separator: "\n").compactMap { line in
            // id parent major:minor root mountpoint options [optional...] - fstype source superoptions
            let fields = line.split(separator: " ").map(String.init)
            guard let dash = fields.firstIndex(of: "-"), dash >= 5, fields.count > dash + 3 else { return nil }
            return Mount(root: unescape(fields[3]), mountPoint: unescape(fields[4]), fsType: fields[dash + 1],
                         superOptions: fields[dash + 3].split(separator: ",").map(String.init))
        }
    }

    /// mountinfo escapes space, tab, newline and backslash as octal.
    static func unescape(_ s: String) -> String {
        guard s.contains("\\") else { return s }
        var out = ""
        var chars = Array(s)[...]
        while let c = chars.first {
            chars = chars.dropFirst()
            if c == "\\", chars.count >= 3, let code = UInt8(String(chars.prefix(3)), radix: 8) {
                out.append(Character(UnicodeScalar(code)))
                chars = chars.dropFirst(3)
            } else {
                out.append(c)
            }
        }
        return out
    }

    /// `hierarchy-id:controllers:path` lines → controllers (or "" for v2) → path.
    static func parseProcCgroup(_ text: String) -> [(controllers: [String], path: String)] {
        text.split(separator: "\n").compactMap { line in
            let parts = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            guard parts.count == 3 else { return nil }
            return (parts[1].split(separator: ",").map(String.init), String(parts[2]))
        }
    }

    static func join(_ mountPoint: String, _ path: String, root: String) -> String {
        var relative = path
        if root != "/" && relative.hasPrefix(root) { relative = String(relative.dropFirst(root.count)) }
        if relative == "/" || relative.isEmpty { return mountPoint }
        return mountPoint + (relative.hasPrefix("/") ? "" : "/") + relative
    }

    /// The v1 memory hierarchy's location for this process, if mounted.
    public static func memoryV1(procSelfCgroup: String, mountinfo: String) -> Location? {
        guard let entry = parseProcCgroup(procSelfCgroup).first(where: { $0.controllers.contains("memory") }),
              let mount = parseMountinfo(mountinfo).first(where: { $0.fsType == "cgroup" && $0.superOptions.contains("memory") })
        else { return nil }
        return Location(version: .v1, mountPoint: mount.mountPoint,
                        ownDirectory: join(mount.mountPoint, entry.path, root: mount.root))
    }

    /// The unified (v2) hierarchy's location for this process, if mounted.
    public static func unified(procSelfCgroup: String, mountinfo: String) -> Location? {
        guard let entry = parseProcCgroup(procSelfCgroup).first(where: { $0.controllers.isEmpty || $0.controllers == [""] }),
              let mount = parseMountinfo(mountinfo).first(where: { $0.fsType == "cgroup2" })
        else { return nil }
        return Location(version: .v2, mountPoint: mount.mountPoint,
                        ownDirectory: join(mount.mountPoint, entry.path, root: mount.root))
    }

    /// The `oom_kill` counter from v2 `memory.events` or v1 `memory.oom_control` text.
    public static func oomKills(in text: String) -> Int? {
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: " ")
            if parts.count == 2, parts[0] == "oom_kill", let n = Int(parts[1]) { return n }
        }
        return nil
    }
}

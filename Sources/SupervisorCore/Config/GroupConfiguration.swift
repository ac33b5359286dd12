/// Tensor-parallel groups (`[[group]]`): one model replica over several devices, one process (rank) per device,
/// started, watched and restarted as one unit (docs/ARCHITECTURE.md, "Tensor-parallel groups").
public struct GroupSpec: Sendable, Hashable {
    /// Which devices a rank's pinning variable names.
    public enum VisibleDevices: String, Sendable, Hashable {
        /// Each rank sees only its own device (`ASCEND_RT_VISIBLE_DEVICES=2` for rank 2 on device 2): engines
        /// that address "device 0" in every rank.
        case own
        /// Every rank sees all the group's devices (`ASCEND_RT_VISIBLE_DEVICES=0,1,2,3`) and picks its own by
        /// `LOCAL_RANK`: engines that call `set_device(local_rank)`.
        case group
    }

    /// The group's id: `npu-supervisorctl restart tp0`, `NPU_GROUP`, status and metrics.
    public var id: String
    /// The devices in rank order: `devices[0]` is rank 0, the leader, which receives the group's requests.
    public var devices: [String]
    public var visibleDevices: VisibleDevices = .own
    /// Write an HCCL rank table file for each start and pass its path in `RANK_TABLE_FILE`.
    public var rankTable = false
    /// The group's restart policy (backoff, restart_limit/restart_window, start and stop timeouts): one
    /// replica is restarted as a unit, so its intensity is counted per group, not per rank.
    public var policy: WorkerStateMachine.Policy

    public init(id: String, devices: [String], visibleDevices: VisibleDevices = .own, rankTable: Bool = false,
                policy: WorkerStateMachine.Policy) {
        self.id = id
        self.devices = devices
        self.visibleDevices = visibleDevices
        self.rankTable = rankTable
        self.policy = policy
    }

    public var worldSize: Int { devices.count }

    /// The HCCL rank table (JSON) for one host: every device with its rank. `host` is the server id
    /// (the loopback address: a group never spans hosts). Device NIC addresses (`device_ip`) are left out: HCCL
    /// within one host does not need them.
    public func rankTableJSON(host: String) -> String {
        let entries = devices.enumerated().map { rank, device in
            "        {\"device_id\": \(HTTPFrontPolicy.jsonString(device)), \"rank_id\": \"\(rank)\"}"
        }
        return """
            {
              "version": "1.0",
              "server_count": "1",
              "server_list": [
                {
                  "server_id": \(HTTPFrontPolicy.jsonString(host)),
                  "device": [
            \(entries.joined(separator: ",\n"))
                  ]
                }
              ],
              "status": "completed"
            }

            """
    }
}

/// A rank's place in its group, carried by its ``WorkerSpec``.
public struct RankInfo: Sendable, Hashable {
    public var group: String
    public var rank: Int
    public var worldSize: Int
    /// Every device of the group in rank order (for `visible_devices = "group"`).
    public var groupDevices: [String]
    public var visibleDevices: GroupSpec.VisibleDevices

    public var isLeader: Bool { rank == 0 }

    /// The contract variables of a rank (docs/PROTOCOL.md, "Tensor-parallel groups"), except `MASTER_PORT` and
    /// `RANK_TABLE_FILE`, which change with every start of the group and are added by the runtime.
    public var environment: [String: String] {
        [
            "NPU_GROUP": group,
            "RANK": String(rank),
            "LOCAL_RANK": String(rank),
            "WORLD_SIZE": String(worldSize),
            "LOCAL_WORLD_SIZE": String(worldSize),
            "MASTER_ADDR": "127.0.0.1",
        ]
    }
}

/// The variable names of a table's `env` (validated later, with the rest of the worker keys).
func envNames(_ table: [String: ConfigValue]) -> [String] {
    guard case .table(let env)? = table["env"] else { return [] }
    return env.keys.sorted()
}

extension SupervisorConfiguration {
    /// Variables the supervisor owns for a rank; a config's `env` may not set them.
    static let rankVariables: Set<String> = ["NPU_GROUP", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                             "MASTER_ADDR", "MASTER_PORT", "RANK_TABLE_FILE"]

    /// Parses `[[group]]`: each table has an `id`, `devices` (rank order) and any `[[device]]` key, applied to
    /// every rank over `[defaults]`; `{device}`, `{rank}` and `{group}` are substituted in command and env.
    /// - Returns: the groups and one ``WorkerSpec`` per rank (in group order, then rank order).
    static func parseGroups(_ value: ConfigValue, defaults: [String: ConfigValue], baseDirectory: String,
                            deviceIds: inout Set<String>) throws -> ([GroupSpec], [WorkerSpec]) {
        guard case .array(let tables) = value else {
            throw ConfigError(key: "group", value: value.description, expected: "one or more [[group]] tables")
        }
        var groups: [GroupSpec] = []
        var ranks: [WorkerSpec] = []
        var groupIds: Set<String> = []
        for (index, item) in tables.enumerated() {
            let path = "group[\(index)]"
            guard case .table(var table) = item else {
                throw ConfigError(key: path, value: item.description, expected: "a table")
            }
            var r = TableReader(path: path, table: table)
            guard let id = try r.string("id"), !id.isEmpty else {
                throw ConfigError(key: "\(path).id", value: nil, expected: "missing: every group needs an id, e.g. \"tp0\"")
            }
            guard id.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" || $0 == "." }), id != "all" else {
                throw ConfigError(key: "\(path).id", value: "\"\(id)\"",
                                  expected: "letters, digits, '-', '_' or '.' only, and not \"all\"")
            }
            guard !deviceIds.contains(id), groupIds.insert(id).inserted else {
                throw ConfigError(key: "\(path).id", value: "\"\(id)\"",
                                  expected: "an id used by no other group or device (control verbs take either)")
            }
            guard let devices = try r.stringArray("devices"), !devices.isEmpty else {
                throw ConfigError(key: "\(path).devices", value: nil,
                                  expected: "missing: the group's device ids in rank order, e.g. [\"0\", \"1\", \"2\", \"3\"]")
            }
            var visible = GroupSpec.VisibleDevices.own
            if let name = try r.string("visible_devices") {
                guard let v = GroupSpec.VisibleDevices(rawValue: name) else {
                    throw ConfigError(key: "\(path).visible_devices", value: "\"\(name)\"",
                                      expected: "own (each rank its device) or group (every rank all the group's devices)")
                }
                visible = v
            }
            let rankTable = try r.bool("rank_table") ?? false
            for key in ["id", "devices", "visible_devices", "rank_table"] { table.removeValue(forKey: key) }
            for name in envNames(table) where rankVariables.contains(name) {
                throw ConfigError(key: "\(path).env.\(name)", value: nil,
                                  expected: "not settable: the supervisor sets it for each rank")
            }
            var specs: [WorkerSpec] = []
            for (rank, device) in devices.enumerated() {
                guard deviceIds.insert(device).inserted else {
                    throw ConfigError(key: "\(path).devices", value: "\"\(device)\"",
                                      expected: "devices that belong to no [[device]] and no other group "
                                          + "(a device belongs to at most one group)")
                }
                var rankTable = table
                rankTable["id"] = .string(device)
                var spec = try WorkerSpec(index: index, device: rankTable, defaults: defaults,
                                          baseDirectory: baseDirectory, path: path)
                let substitute = { (s: String) in s.replacing("{rank}", with: String(rank)).replacing("{group}", with: id) }
                spec.command = spec.command.map(substitute)
                spec.environment = spec.environment.mapValues(substitute)
                spec.rank = RankInfo(group: id, rank: rank, worldSize: devices.count, groupDevices: devices,
                                     visibleDevices: visible)
                // Only the leader gets requests, so only it is probed by inference.
                if rank > 0 { spec.inferenceProbe.enabled = false }
                specs.append(spec)
            }
            // The group's own lifecycle: the ranks' policy, with start_timeout as a backstop behind the ranks'
            // own (which fire first and name the rank that was late).
            var policy = specs[0].policy
            policy.startTimeout = policy.startTimeout + .seconds(1)
            groups.append(GroupSpec(id: id, devices: devices, visibleDevices: visible, rankTable: rankTable, policy: policy))
            ranks += specs
        }
        return (groups, ranks)
    }
}

/// The verbs of control.sock (docs/PROTOCOL.md, "control.sock"), with their wire names. What each verb does
/// to the workers is decided in ``SupervisorMachine/handle(_:now:)`` (event ``SupervisorMachine/Event/control(_:slots:requestedBy:)``);
/// the runtime only reads state for the read-only verbs.
public enum ControlVerb: String, Sendable, Hashable, CaseIterable {
    case status, health, pid, start, stop, restart, tail, shutdown, drain, undrain, reload, rollout

    /// Verbs that change something: allowed only for root, the daemon's user or `control_group`
    /// (`rollout status` only reads: see ``isMutating(action:)``).
    public var isMutating: Bool {
        switch self {
        case .start, .stop, .restart, .shutdown, .drain, .undrain, .reload, .rollout: true
        case .status, .health, .pid, .tail: false
        }
    }

    /// Whether this verb with this `action` changes something.
    public func isMutating(action: String?) -> Bool {
        self == .rollout ? (action ?? "status") != "status" : isMutating
    }

    /// The known verbs, for the error message of an unknown one.
    public static var known: String { allCases.map(\.rawValue).joined(separator: ", ") }
}

/// Picks workers by device id for a control verb: `all` (or nothing, where allowed) means every one.
public enum WorkerSelection {
    public struct Failure: Error, Sendable, Hashable, CustomStringConvertible {
        public var description: String
        public init(description: String) { self.description = description }
    }

    /// - Returns: slot indices in the order named.
    /// - Throws: ``Failure`` naming the unknown device and the configured ones.
    /// - Parameter groups: tensor-parallel groups by id with their ranks' slots: a group's id names every rank.
    public static func select(_ devices: [String]?, among configured: [String], groups: [(id: String, slots: [Int])] = [],
                              allowEmpty: Bool) throws(Failure) -> [Int] {
        let devices = devices ?? []
        if devices.isEmpty {
            guard allowEmpty else { throw Failure(description: "name one or more devices, or all") }
            return Array(configured.indices)
        }
        if devices == ["all"] { return Array(configured.indices) }
        var slots: [Int] = []
        for device in devices {
            if let group = groups.first(where: { $0.id == device }) {
                slots += group.slots
                continue
            }
            guard let slot = configured.firstIndex(of: device) else {
                throw Failure(description: "unknown device '\(device)'; configured: "
                    + configured.filter { !$0.isEmpty }.joined(separator: ", ")
                    + (groups.isEmpty ? "" : "; groups: " + groups.map(\.id).joined(separator: ", ")))
            }
            slots.append(slot)
        }
        return slots
    }
}

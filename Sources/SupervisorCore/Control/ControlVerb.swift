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
/// `configured` is ``SupervisorMachine/devices``: a slot removed by a reload is "" there, never selected.
public enum WorkerSelection {
    public struct Failure: Error, Sendable, Hashable, CustomStringConvertible {
        public var description: String
        public init(description: String) { self.description = description }
    }

    /// - Parameter removed: devices a reload removed (still winding down, or gone): named in their own message.
    /// - Returns: slot indices in the order named.
    /// - Throws: ``Failure`` naming the unknown device and the configured ones.
    /// - Parameter groups: tensor-parallel groups by id with their ranks' slots: a group's id names every rank.
    public static func select(_ devices: [String]?, among configured: [String], removed: [String] = [],
                              groups: [(id: String, slots: [Int])] = [],
                              allowEmpty: Bool) throws(Failure) -> [Int] {
        let devices = devices ?? []
        let live = configured.indices.filter { !configured[$0].isEmpty }
        if devices.isEmpty {
            guard allowEmpty else { throw Failure(description: "name one or more devices, or all") }
            return live
        }
        if devices == ["all"] { return live }
        var slots: [Int] = []
        for device in devices {
            if let group = groups.first(where: { $0.id == device }) {
                slots += group.slots
                continue
            }
            guard !device.isEmpty, let slot = configured.firstIndex(of: device) else {
                throw unknown(device, among: configured, removed: removed, groups: groups.map(\.id))
            }
            slots.append(slot)
        }
        return slots
    }

    /// The one device of `tail` (docs/PROTOCOL.md 7.1): exactly one id, not `all`, configured. The shape of the
    /// argument is checked before the id, so `tail 0 1` says "one device" whatever 0 and 1 are.
    public static func selectOne(_ devices: [String]?, verb: String, among configured: [String],
                                 removed: [String] = [], groups: [(id: String, slots: [Int])] = []) throws(Failure) -> Int {
        let devices = devices ?? []
        switch devices.count {
        case 0: throw Failure(description: "\(verb) takes exactly one device; none named")
        case 1 where devices[0] == "all": throw Failure(description: "\(verb) takes exactly one device, not all")
        // A group's id names its leader first.
        case 1: return try select(devices, among: configured, removed: removed, groups: groups, allowEmpty: false)[0]
        default:
            throw Failure(description: "\(verb) takes exactly one device; \(devices.count) named (\(devices.joined(separator: ", ")))")
        }
    }

    static func unknown(_ device: String, among configured: [String], removed: [String], groups: [String] = []) -> Failure {
        let names = configured.filter { !$0.isEmpty }.joined(separator: ", ")
            + (groups.isEmpty ? "" : "; groups: " + groups.joined(separator: ", "))
        if removed.contains(device) && !device.isEmpty {
            return Failure(description: "device '\(device)' was removed from the configuration by a reload; configured: \(names)")
        }
        return Failure(description: "unknown device '\(device)'; configured: \(names)")
    }
}

/// A parsed configuration document, independent of its file format (TOML today). The loader in the runtime turns
/// the file into this tree; ``SupervisorConfiguration/init(parsing:baseDirectory:)`` validates it with errors
/// that name the key, the value and what was expected.
public indirect enum ConfigValue: Sendable, Equatable, CustomStringConvertible {
    case string(String)
    case integer(Int)
    case double(Double)
    case bool(Bool)
    case array([ConfigValue])
    case table([String: ConfigValue])

    public var description: String {
        switch self {
        case .string(let s): "\"\(s)\""
        case .integer(let i): "\(i)"
        case .double(let d): "\(d)"
        case .bool(let b): "\(b)"
        case .array(let a): "[" + a.map(\.description).joined(separator: ", ") + "]"
        case .table(let t): "{" + t.keys.sorted().map { "\($0) = \(t[$0]!)" }.joined(separator: ", ") + "}"
        }
    }
}

/// A configuration that cannot be used. `key` is the dotted path (`device[2].max_inflight`).
public struct ConfigError: Error, Sendable, Equatable, CustomStringConvertible {
    public var key: String
    public var value: String?
    public var expected: String

    public init(key: String, value: String?, expected: String) {
        self.key = key
        self.value = value
        self.expected = expected
    }

    public var description: String {
        if let value {
            return "config key '\(key)': got \(value), expected \(expected)"
        }
        return "config key '\(key)': \(expected)"
    }
}

/// Reads typed values out of one table, remembering which keys were used so that unknown keys (typos) are
/// reported instead of silently ignored.
struct TableReader {
    let path: String
    let table: [String: ConfigValue]
    private(set) var used: Set<String> = []

    init(path: String, table: [String: ConfigValue]) {
        self.path = path
        self.table = table
    }

    func key(_ name: String) -> String { path.isEmpty ? name : "\(path).\(name)" }

    mutating func raw(_ name: String) -> ConfigValue? {
        used.insert(name)
        return table[name]
    }

    mutating func string(_ name: String) throws -> String? {
        guard let value = raw(name) else { return nil }
        switch value {
        case .string(let s): return s
        case .integer(let i): return String(i)
        default: throw ConfigError(key: key(name), value: value.description, expected: "a string")
        }
    }

    mutating func int(_ name: String, min: Int? = nil, max: Int? = nil) throws -> Int? {
        guard let value = raw(name) else { return nil }
        guard case .integer(let i) = value else {
            throw ConfigError(key: key(name), value: value.description, expected: "an integer")
        }
        if let min, i < min {
            throw ConfigError(key: key(name), value: value.description, expected: "an integer >= \(min)")
        }
        if let max, i > max {
            throw ConfigError(key: key(name), value: value.description, expected: "an integer <= \(max)")
        }
        return i
    }

    mutating func double(_ name: String, min: Double? = nil, max: Double? = nil) throws -> Double? {
        guard let value = raw(name) else { return nil }
        let d: Double
        switch value {
        case .integer(let i): d = Double(i)
        case .double(let x): d = x
        default: throw ConfigError(key: key(name), value: value.description, expected: "a number")
        }
        if let min, d < min { throw ConfigError(key: key(name), value: value.description, expected: "a number >= \(min)") }
        if let max, d > max { throw ConfigError(key: key(name), value: value.description, expected: "a number <= \(max)") }
        return d
    }

    mutating func bool(_ name: String) throws -> Bool? {
        guard let value = raw(name) else { return nil }
        guard case .bool(let b) = value else {
            throw ConfigError(key: key(name), value: value.description, expected: "true or false")
        }
        return b
    }

    /// A duration: a string with a unit (`500ms`, `15s`, `2m`, `1h`) or a number of seconds.
    mutating func duration(_ name: String, min: Duration = .zero) throws -> Duration? {
        guard let value = raw(name) else { return nil }
        let expected = "a duration such as \"500ms\", \"15s\", \"2m\" or a number of seconds"
        let parsed: Duration?
        switch value {
        // Negative ones pass here, for the `min` message below; too long ones do not (see maximumDurationSeconds).
        case .integer(let i): parsed = Double(i) <= maximumDurationSeconds ? .seconds(i) : nil
        case .double(let d): parsed = d.isFinite && abs(d) <= maximumDurationSeconds ? .nanoseconds(Int64(d * 1e9)) : nil
        case .string(let s): parsed = parseDuration(s)
        default: parsed = nil
        }
        guard let parsed else { throw ConfigError(key: key(name), value: value.description, expected: expected) }
        if parsed < min {
            throw ConfigError(key: key(name), value: value.description, expected: "at least \(min.configString)")
        }
        return parsed
    }

    /// A size: an integer number of bytes or a string with a unit (`16MiB`, `512M`, `2GiB`, `64KiB`).
    mutating func bytes(_ name: String, min: Int = 0) throws -> Int? {
        guard let value = raw(name) else { return nil }
        let parsed: Int?
        switch value {
        case .integer(let i): parsed = i
        case .string(let s): parsed = parseByteSize(s)
        default: parsed = nil
        }
        guard let parsed, parsed >= min else {
            throw ConfigError(key: key(name), value: value.description,
                              expected: "a size in bytes >= \(min) (an integer, or \"64KiB\", \"16MiB\", \"2GiB\")")
        }
        return parsed
    }

    mutating func stringArray(_ name: String) throws -> [String]? {
        guard let value = raw(name) else { return nil }
        guard case .array(let items) = value else {
            throw ConfigError(key: key(name), value: value.description, expected: "an array of strings")
        }
        return try items.enumerated().map { index, item in
            switch item {
            case .string(let s): return s
            case .integer(let i): return String(i)
            default: throw ConfigError(key: "\(key(name))[\(index)]", value: item.description, expected: "a string")
            }
        }
    }

    mutating func stringTable(_ name: String) throws -> [String: String]? {
        guard let value = raw(name) else { return nil }
        guard case .table(let t) = value else {
            throw ConfigError(key: key(name), value: value.description, expected: "a table of strings")
        }
        var out: [String: String] = [:]
        for (k, v) in t {
            switch v {
            case .string(let s): out[k] = s
            case .integer(let i): out[k] = String(i)
            case .double(let d): out[k] = String(d)
            case .bool(let b): out[k] = String(b)
            default: throw ConfigError(key: "\(key(name)).\(k)", value: v.description, expected: "a string")
            }
        }
        return out
    }

    mutating func table(_ name: String) throws -> [String: ConfigValue]? {
        guard let value = raw(name) else { return nil }
        guard case .table(let t) = value else {
            throw ConfigError(key: key(name), value: value.description, expected: "a table")
        }
        return t
    }

    /// Rejects keys nobody asked for: a typo must not pass silently.
    func rejectUnknownKeys() throws {
        for name in table.keys.sorted() where !used.contains(name) {
            throw ConfigError(key: key(name), value: nil, expected: "unknown key (misspelt?)")
        }
    }
}

/// The longest duration a configuration may give, in seconds (100 years): beyond any timeout's use, and small
/// enough that the instants computed from it (now + it, Int64 nanoseconds) cannot overflow. A longer one is a
/// `ConfigError` like any other bad value; converting it crashed the parser (`stop_timeout =
/// "1000000000000000000000000005s"`, found by fuzzing, issue 14), so `--check-config`, start-up and a reload.
public let maximumDurationSeconds: Double = 100 * 365 * 24 * 3600

/// Parses `500ms`, `15s`, `1.5s`, `2m`, `1h`, `250us`; nil beyond ``maximumDurationSeconds``.
public func parseDuration(_ text: String) -> Duration? {
    let s = text.trimmingWhitespace()
    let units: [(String, Double)] = [("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9), ("s", 1), ("m", 60), ("h", 3600)]
    for (suffix, scale) in units where s.hasSuffix(suffix) {
        guard let number = Double(s.dropLast(suffix.count)), number >= 0, number.isFinite,
              number * scale <= maximumDurationSeconds
        else { return nil }
        return .nanoseconds(Int64(number * scale * 1e9))
    }
    return nil
}

/// Parses `1024`, `64KiB`, `16MiB`, `2GiB`, `512M`, `1G`, `100K`.
public func parseByteSize(_ text: String) -> Int? {
    let s = text.trimmingWhitespace()
    let units: [(String, Int)] = [
        ("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30), ("TiB", 1 << 40),
        ("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40), ("B", 1),
    ]
    for (suffix, scale) in units where s.hasSuffix(suffix) {
        // Below 2^62: Int(Double) traps on what does not fit (the duration crash's twin), and sizes get added up.
        guard let number = Double(s.dropLast(suffix.count)), number >= 0, number * Double(scale) < 0x1p62
        else { return nil }
        return Int(number * Double(scale))
    }
    return Int(s)
}

extension String {
    /// The string without leading and trailing whitespace (no Foundation in the core).
    public func trimmingWhitespace() -> String {
        var s = Substring(self)
        while let c = s.first, c.isWhitespace { s = s.dropFirst() }
        while let c = s.last, c.isWhitespace { s = s.dropLast() }
        return String(s)
    }
}

internal import CTOMLParser

// TOML documents for the daemon's config loader and the CLI's socket discovery: toml++ (the CTOMLParser target)
// parses, and the result is copied into Swift values before toml++'s document is freed. Pure Swift over a C API:
// no Foundation, so the programs that read config files need not load it (with ICU, it was most of their resident
// memory).

/// A TOML value.
public indirect enum TOMLValue: Sendable, Equatable {
    case table(TOMLTable)
    case array([TOMLValue])
    case string(String)
    case integer(Int)
    case double(Double)
    case bool(Bool)
    /// A local date, as its TOML text (`1979-05-27`).
    case date(String)
    /// A local time, as its TOML text (`07:32:00`).
    case time(String)
    /// A date with a time, and an offset if it had one, as its TOML text (`1979-05-27T07:32:00Z`).
    case dateTime(String)

    /// The kind of value, for error messages ("found an integer").
    public var typeName: String {
        switch self {
        case .table: "table"
        case .array: "array"
        case .string: "string"
        case .integer: "integer"
        case .double: "floating-point number"
        case .bool: "bool"
        case .date: "date"
        case .time: "time"
        case .dateTime: "date-time"
        }
    }
}

/// A TOML table: its keys with their values, in toml++'s key order.
public struct TOMLTable: Sendable, Equatable, Sequence {
    public struct Entry: Sendable, Equatable {
        public var key: String
        public var value: TOMLValue

        public init(key: String, value: TOMLValue) {
            self.key = key
            self.value = value
        }
    }

    public var entries: [Entry]

    public init(entries: [Entry] = []) {
        self.entries = entries
    }

    /// The value at `key` (keys are unique in a parsed table).
    public subscript(key: String) -> TOMLValue? {
        entries.first { $0.key == key }?.value
    }

    public var count: Int { entries.count }

    public func makeIterator() -> IndexingIterator<[Entry]> { entries.makeIterator() }
}

/// Text that is not valid TOML: toml++'s description of the first error and where it starts (1-based).
public struct TOMLSyntaxError: Error, Sendable, Equatable, CustomStringConvertible {
    public var description: String
    public var line: Int
    public var column: Int

    public init(description: String, line: Int, column: Int) {
        self.description = description
        self.line = line
        self.column = column
    }
}

private let noBytes: StaticString = ""

extension TOMLTable {
    /// Parses a whole TOML document.
    ///
    /// toml++ `assert`s on a few malformed inputs instead of reporting them: check the text with
    /// `tomlHeaderDefect(in:)` (SupervisorPaths) first.
    /// - Throws: ``TOMLSyntaxError``.
    public init(parsing text: String) throws(TOMLSyntaxError) {
        var text = text
        var result = ctoml_result()
        let document = text.withUTF8 { bytes in
            // toml++ wants a pointer even for no bytes.
            ctoml_parse(bytes.baseAddress ?? noBytes.utf8Start, bytes.count, &result)
        }
        defer { ctoml_free(document) }
        if let error = result.error {
            throw TOMLSyntaxError(description: String(cString: error), line: Int(result.line),
                                  column: Int(result.column))
        }
        let entries = UnsafeBufferPointer(start: result.entries, count: result.entry_count)
        var index = 0
        guard !entries.isEmpty, case .table(let root) = Self.value(entries, &index) else {
            self.init()
            return
        }
        self = root
    }

    /// The value at `entries[index]` with its descendants; `index` ends past them.
    private static func value(_ entries: UnsafeBufferPointer<ctoml_entry>, _ index: inout Int) -> TOMLValue {
        let entry = entries[index]
        index += 1
        switch entry.kind {
        case CTOML_TABLE:
            var children: [Entry] = []
            children.reserveCapacity(entry.count)
            for _ in 0..<entry.count {
                let key = string(entries[index].key, entries[index].key_length)
                children.append(Entry(key: key, value: value(entries, &index)))
            }
            return .table(TOMLTable(entries: children))
        case CTOML_ARRAY:
            var children: [TOMLValue] = []
            children.reserveCapacity(entry.count)
            for _ in 0..<entry.count { children.append(value(entries, &index)) }
            return .array(children)
        case CTOML_INTEGER: return .integer(Int(entry.integer))
        case CTOML_FLOAT: return .double(entry.floating)
        case CTOML_BOOLEAN: return .bool(entry.boolean != 0)
        case CTOML_DATE: return .date(string(entry.text, entry.text_length))
        case CTOML_TIME: return .time(string(entry.text, entry.text_length))
        case CTOML_DATE_TIME: return .dateTime(string(entry.text, entry.text_length))
        default: return .string(string(entry.text, entry.text_length))
        }
    }

    private static func string(_ pointer: UnsafePointer<CChar>?, _ count: Int) -> String {
        String(decoding: UnsafeRawBufferPointer(start: pointer, count: pointer == nil ? 0 : count), as: UTF8.self)
    }
}

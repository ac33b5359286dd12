/// JSON for ``JSONCoding``, without Foundation: a Codable encoder and decoder over a small document tree, an
/// RFC 8259 parser and a writer.
///
/// Why not Foundation's `JSONEncoder`: it was the only reason the daemon mapped `libFoundationEssentials.so`
/// (3.1 MB of its idle RSS; BENCHMARKS.md "Idle RSS without Foundation"). The output is the one Foundation's
/// encoder gave with `[.sortedKeys, .withoutEscapingSlashes]` (and `.prettyPrinted`), byte for byte:
/// `JSONTests` compares the two on every payload type of the protocol. Inference payloads never pass through
/// here: the supervisor forwards them as opaque bytes.
///
/// Decoding is strict RFC 8259 (no trailing commas, no comments, no NaN): text is UTF-8, a string's escapes
/// must be whole (a lone UTF-16 surrogate is an error), nesting deeper than ``JSONParser/maximumDepth`` is an
/// error rather than a stack overflow, and an integer must fit its Swift type exactly (`1.0` decodes as an
/// `Int`, `1.5` and `300` as a `UInt8` do not). Of duplicate keys in an object the first counts, as Foundation's.

// MARK: - The document

/// A parsed JSON value. Numbers keep their text: each Swift type converts it exactly or refuses it.
enum JSONValue: Equatable, Sendable {
    case null
    case bool(Bool)
    case number(String)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    /// For error messages: "a string", "an object", ...
    var kindDescription: String {
        switch self {
        case .null: return "null"
        case .bool: return "a boolean"
        case .number: return "a number"
        case .string: return "a string"
        case .array: return "an array"
        case .object: return "an object"
        }
    }
}

/// Why a text is not JSON, and where (a byte offset from the start).
struct JSONSyntaxError: Error, CustomStringConvertible {
    let reason: String
    let offset: Int
    var description: String { "\(reason) at byte \(offset)" }
}

// MARK: - Parsing

/// An RFC 8259 parser over UTF-8 bytes.
struct JSONParser {
    /// Arrays and objects nested deeper than this are refused (Foundation's limit too): the parser recurses.
    static let maximumDepth = 512

    private let bytes: UnsafeRawBufferPointer
    private var index = 0
    private var depth = 0

    private init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

    /// Parses one JSON text: a value with only whitespace around it.
    static func parse(_ bytes: UnsafeRawBufferPointer) throws(JSONSyntaxError) -> JSONValue {
        var parser = JSONParser(bytes)
        // A UTF-8 byte-order mark in front is skipped (RFC 8259 allows it; Foundation does the same).
        if bytes.count >= 3 && bytes[0] == 0xEF && bytes[1] == 0xBB && bytes[2] == 0xBF { parser.index = 3 }
        parser.skipWhitespace()
        let value = try parser.parseValue()
        parser.skipWhitespace()
        guard parser.index == bytes.count else { throw parser.error("unexpected text after the value") }
        return value
    }

    private func error(_ reason: String) -> JSONSyntaxError { JSONSyntaxError(reason: reason, offset: index) }

    private var current: UInt8? { index < bytes.count ? bytes[index] : nil }

    private mutating func skipWhitespace() {
        while index < bytes.count {
            switch bytes[index] {
            case UInt8(ascii: " "), UInt8(ascii: "\t"), UInt8(ascii: "\n"), UInt8(ascii: "\r"): index += 1
            default: return
            }
        }
    }

    private func describe(_ byte: UInt8?) -> String {
        guard let byte else { return "end of input" }
        if byte >= 0x21 && byte < 0x7F { return "'\(Character(Unicode.Scalar(byte)))'" }
        return "byte 0x" + String(byte, radix: 16)
    }

    private mutating func parseValue() throws(JSONSyntaxError) -> JSONValue {
        guard let byte = current else { throw error("expected a value, found end of input") }
        switch byte {
        case UInt8(ascii: "{"): return try parseObject()
        case UInt8(ascii: "["): return try parseArray()
        case UInt8(ascii: "\""): return .string(try parseString())
        case UInt8(ascii: "t"): try literal("true"); return .bool(true)
        case UInt8(ascii: "f"): try literal("false"); return .bool(false)
        case UInt8(ascii: "n"): try literal("null"); return .null
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return .number(try parseNumber())
        default: throw error("expected a value, found \(describe(byte))")
        }
    }

    private mutating func literal(_ word: StaticString) throws(JSONSyntaxError) {
        let start = index
        for i in 0..<word.utf8CodeUnitCount {
            guard index < bytes.count, bytes[index] == word.utf8Start[i] else {
                index = start
                throw error("expected a value, found \(describe(bytes[start]))")
            }
            index += 1
        }
    }

    private mutating func enter() throws(JSONSyntaxError) {
        depth += 1
        guard depth <= Self.maximumDepth else { throw error("nested deeper than \(Self.maximumDepth) levels") }
    }

    private mutating func parseArray() throws(JSONSyntaxError) -> JSONValue {
        try enter()
        index += 1  // [
        var elements: [JSONValue] = []
        skipWhitespace()
        if current == UInt8(ascii: "]") {
            index += 1
            depth -= 1
            return .array(elements)
        }
        while true {
            skipWhitespace()
            elements.append(try parseValue())
            skipWhitespace()
            switch current {
            case UInt8(ascii: ","): index += 1
            case UInt8(ascii: "]"):
                index += 1
                depth -= 1
                return .array(elements)
            case let other: throw error("expected ',' or ']' in an array, found \(describe(other))")
            }
        }
    }

    private mutating func parseObject() throws(JSONSyntaxError) -> JSONValue {
        try enter()
        index += 1  // {
        var members: [String: JSONValue] = [:]
        skipWhitespace()
        if current == UInt8(ascii: "}") {
            index += 1
            depth -= 1
            return .object(members)
        }
        while true {
            skipWhitespace()
            guard current == UInt8(ascii: "\"") else {
                throw error("expected a string key in an object, found \(describe(current))")
            }
            let key = try parseString()
            skipWhitespace()
            guard current == UInt8(ascii: ":") else { throw error("expected ':' after a key, found \(describe(current))") }
            index += 1
            skipWhitespace()
            let value = try parseValue()
            if members[key] == nil { members[key] = value }  // the first of duplicate keys counts
            skipWhitespace()
            switch current {
            case UInt8(ascii: ","): index += 1
            case UInt8(ascii: "}"):
                index += 1
                depth -= 1
                return .object(members)
            case let other: throw error("expected ',' or '}' in an object, found \(describe(other))")
            }
        }
    }

    private mutating func parseNumber() throws(JSONSyntaxError) -> String {
        let start = index
        func digits(_ parser: inout JSONParser) -> Int {
            let from = parser.index
            while let byte = parser.current, byte >= UInt8(ascii: "0"), byte <= UInt8(ascii: "9") { parser.index += 1 }
            return parser.index - from
        }
        if current == UInt8(ascii: "-") { index += 1 }
        if current == UInt8(ascii: "0") {
            index += 1
            if let next = current, next >= UInt8(ascii: "0"), next <= UInt8(ascii: "9") {
                throw error("a number has a leading zero")
            }
        } else if digits(&self) == 0 {
            throw error("expected a digit, found \(describe(current))")
        }
        if current == UInt8(ascii: ".") {
            index += 1
            guard digits(&self) > 0 else { throw error("expected a digit after '.', found \(describe(current))") }
        }
        if current == UInt8(ascii: "e") || current == UInt8(ascii: "E") {
            index += 1
            if current == UInt8(ascii: "+") || current == UInt8(ascii: "-") { index += 1 }
            guard digits(&self) > 0 else { throw error("expected a digit in an exponent, found \(describe(current))") }
        }
        return String(decoding: UnsafeRawBufferPointer(rebasing: bytes[start..<index]), as: UTF8.self)
    }

    private mutating func parseString() throws(JSONSyntaxError) -> String {
        index += 1  // "
        var start = index
        // Plain runs are copied as they are; escapes are decoded into `scalars` between them.
        var result = String()
        while true {
            guard index < bytes.count else { throw error("a string is not terminated") }
            let byte = bytes[index]
            if byte == UInt8(ascii: "\"") {
                try appendRun(from: start, to: &result)
                index += 1
                return result
            }
            if byte < 0x20 { throw error("a control character (0x\(String(byte, radix: 16))) inside a string must be escaped") }
            if byte == UInt8(ascii: "\\") {
                try appendRun(from: start, to: &result)
                index += 1
                result.unicodeScalars.append(try parseEscape())
                start = index
                continue
            }
            index += 1
        }
    }

    /// Appends the raw bytes `start..<index` (no escapes in them) to `result`, refusing invalid UTF-8.
    private func appendRun(from start: Int, to result: inout String) throws(JSONSyntaxError) {
        guard start < index else { return }
        guard let run = String(validating: UnsafeRawBufferPointer(rebasing: bytes[start..<index]), as: UTF8.self) else {
            throw JSONSyntaxError(reason: "a string is not valid UTF-8", offset: start)
        }
        result += run
    }

    private mutating func parseEscape() throws(JSONSyntaxError) -> Unicode.Scalar {
        guard let byte = current else { throw error("a string is not terminated") }
        index += 1
        switch byte {
        case UInt8(ascii: "\""): return "\""
        case UInt8(ascii: "\\"): return "\\"
        case UInt8(ascii: "/"): return "/"
        case UInt8(ascii: "b"): return "\u{08}"
        case UInt8(ascii: "f"): return "\u{0C}"
        case UInt8(ascii: "n"): return "\n"
        case UInt8(ascii: "r"): return "\r"
        case UInt8(ascii: "t"): return "\t"
        case UInt8(ascii: "u"):
            let unit = try hex4()
            if UTF16.isLeadSurrogate(unit) {
                guard current == UInt8(ascii: "\\"), index + 1 < bytes.count, bytes[index + 1] == UInt8(ascii: "u") else {
                    throw error("a \\u escape of a lead surrogate is not followed by its trail surrogate")
                }
                index += 2
                let trail = try hex4()
                guard UTF16.isTrailSurrogate(trail) else {
                    throw error("a \\u escape of a lead surrogate is not followed by its trail surrogate")
                }
                let value = 0x10000 + ((UInt32(unit) - 0xD800) << 10) + (UInt32(trail) - 0xDC00)
                return Unicode.Scalar(value)!  // in 0x10000...0x10FFFF by construction
            }
            guard let scalar = Unicode.Scalar(UInt32(unit)) else {
                throw error("a \\u escape of a lone trail surrogate")
            }
            return scalar
        default:
            index -= 1
            throw error("unknown escape '\\\(describe(byte))' in a string")
        }
    }

    private mutating func hex4() throws(JSONSyntaxError) -> UInt16 {
        var value: UInt16 = 0
        for _ in 0..<4 {
            guard let byte = current else { throw error("a \\u escape needs four hex digits") }
            let digit: UInt8
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = byte - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = byte - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = byte - UInt8(ascii: "A") + 10
            default: throw error("a \\u escape needs four hex digits, found \(describe(byte))")
            }
            value = value << 4 | UInt16(digit)
            index += 1
        }
        return value
    }
}

// MARK: - Writing

/// A node of the document an encoder builds. A reference, so that nested containers and super-encoders write
/// into their parent's slot in place.
final class JSONNode {
    enum Kind {
        /// Nothing encoded into it (yet): written as `{}`, as Foundation does for a value that encoded nothing.
        case empty
        case null
        case bool(Bool)
        case number(String)
        case string(String)
        case array
        case object
    }
    var kind: Kind
    var elements: [JSONNode] = []
    var members: [String: JSONNode] = [:]

    init(_ kind: Kind = .empty) { self.kind = kind }

    func becomeObject() {
        if case .object = kind { return }
        kind = .object
        members = [:]
    }

    func becomeArray() {
        if case .array = kind { return }
        kind = .array
        elements = []
    }
}

/// Writes a node tree: keys sorted by their UTF-8 bytes, `/` not escaped, pretty as Foundation prints it
/// (two spaces, `"key" : value`, an empty container as an opening line, an empty line and the closing one).
struct JSONWriter {
    var output: [UInt8] = []
    let pretty: Bool

    init(pretty: Bool) {
        self.pretty = pretty
        output.reserveCapacity(256)
    }

    mutating func write(_ node: JSONNode, level: Int = 0) {
        switch node.kind {
        case .empty: writeContainer(open: "{", close: "}", count: 0, level: level) { _, _ in }
        case .null: append("null")
        case .bool(let value): append(value ? "true" : "false")
        case .number(let text): output.append(contentsOf: text.utf8)
        case .string(let text): writeString(text)
        case .array:
            let elements = node.elements
            writeContainer(open: "[", close: "]", count: elements.count, level: level) { writer, i in
                writer.write(elements[i], level: level + 1)
            }
        case .object:
            let members = node.members.sorted { $0.key.utf8.lexicographicallyPrecedes($1.key.utf8) }
            writeContainer(open: "{", close: "}", count: members.count, level: level) { writer, i in
                writer.writeString(members[i].key)
                writer.append(writer.pretty ? " : " : ":")
                writer.write(members[i].value, level: level + 1)
            }
        }
    }

    private mutating func writeContainer(open: StaticString, close: StaticString, count: Int, level: Int,
                                         element: (inout JSONWriter, Int) -> Void) {
        append(open)
        if pretty {
            append("\n")
            for i in 0..<count {
                indent(level + 1)
                element(&self, i)
                append(i + 1 < count ? ",\n" : "\n")
            }
            if count == 0 { append("\n") }
            indent(level)
        } else {
            for i in 0..<count {
                if i > 0 { output.append(UInt8(ascii: ",")) }
                element(&self, i)
            }
        }
        append(close)
    }

    private mutating func indent(_ level: Int) {
        output.append(contentsOf: repeatElement(UInt8(ascii: " "), count: 2 * level))
    }

    private mutating func append(_ text: StaticString) {
        output.append(contentsOf: UnsafeBufferPointer(start: text.utf8Start, count: text.utf8CodeUnitCount))
    }

    mutating func writeString(_ text: String) {
        output.append(UInt8(ascii: "\""))
        for byte in text.utf8 {
            switch byte {
            case UInt8(ascii: "\""): append("\\\"")
            case UInt8(ascii: "\\"): append("\\\\")
            case 0x08: append("\\b")
            case 0x0C: append("\\f")
            case UInt8(ascii: "\n"): append("\\n")
            case UInt8(ascii: "\r"): append("\\r")
            case UInt8(ascii: "\t"): append("\\t")
            case 0..<0x20:
                append("\\u00")
                output.append(Self.hexDigit(byte >> 4))
                output.append(Self.hexDigit(byte & 0xF))
            default: output.append(byte)
            }
        }
        output.append(UInt8(ascii: "\""))
    }

    /// Lower-case, as Foundation writes `\u001a`.
    private static func hexDigit(_ value: UInt8) -> UInt8 {
        value < 10 ? UInt8(ascii: "0") + value : UInt8(ascii: "a") + value - 10
    }
}

// MARK: - Encoding

/// A Codable encoder into a ``JSONNode``.
struct JSONTreeEncoder: Encoder {
    let node: JSONNode
    let codingPath: [any CodingKey]
    var userInfo: [CodingUserInfoKey: Any] { [:] }

    /// The document of `value`.
    static func encode<T: Encodable>(_ value: T) throws -> JSONNode {
        let node = JSONNode()
        try value.encode(to: JSONTreeEncoder(node: node, codingPath: []))
        if case .empty = node.kind {
            throw EncodingError.invalidValue(value, EncodingError.Context(
                codingPath: [], debugDescription: "Top-level \(T.self) did not encode any values."))
        }
        return node
    }

    func container<Key: CodingKey>(keyedBy type: Key.Type) -> KeyedEncodingContainer<Key> {
        node.becomeObject()
        return KeyedEncodingContainer(KeyedContainer<Key>(node: node, codingPath: codingPath))
    }

    func unkeyedContainer() -> any UnkeyedEncodingContainer {
        node.becomeArray()
        return UnkeyedContainer(node: node, codingPath: codingPath)
    }

    func singleValueContainer() -> any SingleValueEncodingContainer {
        SingleValueContainer(node: node, codingPath: codingPath)
    }

    /// The node of one value (a key's or an element's).
    static func box<T: Encodable>(_ value: T, at path: [any CodingKey]) throws -> JSONNode {
        switch value {
        // The common leaves without an encoder of their own.
        case let string as String: return JSONNode(.string(string))
        case let int as Int: return JSONNode(.number(String(int)))
        case let bool as Bool: return JSONNode(.bool(bool))
        default:
            let node = JSONNode()
            try value.encode(to: JSONTreeEncoder(node: node, codingPath: path))
            return node
        }
    }

    static func number<F: BinaryFloatingPoint & LosslessStringConvertible>(_ value: F, at path: [any CodingKey])
        throws -> JSONNode {
        guard value.isFinite else {
            throw EncodingError.invalidValue(value, EncodingError.Context(
                codingPath: path, debugDescription: "Unable to encode \(F.self).\(value) directly in JSON."))
        }
        var text = value.description
        if text.hasSuffix(".0") { text.removeLast(2) }  // 1.0 is written 1, as Foundation does
        return JSONNode(.number(text))
    }

    struct KeyedContainer<Key: CodingKey>: KeyedEncodingContainerProtocol {
        let node: JSONNode
        let codingPath: [any CodingKey]

        private func set(_ child: JSONNode, _ key: Key) { node.members[key.stringValue] = child }

        mutating func encodeNil(forKey key: Key) { set(JSONNode(.null), key) }
        mutating func encode(_ value: Bool, forKey key: Key) { set(JSONNode(.bool(value)), key) }
        mutating func encode(_ value: String, forKey key: Key) { set(JSONNode(.string(value)), key) }
        mutating func encode(_ value: Double, forKey key: Key) throws {
            set(try JSONTreeEncoder.number(value, at: codingPath + [key]), key)
        }
        mutating func encode(_ value: Float, forKey key: Key) throws {
            set(try JSONTreeEncoder.number(value, at: codingPath + [key]), key)
        }
        mutating func encode(_ value: Int, forKey key: Key) { set(JSONNode(.number(String(value))), key) }
        mutating func encode(_ value: Int8, forKey key: Key) { set(JSONNode(.number(String(value))), key) }
        mutating func encode(_ value: Int16, forKey key: Key) { set(JSONNode(.number(String(value))), key) }
        mutating func encode(_ value: Int32, forKey key: Key) { set(JSONNode(.number(String(value))), key) }
        mutating func encode(_ value: Int64, forKey key: Key) { set(JSONNode(.number(String(value))), key) }
        mutating func encode(_ value: UInt, forKey key: Key) { set(JSONNode(.number(String(value))), key) }
        mutating func encode(_ value: UInt8, forKey key: Key) { set(JSONNode(.number(String(value))), key) }
        mutating func encode(_ value: UInt16, forKey key: Key) { set(JSONNode(.number(String(value))), key) }
        mutating func encode(_ value: UInt32, forKey key: Key) { set(JSONNode(.number(String(value))), key) }
        mutating func encode(_ value: UInt64, forKey key: Key) { set(JSONNode(.number(String(value))), key) }
        mutating func encode<T: Encodable>(_ value: T, forKey key: Key) throws {
            set(try JSONTreeEncoder.box(value, at: codingPath + [key]), key)
        }

        /// A container asked for twice under one key is the same one (what was written into it stays).
        mutating func nestedContainer<NestedKey: CodingKey>(keyedBy keyType: NestedKey.Type, forKey key: Key)
            -> KeyedEncodingContainer<NestedKey> {
            let child = child(key) { $0.becomeObject() }
            return KeyedEncodingContainer(KeyedContainer<NestedKey>(node: child, codingPath: codingPath + [key]))
        }

        mutating func nestedUnkeyedContainer(forKey key: Key) -> any UnkeyedEncodingContainer {
            UnkeyedContainer(node: child(key) { $0.becomeArray() }, codingPath: codingPath + [key])
        }

        private func child(_ key: Key, _ become: (JSONNode) -> Void) -> JSONNode {
            let child = node.members[key.stringValue] ?? JSONNode()
            become(child)
            set(child, key)
            return child
        }

        mutating func superEncoder() -> any Encoder { superEncoder(named: JSONKey.super) }
        mutating func superEncoder(forKey key: Key) -> any Encoder { superEncoder(named: key) }

        private func superEncoder(named key: any CodingKey) -> any Encoder {
            let child = JSONNode()
            node.members[key.stringValue] = child
            return JSONTreeEncoder(node: child, codingPath: codingPath + [key])
        }
    }

    struct UnkeyedContainer: UnkeyedEncodingContainer {
        let node: JSONNode
        let codingPath: [any CodingKey]
        var count: Int { node.elements.count }

        private var nextKey: any CodingKey { JSONKey(intValue: node.elements.count) }

        mutating func encodeNil() { node.elements.append(JSONNode(.null)) }
        mutating func encode(_ value: Bool) { node.elements.append(JSONNode(.bool(value))) }
        mutating func encode(_ value: String) { node.elements.append(JSONNode(.string(value))) }
        mutating func encode(_ value: Double) throws {
            node.elements.append(try JSONTreeEncoder.number(value, at: codingPath + [nextKey]))
        }
        mutating func encode(_ value: Float) throws {
            node.elements.append(try JSONTreeEncoder.number(value, at: codingPath + [nextKey]))
        }
        mutating func encode(_ value: Int) { node.elements.append(JSONNode(.number(String(value)))) }
        mutating func encode(_ value: Int8) { node.elements.append(JSONNode(.number(String(value)))) }
        mutating func encode(_ value: Int16) { node.elements.append(JSONNode(.number(String(value)))) }
        mutating func encode(_ value: Int32) { node.elements.append(JSONNode(.number(String(value)))) }
        mutating func encode(_ value: Int64) { node.elements.append(JSONNode(.number(String(value)))) }
        mutating func encode(_ value: UInt) { node.elements.append(JSONNode(.number(String(value)))) }
        mutating func encode(_ value: UInt8) { node.elements.append(JSONNode(.number(String(value)))) }
        mutating func encode(_ value: UInt16) { node.elements.append(JSONNode(.number(String(value)))) }
        mutating func encode(_ value: UInt32) { node.elements.append(JSONNode(.number(String(value)))) }
        mutating func encode(_ value: UInt64) { node.elements.append(JSONNode(.number(String(value)))) }
        mutating func encode<T: Encodable>(_ value: T) throws {
            node.elements.append(try JSONTreeEncoder.box(value, at: codingPath + [nextKey]))
        }

        mutating func nestedContainer<NestedKey: CodingKey>(keyedBy keyType: NestedKey.Type)
            -> KeyedEncodingContainer<NestedKey> {
            let path = codingPath + [nextKey]
            let child = JSONNode(.object)
            node.elements.append(child)
            return KeyedEncodingContainer(KeyedContainer<NestedKey>(node: child, codingPath: path))
        }

        mutating func nestedUnkeyedContainer() -> any UnkeyedEncodingContainer {
            let path = codingPath + [nextKey]
            let child = JSONNode(.array)
            node.elements.append(child)
            return UnkeyedContainer(node: child, codingPath: path)
        }

        mutating func superEncoder() -> any Encoder {
            let path = codingPath + [nextKey]
            let child = JSONNode()
            node.elements.append(child)
            return JSONTreeEncoder(node: child, codingPath: path)
        }
    }

    struct SingleValueContainer: SingleValueEncodingContainer {
        let node: JSONNode
        let codingPath: [any CodingKey]

        private func set(_ kind: JSONNode.Kind) { node.kind = kind }

        mutating func encodeNil() { set(.null) }
        mutating func encode(_ value: Bool) { set(.bool(value)) }
        mutating func encode(_ value: String) { set(.string(value)) }
        mutating func encode(_ value: Double) throws { set(try JSONTreeEncoder.number(value, at: codingPath).kind) }
        mutating func encode(_ value: Float) throws { set(try JSONTreeEncoder.number(value, at: codingPath).kind) }
        mutating func encode(_ value: Int) { set(.number(String(value))) }
        mutating func encode(_ value: Int8) { set(.number(String(value))) }
        mutating func encode(_ value: Int16) { set(.number(String(value))) }
        mutating func encode(_ value: Int32) { set(.number(String(value))) }
        mutating func encode(_ value: Int64) { set(.number(String(value))) }
        mutating func encode(_ value: UInt) { set(.number(String(value))) }
        mutating func encode(_ value: UInt8) { set(.number(String(value))) }
        mutating func encode(_ value: UInt16) { set(.number(String(value))) }
        mutating func encode(_ value: UInt32) { set(.number(String(value))) }
        mutating func encode(_ value: UInt64) { set(.number(String(value))) }
        mutating func encode<T: Encodable>(_ value: T) throws {
            try value.encode(to: JSONTreeEncoder(node: node, codingPath: codingPath))
        }
    }
}

/// The keys of array elements and `super` in coding paths.
struct JSONKey: CodingKey {
    var stringValue: String
    var intValue: Int?

    init(stringValue: String) { self.stringValue = stringValue }
    init(intValue: Int) {
        self.stringValue = "Index \(intValue)"
        self.intValue = intValue
    }

    static let `super` = JSONKey(stringValue: "super")
}

// MARK: - Decoding

/// A Codable decoder over a parsed ``JSONValue``. Its errors are the standard library's `DecodingError`s, with
/// the coding path.
struct JSONTreeDecoder: Decoder {
    let value: JSONValue
    let codingPath: [any CodingKey]
    var userInfo: [CodingUserInfoKey: Any] { [:] }

    static func decode<T: Decodable>(_ type: T.Type, from bytes: UnsafeRawBufferPointer) throws -> T {
        let value: JSONValue
        do {
            value = try JSONParser.parse(bytes)
        } catch {
            throw DecodingError.dataCorrupted(DecodingError.Context(
                codingPath: [], debugDescription: "The given data was not valid JSON: \(error).", underlyingError: error))
        }
        return try T(from: JSONTreeDecoder(value: value, codingPath: []))
    }

    func container<Key: CodingKey>(keyedBy type: Key.Type) throws -> KeyedDecodingContainer<Key> {
        guard case .object(let members) = value else {
            throw Self.mismatch([String: Any].self, value, codingPath)
        }
        return KeyedDecodingContainer(KeyedContainer<Key>(members: members, codingPath: codingPath))
    }

    func unkeyedContainer() throws -> any UnkeyedDecodingContainer {
        guard case .array(let elements) = value else { throw Self.mismatch([Any].self, value, codingPath) }
        return UnkeyedContainer(elements: elements, codingPath: codingPath)
    }

    func singleValueContainer() throws -> any SingleValueDecodingContainer {
        SingleValueContainer(value: value, codingPath: codingPath)
    }

    static func mismatch(_ type: Any.Type, _ value: JSONValue, _ path: [any CodingKey]) -> DecodingError {
        if case .null = value {
            return .valueNotFound(type, DecodingError.Context(
                codingPath: path, debugDescription: "Expected \(type) but found null instead."))
        }
        return .typeMismatch(type, DecodingError.Context(
            codingPath: path, debugDescription: "Expected to decode \(type) but found \(value.kindDescription) instead."))
    }

    static func unbox(_ value: JSONValue, as type: Bool.Type, _ path: [any CodingKey]) throws -> Bool {
        guard case .bool(let bool) = value else { throw mismatch(type, value, path) }
        return bool
    }

    static func unbox(_ value: JSONValue, as type: String.Type, _ path: [any CodingKey]) throws -> String {
        guard case .string(let string) = value else { throw mismatch(type, value, path) }
        return string
    }

    /// An integer: the number's text as it is, or, written with a fraction or an exponent (`1.0`, `1e2`), a
    /// whole number that fits, decided from the digits themselves (no rounding through a Double).
    static func unbox<I: FixedWidthInteger>(_ value: JSONValue, as type: I.Type, _ path: [any CodingKey]) throws -> I {
        guard case .number(let text) = value else { throw mismatch(type, value, path) }
        if let exact = I(text, radix: 10) ?? wholeDigits(text).flatMap({ I($0, radix: 10) }) { return exact }
        throw DecodingError.dataCorrupted(DecodingError.Context(
            codingPath: path, debugDescription: "Parsed JSON number <\(text)> does not fit in \(type)."))
    }

    /// `1.50e2` → "150", `-2.0` → "-2", `1e-400` or `1.5` → nil (not whole); nil too past 40 digits (no Swift
    /// integer has more). `text` follows JSON's number grammar (the parser checked it).
    static func wholeDigits(_ text: String) -> String? {
        var mantissa = Substring(text)
        var exponent = 0
        if let e = mantissa.firstIndex(where: { $0 == "e" || $0 == "E" }) {
            let written = mantissa[mantissa.index(after: e)...]
            mantissa = mantissa[..<e]
            if !mantissa.contains(where: { $0 >= "1" && $0 <= "9" }) { return "0" }  // 0e5000
            guard let value = Int(written), abs(value) < 1_000 else { return nil }
            exponent = value
        }
        let negative = mantissa.hasPrefix("-")
        if negative { mantissa = mantissa.dropFirst() }
        var integral = mantissa
        var fraction: Substring = ""
        if let dot = mantissa.firstIndex(of: ".") {
            integral = mantissa[..<dot]
            fraction = mantissa[mantissa.index(after: dot)...]
        }
        // The digits and where the decimal point falls in them.
        let digits = String(integral) + String(fraction)
        let point = integral.count + exponent
        if point <= 0 { return digits.allSatisfy { $0 == "0" } ? "0" : nil }
        if point >= digits.count {
            if digits.allSatisfy({ $0 == "0" }) { return "0" }
            guard point <= 40 else { return nil }
            return (negative ? "-" : "") + digits + String(repeating: "0", count: point - digits.count)
        }
        let whole = digits.prefix(point)
        guard digits.dropFirst(point).allSatisfy({ $0 == "0" }), whole.count <= 40 else { return nil }
        if whole.allSatisfy({ $0 == "0" }) { return "0" }  // -0.0 is 0, for unsigned types too
        return (negative ? "-" : "") + whole
    }

    static func unbox<F: BinaryFloatingPoint & LosslessStringConvertible>(
        _ value: JSONValue, as type: F.Type, _ path: [any CodingKey]
    ) throws -> F {
        guard case .number(let text) = value else { throw mismatch(type, value, path) }
        // Out of range either way is refused, as Foundation does: infinite, or zero from digits that are not.
        guard let number = F(text), number.isFinite,
              number != 0 || !text.prefix(while: { $0 != "e" && $0 != "E" }).contains(where: { $0 >= "1" && $0 <= "9" })
        else {
            throw DecodingError.dataCorrupted(DecodingError.Context(
                codingPath: path, debugDescription: "Parsed JSON number <\(text)> does not fit in \(type)."))
        }
        return number
    }

    struct KeyedContainer<Key: CodingKey>: KeyedDecodingContainerProtocol {
        let members: [String: JSONValue]
        let codingPath: [any CodingKey]

        var allKeys: [Key] { members.keys.compactMap { Key(stringValue: $0) } }

        func contains(_ key: Key) -> Bool { members[key.stringValue] != nil }

        private func value(_ key: Key) throws -> JSONValue {
            guard let value = members[key.stringValue] else {
                throw DecodingError.keyNotFound(key, DecodingError.Context(
                    codingPath: codingPath,
                    debugDescription: "No value associated with key \(key) (\"\(key.stringValue)\")."))
            }
            return value
        }

        func decodeNil(forKey key: Key) throws -> Bool { try value(key) == .null }
        func decode(_ type: Bool.Type, forKey key: Key) throws -> Bool {
            try JSONTreeDecoder.unbox(value(key), as: type, codingPath + [key])
        }
        func decode(_ type: String.Type, forKey key: Key) throws -> String {
            try JSONTreeDecoder.unbox(value(key), as: type, codingPath + [key])
        }
        func decode(_ type: Double.Type, forKey key: Key) throws -> Double {
            try JSONTreeDecoder.unbox(value(key), as: type, codingPath + [key])
        }
        func decode(_ type: Float.Type, forKey key: Key) throws -> Float {
            try JSONTreeDecoder.unbox(value(key), as: type, codingPath + [key])
        }
        func decode(_ type: Int.Type, forKey key: Key) throws -> Int {
            try JSONTreeDecoder.unbox(value(key), as: type, codingPath + [key])
        }
        func decode(_ type: Int8.Type, forKey key: Key) throws -> Int8 {
            try JSONTreeDecoder.unbox(value(key), as: type, codingPath + [key])
        }
        func decode(_ type: Int16.Type, forKey key: Key) throws -> Int16 {
            try JSONTreeDecoder.unbox(value(key), as: type, codingPath + [key])
        }
        func decode(_ type: Int32.Type, forKey key: Key) throws -> Int32 {
            try JSONTreeDecoder.unbox(value(key), as: type, codingPath + [key])
        }
        func decode(_ type: Int64.Type, forKey key: Key) throws -> Int64 {
            try JSONTreeDecoder.unbox(value(key), as: type, codingPath + [key])
        }
        func decode(_ type: UInt.Type, forKey key: Key) throws -> UInt {
            try JSONTreeDecoder.unbox(value(key), as: type, codingPath + [key])
        }
        func decode(_ type: UInt8.Type, forKey key: Key) throws -> UInt8 {
            try JSONTreeDecoder.unbox(value(key), as: type, codingPath + [key])
        }
        func decode(_ type: UInt16.Type, forKey key: Key) throws -> UInt16 {
            try JSONTreeDecoder.unbox(value(key), as: type, codingPath + [key])
        }
        func decode(_ type: UInt32.Type, forKey key: Key) throws -> UInt32 {
            try JSONTreeDecoder.unbox(value(key), as: type, codingPath + [key])
        }
        func decode(_ type: UInt64.Type, forKey key: Key) throws -> UInt64 {
            try JSONTreeDecoder.unbox(value(key), as: type, codingPath + [key])
        }
        func decode<T: Decodable>(_ type: T.Type, forKey key: Key) throws -> T {
            try T(from: JSONTreeDecoder(value: value(key), codingPath: codingPath + [key]))
        }

        func nestedContainer<NestedKey: CodingKey>(keyedBy type: NestedKey.Type, forKey key: Key) throws
            -> KeyedDecodingContainer<NestedKey> {
            try JSONTreeDecoder(value: value(key), codingPath: codingPath + [key]).container(keyedBy: type)
        }

        func nestedUnkeyedContainer(forKey key: Key) throws -> any UnkeyedDecodingContainer {
            try JSONTreeDecoder(value: value(key), codingPath: codingPath + [key]).unkeyedContainer()
        }

        func superDecoder() throws -> any Decoder {
            JSONTreeDecoder(value: members[JSONKey.super.stringValue] ?? .null, codingPath: codingPath + [JSONKey.super])
        }

        func superDecoder(forKey key: Key) throws -> any Decoder {
            JSONTreeDecoder(value: members[key.stringValue] ?? .null, codingPath: codingPath + [key])
        }
    }

    struct UnkeyedContainer: UnkeyedDecodingContainer {
        let elements: [JSONValue]
        let codingPath: [any CodingKey]
        var currentIndex = 0

        init(elements: [JSONValue], codingPath: [any CodingKey]) {
            self.elements = elements
            self.codingPath = codingPath
        }

        var count: Int? { elements.count }
        var isAtEnd: Bool { currentIndex >= elements.count }

        private var path: [any CodingKey] { codingPath + [JSONKey(intValue: currentIndex)] }

        /// Decodes the current element with `body` and moves on only when that succeeded (as Foundation's: a
        /// type may try one decoding, then another, of the same element).
        private mutating func decodeNext<R>(_ type: Any.Type, _ body: (JSONValue, [any CodingKey]) throws -> R) throws -> R {
            guard !isAtEnd else {
                throw DecodingError.valueNotFound(type, DecodingError.Context(
                    codingPath: path, debugDescription: "Unkeyed container is at end."))
            }
            let result = try body(elements[currentIndex], path)
            currentIndex += 1
            return result
        }

        mutating func decodeNil() throws -> Bool {
            guard !isAtEnd else {
                throw DecodingError.valueNotFound(Any?.self, DecodingError.Context(
                    codingPath: path, debugDescription: "Unkeyed container is at end."))
            }
            if elements[currentIndex] == .null {
                currentIndex += 1
                return true
            }
            return false
        }

        mutating func decode(_ type: Bool.Type) throws -> Bool {
            try decodeNext(type) { try JSONTreeDecoder.unbox($0, as: type, $1) }
        }
        mutating func decode(_ type: String.Type) throws -> String {
            try decodeNext(type) { try JSONTreeDecoder.unbox($0, as: type, $1) }
        }
        mutating func decode(_ type: Double.Type) throws -> Double {
            try decodeNext(type) { try JSONTreeDecoder.unbox($0, as: type, $1) }
        }
        mutating func decode(_ type: Float.Type) throws -> Float {
            try decodeNext(type) { try JSONTreeDecoder.unbox($0, as: type, $1) }
        }
        mutating func decode(_ type: Int.Type) throws -> Int { try integer(type) }
        mutating func decode(_ type: Int8.Type) throws -> Int8 { try integer(type) }
        mutating func decode(_ type: Int16.Type) throws -> Int16 { try integer(type) }
        mutating func decode(_ type: Int32.Type) throws -> Int32 { try integer(type) }
        mutating func decode(_ type: Int64.Type) throws -> Int64 { try integer(type) }
        mutating func decode(_ type: UInt.Type) throws -> UInt { try integer(type) }
        mutating func decode(_ type: UInt8.Type) throws -> UInt8 { try integer(type) }
        mutating func decode(_ type: UInt16.Type) throws -> UInt16 { try integer(type) }
        mutating func decode(_ type: UInt32.Type) throws -> UInt32 { try integer(type) }
        mutating func decode(_ type: UInt64.Type) throws -> UInt64 { try integer(type) }

        private mutating func integer<I: FixedWidthInteger>(_ type: I.Type) throws -> I {
            try decodeNext(type) { try JSONTreeDecoder.unbox($0, as: type, $1) }
        }

        mutating func decode<T: Decodable>(_ type: T.Type) throws -> T {
            try decodeNext(type) { try T(from: JSONTreeDecoder(value: $0, codingPath: $1)) }
        }

        mutating func nestedContainer<NestedKey: CodingKey>(keyedBy type: NestedKey.Type) throws
            -> KeyedDecodingContainer<NestedKey> {
            try decodeNext(KeyedDecodingContainer<NestedKey>.self) {
                try JSONTreeDecoder(value: $0, codingPath: $1).container(keyedBy: type)
            }
        }

        mutating func nestedUnkeyedContainer() throws -> any UnkeyedDecodingContainer {
            try decodeNext([Any].self) { try JSONTreeDecoder(value: $0, codingPath: $1).unkeyedContainer() }
        }

        mutating func superDecoder() throws -> any Decoder {
            try decodeNext((any Decoder).self) { JSONTreeDecoder(value: $0, codingPath: $1) }
        }
    }

    struct SingleValueContainer: SingleValueDecodingContainer {
        let value: JSONValue
        let codingPath: [any CodingKey]

        func decodeNil() -> Bool { value == .null }
        func decode(_ type: Bool.Type) throws -> Bool { try JSONTreeDecoder.unbox(value, as: type, codingPath) }
        func decode(_ type: String.Type) throws -> String { try JSONTreeDecoder.unbox(value, as: type, codingPath) }
        func decode(_ type: Double.Type) throws -> Double { try JSONTreeDecoder.unbox(value, as: type, codingPath) }
        func decode(_ type: Float.Type) throws -> Float { try JSONTreeDecoder.unbox(value, as: type, codingPath) }
        func decode(_ type: Int.Type) throws -> Int { try JSONTreeDecoder.unbox(value, as: type, codingPath) }
        func decode(_ type: Int8.Type) throws -> Int8 { try JSONTreeDecoder.unbox(value, as: type, codingPath) }
        func decode(_ type: Int16.Type) throws -> Int16 { try JSONTreeDecoder.unbox(value, as: type, codingPath) }
        func decode(_ type: Int32.Type) throws -> Int32 { try JSONTreeDecoder.unbox(value, as: type, codingPath) }
        func decode(_ type: Int64.Type) throws -> Int64 { try JSONTreeDecoder.unbox(value, as: type, codingPath) }
        func decode(_ type: UInt.Type) throws -> UInt { try JSONTreeDecoder.unbox(value, as: type, codingPath) }
        func decode(_ type: UInt8.Type) throws -> UInt8 { try JSONTreeDecoder.unbox(value, as: type, codingPath) }
        func decode(_ type: UInt16.Type) throws -> UInt16 { try JSONTreeDecoder.unbox(value, as: type, codingPath) }
        func decode(_ type: UInt32.Type) throws -> UInt32 { try JSONTreeDecoder.unbox(value, as: type, codingPath) }
        func decode(_ type: UInt64.Type) throws -> UInt64 { try JSONTreeDecoder.unbox(value, as: type, codingPath) }
        func decode<T: Decodable>(_ type: T.Type) throws -> T {
            try T(from: JSONTreeDecoder(value: value, codingPath: codingPath))
        }
    }
}

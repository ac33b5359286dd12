/// A defect in config text that the TOML parser (toml++ 3.4, the CTOMLParser target) does not report but dies
/// of: a table header whose key starts with a character that is neither a bare-key character nor a quote (`[$`,
/// `[[ =`, `[{`). toml++ `assert`s on it (SIGABRT: `--check-config`, start-up and a SIGHUP reload all abort instead of
/// answering exit 78), and where asserts are compiled out it is an `assume` the compiler may build on. Found by
/// fuzzing (issue 14, `scripts/fuzz.sh config`). Callers check the text with this before handing it to toml++.
/// The same for a value missing in an array: toml++ `assert`s when the first non-blank character after an
/// array's `[` or one of its commas is `}` or a Unicode line separator (U+0085, U+2028, U+2029) (`a = [1, }`,
/// found by fuzzing too).
public struct TOMLHeaderDefect: Sendable, Equatable, CustomStringConvertible {
    /// 1-based, as TOML parse errors count.
    public var line: Int
    public var column: Int
    /// What is wrong there.
    public var problem: String
    public init(line: Int, column: Int,
                problem: String = "a table header's key must start with a letter, digit, '_', '-' or a quote") {
        self.line = line
        self.column = column
        self.problem = problem
    }
    public var description: String { "\(problem) (line \(line), column \(column))" }
}

/// The first table header in `text` that toml++ would abort on, or nil. It follows strings, comments and
/// brackets enough to look only at headers (a `[` first on a line outside any array, inline table or string);
/// text that is not valid TOML for any other reason is left to the parser.
public func tomlHeaderDefect(in text: String) -> TOMLHeaderDefect? {
    let bytes = Array(text.utf8)
    var i = 0
    var line = 1
    var lineStart = 0
    var open: [UInt8] = []  // the arrays ([) and inline tables ({) of values open here, innermost last
    var atLineStart = true  // only spaces or tabs so far on this line
    if bytes.starts(with: [0xEF, 0xBB, 0xBF]) { i = 3; lineStart = 3 }  // a BOM, which toml++ skips
    func isBare(_ b: UInt8) -> Bool {
        (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || (b >= 0x30 && b <= 0x39) || b == 0x5F || b == 0x2D
    }
    func newline() { line += 1; lineStart = i + 1; atLineStart = true }
    // Where an array expects a value (after its `[` or a comma, at `from`): what toml++ would take for the start
    // of a value and abort on, past blanks, line breaks and comments.
    func missingArrayValue(from start: Int) -> TOMLHeaderDefect? {
        var j = start, atLine = line, atLineStart = lineStart
        while j < bytes.count {
            switch bytes[j] {
            case 0x20, 0x09: j += 1
            case 0x0D where j + 1 < bytes.count && bytes[j + 1] == 0x0A: j += 1
            case 0x0A: j += 1; atLine += 1; atLineStart = j
            case 0x23: while j < bytes.count && bytes[j] != 0x0A { j += 1 }
            default:
                let rest = bytes[j...]
                guard rest.starts(with: [0x7D]) || rest.starts(with: [0xC2, 0x85]) || rest.starts(with: [0xE2, 0x80, 0xA8])
                    || rest.starts(with: [0xE2, 0x80, 0xA9]) else { return nil }
                let column = String(decoding: bytes[atLineStart..<j], as: UTF8.self).count + 1
                return TOMLHeaderDefect(line: atLine, column: column, problem: "an array value is missing")
            }
        }
        return nil
    }
    // Skips a string that starts at i; multi-line ones may span lines.
    func skipString() {
        let quote = bytes[i]
        let multi = i + 2 < bytes.count && bytes[i + 1] == quote && bytes[i + 2] == quote
        i += multi ? 3 : 1
        while i < bytes.count {
            let b = bytes[i]
            if b == 0x5C && quote == 0x22 {  // an escape in a basic string (a line-ending one, too)
                if i + 1 < bytes.count && bytes[i + 1] == 0x0A {
                    i += 1
                    if !multi { return }  // unterminated: the parser says so
                    newline()
                    i += 1
                    continue
                }
                i += 2
                continue
            }
            if b == quote {
                if !multi { i += 1; return }
                if i + 2 < bytes.count && bytes[i + 1] == quote && bytes[i + 2] == quote {
                    i += 3
                    while i < bytes.count && bytes[i] == quote { i += 1 }  // up to two quotes end the content
                    return
                }
            }
            if b == 0x0A {
                if !multi { return }  // unterminated: the parser says so
                newline()
            }
            i += 1
        }
    }
    while i < bytes.count {
        let b = bytes[i]
        switch b {
        case 0x0A:
            newline()
            i += 1
        case 0x20, 0x09, 0x0D:
            i += 1
        case 0x23:  // a comment, to the end of the line
            while i < bytes.count && bytes[i] != 0x0A { i += 1 }
        case 0x22, 0x27:
            skipString()
            atLineStart = false
        case 0x5B where atLineStart && open.isEmpty:  // a table header
            atLineStart = false
            var j = i + 1
            if j < bytes.count && bytes[j] == 0x5B { j += 1 }
            while j < bytes.count && (bytes[j] == 0x20 || bytes[j] == 0x09) { j += 1 }
            if j < bytes.count {
                let c = bytes[j]
                if !(isBare(c) || c == 0x22 || c == 0x27 || c == 0x5D) {  // a newline, too, kills it
                    let column = String(decoding: bytes[lineStart..<j], as: UTF8.self).count + 1
                    return TOMLHeaderDefect(line: line, column: column)
                }
            }
            // The rest of the header (its quoted keys included) is one line: skip it, strings and all.
            i = j
            while i < bytes.count && bytes[i] != 0x0A {
                if bytes[i] == 0x22 || bytes[i] == 0x27 { skipString() } else { i += 1 }
            }
        case 0x5B, 0x7B:
            atLineStart = false
            open.append(b)
            i += 1
            if b == 0x5B, let defect = missingArrayValue(from: i) { return defect }
        case 0x2C where open.last == 0x5B:  // a comma between an array's values
            atLineStart = false
            i += 1
            if let defect = missingArrayValue(from: i) { return defect }
        case 0x5D, 0x7D:
            atLineStart = false
            if !open.isEmpty { open.removeLast() }
            i += 1
        default:
            atLineStart = false
            i += 1
        }
    }
    return nil
}

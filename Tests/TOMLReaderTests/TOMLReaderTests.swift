import Testing
import TOMLReader

@Suite struct TOMLReaderTests {
    @Test func everyKindOfValue() throws {
        let table = try TOMLTable(parsing: """
            s = "text\\twith \\u00e9"
            i = -42
            f = 1.5
            b = true
            d = 1979-05-27
            t = 07:32:00
            dt = 1979-05-27T07:32:00Z
            a = [1, "two"]
            [inner]
            k = "v"
            [[list]]
            n = 1
            [[list]]
            n = 2
            """)
        #expect(table["s"] == .string("text\twith é"))
        #expect(table["i"] == .integer(-42))
        #expect(table["f"] == .double(1.5))
        #expect(table["b"] == .bool(true))
        #expect(table["d"] == .date("1979-05-27"))
        #expect(table["t"] == .time("07:32:00"))
        #expect(table["dt"] == .dateTime("1979-05-27T07:32:00Z"))
        #expect(table["a"] == .array([.integer(1), .string("two")]))
        #expect(table["inner"] == .table(TOMLTable(entries: [.init(key: "k", value: .string("v"))])))
        #expect(table["list"] == .array([
            .table(TOMLTable(entries: [.init(key: "n", value: .integer(1))])),
            .table(TOMLTable(entries: [.init(key: "n", value: .integer(2))])),
        ]))
        #expect(table["missing"] == nil)
        #expect(table.count == 10)
    }

    @Test func anEmptyDocumentIsAnEmptyTable() throws {
        #expect(try TOMLTable(parsing: "").count == 0)
        #expect(try TOMLTable(parsing: "# only a comment\n").count == 0)
    }

    @Test func aSyntaxErrorHasToml_plus_plusDescriptionAndPosition() {
        #expect(throws: TOMLSyntaxError.self) { try TOMLTable(parsing: "a = 1\nb = = 2\n") }
        do {
            _ = try TOMLTable(parsing: "a = 1\nb = = 2\n")
        } catch {
            #expect(error.line == 2)
            #expect(error.column == 5)
            #expect(!error.description.isEmpty)
        }
    }

    /// The input's length counts, not a terminating NUL: a NUL byte is an error toml++ reports.
    @Test func aNulByteIsASyntaxError() {
        #expect(throws: TOMLSyntaxError.self) { try TOMLTable(parsing: "a = 1\n\u{0}b = 2\n") }
    }

    @Test func aDuplicateKeyIsASyntaxError() {
        #expect(throws: TOMLSyntaxError.self) { try TOMLTable(parsing: "a = 1\na = 2\n") }
    }
}

import Foundation
import SocketDiscovery
import SupervisorCore
import SupervisorRuntime
import Testing

/// Regression (issue 14, found by `scripts/fuzz.sh config`): toml++ 3.4 `assert`s, killing the process with
/// SIGABRT, on a table header whose key starts with neither a bare-key character nor a quote. `--check-config`,
/// start-up and a SIGHUP reload aborted on `[$` instead of exit 78 / a refused reload.
@Suite struct TOMLGuardTests {
    static let aborting = ["[$", "[[ =]]", "[\n", "[{a = 1}]", "[[[x]]]", "[+1]", "\u{FEFF}[$",
                           "a = 1\n  [ #]\n", "s = \"\"\"\n\"\"\"\n[?]", "x = [1]\n[!]\n", "[a]\r\n[\r\n",
                           // A value missing in an array (each checked to abort toml++ without the guard).
                           "a = [}\n", "a = [\u{2028}]\n", "a = [1,\u{85}]\n", "a = [1, # c\n }\n",
                           "a = { b = [ 1, } }\n", "[t]\nc = [\"w\",}}]\n"]

    @Test(arguments: aborting) func malformedHeaderIsASyntaxError(_ text: String) throws {
        #expect(tomlHeaderDefect(in: text) != nil)
        let error = try #require(throws: ConfigError.self) { _ = try ConfigLoader.parse(text, path: "/etc/npu/c.toml") }
        #expect(error.key == "(syntax)")
        #expect("\(error)".contains("/etc/npu/c.toml:"))
        #expect(throws: (any Error).self) { _ = try SocketPaths(parsingConfig: text, path: "/etc/c.toml", currentDirectory: "/") }
    }

    @Test func positionIsReported() {
        #expect(tomlHeaderDefect(in: "[a]\nx = 1\n  [[ $]]") == TOMLHeaderDefect(line: 3, column: 6))
        #expect(tomlHeaderDefect(in: "x = [1,\n  # c\n  }]")
            == TOMLHeaderDefect(line: 3, column: 3, problem: "an array value is missing"))
    }

    /// What the guard must leave alone: brackets inside values, strings and comments, and headers that are fine.
    static let valid = [
        "[a]\n[ b ]\n[[c]]\n[ \"q k\" ]\n['lit']\n[d.e]\n[-x]\n[_y]\n[0]\n",
        "x = [\n  [1, 2],\n  [\"$\"],\n  {a = 1},\n]\n",
        "s = \"\"\"\n[$\n\"\"\"\nt = '''\n[{\n'''\n",
        "# [$\nu = \"[$\" # [?\n",
        "[]", "[ \t",  // errors toml++ reports by itself
        "a = []\nb = [ ]\nc = [1, ]\nd = [\n  1, # one\n]\ne = [{x = 1}, {}]\nf = {g = [1]}\n",
        "a = [1,,2]\nb = [1 }\n",  // errors toml++ reports by itself
    ]

    @Test(arguments: valid) func wellFormedTextPasses(_ text: String) {
        #expect(tomlHeaderDefect(in: text) == nil)
    }

    @Test func exampleConfigPasses() throws {
        let path = #filePath.replacingOccurrences(of: "Tests/SupervisorCoreTests/TOMLGuardTests.swift",
                                                  with: "config/example.toml")
        let text = try String(contentsOfFile: path, encoding: .utf8)
        #expect(tomlHeaderDefect(in: text) == nil)
    }
}

import SocketDiscovery
import SupervisorCore
import SupervisorRuntime
import Glibc
import Testing

/// The CLI finds the sockets with `SocketPaths(parsingConfig:)`; the daemon binds them from `ConfigLoader`. They
/// must agree for every way of writing the `[supervisor]` table.
@Suite struct SocketPathsTests {
    static let workers = "[defaults]\ncommand = [\"/bin/sh\"]\n[[device]]\nid = \"0\"\n"

    static let supervisorTables = [
        "",
        "[supervisor]\n",
        "[supervisor]\nrun_dir = \"run\"\n",
        "[supervisor]\nrun_dir = \"/var/run/x\"\n",
        "[supervisor]\nrun_dir = \"./a/../b/./c\"\n",
        "[supervisor]\nrun_dir = \"../../..\"\n",
        "[supervisor]\nrun_dir = 5\n",
        "[supervisor]\nrequests_socket = \"r.sock\"\ncontrol_socket = \"/abs/c.sock\"\n",
        "[supervisor]\nrun_dir = \"run\"\nstatus_socket = \"s/status.sock\"\ncontrol_socket = \"../c.sock\"\n",
    ]

    static let configPaths = ["/etc/npu/config.toml", "config.toml", "sub/dir/config.toml", "/config.toml",
                              "../up.toml"]

    @Test(arguments: supervisorTables, configPaths)
    func theClientAndTheDaemonAgree(table: String, path: String) throws {
        let text = table + Self.workers
        let cwd = SocketPathsTests.currentDirectory
        let daemon = try ConfigLoader.parse(text, path: path)
        let client = try SocketPaths(parsingConfig: text, path: path, currentDirectory: cwd)
        #expect(client.runDirectory == daemon.runDirectory)
        #expect(client.requests == daemon.requestsSocket)
        #expect(client.status == daemon.statusSocket)
        #expect(client.control == daemon.controlSocket)
    }

    @Test func missingWorkerProgramsDoNotStopTheClient() throws {
        let text = "[supervisor]\nrun_dir = \"/srv/r\"\n[defaults]\ncommand = [\"/nowhere/worker\"]\n[[device]]\nid = \"0\"\n"
        #expect(throws: ConfigError.self) { try ConfigLoader.parse(text, path: "/etc/c.toml") }
        let client = try SocketPaths(parsingConfig: text, path: "/etc/c.toml", currentDirectory: "/")
        #expect(client.control == "/srv/r/control.sock")
        #expect(client.requests == "/srv/r/requests.sock")
    }

    @Test func aSocketKeyOfTheWrongTypeIsAnError() {
        #expect(throws: ConfigFileError.self) {
            try SocketPaths(parsingConfig: "[supervisor]\nrun_dir = true\n", path: "/c.toml", currentDirectory: "/")
        }
        #expect(throws: ConfigFileError.self) {
            try SocketPaths(parsingConfig: "supervisor = 3\n", path: "/c.toml", currentDirectory: "/")
        }
        #expect(throws: ConfigFileError.self) {
            try SocketPaths(parsingConfig: "[supervisor\n", path: "/c.toml", currentDirectory: "/")
        }
    }

    static var currentDirectory: String {
        var buffer = [CChar](repeating: 0, count: 4097)
        guard getcwd(&buffer, buffer.count) != nil else { return "/" }
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

import Glibc
@_exported import SupervisorPaths
internal import TOMLReader

// Apart from NPUClient on purpose: a client that is given socket paths needs no TOML parser (toml++, C++).

extension SocketPaths {
    /// The sockets of the daemon that runs with this config file: the `[supervisor]` table's `run_dir` and
    /// `*_socket` keys, by the daemon's own rule. Nothing else in the file is validated (a CLI on another host,
    /// or before the workers are installed, can still find the sockets).
    /// - Throws: ``ConfigFileError`` for an unreadable file, a TOML syntax error or a socket key of the wrong type.
    public init(configFile path: String) throws {
        let text: String
        do {
            text = try readWholeFile(path)
        } catch {
            throw ConfigFileError(description: "\(error)")
        }
        try self.init(parsingConfig: text, path: path, currentDirectory: workingDirectory())
    }

    /// As ``init(configFile:)`` for config text already read; `path` names the file in errors and, with
    /// `currentDirectory`, gives the base for relative paths.
    /// - Throws: ``ConfigFileError``.
    public init(parsingConfig text: String, path: String, currentDirectory: String) throws {
        // toml++ aborts on some malformed headers instead of reporting them (SupervisorPaths/TOMLGuard.swift).
        if let defect = tomlHeaderDefect(in: text) {
            throw ConfigFileError(description: "valid TOML expected: \(defect.description) at \(path):"
                                  + "\(defect.line):\(defect.column)")
        }
        let table: TOMLTable
        do throws(TOMLSyntaxError) {
            table = try TOMLTable(parsing: text)
        } catch {
            throw ConfigFileError(description: "valid TOML expected: \(error.description) at \(path):"
                                  + "\(error.line):\(error.column)")
        }
        let base = configBaseDirectory(ofFile: path, currentDirectory: currentDirectory)
        guard let value = table["supervisor"] else {
            self.init(baseDirectory: base)
            return
        }
        guard case .table(let supervisor) = value else {
            throw ConfigFileError(description: "supervisor: a table expected, found \(value.typeName)")
        }
        // As the daemon's config reader: a string, or an integer taken as its digits.
        func string(_ key: String) throws -> String? {
            guard let value = supervisor[key] else { return nil }
            switch value {
            case .string(let s): return s
            case .integer(let i): return String(i)
            default: throw ConfigFileError(description: "supervisor.\(key): a string expected, found \(value.typeName)")
            }
        }
        self.init(runDirectory: try string("run_dir"), requestsSocket: try string("requests_socket"),
                  statusSocket: try string("status_socket"), controlSocket: try string("control_socket"),
                  baseDirectory: base)
    }
}

/// A config file from which the sockets cannot be found.
public struct ConfigFileError: Error, CustomStringConvertible, Sendable {
    public var description: String
}

private struct ReadError: Error, CustomStringConvertible {
    var call: String
    var errno: Int32
    var description: String { "\(call): \(String(cString: strerror(errno)))" }
}

private func readWholeFile(_ path: String) throws -> String {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw ReadError(call: "open", errno: errno) }
    defer { close(fd) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n < 0 {
            if errno == EINTR { continue }
            throw ReadError(call: "read", errno: errno)
        }
        if n == 0 { break }
        bytes += chunk[0..<n]
    }
    return String(decoding: bytes, as: UTF8.self)
}

private func workingDirectory() -> String {
    var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
    guard getcwd(&buffer, buffer.count) != nil else { return "/" }
    return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

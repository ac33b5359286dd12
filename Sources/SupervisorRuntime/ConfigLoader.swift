import Glibc
import SupervisorCore
import TOMLReader

/// Reads a TOML config file into a validated ``SupervisorConfiguration``.
public enum ConfigLoader {
    /// - Throws: ``ConfigError`` (bad key or value, unreadable file, TOML syntax error with line and column).
    public static func load(path: String) throws -> SupervisorConfiguration {
        let text: String
        do {
            text = try readFile(path)
        } catch {
            throw ConfigError(key: "(file)", value: "\"\(path)\"", expected: "a readable file: \(error)")
        }
        return try parse(text, path: path)
    }

    /// Parses config text; `path` names the file in errors and gives the base for relative paths.
    public static func parse(_ text: String, path: String) throws -> SupervisorConfiguration {
        // toml++ aborts on some malformed headers instead of reporting them (SupervisorPaths/TOMLGuard.swift).
        if let defect = tomlHeaderDefect(in: text) {
            throw ConfigError(key: "(syntax)", value: nil,
                              expected: "valid TOML: \(defect.description) at \(path):\(defect.line):\(defect.column)")
        }
        let table: TOMLTable
        do throws(TOMLSyntaxError) {
            table = try TOMLTable(parsing: text)
        } catch {
            throw ConfigError(key: "(syntax)", value: nil,
                              expected: "valid TOML: \(error.description) at \(path):\(error.line):\(error.column)")
        }
        let base = configBaseDirectory(ofFile: path, currentDirectory: currentDirectory())
        var config = try SupervisorConfiguration(parsing: convert(table), baseDirectory: base)
        for index in config.workers.indices {
            config.workers[index].command[0] = try resolveExecutable(
                config.workers[index].command[0], key: "device[\(index)].command[0]", base: base)
        }
        if var fallback = config.fallback {
            for index in fallback.workers.indices {
                fallback.workers[index].command[0] = try resolveExecutable(
                    fallback.workers[index].command[0], key: "fallback.command[0]", base: base)
            }
            config.fallback = fallback
        }
        for index in config.workers.indices where config.workers[index].deviceProbe.kind == .command {
            // A probe command that is not installed is a configuration error, not a sick device.
            config.workers[index].deviceProbe.command[0] = try resolveExecutable(
                config.workers[index].deviceProbe.command[0], key: "device[\(index)].device_probe.command[0]", base: base)
        }
        if let file = config.http.tokenFile {
            // Read now, so that --check-config and start-up fail on an unreadable or empty token (exit 78).
            let token: String
            do {
                token = try readFile(file).trimmingWhitespace()
            } catch {
                throw ConfigError(key: "http.token_file", value: "\"\(file)\"", expected: "a readable file: \(error)")
            }
            guard !token.isEmpty, !token.contains(where: { $0.isWhitespace }) else {
                throw ConfigError(key: "http.token_file", value: "\"\(file)\"",
                                  expected: "a file holding one bearer token (non-empty, no whitespace inside)")
            }
            config.http.token = token
        }
        return config
    }

    static func convert(_ table: TOMLTable) -> [String: ConfigValue] {
        var out: [String: ConfigValue] = [:]
        out.reserveCapacity(table.count)
        for entry in table { out[entry.key] = convert(entry.value) }
        return out
    }

    static func convert(_ value: TOMLValue) -> ConfigValue {
        switch value {
        case .table(let table): .table(convert(table))
        case .array(let items): .array(items.map { convert($0) })
        case .integer(let i): .integer(i)
        case .double(let d): .double(d)
        case .bool(let b): .bool(b)
        case .string(let s): .string(s)
        // The configuration has no date keys: a date is its TOML text, which a string key takes as it is.
        case .date(let text), .time(let text), .dateTime(let text): .string(text)
        }
    }

    /// argv[0] without a slash: next to this executable first (so a build tree or an install prefix finds its
    /// own `npu-worker`), then PATH. With a slash: relative to the config file.
    static func resolveExecutable(_ name: String, key: String, base: String) throws -> String {
        if name.contains("/") {
            let path = resolve(name, against: base)
            guard access(path, X_OK) == 0 else {
                throw ConfigError(key: key, value: "\"\(name)\"", expected: "an executable file (\(path) is not one)")
            }
            return path
        }
        var candidates: [String] = []
        if let exe = ownExecutableDirectory() { candidates.append(exe + "/" + name) }
        let pathVar = getenv("PATH").map { String(cString: $0) } ?? "/usr/local/bin:/usr/bin:/bin"
        candidates += pathVar.split(separator: ":").map { "\($0)/\(name)" }
        for candidate in candidates where access(candidate, X_OK) == 0 {
            return candidate
        }
        throw ConfigError(key: key, value: "\"\(name)\"",
                          expected: "a program found next to npu-supervisord or on PATH (\(pathVar))")
    }
}

func readFile(_ path: String) throws -> String {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw SystemError(call: "open \(path)", errno: errno) }
    defer { close(fd) }
    var bytes: [UInt8] = []
    // 4 KiB at a time, on the stack: most files read here are a line (a cgroup counter per worker on every status
    // request, /proc children lists on every reap), which got a 64 KiB heap buffer each before.
    try withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 4096) { chunk in
        while true {
            let n = read(fd, chunk.baseAddress, chunk.count)
            if n < 0 {
                if errno == EINTR { continue }
                throw SystemError(call: "read \(path)", errno: errno)
            }
            if n == 0 { break }
            bytes.append(contentsOf: UnsafeBufferPointer(rebasing: chunk[0..<n]))
        }
    }
    return String(decoding: bytes, as: UTF8.self)
}

func currentDirectory() -> String {
    var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
    guard getcwd(&buffer, buffer.count) != nil else { return "/" }
    let bytes = buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }
    return String(decoding: bytes, as: UTF8.self)
}

/// The folder holding the running executable (`/proc/self/exe`).
public func ownExecutableDirectory() -> String? {
    var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
    let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    guard n > 0 else { return nil }
    let path = String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    return String(path[..<(path.lastIndex(of: "/") ?? path.endIndex)])
}

/// A failed system call, with its errno.
public struct SystemError: Error, CustomStringConvertible, Sendable {
    public var call: String
    public var errno: Int32
    public init(call: String, errno: Int32) {
        self.call = call
        self.errno = errno
    }
    public var description: String { "\(call): \(String(cString: strerror(errno))) (errno \(errno))" }
}

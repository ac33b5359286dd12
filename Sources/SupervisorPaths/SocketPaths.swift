/// Where npu-supervisord's sockets are, from the `[supervisor]` table of its config file. One rule, shared by the
/// daemon (through `SupervisorConfiguration`) and by clients that find the sockets from the same file
/// (`npu-supervisorctl --config`), so that the two can never disagree. Pure: no syscalls, no Foundation.
public struct SocketPaths: Sendable, Hashable {
    /// `run_dir` when the config does not name one.
    public static let defaultRunDirectory = "/run/npu-supervisor"

    public var runDirectory: String
    public var requests: String
    public var status: String
    public var control: String

    /// Applies the defaults and resolves relative paths.
    /// - Parameters:
    ///   - runDirectory: `supervisor.run_dir`, as written (nil: ``defaultRunDirectory``).
    ///   - requestsSocket: `supervisor.requests_socket`, as written (nil: `requests.sock` in the run directory).
    ///   - statusSocket: `supervisor.status_socket`, as written (nil: `status.sock` in the run directory).
    ///   - controlSocket: `supervisor.control_socket`, as written (nil: `control.sock` in the run directory).
    ///   - baseDirectory: what relative paths are resolved against (the config file's folder).
    public init(runDirectory: String? = nil, requestsSocket: String? = nil, statusSocket: String? = nil,
                controlSocket: String? = nil, baseDirectory: String) {
        let run = runDirectory.map { resolve($0, against: baseDirectory) } ?? Self.defaultRunDirectory
        self.runDirectory = run
        self.requests = requestsSocket.map { resolve($0, against: baseDirectory) } ?? run + "/requests.sock"
        self.status = statusSocket.map { resolve($0, against: baseDirectory) } ?? run + "/status.sock"
        self.control = controlSocket.map { resolve($0, against: baseDirectory) } ?? run + "/control.sock"
    }
}

/// `path` if absolute, else `base/path` (with `./` segments removed).
public func resolve(_ path: String, against base: String) -> String {
    if path.hasPrefix("/") { return path }
    var parts = base.split(separator: "/", omittingEmptySubsequences: true).map(String.init)
    for part in path.split(separator: "/", omittingEmptySubsequences: true) {
        switch part {
        case ".": continue
        case "..": if !parts.isEmpty { parts.removeLast() }
        default: parts.append(String(part))
        }
    }
    return "/" + parts.joined(separator: "/")
}

/// The folder that a config file's relative paths are resolved against: the file's own folder, made absolute
/// with `currentDirectory` when `configPath` is relative.
public func configBaseDirectory(ofFile configPath: String, currentDirectory: String) -> String {
    let absolute = configPath.hasPrefix("/") ? configPath : resolve(configPath, against: currentDirectory)
    let base = String(absolute[..<(absolute.lastIndex(of: "/") ?? absolute.startIndex)])
    return base.isEmpty ? "/" : base
}

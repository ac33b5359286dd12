import CSystemd
import Glibc
import Logging

/// Where the daemon's log records go: journald (structured fields) when its stderr is connected to the journal,
/// else plain lines on stderr.
public enum LogDestination: String, Sendable {
    case journal
    case stderr

    /// systemd's documented test (systemd.exec(5), `$JOURNAL_STREAM`): the variable holds the device and inode
    /// numbers of the journal stream systemd connected to stdout/stderr; when they match fd 2's, stderr goes to
    /// the journal and the native protocol may be used instead. Anything else (unset, stderr redirected by a
    /// wrapper, a terminal) means stderr.
    public static func detect() -> LogDestination {
        guard let value = getenv("JOURNAL_STREAM") else { return .stderr }
        var st = stat()
        guard fstat(2, &st) == 0 else { return .stderr }
        return journalStreamMatches(String(cString: value), device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
            ? .journal : .stderr
    }

    /// Whether `JOURNAL_STREAM` (`"<device>:<inode>"`, decimal) names the file with these numbers.
    public static func journalStreamMatches(_ value: String, device: UInt64, inode: UInt64) -> Bool {
        let parts = value.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 2, let d = UInt64(parts[0]), let i = UInt64(parts[1]) else { return false }
        return d == device && i == inode
    }
}

/// A swift-log handler that writes each record to journald with structured fields (sd_journal_sendv):
/// `MESSAGE=`, `PRIORITY=` (from the level), `SYSLOG_IDENTIFIER=`, `CODE_FILE=`/`CODE_LINE=`/`CODE_FUNC=`, and
/// every metadata key as an upper-case field (`device` → `DEVICE=`, `worker_pid` → `WORKER_PID=`, `reason` →
/// `REASON=`, `stream` → `STREAM=`), so that `journalctl DEVICE=2` or `journalctl -o json` finds them. A record
/// journald does not take (socket gone) is written to stderr instead, as a plain line.
public struct JournalLogHandler: LogHandler {
    public var logLevel: Logger.Level = .info
    public var metadata: Logger.Metadata = [:]
    public var metadataProvider: Logger.MetadataProvider?
    public let label: String
    public let identifier: String

    /// - Parameters:
    ///   - label: the logger's label (swift-log).
    ///   - identifier: `SYSLOG_IDENTIFIER=` (what `journalctl -t` matches).
    public init(label: String, identifier: String, metadataProvider: Logger.MetadataProvider? = nil) {
        self.label = label
        self.identifier = identifier
        self.metadataProvider = metadataProvider
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var all = metadata
        if let provided = metadataProvider?.get() { all.merge(provided) { _, new in new } }
        if let own = event.metadata { all.merge(own) { _, new in new } }
        let fields = Self.fields(level: event.level, message: event.message.description, metadata: all,
                                 identifier: identifier, file: event.file, function: event.function,
                                 line: event.line)
        if Self.send(fields) < 0 {
            let line = "\(identifier)[\(getpid())] \(event.level): \(Self.messageText(event.message.description, all))\n"
            _ = line.withCString { write(2, $0, strlen($0)) }
        }
    }

    /// journald's priority (syslog levels) for a swift-log level.
    public static func priority(_ level: Logger.Level) -> Int {
        switch level {
        case .trace, .debug: 7
        case .info: 6
        case .notice: 5
        case .warning: 4
        case .error: 3
        case .critical: 2
        }
    }

    /// The journal field name for a metadata key: upper case, `[A-Z0-9_]` only, not starting with `_` (those are
    /// journald's trusted fields) or a digit, at most 64 characters. Keys that would collide with a field this
    /// handler sets itself get a `META_` prefix.
    public static func fieldName(forMetadataKey key: String) -> String {
        var name = String(key.uppercased().map { c -> Character in
            (c.isASCII && (c.isLetter || c.isNumber)) ? c : "_"
        })
        while name.hasPrefix("_") { name.removeFirst() }
        if name.isEmpty || name.first!.isNumber || reserved.contains(name) { name = "META_" + name }
        return String(name.prefix(64))
    }

    static let reserved: Set<String> = ["MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "CODE_FILE", "CODE_LINE",
                                        "CODE_FUNC", "MESSAGE_ID", "SYSLOG_FACILITY", "SYSLOG_PID", "LOGGER"]

    /// The `FIELD=value` assignments of one record, in a fixed order (metadata fields sorted by name).
    public static func fields(level: Logger.Level, message: String, metadata: Logger.Metadata, identifier: String,
                              file: String, function: String, line: UInt) -> [String] {
        var fields = [
            "MESSAGE=" + messageText(message, metadata),
            "PRIORITY=\(priority(level))",
            "SYSLOG_IDENTIFIER=" + identifier,
            "CODE_FILE=" + file,
            "CODE_LINE=\(line)",
            "CODE_FUNC=" + function,
        ]
        for (key, value) in metadata.sorted(by: { $0.key < $1.key }) {
            fields.append(fieldName(forMetadataKey: key) + "=" + "\(value)")
        }
        return fields
    }

    /// MESSAGE= text: the message, prefixed with the metadata a reader of plain `journalctl` output needs to
    /// make sense of it (`device=1 worker_pid=42: ...`); `stream=output` is left to its field.
    static func messageText(_ message: String, _ metadata: Logger.Metadata) -> String {
        let shown = metadata.filter { $0.key != "stream" }.sorted { $0.key < $1.key }
        guard !shown.isEmpty else { return message }
        return shown.map { "\($0.key)=\($0.value)" }.joined(separator: " ") + ": " + message
    }

    /// Sends one record (sd_journal_sendv: binary-safe, values may hold newlines). Returns its result.
    static func send(_ fields: [String]) -> CInt {
        var storage: [UInt8] = []
        var ranges: [(Int, Int)] = []
        for field in fields {
            ranges.append((storage.count, field.utf8.count))
            storage.append(contentsOf: field.utf8)
        }
        return storage.withUnsafeMutableBytes { raw -> CInt in
            let base = raw.baseAddress!
            var iov = ranges.map { iovec(iov_base: base + $0.0, iov_len: $0.1) }
            return sd_journal_sendv(&iov, CInt(iov.count))
        }
    }
}

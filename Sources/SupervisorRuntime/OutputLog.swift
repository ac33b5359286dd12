import Glibc
import Logging

/// How workers' output lines reach the daemon's log.
///
/// Through swift-log, each line is one record: formatted (a timestamp from `strftime`, the metadata sorted and
/// joined) and written with its own `write(2)`. At a flooding worker's ~100-byte lines that bound what the
/// output thread could keep to about 11 MiB/s (BENCHMARKS.md, "Output flooding"). Where the log is swift-log's
/// plain stderr stream, the lines of one read batch are formatted as that handler would format them, with the
/// timestamp and metadata computed once per batch, and written with one `write(2)`.
public enum WorkerOutputLogging: Sendable {
    /// One swift-log record per line (journald's structured fields need it).
    case perLine
    /// Lines written to stderr in `StreamLogHandler`'s format, one write per batch; `label` is the logger's.
    case stderrBatched(label: String)
}

enum OutputLog {
    /// `StreamLogHandler`'s line: `TIMESTAMP info LABEL: device=D stream=output worker_pid=P [SupervisorRuntime] LINE`.
    static func write(_ lines: [String], label: String, device: String, pid: Int32) {
        guard !lines.isEmpty else { return }
        let prefix = timestamp() + " info " + label + ": device=" + device + " stream=output worker_pid=" + String(pid)
            + " [SupervisorRuntime] "
        var bytes: [UInt8] = []
        bytes.reserveCapacity(lines.reduce(0) { $0 + $1.utf8.count } + lines.count * (prefix.utf8.count + 1))
        for line in lines {
            bytes.append(contentsOf: prefix.utf8)
            bytes.append(contentsOf: line.utf8)
            bytes.append(0x0A)
        }
        bytes.withUnsafeBytes { buffer in
            var offset = 0
            while offset < buffer.count {
                let n = Glibc.write(2, buffer.baseAddress! + offset, buffer.count - offset)
                if n > 0 {
                    offset += n
                } else if n < 0 && errno == EINTR {
                    continue
                } else {
                    return  // stderr gone or full: the log loses these lines, as swift-log's stream would
                }
            }
        }
    }

    /// The same text as `StreamLogHandler`'s timestamp (local time, `%Y-%m-%dT%H:%M:%S%z`).
    static func timestamp() -> String {
        var now = time(nil)
        var parts = tm()
        guard localtime_r(&now, &parts) != nil else { return "<unknown>" }
        var buffer = [CChar](repeating: 0, count: 64)
        let count = strftime(&buffer, buffer.count, "%Y-%m-%dT%H:%M:%S%z", &parts)
        return String(decoding: buffer.prefix(count).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

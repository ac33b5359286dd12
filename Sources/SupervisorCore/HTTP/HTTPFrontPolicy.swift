/// The rules of the HTTP request front (`POST /v1/infer`, docs/PROTOCOL.md section 12), pure so that they are
/// tested without sockets: which HTTP status answers which error code, which listen addresses are loopback,
/// how the request's options are read from its query and headers, and the bearer-token check.
public enum HTTPFrontPolicy {
    /// The path of the request front.
    public static let inferPath = "/v1/infer"

    /// Seconds told in `Retry-After` with every retryable error.
    public static let retryAfterSeconds = 1

    /// The HTTP status for an error `code` (PROTOCOL.md section 4, plus the front's own codes), and whether a
    /// `Retry-After` goes with it (every retryable error: the request may succeed later, or on another host).
    public static func status(forErrorCode code: String, retryable: Bool) -> (status: Int, retryAfter: Int?) {
        let status: Int
        switch code {
        case "overloaded", "no_workers", "shutting_down", "too_many_connections": status = 503
        case "deadline_exceeded": status = 504
        case "worker_lost": status = 502
        case "bad_request", "protocol_error", "unsupported": status = 400
        case "cancelled": status = 499
        case "permission_denied": status = 403
        case "command_failed": status = 409
        case "unauthorized": status = 401
        case "payload_too_large": status = 413
        case "method_not_allowed": status = 405
        case "not_found": status = 404
        case "device_oom", "worker_error": status = retryable ? 503 : 500
        default: status = retryable ? 503 : 500  // a worker's own code
        }
        return (status, retryable ? retryAfterSeconds : nil)
    }

    /// Whether `host` (from `[http] listen`) can only be reached from this machine.
    public static func isLoopback(host: String) -> Bool {
        let h = host.lowercased()
        if h == "localhost" || h == "::1" || h == "0:0:0:0:0:0:0:1" { return true }
        let parts = h.split(separator: ".", omittingEmptySubsequences: false)
        return parts.count == 4 && parts[0] == "127" && parts.allSatisfy { UInt8($0) != nil }
    }

    /// How streamed chunks are sent.
    public enum StreamFormat: String, Sendable {
        /// `text/event-stream`: `event: chunk`, then `event: response` or `event: error`.
        case sse
        /// `application/x-ndjson` in a chunked body: `{"chunk":...}` lines, then `{"response":...}` or `{"error":...}`.
        case ndjson
    }

    /// A request's options as the front reads them.
    public struct Options: Equatable, Sendable {
        public var device: String?
        public var deadlineMS: Int?
        public var stream: StreamFormat = .ndjson
        public init() {}
    }

    /// Reads the options from the query string (`device=`, `deadline_ms=`, `stream=sse|ndjson`) and the headers
    /// (`X-NPU-Device`, `X-NPU-Deadline-Ms`, `Accept: text/event-stream`); the query wins. Unknown query
    /// parameters are refused (a typo must not pass silently).
    /// - Returns: the options, or the message of a `bad_request`.
    public static func options(query: String?, header: (String) -> String?) -> Result<Options, OptionsError> {
        var o = Options()
        if let accept = header("accept"), accept.lowercased().contains("text/event-stream") { o.stream = .sse }
        var device = header("x-npu-device")
        var deadline = header("x-npu-deadline-ms")
        for pair in (query ?? "").split(separator: "&") where !pair.isEmpty {
            let kv = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            let key = String(kv[0])
            let value = kv.count > 1 ? percentDecoded(String(kv[1])) : ""
            switch key {
            case "device": device = value
            case "deadline_ms": deadline = value
            case "stream":
                guard let format = StreamFormat(rawValue: value) else {
                    return .failure(OptionsError("query parameter 'stream': got \"\(value)\", expected sse or ndjson"))
                }
                o.stream = format
            case "priority":
                return .failure(OptionsError("query parameter 'priority' is not supported: requests are served in arrival order"))
            default:
                return .failure(OptionsError("unknown query parameter '\(key)'; known: device, deadline_ms, stream"))
            }
        }
        if let device {
            guard !device.isEmpty else { return .failure(OptionsError("device: empty")) }
            o.device = device
        }
        if let deadline {
            guard let ms = Int(deadline.trimmingWhitespace()), ms >= 1 else {
                return .failure(OptionsError("deadline_ms: got \"\(deadline)\", expected an integer >= 1 (milliseconds)"))
            }
            o.deadlineMS = ms
        }
        return .success(o)
    }

    public struct OptionsError: Error, Equatable, Sendable, CustomStringConvertible {
        public var description: String
        public init(_ description: String) { self.description = description }
    }

    /// Whether an `Authorization` header carries `Bearer <token>`; compares in time independent of where the
    /// first difference is.
    public static func isAuthorized(_ authorization: String?, token: String) -> Bool {
        guard let authorization else { return false }
        let prefix = "bearer "
        guard authorization.count > prefix.count,
              authorization.prefix(prefix.count).lowercased() == prefix else { return false }
        let given = Array(String(authorization.dropFirst(prefix.count)).trimmingWhitespace().utf8)
        let expected = Array(token.utf8)
        var difference = given.count ^ expected.count
        for i in 0..<expected.count {
            difference |= Int(expected[i] ^ (i < given.count ? given[i] : 0))
        }
        return difference == 0
    }

    /// `%XX` and `+` decoding of one query value.
    static func percentDecoded(_ text: String) -> String {
        var bytes: [UInt8] = []
        var it = Array(text.utf8)[...]
        while let b = it.popFirst() {
            if b == UInt8(ascii: "+") {
                bytes.append(UInt8(ascii: " "))
            } else if b == UInt8(ascii: "%"), it.count >= 2,
                      let v = UInt8(String(decoding: it.prefix(2), as: UTF8.self), radix: 16) {
                bytes.append(v)
                it = it.dropFirst(2)
            } else {
                bytes.append(b)
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// A JSON string literal (quotes included) for `text`.
    public static func jsonString(_ text: String) -> String {
        var out = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where scalar.value < 0x20:
                let hex = String(scalar.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }
}

import Foundation
import SupervisorCore
import SupervisorRuntime
import Testing

/// The HTTP request front's rules: status per error code, loopback, options, token, and its config keys.
struct HTTPFrontPolicyTests {
    @Test func everyErrorCodeHasAFittingStatus() {
        let cases: [(String, Bool, Int, Int?)] = [
            ("overloaded", true, 503, 1), ("no_workers", true, 503, 1), ("shutting_down", true, 503, 1),
            ("too_many_connections", true, 503, 1), ("deadline_exceeded", false, 504, nil),
            ("worker_lost", false, 502, nil), ("bad_request", false, 400, nil), ("protocol_error", false, 400, nil),
            ("unsupported", false, 400, nil), ("cancelled", false, 499, nil), ("permission_denied", false, 403, nil),
            ("command_failed", false, 409, nil), ("device_oom", false, 500, nil), ("worker_error", false, 500, nil),
            ("worker_error", true, 503, 1), ("some_worker_code", false, 500, nil), ("unauthorized", false, 401, nil),
            ("payload_too_large", false, 413, nil), ("method_not_allowed", false, 405, nil), ("not_found", false, 404, nil),
        ]
        for (code, retryable, status, retryAfter) in cases {
            let got = HTTPFrontPolicy.status(forErrorCode: code, retryable: retryable)
            #expect(got.status == status && got.retryAfter == retryAfter, "\(code) retryable=\(retryable)")
        }
    }

    @Test func loopbackAddresses() {
        for host in ["127.0.0.1", "127.1.2.3", "::1", "localhost"] { #expect(HTTPFrontPolicy.isLoopback(host: host), "\(host)") }
        for host in ["0.0.0.0", "10.0.0.1", "::", "example.com", "127.0.0"] { #expect(!HTTPFrontPolicy.isLoopback(host: host), "\(host)") }
    }

    @Test func optionsFromQueryAndHeaders() throws {
        let headers = ["accept": "text/event-stream", "x-npu-device": "2", "x-npu-deadline-ms": "500"]
        let o = try HTTPFrontPolicy.options(query: nil, header: { headers[$0] }).get()
        #expect(o.device == "2" && o.deadlineMS == 500 && o.stream == .sse)
        let q = try HTTPFrontPolicy.options(query: "device=a%20b&deadline_ms=7&stream=ndjson", header: { headers[$0] }).get()
        #expect(q.device == "a b" && q.deadlineMS == 7 && q.stream == .ndjson, "the query wins")
        for bad in ["deadline_ms=0", "deadline_ms=x", "stream=xml", "priority=1", "devcie=1", "device="] {
            guard case .failure = HTTPFrontPolicy.options(query: bad, header: { _ in nil }) else {
                Issue.record("\(bad) was accepted")
                continue
            }
        }
    }

    @Test func bearerToken() {
        #expect(HTTPFrontPolicy.isAuthorized("Bearer s3cret", token: "s3cret"))
        #expect(HTTPFrontPolicy.isAuthorized("bearer s3cret", token: "s3cret"))
        for bad in [nil, "", "Bearer", "Bearer s3cre", "Bearer s3cret1", "Basic s3cret", "s3cret"] {
            #expect(!HTTPFrontPolicy.isAuthorized(bad, token: "s3cret"), "\(bad ?? "nil")")
        }
    }

    @Test func jsonStringEscapes() {
        #expect(HTTPFrontPolicy.jsonString("a\"b\\c\nd\u{1}é") == "\"a\\\"b\\\\c\\nd\\u0001é\"")
    }

    static let devices = "\n[defaults]\ncommand = [\"/bin/true\"]\n[[device]]\nid = \"0\"\n"

    @Test func aNonLoopbackListenNeedsATokenFile() throws {
        do {
            _ = try ConfigLoader.parse("[http]\nlisten = \"0.0.0.0:8087\"\n" + Self.devices, path: "/tmp/c.toml")
            Issue.record("accepted without a token")
        } catch let error as ConfigError {
            #expect(error.key == "http.token_file")
        }
        // Probes and metrics only: no token needed.
        let c = try ConfigLoader.parse("[http]\nlisten = \"0.0.0.0:8087\"\nrequests = false\n" + Self.devices, path: "/tmp/c.toml")
        #expect(!c.http.requests && c.http.token == nil)
        #expect(try ConfigLoader.parse(Self.devices, path: "/tmp/c.toml").http.requests, "on by default on loopback")
    }

    @Test func theTokenIsReadFromItsFile() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("tok-\(UUID().uuidString.prefix(6))").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try "abc123\n".write(toFile: dir + "/token", atomically: true, encoding: .utf8)
        let c = try ConfigLoader.parse("[http]\nlisten = \"[::]:80\"\ntoken_file = \"token\"\n" + Self.devices,
                                       path: dir + "/c.toml")
        #expect(c.http.token == "abc123" && c.http.tokenFile == dir + "/token")
        #expect(!ConfigRenderer.render(c).contains("abc123"), "the token is never printed")
        for (file, content) in [("empty", "\n"), ("spaced", "a b")] {
            try content.write(toFile: dir + "/" + file, atomically: true, encoding: .utf8)
            #expect(throws: ConfigError.self) {
                try ConfigLoader.parse("[http]\ntoken_file = \"\(file)\"\n" + Self.devices, path: dir + "/c.toml")
            }
        }
        #expect(throws: ConfigError.self) {
            try ConfigLoader.parse("[http]\ntoken_file = \"missing\"\n" + Self.devices, path: dir + "/c.toml")
        }
    }

    @Test func maxBodyIsBoundedByTheFrameSize() throws {
        let c = try ConfigLoader.parse("[http]\nmax_body = \"4KiB\"\n" + Self.devices, path: "/tmp/c.toml")
        #expect(c.http.maxBodyBytes == 4096)
        do {
            _ = try ConfigLoader.parse("[supervisor]\nmax_frame_bytes = \"1MiB\"\n[http]\nmax_body = \"1MiB\"\n" + Self.devices,
                                       path: "/tmp/c.toml")
            Issue.record("accepted a body larger than a frame")
        } catch let error as ConfigError {
            #expect(error.key == "http.max_body")
        }
    }
}

import Foundation
import TestSupport
import Testing

/// The HTTP request front (`POST /v1/infer`) against a real daemon and real workers, driven with curl.
@Suite(.serialized) struct HTTPFrontTests {
    struct Reply {
        var code: Int
        var headers: [String: String]
        var body: String
    }

    /// One curl call; headers are lower-cased names.
    static func post(_ url: String, _ body: String?, headers: [String] = [], method: String = "POST",
                     timeout: Int = 10) throws -> Reply {
        let dir = FileManager.default.temporaryDirectory.path
        let headerFile = dir + "/hdr-\(UUID().uuidString.prefix(8))"
        defer { try? FileManager.default.removeItem(atPath: headerFile) }
        var args = ["-s", "-N", "-m", "\(timeout)", "-D", headerFile, "-X", method, "-w", "\n%{http_code}"]
        for h in headers { args += ["-H", h] }
        if let body { args += ["--data-binary", body] }
        let r = try runCommand("/usr/bin/curl", args + [url])
        var lines = r.stdout.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        let code = Int(lines.popLast() ?? "") ?? -1
        var parsed: [String: String] = [:]
        for line in ((try? String(contentsOfFile: headerFile, encoding: .utf8)) ?? "").split(separator: "\r\n") {
            if let colon = line.firstIndex(of: ":") {
                parsed[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
            }
        }
        return Reply(code: code, headers: parsed, body: lines.joined(separator: "\n"))
    }

    static func error(_ reply: Reply) -> (code: String, retryable: Bool)? {
        struct E: Decodable { var code: String; var message: String; var retryable: Bool }
        guard let e = try? JSONDecoder().decode(E.self, from: Data(reply.body.utf8)) else { return nil }
        return (e.code, e.retryable)
    }

    static func front(_ daemon: TestDaemon) throws -> String {
        "http://" + (try #require(daemon.status()?.supervisor.http)) + "/v1/infer"
    }

    @Test func answersAndMapsEveryErrorToAStatus() throws {
        let daemon = try TestDaemon(devices: ["0", "1"], defaults: "max_inflight = 1",
                                    extra: "[requests]\nmax_queue = 0", http: "127.0.0.1:0")
        #expect(daemon.waitAllReady() != nil)
        let url = try Self.front(daemon)

        let ok = try Self.post(url, #"{"prompt": "Hi", "max_new_tokens": 5}"#)
        #expect(ok.code == 200 && ok.headers["content-type"] == "application/json")
        #expect(ok.body.contains(#""text":"npu npu quickly tokens workers""#))
        #expect(try Self.post(url + "?device=1", #"{"prompt": "Hi"}"#).body.contains(#""device":"1""#))
        #expect(try Self.post(url, #"{"prompt": "Hi"}"#, headers: ["X-NPU-Device: 0"]).body.contains(#""device":"0""#))

        let late = try Self.post(url + "?deadline_ms=200", #"{"fault": "sleep", "sleep_ms": 3000}"#)
        #expect(late.code == 504 && Self.error(late)?.code == "deadline_exceeded" && late.headers["retry-after"] == nil)

        let unknown = try Self.post(url + "?device=9", "{}")
        #expect(unknown.code == 400 && Self.error(unknown)?.code == "bad_request")
        #expect(try Self.post(url + "?devcie=1", "{}").code == 400, "a mistyped parameter is refused")
        #expect(try Self.post(url, #"{"prompt": 5}"#).code == 400, "the worker's bad_request")
        let get = try Self.post(url, nil, method: "GET")
        #expect(get.code == 405 && get.headers["allow"] == "POST")

        let oom = try Self.post(url + "?device=1", #"{"fault": "device_oom"}"#)
        #expect(oom.code == 500 && Self.error(oom)?.code == "device_oom")
        #expect(daemon.waitAllReady() != nil)
        let lost = try Self.post(url + "?device=0", #"{"fault": "crash"}"#)
        #expect(lost.code == 502 && Self.error(lost)?.code == "worker_lost")
        #expect(daemon.waitAllReady() != nil)

        // Both workers busy (max_inflight 1) and no queue: overloaded, 503 with Retry-After.
        let slow = #"{"fault": "sleep", "sleep_ms": 4000}"#
        let holders = (0..<2).map { i in
            Thread { _ = try? Self.post(url + "?device=\(i)", slow) }
        }
        holders.forEach { $0.start() }
        #expect(eventually { (daemon.status()?.workers.map(\.inflight).reduce(0, +) ?? 0) == 2 })
        let busy = try Self.post(url, #"{"prompt": "Hi"}"#)
        #expect(busy.code == 503 && busy.headers["retry-after"] == "1" && Self.error(busy)?.code == "overloaded")
        #expect(Self.error(busy)?.retryable == true)
        #expect(eventually { (daemon.status()?.workers.map(\.inflight).reduce(0, +) ?? 1) == 0 })

        // No worker can serve: no_workers, 503 with Retry-After.
        #expect(try daemon.ctl(["stop", "all"]).status == 0)
        let none = try Self.post(url, #"{"prompt": "Hi"}"#)
        #expect(none.code == 503 && none.headers["retry-after"] == "1" && Self.error(none)?.code == "no_workers")
        #expect(daemon.terminate() == 0)
    }

    @Test func streamsAsServerSentEventsOrNDJSON() throws {
        let daemon = try TestDaemon(devices: ["0"], workerArgs: ["--token-ms", "5"], http: "127.0.0.1:0")
        #expect(daemon.waitAllReady() != nil)
        let url = try Self.front(daemon)
        let body = #"{"prompt": "Hi", "max_new_tokens": 3, "stream": true}"#
        let sse = try Self.post(url, body, headers: ["Accept: text/event-stream"])
        #expect(sse.code == 200 && sse.headers["content-type"] == "text/event-stream")
        #expect(sse.body.hasPrefix("event: chunk\ndata: npu\n\nevent: chunk\ndata:  npu\n\nevent: chunk\ndata:  quickly\n\nevent: response\ndata: {"))
        let nd = try Self.post(url + "?stream=ndjson", body)
        #expect(nd.code == 200 && nd.headers["transfer-encoding"] == "chunked")
        let lines = nd.body.split(separator: "\n").map(String.init)
        #expect(Array(lines.prefix(3)) == [#"{"chunk":"npu"}"#, #"{"chunk":" npu"}"#, #"{"chunk":" quickly"}"#])
        #expect(lines.count == 4 && lines[3].hasPrefix(#"{"response":"{\"device\":\"0\""#))
        // An error after the first chunk ends the stream as its last event (the status was already 200).
        let crash = try Self.post(url, #"{"prompt": "Hi", "max_new_tokens": 400, "stream": true}"#,
                                  headers: ["Accept: text/event-stream", "X-NPU-Deadline-Ms: 300"])
        #expect(crash.code == 200 && crash.body.contains("event: error\ndata: {\"code\":\"deadline_exceeded\""))
        #expect(daemon.terminate() == 0)
    }

    @Test func aTokenIsRequiredWhenConfiguredAndBodiesAreBounded() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("tok-\(UUID().uuidString.prefix(6))").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try "t0ken\n".write(toFile: dir + "/token", atomically: true, encoding: .utf8)
        let daemon = try TestDaemon(devices: ["0"], workerArgs: ["--token-ms", "50"],
                                    // More [http] keys after the harness's `listen = "..."` (closing its quote).
                                    http: "127.0.0.1:0\"\ntoken_file = \"\(dir)/token\"\nmax_body = 1024 #")
        #expect(daemon.waitAllReady() != nil)
        let url = try Self.front(daemon)
        let none = try Self.post(url, "{}")
        #expect(none.code == 401 && none.headers["www-authenticate"]?.hasPrefix("Bearer") == true)
        #expect(try Self.post(url, "{}", headers: ["Authorization: Bearer wrong"]).code == 401)
        let auth = "Authorization: Bearer t0ken"
        #expect(try Self.post(url, #"{"prompt": "Hi"}"#, headers: [auth]).code == 200)
        let readyz = url.replacingOccurrences(of: "/v1/infer", with: "/readyz")
        #expect(try Self.post(readyz, nil, method: "GET").code == 200, "probes need no token")

        let big = String(repeating: "x", count: 2000)
        let tooBig = try Self.post(url, big, headers: [auth])
        #expect(tooBig.code == 413 && Self.error(tooBig)?.code == "payload_too_large")
        let chunked = try Self.post(url, big, headers: [auth, "Transfer-Encoding: chunked"])
        #expect(chunked.code == 413, "a chunked body is bounded as it arrives")
        #expect(try Self.post(url, #"{"prompt": "Hi"}"#, headers: [auth]).code == 200)

        // A client that hangs up: its request is cancelled and the worker's place freed.
        _ = try? Self.post(url, #"{"prompt": "Hi", "max_new_tokens": 200}"#, headers: [auth], timeout: 1)
        #expect(eventually { daemon.worker("0")?.inflight == 0 })
        #expect(daemon.log.contains("http.token_file") == false)
        #expect(daemon.terminate() == 0)
    }

    @Test func aNonLoopbackListenWithoutATokenIsRefused() throws {
        let daemon = try TestDaemon(devices: ["0"], http: "0.0.0.0:0", start: false)
        let r = try runCommand(Binaries.supervisord, ["--config", daemon.configPath, "--check-config"])
        #expect(r.status == 78)
        #expect(r.stderr.contains("config key 'http.token_file'"))
    }
}

import ArgumentParser
import Foundation
import NIOCore

/// Closed-loop load on the HTTP request front (`POST /v1/infer`), to compare with `load` on requests.sock.
struct HTTPLoad: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "http-load",
        abstract: "Closed-loop load on the HTTP request front: keep-alive connections, one request in flight each.",
        discussion: "Same report as `load`; errors are counted by the X-NPU-Error header (HTTP status otherwise).")

    @Option(help: "host:port of the supervisor's [http] listen.") var http: String
    @Option(help: "Concurrent keep-alive connections.") var clients = 8
    @Option(help: "Payload size in bytes (echo payload) when --json is not given.") var size = 64
    @Option(help: "Send this JSON payload instead of an echo payload.") var json: String?
    @Option(help: "Seconds to run.") var duration: Double = 5
    @Option(help: "Bearer token (http.token_file's content).") var token: String?
    @Flag(help: "Print one line of JSON instead of text.") var machine = false

    func run() throws {
        let body = json.map { Array($0.utf8) } ?? [UInt8](repeating: UInt8(ascii: "x"), count: size)
        guard let colon = http.lastIndex(of: ":"), let port = UInt16(http[http.index(after: colon)...]) else {
            throw ValidationError("--http: expected host:port")
        }
        let host = String(http[..<colon])
        var head = "POST /v1/infer HTTP/1.1\r\nHost: \(http)\r\nContent-Length: \(body.count)\r\n"
        if let token { head += "Authorization: Bearer \(token)\r\n" }
        let request = Array((head + "\r\n").utf8) + body
        let stats = LoadStats()
        let stopAt = now() + duration
        let group = DispatchGroup()
        for _ in 0..<clients {
            group.enter()
            Thread.detachNewThread {
                defer { group.leave() }
                do {
                    let connection = try HTTPConnection(host: host, port: port)
                    defer { close(connection.fd) }
                    while now() < stopAt {
                        let t = now()
                        try connection.write(request)
                        stats.sent()
                        guard let (status, error) = try connection.readResponse() else {
                            stats.lost(1, why: "connection closed")
                            return
                        }
                        if status == 200 { stats.ok(latency: now() - t) } else { stats.error(error ?? "http_\(status)") }
                    }
                } catch {
                    stats.failure("\(error)")
                }
            }
        }
        group.wait()
        stats.report(kills: 0, rssKB: [], clients: clients, depth: 1, size: body.count, duration: duration, machine: machine)
        if stats.neverAnswered > 0 || !stats.failures.isEmpty { throw ExitCode(1) }
    }
}

/// One blocking keep-alive HTTP/1.1 connection (responses with Content-Length only: not streamed ones).
final class HTTPConnection {
    let fd: Int32
    var buffer: [UInt8] = []

    init(host: String, port: UInt16) throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = port.bigEndian
        addr.sin_addr.s_addr = inet_addr(host == "localhost" ? "127.0.0.1" : host)
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard rc == 0 else { close(fd); throw ValidationError("connect \(host):\(port): errno \(errno)") }
    }

    func write(_ bytes: [UInt8]) throws {
        var offset = 0
        while offset < bytes.count {
            let n = bytes[offset...].withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
            guard n > 0 else { throw ValidationError("write: errno \(errno)") }
            offset += n
        }
    }

    /// The status and the X-NPU-Error header of the next response, nil at EOF.
    func readResponse() throws -> (Int, String?)? {
        var headerEnd: Int?
        while headerEnd == nil {
            if let end = find(Array("\r\n\r\n".utf8)) { headerEnd = end; break }
            guard try fill() else { return nil }
        }
        let head = String(decoding: buffer[..<headerEnd!], as: UTF8.self)
        let lines = head.split(separator: "\r\n")
        let status = lines.first.flatMap { $0.split(separator: " ").dropFirst().first }.flatMap { Int($0) } ?? 0
        var length = 0
        var error: String?
        for line in lines.dropFirst() {
            let parts = line.split(separator: ":", maxSplits: 1)
            guard parts.count == 2 else { continue }
            let value = parts[1].trimmingCharacters(in: .whitespaces)
            switch parts[0].lowercased() {
            case "content-length": length = Int(value) ?? 0
            case "x-npu-error": error = value
            default: break
            }
        }
        let total = headerEnd! + 4 + length
        while buffer.count < total { guard try fill() else { return nil } }
        buffer.removeFirst(total)
        return (status, error)
    }

    private func find(_ needle: [UInt8]) -> Int? {
        guard buffer.count >= needle.count else { return nil }
        for i in 0...(buffer.count - needle.count) where buffer[i] == needle[0] {
            if Array(buffer[i..<(i + needle.count)]) == needle { return i }
        }
        return nil
    }

    private func fill() throws -> Bool {
        var chunk = [UInt8](repeating: 0, count: 65536)
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n < 0 { throw ValidationError("read: errno \(errno)") }
        if n == 0 { return false }
        buffer.append(contentsOf: chunk[..<n])
        return true
    }
}

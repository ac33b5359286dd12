import Foundation
import NIOCore
import NPUClient
import TestSupport
import Testing
import WireProtocol

/// Socket activation without systemd: `systemd-socket-activate` listens, and execs the daemon (in place, with
/// LISTEN_FDS / LISTEN_FDNAMES) only when the first client connects.
@Suite(.serialized, .timeLimit(.minutes(2)))
struct SocketActivationTests {
    static let activator: String? = ["/usr/bin/systemd-socket-activate", "/lib/systemd/systemd-socket-activate"]
        .first { access($0, X_OK) == 0 }

    @Test(.enabled(if: activator != nil, "systemd-socket-activate is not installed (apt-get install systemd)"))
    func theDaemonTakesItsSocketsByNameAndLeavesThemInPlace() throws {
        let dir = try Paths.scratch("activate")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let run = dir + "/run"
        try FileManager.default.createDirectory(atPath: run, withIntermediateDirectories: true)
        let config = dir + "/config.toml"
        let port = TestConfig.knowsHTTP ? freeTCPPort() : nil
        // [http] listen names port 1, which could not be bound: HTTP must be served on the fd named "http".
        try TestConfig.make(runDir: run, devices: ["0"], loadMS: 100, http: port.map { _ in "127.0.0.1:1" })
            .write(toFile: config, atomically: true, encoding: .utf8)
        var arguments = ["-l", run + "/requests.sock", "-l", run + "/status.sock", "-l", run + "/control.sock"]
        var names = "requests:status:control"
        if let port {
            arguments += ["-l", "127.0.0.1:\(port)"]
            names += ":http"
        }
        arguments += ["--fdname=" + names, Binaries.supervisord, "--config", config]
        let daemon = try DaemonProcess(executable: Self.activator!, arguments: arguments, logPath: dir + "/daemon.log")
        #expect(eventually { FileManager.default.fileExists(atPath: run + "/control.sock") })
        // Nobody has connected: the daemon has not been started yet.
        let exe = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(daemon.pid)/exe")
        #expect(exe.hasSuffix("systemd-socket-activate"))

        // The first connection starts it; it answers on the very socket the client connected to. (A socket file
        // appears at bind(), a moment before listen(): a connection in between is refused, so retry.)
        var firstDoc: StatusDocument?
        #expect(eventually {
            firstDoc = readStatus(run + "/status.sock")
            return firstDoc != nil
        })
        let first = try #require(firstDoc, "no status; log:\n\(daemon.log)")
        #expect(first.supervisor.pid == daemon.pid, "the daemon runs in the activator's process (exec)")
        #expect(eventually { readStatus(run + "/status.sock")?.workers.first?.state == "ready" })
        daemon.remember(readStatus(run + "/status.sock"))
        let client = try SupervisorClient(socketPath: run + "/requests.sock", timeout: .seconds(20))
        guard case .response = try client.infer(ByteBuffer(string: #"{"prompt": "Hi", "max_new_tokens": 3}"#)) else {
            Issue.record("no answer on the passed requests.sock")
            return
        }
        let ctl = try runCommand(Binaries.supervisorctl, ["--socket", run + "/control.sock", "status"])
        #expect(ctl.status == 0, "\(ctl.stderr)")
        let log = daemon.log
        for name in ["requests", "status", "control"] {
            #expect(log.contains("using \(name) socket passed by systemd"), "\(log)")
        }
        if let port {
            let answer = try httpGet(port: port, path: "/livez")
            #expect(answer.hasPrefix("HTTP/1.0 200") && answer.hasSuffix("\r\n\r\nok\n"), "\(answer)")
        }
        #expect(!log.contains("does not use"), "every passed socket was taken: \(log)")
        #expect(!log.contains("passed by systemd is"), "paths agree with the configuration: \(log)")

        // Nothing of systemd's reaches the worker.
        let worker = try #require(readStatus(run + "/status.sock")?.workers.first?.pid)
        let environ = try String(contentsOfFile: "/proc/\(worker)/environ", encoding: .utf8)
        #expect(!environ.contains("LISTEN_"), "LISTEN_* leaked into the worker")
        let fds = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(worker)/fd").sorted()
        #expect(fds == ["0", "1", "2", "3"])

        // The socket files belong to whoever passed them: they stay after the daemon has gone.
        #expect(daemon.terminate() == 0, "log:\n\(daemon.log)")
        for name in ["requests", "status", "control"] {
            #expect(FileManager.default.fileExists(atPath: run + "/\(name).sock"), "\(name).sock was removed")
        }
    }
}

extension SocketActivationTests {
    @Test(.enabled(if: activator != nil, "systemd-socket-activate is not installed (apt-get install systemd)"))
    func aPassedSocketElsewhereThanConfiguredIsUsedAndReported() throws {
        let dir = try Paths.scratch("elsewhere")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let elsewhere = dir + "/elsewhere"
        try FileManager.default.createDirectory(atPath: elsewhere, withIntermediateDirectories: true)
        let config = dir + "/config.toml"
        try TestConfig.make(runDir: dir + "/run", devices: ["0"], loadMS: 0)
            .write(toFile: config, atomically: true, encoding: .utf8)
        let daemon = try DaemonProcess(
            executable: Self.activator!,
            arguments: ["-l", elsewhere + "/status.sock", "--fdname=status", Binaries.supervisord, "--config", config],
            logPath: dir + "/daemon.log")
        // The file appears at bind(), a moment before listen(): a connection in between is refused. Retry.
        var doc: StatusDocument?
        #expect(eventually {
            doc = readStatus(elsewhere + "/status.sock")
            return doc != nil
        }, "log:\n\(daemon.log)")
        daemon.remember(doc)
        #expect(eventually { daemon.log.contains("passed by systemd is") })
        #expect(daemon.log.contains("the status socket passed by systemd is \(elsewhere)/status.sock, the configuration "
                                    + "says \(dir)/run/status.sock"), "\(daemon.log)")
        // The others were bound by the daemon itself, at the configured paths.
        #expect(FileManager.default.fileExists(atPath: dir + "/run/requests.sock"))
        #expect(daemon.terminate() == 0)
    }
}

func freeTCPPort() -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    address.sin_port = 0
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { p -> Int32 in
            _ = bind(fd, p, length)
            return getsockname(fd, p, &length)
        }
    }
    return Int(UInt16(bigEndian: address.sin_port))
}

/// A minimal HTTP/1.0 GET on 127.0.0.1: the whole answer (head and body) as text.
func httpGet(port: Int, path: String) throws -> String {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    address.sin_port = UInt16(port).bigEndian
    var tv = timeval(tv_sec: 10, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    let rc = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    guard rc == 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
    let request = "GET \(path) HTTP/1.0\r\nHost: localhost\r\n\r\n"
    _ = request.withCString { write(fd, $0, strlen($0)) }
    var data = [UInt8]()
    var buffer = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = read(fd, &buffer, buffer.count)
        if n <= 0 { break }
        data += buffer[0..<n]
    }
    return String(decoding: data, as: UTF8.self)
}

import Foundation
import Glibc
import NIOCore
import NPUClient
import TestSupport
import Testing

/// deploy/kubernetes validated offline, and deploy/haproxy checked by HAProxy and run in front of two real
/// supervisors (loopback addresses only).
@Suite(.serialized) struct DeploymentTests {
    static let root = PackagePaths.root
    static let haproxy = ["/usr/sbin/haproxy", "/usr/bin/haproxy"].first { FileManager.default.isExecutableFile(atPath: $0) }

    @Test func kubernetesManifestsBuildValidateAndCarryTheirRules() throws {
        let r = try runCommand("/usr/bin/env", ["python3", Self.root + "/deploy/kubernetes/check-manifests.py",
                                                Binaries.supervisord], timeout: 300)
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        for build in ["base", "ascend", "nvidia"] {
            #expect(r.stdout.contains("ok: \(build): kubectl kustomize, kubernetes-validate --strict"))
            #expect(r.stdout.contains("ok: \(build): config.toml passes npu-supervisord --check-config"))
        }
    }

    static func freePort() -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = 0
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { p -> Int32 in
                _ = bind(fd, p, len)
                return getsockname(fd, p, &len)
            }
        }
        return Int(UInt16(bigEndian: addr.sin_port))
    }

    @Test(.enabled(if: haproxy != nil, "haproxy is not installed"))
    func theShippedConfigurationsAreValid() throws {
        let env = ["NPU_SUPERVISOR_TOKEN": "x", "NPU_HOST1": "127.0.0.1:1", "NPU_HOST2": "127.0.0.1:2",
                   "NPU_HOST3": "127.0.0.1:3", "NPU_PRIMARY_RUN": "/tmp/a", "NPU_STANDBY_RUN": "/tmp/b",
                   "NPU_PRIMARY_HTTP": "127.0.0.1:4", "NPU_STANDBY_HTTP": "127.0.0.1:5"]
        for file in ["haproxy.cfg", "haproxy-framed.cfg"] {
            let r = try runCommand(Self.haproxy!, ["-c", "-f", Self.root + "/deploy/haproxy/" + file],
                                   environment: ProcessInfo.processInfo.environment.merging(env) { $1 })
            #expect(r.status == 0, "\(file): \(r.stdout) \(r.stderr)")
        }
    }

    @Test(.enabled(if: haproxy != nil, "haproxy is not installed"))
    func haproxyKeepsEveryRequestAnsweredWhileAHostLeavesAndRejoins() throws {
        let scratch = FileManager.default.temporaryDirectory.appendingPathComponent("lb-\(UUID().uuidString.prefix(6))").path
        try FileManager.default.createDirectory(atPath: scratch, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: scratch) }
        try "t0ken\n".write(toFile: scratch + "/token", atomically: true, encoding: .utf8)
        let http = "127.0.0.1:0\"\ntoken_file = \"\(scratch)/token\" #"
        let a = try TestDaemon(devices: ["0"], http: http)
        let b = try TestDaemon(devices: ["0"], http: http)
        #expect(a.waitAllReady() != nil && b.waitAllReady() != nil)
        let httpA = try #require(a.status()?.supervisor.http)
        let httpB = try #require(b.status()?.supervisor.http)
        let pidA = try #require(a.worker("0")?.pid)
        let pidB = try #require(b.worker("0")?.pid)

        let port = Self.freePort()
        var cfg = try String(contentsOfFile: Self.root + "/deploy/haproxy/haproxy.cfg", encoding: .utf8)
        cfg = cfg.replacingOccurrences(of: "bind :8080", with: "bind 127.0.0.1:\(port)")
            .replacingOccurrences(of: "bind 127.0.0.1:8404", with: "bind 127.0.0.1:\(Self.freePort())")
        var framed = try String(contentsOfFile: Self.root + "/deploy/haproxy/haproxy-framed.cfg", encoding: .utf8)
        framed = framed.replacingOccurrences(of: "/run/npu-lb/requests.sock", with: scratch + "/lb.sock")
        try cfg.write(toFile: scratch + "/haproxy.cfg", atomically: true, encoding: .utf8)
        try framed.write(toFile: scratch + "/framed.cfg", atomically: true, encoding: .utf8)
        let env = ["NPU_SUPERVISOR_TOKEN": "t0ken", "NPU_HOST1": httpA, "NPU_HOST2": httpB,
                   "NPU_HOST3": "127.0.0.1:1",  // a host that is down: never in rotation
                   "NPU_PRIMARY_RUN": a.directory + "/run", "NPU_STANDBY_RUN": b.directory + "/run",
                   "NPU_PRIMARY_HTTP": httpA, "NPU_STANDBY_HTTP": httpB]
        let lb = try DaemonProcess(executable: Self.haproxy!, arguments: ["-db", "-f", scratch + "/haproxy.cfg"],
                                   environment: env, logPath: scratch + "/haproxy.log")
        let lbFramed = try DaemonProcess(executable: Self.haproxy!, arguments: ["-db", "-f", scratch + "/framed.cfg"],
                                         environment: env, logPath: scratch + "/framed.log")
        defer { _ = lb.terminate(); _ = lbFramed.terminate() }
        let url = "http://127.0.0.1:\(port)/v1/infer"
        func pid(of reply: HTTPFrontTests.Reply) -> Int32? {
            struct A: Decodable { var pid: Int32 }
            return try? JSONDecoder().decode(A.self, from: Data(reply.body.utf8)).pid
        }
        let body = #"{"prompt": "Hi", "max_new_tokens": 3}"#
        guard eventually(timeout: .seconds(15), { (try? HTTPFrontTests.post(url, body).code) == 200 }) else {
            Issue.record("HAProxy does not answer: \((try? String(contentsOfFile: scratch + "/haproxy.log", encoding: .utf8)) ?? "")")
            return
        }

        // Both hosts serve; the client's request carries no token, HAProxy adds it.
        var seen = Set<Int32>()
        for _ in 0..<10 {
            let r = try HTTPFrontTests.post(url, body)
            #expect(r.code == 200, "\(r.code) \(r.body)")
            if let p = pid(of: r) { seen.insert(p) }
        }
        #expect(seen == [pidA, pidB], "answered by \(seen)")

        // Host A's workers stop: its refusals (no_workers, 503) are retried on B at once, then A leaves rotation.
        #expect(try a.ctl(["stop", "all"]).status == 0)
        var failed = 0
        for _ in 0..<20 {
            let r = try HTTPFrontTests.post(url, body)
            if r.code != 200 || pid(of: r) != pidB { failed += 1 }
        }
        #expect(failed == 0, "\(failed) of 20 requests failed or were not served by host B while A was down")

        // A back: it rejoins within the health checks' rise and slowstart.
        #expect(try a.ctl(["start", "all"]).status == 0)
        #expect(a.waitAllReady() != nil)
        let newA = try #require(a.worker("0")?.pid)
        #expect(eventually(timeout: .seconds(30)) { (try? HTTPFrontTests.post(url, body)).flatMap(pid(of:)) == newA },
                "host A does not rejoin")

        // The framed variant: connections go to A's requests.sock while it is ready, to B's when it is not.
        func framedPid() -> Int32? {
            guard let client = try? SupervisorClient(socketPath: scratch + "/lb.sock", timeout: .seconds(10)),
                  let outcome = try? client.infer(ByteBuffer(string: body)) else { return nil }
            return decodeAnswer(outcome)?.pid
        }
        #expect(eventually { framedPid() == newA }, "the framed front does not reach the primary")
        #expect(try a.ctl(["stop", "all"]).status == 0)
        #expect(eventually { framedPid() == pidB }, "the framed front does not fail over to the standby")
        #expect(a.terminate() == 0 && b.terminate() == 0)
    }
}

import Foundation
import TestSupport
import Testing

/// The three-host failover drill (deploy/drill/netns-drill.py): three supervisors in network namespaces behind
/// HAProxy, closed-loop clients, five scenarios; 0 failed requests in each. The namespaces, links and addresses
/// exist only inside namespaces the drill creates, and are deleted at its end, also on failure.
@Suite(.serialized) struct NetnsDrillTests {
    static var canRun: Bool {
        // Not again in make test's second pass (NPU_SUPERVISOR_NO_PIDFD=1): 80 s, and exit detection is covered there.
        ProcessInfo.processInfo.environment["NPU_SUPERVISOR_NO_PIDFD"] == nil && getuid() == 0 && FileManager.default.isExecutableFile(atPath: "/usr/sbin/ip")
            && (FileManager.default.isExecutableFile(atPath: "/usr/sbin/haproxy")
                || FileManager.default.isExecutableFile(atPath: "/usr/bin/haproxy"))
    }

    @Test(.enabled(if: canRun, "needs root, ip (iproute2) and haproxy"))
    func threeHostsBehindHAProxyLoseNoRequest() throws {
        // A tag of its own: other runs on the machine (another checkout's suite) have their namespaces too.
        let tag = "nd\(getpid() % 100000)t"
        let r = try runCommand("/usr/bin/env", ["NPU_DRILL_TAG=\(tag)", "python3",
                                                PackagePaths.root + "/deploy/drill/netns-drill.py",
                                                "--bin", Binaries.directory, "--json"], timeout: 400)
        if r.status == 77 {
            // Namespaces could not be created here (a container without CAP_SYS_ADMIN): say so, do not pass silently.
            withKnownIssue("network namespaces unavailable: \(r.stderr)") { Issue.record("skipped") }
            return
        }
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        struct Outcome: Decodable { var answered: Int; var failed: Int; var full_capacity_s: Double }
        let results = try JSONDecoder().decode([String: Outcome].self, from: Data(r.stdout.utf8))
        #expect(results.count == 5)
        for (scenario, outcome) in results {
            #expect(outcome.answered > 100 && outcome.failed == 0, "\(scenario): \(outcome)")
        }
        let left = try runCommand("/usr/sbin/ip", ["netns", "list"]).stdout
        #expect(!left.split(separator: "\n").contains { $0.hasPrefix(tag + "-") },
                "the drill's namespaces are gone: \(left)")
    }
}

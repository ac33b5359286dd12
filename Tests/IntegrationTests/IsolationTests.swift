import Foundation
import NIOCore
import NPUClient
import TestSupport
import Testing
import WireProtocol

/// Memory isolation (README "Configuration reference", `[cgroups]`) on the real kernel of this machine: per-worker memory cgroups, OOM kills proven by the
/// cgroup's counter, process groups cleaned up, nothing leaking across restarts.
@Suite(.serialized, .timeLimit(.minutes(3)))
struct IsolationTests {
    static var canUseCgroups: Bool { getuid() == 0 }

    @Test(.enabled(if: IsolationTests.canUseCgroups, "needs root to create memory cgroups"))
    func aWorkerOverItsMemoryLimitIsReportedOOMKilledByTheCounter() throws {
        let daemon = try TestDaemon(devices: ["0", "1"], defaults: "memory_limit = \"64MiB\"", extra: "[requests]\nretries = 0")
        let doc = try #require(daemon.waitAllReady())
        #expect(daemon.log.contains("per-worker memory cgroups"))
        #expect(doc.workers[0].memoryLimitBytes == 64 << 20)
        #expect((doc.workers[0].memoryBytes ?? 0) > 0, "usage is read from the worker's cgroup")
        let victim = try #require(doc.workers[0].pid)
        let cgroupLine = try String(contentsOfFile: "/proc/\(victim)/cgroup", encoding: .utf8)
            .split(separator: "\n").first { $0.contains("memory") || $0.hasPrefix("0::") } ?? ""
        #expect(cgroupLine.hasSuffix("/worker-0"), "the worker runs in its own cgroup: \(cgroupLine)")
        let client = try daemon.client()
        let outcome = try client.infer(payload("{\"prompt\": \"x\", \"fault\": \"host_oom\", \"memory_mb\": 1024}"),
                                       options: RequestOptions(device: "0"))
        guard case .error(let e) = outcome else {
            Issue.record("expected worker_lost, got \(outcome)")
            return
        }
        #expect(e.code == "worker_lost")
        #expect(eventually { daemon.worker("0")?.lastExit == "oom_killed" })
        #expect(daemon.worker("0")?.exits["oom_killed"] == 1)
        #expect(daemon.log.contains("reason=oom_killed"))
        #expect(daemon.log.contains("killed by the kernel OOM killer (memory cgroup oom_kill counter rose)"))
        #expect(daemon.worker("1")?.pid == doc.workers[1].pid, "the other worker is untouched")
        #expect(eventually { daemon.worker("0")?.state == "ready" })
        // The same setup, a plain kill -9: not an OOM.
        let second = try #require(daemon.worker("0")?.pid)
        kill(second, SIGKILL)
        #expect(eventually { daemon.worker("0")?.lastExit == "signaled(9)" })
        #expect(daemon.terminate() == 0)
    }

    /// A restart takes the standby prepared ahead of need (StandbyWorker.swift): the new worker runs in the other
    /// cgroup of its slot, with the limit, and its OOM kill is still proven by that cgroup's counter.
    @Test(.enabled(if: IsolationTests.canUseCgroups, "needs root to create memory cgroups"))
    func aRestartUsesTheStandbyPreparedInTheSlotsOtherCgroup() throws {
        let daemon = try TestDaemon(devices: ["0"], defaults: "memory_limit = \"64MiB\"", extra: "[requests]\nretries = 0")
        let first = try #require(daemon.waitAllReady()?.workers[0].pid)
        func cgroup(_ pid: pid_t) -> String {
            let text = (try? String(contentsOfFile: "/proc/\(pid)/cgroup", encoding: .utf8)) ?? ""
            return String(text.split(separator: "\n").first { $0.contains(":memory:") || $0.hasPrefix("0::") } ?? "")
        }
        #expect(cgroup(first).hasSuffix("/worker-0"))
        // The standby is started a moment after the spawn: a child of the supervisor, in worker-0.next.
        #expect(eventually {
            childPids(of: daemon.pid).contains { $0 != first && cgroup($0).hasSuffix("/worker-0.next") }
        })
        kill(first, SIGKILL)
        #expect(eventually { daemon.worker("0").map { $0.state == "ready" && $0.pid != first } ?? false })
        let second = try #require(daemon.worker("0")?.pid)
        let path = cgroup(second)
        #expect(path.hasSuffix("/worker-0.next"), "the restart used the standby: \(path)")
        if let dir = path.split(separator: ":").last, path.contains(":memory:") {
            let limit = try? String(contentsOfFile: "/sys/fs/cgroup/memory\(dir)/memory.limit_in_bytes", encoding: .utf8)
            #expect(limit == "\(64 << 20)\n")
        }
        // Its own cgroup's counter proves an OOM kill.
        _ = try daemon.client().infer(payload("{\"prompt\": \"x\", \"fault\": \"host_oom\", \"memory_mb\": 1024}"),
                                      options: RequestOptions(device: "0"))
        #expect(eventually { daemon.worker("0")?.lastExit == "oom_killed" })
        #expect(eventually { daemon.worker("0").map { $0.state == "ready" && $0.pid != second } ?? false })
        #expect(daemon.terminate() == 0)
    }

    @Test func deviceOOMIsReportedAsSuch() throws {
        let daemon = try TestDaemon(devices: ["0"])
        #expect(daemon.waitAllReady() != nil)
        let client = try daemon.client()
        guard case .error(let e) = try client.infer(payload("{\"prompt\": \"x\", \"fault\": \"device_oom\"}")) else {
            Issue.record("expected device_oom")
            return
        }
        #expect(e.code == "device_oom")
        #expect(e.message.contains("NPU out of memory"))
        #expect(eventually { daemon.worker("0")?.lastExit == "device_oom" })
        #expect(daemon.log.contains("reason=device_oom"))
        #expect(daemon.terminate() == 0)
    }

    @Test func aCrashedWorkersHelpersDieWithIt() throws {
        let daemon = try TestDaemon(devices: ["0"], defaults: "restart = \"never\"")
        #expect(daemon.waitAllReady() != nil)
        let client = try daemon.client()
        struct Child: Decodable { var child_pid: Int32 }
        let answer = try client.infer(payload("{\"fault\": \"spawn_child\"}"))
        guard case .response(let body) = answer,
              let child = try? JSONDecoder().decode(Child.self, from: Data(body.readableBytesView)) else {
            Issue.record("no child pid: \(answer)")
            return
        }
        #expect(processExists(child.child_pid))
        _ = try client.infer(payload("{\"fault\": \"crash\"}"))
        #expect(eventually { daemon.worker("0")?.lastExit == "signaled(11)" })
        #expect(eventually(timeout: .seconds(2)) { !processExists(child.child_pid) }, "the helper went with its worker")
        #expect(daemon.terminate() == 0)
    }

    /// Without cgroups only the subreaper catches a helper that left the worker's group and session.
    @Test func helpersThatEscapeTheProcessGroupDieWithTheirWorkerAndAtExitWithoutCgroups() throws {
        struct Escaped: Decodable { var escaped_pid: Int32 }
        let daemon = try TestDaemon(devices: ["0", "1"], extra: "[cgroups]\nmode = \"off\"")
        #expect(daemon.waitAllReady() != nil)
        let client = try daemon.client()
        func escape(_ device: String) throws -> Int32 {
            let answer = try client.infer(payload("{\"fault\": \"spawn_escaped\"}"), options: RequestOptions(device: device))
            guard case .response(let body) = answer,
                  let e = try? JSONDecoder().decode(Escaped.self, from: Data(body.readableBytesView)) else {
                throw SandboxFailure("no escaped pid: \(answer)")
            }
            return e.escaped_pid
        }
        let first = try escape("0")
        let kept = try escape("1")
        #expect(processExists(first) && processExists(kept))
        // Re-parented to the supervisor (its own parent, a shell, has exited).
        #expect(eventually { parentPID(of: first) == daemon.pid }, "parent of \(first): \(parentPID(of: first) as Any)")
        let worker = try #require(daemon.worker("0")?.pid)
        kill(worker, SIGKILL)
        #expect(eventually(timeout: .seconds(3)) { !processExists(first) }, "the escaped helper went with its worker")
        #expect(processExists(kept), "device 1's helper is not touched")
        #expect(eventually { daemon.worker("0")?.state == "ready" })
        #expect(daemon.terminate() == 0)
        #expect(eventually(timeout: .seconds(3)) { !processExists(kept) }, "nothing is left at exit")
    }

    @Test func restartCyclesLeakNoDescriptorsAndLittleMemory() throws {
        let daemon = try TestDaemon(devices: ["0"], defaults: "restart_limit = 100000\nbackoff_initial = \"10ms\"\nbackoff_max = \"10ms\"")
        #expect(daemon.waitAllReady() != nil)
        func fdCount() -> Int { (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(daemon.pid)/fd").count) ?? -1 }
        // The fewest descriptors seen over 400 ms: a transient one (the orphan sweep reading /proc a moment after
        // an exit) is not a leak; a leak stays.
        func settledFDs() -> Int {
            var fewest = Int.max
            let until = ContinuousClock.now + .milliseconds(400)
            while ContinuousClock.now < until { fewest = min(fewest, fdCount()) }
            return fewest
        }
        // Warm up (lazy allocations, the first cgroup), then measure.
        for _ in 0..<10 { try cycle(daemon) }
        let fdsBefore = settledFDs()
        let rssBefore = rssKB(daemon.pid)
        for _ in 0..<100 { try cycle(daemon) }
        let fdsAfter = settledFDs()
        #expect(fdsAfter <= fdsBefore, "descriptors: \(fdsBefore) before, \(fdsAfter) after 100 restarts")
        #expect(rssKB(daemon.pid) - rssBefore < 4096, "RSS grew \(rssKB(daemon.pid) - rssBefore) KiB over 100 restarts")
        #expect(daemon.terminate() == 0)
    }

    func cycle(_ daemon: TestDaemon) throws {
        guard let pid = daemon.worker("0")?.pid else { throw CycleError() }
        kill(pid, SIGKILL)
        guard eventually(timeout: .seconds(10), { daemon.worker("0").map { $0.state == "ready" && $0.pid != pid } ?? false })
        else { throw CycleError() }
    }

    struct CycleError: Error {}
}

/// A process's parent pid (from /proc), nil when it is gone.
func parentPID(of pid: Int32) -> Int32? {
    guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
          let close = stat.lastIndex(of: ")") else { return nil }
    let fields = stat[stat.index(after: close)...].split(separator: " ")
    return fields.count > 1 ? Int32(fields[1]) : nil
}

struct SandboxFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// The children of a process (its threads' /proc children files).
func childPids(of pid: pid_t) -> [pid_t] {
    let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
    return tasks.flatMap { tid in
        ((try? String(contentsOfFile: "/proc/\(pid)/task/\(tid)/children", encoding: .utf8)) ?? "")
            .split(separator: " ").compactMap { pid_t($0) }
    }
}

import ArgumentParser
import Foundation
import NPUClient
import WireProtocol

/// Many workers: cold start to all ready, then the idle supervisor's memory, CPU and wake-ups (issue 10, item 5).
struct Scale: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "scale",
        abstract: "N workers (model load 0): cold start to all ready, then idle RSS, CPU and context switches.")
    @OptionGroup var bin: BinOption
    @Option(help: "Worker count.") var workers = 64
    @Option(help: "Per-worker memory cgroups: auto or off.") var cgroups = "auto"
    @Option(help: "Seconds to settle once all are ready, before the idle measurement.") var settle: Double = 3
    @Option(help: "Seconds of idle measurement (CPU from /proc/PID/stat).") var idle: Double = 60
    @Option(help: "Status poll interval while waiting for all ready, ms.") var pollMs = 5

    func run() throws {
        let t0 = now()
        let daemon = try BenchDaemon(devices: workers, workerArgs: ["--load-ms", "0"], cgroups: cgroups,
                                     binDirectory: bin.bin)
        defer { daemon.stop() }
        var ready = Double.nan
        while now() - t0 < 60 && daemon.process.isRunning {
            if let doc = daemon.status(), doc.workers.count == workers, doc.workers.allSatisfy({ $0.state == "ready" }) {
                ready = now() - t0
                break
            }
            usleep(useconds_t(pollMs * 1000))
        }
        guard !ready.isNaN else {
            let states = daemon.status().map { doc in
                Dictionary(grouping: doc.workers, by: \.state).map { "\($0.key): \($0.value.count)" }.joined(separator: ", ")
            } ?? "no status document"
            let log = (try? String(contentsOfFile: daemon.directory + "/daemon.log", encoding: .utf8)) ?? ""
            throw BenchError("not all \(workers) workers ready within 60 s (\(states)); log:\n\(log.suffix(3000))")
        }
        let startCPU = ProcessCPU(pid: daemon.pid).ticks
        usleep(useconds_t(settle * 1e6))
        let before = ProcessCPU(pid: daemon.pid)
        let m0 = Memory(pid: daemon.pid)
        usleep(useconds_t(idle * 1e6))
        let after = ProcessCPU(pid: daemon.pid)
        let m1 = Memory(pid: daemon.pid)
        let ticks = Double(sysconf(Int32(_SC_CLK_TCK)))
        let cpu = Double(after.ticks - before.ticks) / ticks / idle * 100
        let switches = Double(after.contextSwitches - before.contextSwitches) / idle
        print(String(format: "workers %d, cgroups %@: cold start -> all ready %.0f ms (supervisor CPU %.0f ms); idle %.0f s: CPU %.3f%% of a core, "
                     + "%.1f context switches/s (all threads); RSS %.1f MB -> %.1f MB (anon %.1f MB), %d threads, %d fds",
                     workers, cgroups, ready * 1000, Double(startCPU) / ticks * 1000, idle, cpu, switches, Double(m0.rssKB) / 1024,
                     Double(m1.rssKB) / 1024, Double(m1.anonKB) / 1024, m1.threads, m1.fds))
    }
}

/// A process's CPU time (user + system, clock ticks) and the context switches of all its threads.
struct ProcessCPU {
    var ticks: Int
    var contextSwitches: Int

    init(pid: Int32) {
        let stat = (try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)) ?? ""
        let fields = stat.split(separator: ")").last.map { $0.split(separator: " ") } ?? []
        // After "comm)": state(0) ... utime is field 14 (index 11 here), stime 15 (index 12).
        ticks = fields.count > 12 ? (Int(fields[11]) ?? 0) + (Int(fields[12]) ?? 0) : 0
        var switches = 0
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
        for tid in tasks {
            let status = (try? String(contentsOfFile: "/proc/\(pid)/task/\(tid)/status", encoding: .utf8)) ?? ""
            for line in status.split(separator: "\n") where line.hasSuffix("ctxt_switches") == false
                && (line.hasPrefix("voluntary_ctxt_switches") || line.hasPrefix("nonvoluntary_ctxt_switches")) {
                switches += Int(line.split(separator: ":").last?.trimmingCharacters(in: .whitespaces) ?? "") ?? 0
            }
        }
        contextSwitches = switches
    }
}

import ArgumentParser
import Foundation
import NIOCore
import NPUClient
import WireProtocol

@main
struct NPUBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "npu-bench",
        abstract: "Benchmarks and drills for npu-supervisor (figures for BENCHMARKS.md).",
        subcommands: [Load.self, RestartLatency.self, RestartPeers.self, Scale.self, IdleMemory.self, Soak.self, HTTPLoad.self, Codec.self, Forward.self])
}

struct BinOption: ParsableArguments {
    @Option(help: "Folder with npu-supervisord and npu-worker (default: next to this program).")
    var bin: String = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
        .deletingLastPathComponent().path
}

/// SIGKILL a worker, time until the replacement is spawned (new pid in status) and until it is ready.
struct RestartLatency: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "restart")
    @OptionGroup var bin: BinOption
    @Option(help: "Kill/replace cycles.") var repetitions = 50
    @Option(help: "backoff_initial for the run (the supervisor's reaction time is measured on top of it).")
    var backoff = "10ms"
    @Option(help: "Simulated model-load time of the worker, ms.") var loadMs = 0
    @Option(help: "Per-worker memory cgroups: auto or off.") var cgroups = "auto"
    @Option(help: "backoff_reset_after in ms; each kill then waits until the worker has served that long, so it is restarted at once (no backoff), as runit and s6 restart a service that ran for a second.")
    var servedMs: Int?

    func run() throws {
        let resetAfter = servedMs.map { "\nbackoff_reset_after = \"\($0)ms\"" } ?? ""
        let daemon = try BenchDaemon(
            devices: 2, workerArgs: ["--load-ms", "\(loadMs)"],
            defaults: "backoff_initial = \"\(backoff)\"\nbackoff_max = \"\(backoff)\"\nbackoff_jitter = 0\n"
                + "restart_limit = 1000000\nrestart_window = \"1s\"" + resetAfter,
            cgroups: cgroups, binDirectory: bin.bin)
        defer { daemon.stop() }
        _ = try daemon.waitAllReady()
        var spawned: [Double] = []
        var ready: [Double] = []
        for _ in 0..<repetitions {
            guard let victim = daemon.status()?.workers[0].pid else { throw BenchError("no worker pid") }
            if let servedMs { usleep(useconds_t((servedMs + 50) * 1000)) }  // it has served long enough
            let t0 = now()
            kill(victim, SIGKILL)
            var sawSpawn = false
            while true {
                guard let w = daemon.status()?.workers[0] else { continue }
                if !sawSpawn, let pid = w.pid, pid != victim {
                    spawned.append(now() - t0)
                    sawSpawn = true
                }
                if sawSpawn && w.state == "ready" {
                    ready.append(now() - t0)
                    break
                }
                if now() - t0 > 30 { throw BenchError("no replacement within 30 s") }
            }
        }
        print("restart latency over \(repetitions) SIGKILLs (backoff_initial = \(backoff), model load \(loadMs) ms, cgroups \(cgroups)"
            + (servedMs.map { ", each worker killed after serving \($0 + 50) ms with backoff_reset_after \($0) ms" } ?? "") + "):")
        print("  kill -> replacement spawned: median \(ms(percentile(spawned, 50)))  p90 \(ms(percentile(spawned, 90)))  max \(ms(spawned.max() ?? 0))")
        print("  kill -> replacement ready:   median \(ms(percentile(ready, 50)))  p90 \(ms(percentile(ready, 90)))  max \(ms(ready.max() ?? 0))")
    }
}

/// The supervisor's own memory, threads and fds when idle with N ready workers.
struct IdleMemory: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "idle")
    @OptionGroup var bin: BinOption
    @Option(parsing: .upToNextOption, help: "Worker counts to measure.") var workers: [Int] = [4, 32]
    @Option(help: "Seconds to idle before measuring.") var settle: Double = 3

    func run() throws {
        print("workers  supervisor RSS  RssAnon  threads  fds")
        for n in workers {
            let daemon = try BenchDaemon(devices: n, workerArgs: ["--load-ms", "0"], binDirectory: bin.bin)
            defer { daemon.stop() }
            _ = try daemon.waitAllReady(timeout: 120)
            usleep(UInt32(settle * 1e6))
            let m = Memory(pid: daemon.pid)
            print(String(format: "%7d  %10.1f MB  %5.1f MB  %7d  %3d", n, Double(m.rssKB) / 1024,
                         Double(m.anonKB) / 1024, m.threads, m.fds))
        }
    }
}

/// Many kill/restart cycles: the supervisor's descriptors and memory must stay flat (no leak per restart).
struct Soak: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "soak")
    @OptionGroup var bin: BinOption
    @Option(help: "Kill/replace cycles.") var cycles = 1000
    @Option(help: "Report every this many cycles.") var every = 250
    @Option(help: "Let each new worker run this long before it is killed, ms (with cgroups, restarts from 300 ms on take the slot's standby).")
    var pauseMs = 0

    func run() throws {
        let daemon = try BenchDaemon(
            devices: 2, workerArgs: ["--load-ms", "0"],
            defaults: "backoff_initial = \"10ms\"\nbackoff_max = \"10ms\"\nbackoff_jitter = 0\n"
                + "restart_limit = 1000000\nrestart_window = \"1s\"",
            binDirectory: bin.bin)
        defer { daemon.stop() }
        _ = try daemon.waitAllReady()
        func line(_ n: Int) {
            let m = Memory(pid: daemon.pid)
            let cgroups = (try? FileManager.default.contentsOfDirectory(atPath: "/sys/fs/cgroup/memory"))
                .map { _ in "" } ?? ""
            print(String(format: "%6d cycles: supervisor RSS %.1f MB (anon %.1f MB), %d fds, %d threads%@", n,
                         Double(m.rssKB) / 1024, Double(m.anonKB) / 1024, m.fds, m.threads, cgroups))
        }
        line(0)
        for n in 1...cycles {
            if pauseMs > 0 { usleep(useconds_t(pauseMs * 1000 / 2)) }  // two workers alternate: each runs ~pauseMs
            guard let victim = daemon.status()?.workers[n % 2].pid else { throw BenchError("no worker pid") }
            kill(victim, SIGKILL)
            let t0 = now()
            while true {
                if let w = daemon.status()?.workers[n % 2], w.state == "ready", w.pid != victim { break }
                if now() - t0 > 30 { throw BenchError("no replacement within 30 s") }
                usleep(1000)
            }
            if n % every == 0 { line(n) }
        }
        let restarts = daemon.status()?.workers.map(\.restarts).reduce(0, +) ?? 0
        print("total restarts seen by the supervisor: \(restarts)")
    }
}

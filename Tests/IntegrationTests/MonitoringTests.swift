import Foundation
import NIOCore
import NPUClient
import TestSupport
import Testing
import WireProtocol

/// README "Monitoring": the shipped alert rules under promtool, the dashboard's queries against the real
/// `/metrics`, a real Prometheus scraping a real supervisor, and the availability account against what a client
/// counts through a chaos drill. Prometheus comes from scripts/install-deps.sh (the Debian package `prometheus`);
/// where it is missing the tests that need it are skipped with that reason.
@Suite(.serialized, .timeLimit(.minutes(4)))
struct MonitoringTests {
    static let repo = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().path
    static let rules = repo + "/deploy/prometheus/npu-supervisor.rules.yml"
    static let ruleTests = repo + "/deploy/prometheus/npu-supervisor.tests.yml"
    static let dashboard = repo + "/deploy/grafana/npu-supervisor.json"

    static func tool(_ name: String) -> String? {
        for dir in ["/usr/bin", "/usr/local/bin", "/bin"] where FileManager.default.isExecutableFile(atPath: dir + "/" + name) {
            return dir + "/" + name
        }
        return nil
    }

    static let promtool = tool("promtool")
    static let prometheus = tool("prometheus")
    static let missing = "not installed (scripts/install-deps.sh installs the Debian package prometheus)"

    // MARK: promtool

    @Test(.enabled(if: promtool != nil, "promtool \(missing)"))
    func theShippedRulesPassPromtoolCheckAndTheirUnitTests() throws {
        let check = try runCommand(Self.promtool!, ["check", "rules", Self.rules])
        #expect(check.status == 0, "\(check.stdout)\(check.stderr)")
        #expect(check.stdout.contains("SUCCESS: 9 rules found"), "\(check.stdout)")
        let test = try runCommand(Self.promtool!, ["test", "rules", Self.ruleTests])
        #expect(test.status == 0, "\(test.stdout)\(test.stderr)")
        // Every alert is tested both firing and not firing.
        let rulesText = try String(contentsOfFile: Self.rules, encoding: .utf8)
        let testsText = try String(contentsOfFile: Self.ruleTests, encoding: .utf8)
        let alerts = rulesText.split(separator: "\n").compactMap { line -> String? in
            let t = line.trimmingCharacters(in: .whitespaces)
            return t.hasPrefix("- alert: ") ? String(t.dropFirst("- alert: ".count)) : nil
        }
        #expect(alerts.count == 9)
        let lines = testsText.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }
        for alert in alerts {
            let next = lines.indices.filter { lines[$0] == "alertname: \(alert)" && $0 + 1 < lines.count }.map { lines[$0 + 1] }
            #expect(next.contains("exp_alerts: []"), "\(alert) never tested not firing")
            #expect(next.contains("exp_alerts:"), "\(alert) never tested firing")
        }
    }

    // MARK: The dashboard and the rules name real series

    /// Metric names in a PromQL expression: ours all start with `inference_` or `npu_supervisor_`.
    static func seriesNames(_ expr: String) -> Set<String> {
        var names = Set<String>()
        var stripped = expr
        while let open = stripped.firstIndex(of: "\""), let close = stripped[stripped.index(after: open)...].firstIndex(of: "\"") {
            stripped.removeSubrange(open...close)
        }
        var token = ""
        for c in stripped + " " {
            if c.isLetter || c.isNumber || c == "_" || c == ":" {
                token.append(c)
            } else {
                if token.hasPrefix("inference_") || token.hasPrefix("npu_supervisor_") { names.insert(token) }
                token = ""
            }
        }
        return names
    }

    static func exposedNames(_ metrics: String) -> Set<String> {
        Set(metrics.split(separator: "\n").filter { !$0.hasPrefix("#") }.compactMap {
            $0.split(whereSeparator: { $0 == "{" || $0 == " " }).first.map(String.init)
        })
    }

    @Test func everyDashboardAndAlertQueryNamesSeriesThatMetricsExposes() throws {
        let daemon = try TestDaemon(devices: ["0", "1"], http: "127.0.0.1:0")
        #expect(daemon.waitAllReady() != nil)
        let http = try #require(daemon.status()?.supervisor.http)
        let client = try daemon.client()
        #expect(decodeAnswer(try client.infer(payload("{\"prompt\": \"a\"}"))) != nil)
        var chunks = 0
        _ = try client.infer(payload("{\"prompt\": \"b\", \"stream\": true}")) { _ in chunks += 1 }
        #expect(chunks > 0)
        let scrape = try HealthTests.curl("http://\(http)/metrics")
        #expect(scrape.code == 200)
        let exposed = Self.exposedNames(scrape.body)
        if let promtool = Self.promtool {
            // Prometheus's own linter: naming conventions (base units, _total counters), HELP and TYPE.
            let file = daemon.directory + "/metrics.txt"
            try (scrape.body + "\n").write(toFile: file, atomically: true, encoding: .utf8)  // curl() trims the last newline
            let lint = try runCommand("/bin/sh", ["-c", "\"$0\" check metrics < \"$1\"", promtool, file])
            #expect(lint.status == 0 && lint.stdout.isEmpty && lint.stderr.isEmpty, "\(lint.stdout)\(lint.stderr)")
        }
        #expect(exposed.contains("npu_supervisor_time_to_first_chunk_seconds_bucket"))
        #expect(scrape.body.contains("npu_supervisor_time_to_first_chunk_seconds_count{device=\"0\"} 1")
                    || scrape.body.contains("npu_supervisor_time_to_first_chunk_seconds_count{device=\"1\"} 1"),
                "the streamed request's first chunk is counted")

        let json = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: Self.dashboard))) as! [String: Any]
        let panels = try #require(json["panels"] as? [[String: Any]])
        #expect(panels.count >= 10)
        var used = Set<String>()
        for panel in panels {
            let title = panel["title"] as? String ?? "?"
            let exprs = (panel["targets"] as? [[String: Any]] ?? []).compactMap { $0["expr"] as? String }
            #expect(!exprs.isEmpty, "panel \(title) has no query")
            for expr in exprs {
                let names = Self.seriesNames(expr)
                #expect(!names.isEmpty, "panel \(title): \(expr) names no series of ours")
                for name in names {
                    #expect(exposed.contains(name), "panel \(title) queries \(name), which /metrics does not expose")
                    used.insert(name)
                }
            }
        }
        for wanted in ["inference_requests_total", "inference_latency_seconds_bucket", "npu_supervisor_worker_up",
                       "npu_supervisor_device_healthy", "npu_supervisor_worker_restarts_total",
                       "npu_supervisor_availability_ratio"] {
            #expect(used.contains(wanted), "the dashboard shows no \(wanted)")
        }
        let rulesText = try String(contentsOfFile: Self.rules, encoding: .utf8)
        for line in rulesText.split(separator: "\n") where !line.trimmingCharacters(in: .whitespaces).hasPrefix("#")
            && !line.contains("runbook:") && !line.contains("summary:") {
            for name in Self.seriesNames(String(line)) {
                #expect(exposed.contains(name), "the rules query \(name), which /metrics does not expose")
            }
        }
        #expect(daemon.terminate() == 0)
    }

    @Test func deviceHealthGaugeIsMinusOneWhenTheProbeCannotRunZeroWhenUnhealthyOneWhenHealthy() throws {
        let scratch = try HealthTests.scratch()
        defer { try? FileManager.default.removeItem(atPath: scratch) }
        let smi = try HealthTests.fakeNPUSmi(in: scratch)
        try HealthTests.setDevice(scratch, "0", "HANG")
        let daemon = try TestDaemon(
            devices: ["0"],
            defaults: "device_probe = { type = \"command\", command = [\"\(smi)\", \"info\", \"-t\", \"health\", \"-i\", \"{device}\"], interval = \"200ms\", timeout = \"300ms\" }",
            http: "127.0.0.1:0")
        let http = try #require(eventually { daemon.status()?.supervisor.http != nil } ? daemon.status()?.supervisor.http : nil)
        func gauge() -> String? {
            let body = (try? HealthTests.curl("http://\(http)/metrics").body) ?? ""
            return body.split(separator: "\n").first { $0.hasPrefix("npu_supervisor_device_healthy{device=\"0\"} ") }
                .map { String($0.split(separator: " ").last!) }
        }
        #expect(eventually { daemon.worker("0")?.health.device.contains("timed out after 300ms") == true })
        #expect(gauge() == "-1", "a probe that times out says nothing of the device")
        try HealthTests.setDevice(scratch, "0", "Critical")
        #expect(eventually { gauge() == "0" }, "unhealthy")
        try HealthTests.setDevice(scratch, "0", "OK")
        #expect(eventually(timeout: .seconds(30)) { gauge() == "1" }, "healthy again")
        #expect(daemon.terminate() == 0)
    }

    // MARK: A real Prometheus

    /// A free TCP port on 127.0.0.1 (bound, read, closed).
    static func freePort() throws -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0
            }
        }
        guard bound else { throw POSIXError(.EADDRINUSE) }
        return Int(UInt16(bigEndian: address.sin_port))
    }

    /// `GET` a Prometheus API path with URL-encoded parameters; the decoded JSON `data`, or nil.
    static func api(_ port: Int, _ path: String, _ parameters: [String: String] = [:]) -> Any? {
        var args = ["-s", "-m", "5", "-G", "http://127.0.0.1:\(port)\(path)"]
        for (k, v) in parameters { args += ["--data-urlencode", "\(k)=\(v)"] }
        guard let r = try? runCommand("/usr/bin/curl", args, timeout: 10), r.status == 0,
              let object = try? JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any],
              object["status"] as? String == "success" else { return nil }
        return object["data"]
    }

    /// The instant value of a query's first series, or nil when it returns none.
    static func value(_ port: Int, _ query: String) -> Double? {
        guard let data = api(port, "/api/v1/query", ["query": query]) as? [String: Any],
              let result = data["result"] as? [[String: Any]], let first = result.first,
              let pair = first["value"] as? [Any], pair.count == 2, let text = pair[1] as? String else { return nil }
        return Double(text)
    }

    /// The states (`pending`, `firing`) of an alert for one device.
    static func alertStates(_ port: Int, _ name: String, device: String) -> [String] {
        guard let data = api(port, "/api/v1/alerts") as? [String: Any],
              let alerts = data["alerts"] as? [[String: Any]] else { return [] }
        return alerts.compactMap { alert in
            let labels = alert["labels"] as? [String: String] ?? [:]
            return labels["alertname"] == name && labels["device"] == device ? alert["state"] as? String : nil
        }
    }

    @Test(.enabled(if: prometheus != nil, "prometheus \(missing)"))
    func aRealPrometheusSeesAWorkerKillAndTheDeviceDownAlert() throws {
        let scratch = try HealthTests.scratch()
        defer { try? FileManager.default.removeItem(atPath: scratch) }
        let smi = try HealthTests.fakeNPUSmi(in: scratch)
        let daemon = try TestDaemon(
            devices: ["0", "1"],
            defaults: "device_probe = { type = \"command\", command = [\"\(smi)\", \"info\", \"-t\", \"health\", \"-i\", \"{device}\"], interval = \"200ms\", timeout = \"1s\" }",
            http: "127.0.0.1:0")
        #expect(daemon.waitAllReady() != nil)
        let http = try #require(daemon.status()?.supervisor.http)

        let port = try Self.freePort()
        try """
            global:
              scrape_interval: 1s
              evaluation_interval: 1s
            rule_files: ["\(Self.rules)"]
            scrape_configs:
              - job_name: npu-supervisor
                static_configs:
                  - targets: ["\(http)"]
            """.write(toFile: scratch + "/prometheus.yml", atomically: true, encoding: .utf8)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Self.prometheus!)
        process.arguments = ["--config.file=\(scratch)/prometheus.yml", "--storage.tsdb.path=\(scratch)/data",
                             "--web.listen-address=127.0.0.1:\(port)", "--log.level=warn"]
        _ = FileManager.default.createFile(atPath: scratch + "/prometheus.log", contents: nil)
        let log = try #require(FileHandle(forWritingAtPath: scratch + "/prometheus.log"))
        process.standardOutput = log
        process.standardError = log
        try process.run()
        defer {
            // Always stopped, even when an expectation failed: SIGTERM, then SIGKILL.
            process.terminate()
            if !eventually(timeout: .seconds(10), { !process.isRunning }) { kill(process.processIdentifier, SIGKILL) }
            process.waitUntilExit()
        }
        let prometheusLog = { (try? String(contentsOfFile: scratch + "/prometheus.log", encoding: .utf8)) ?? "" }

        // The first scrape and the first rule evaluation take a few seconds.
        #expect(eventually(timeout: .seconds(30)) { Self.value(port, "up{job=\"npu-supervisor\"}") == 1 },
                "Prometheus never scraped the supervisor: \(prometheusLog())")
        #expect(eventually(timeout: .seconds(30)) {
            Self.value(port, "npu_supervisor_device_healthy{device=\"1\"}") == 1
                && Self.alertStates(port, "NPUDeviceDown", device: "1").isEmpty
        }, "device 1 never looked healthy to Prometheus")

        // A worker kill shows up in the restarts series.
        #expect(Self.value(port, "sum(npu_supervisor_worker_restarts_total{device=\"0\"})") == 0)
        let pid = try #require(daemon.worker("0")?.pid)
        kill(pid, SIGKILL)
        #expect(eventually(timeout: .seconds(30)) {
            Self.value(port, "npu_supervisor_worker_restarts_total{device=\"0\",reason=\"signaled\"}") == 1
        }, "the kill never reached the restarts series")

        // A failing device probe: the device-down alert goes pending (then firing after its minute).
        try HealthTests.setDevice(scratch, "1", "Critical")
        #expect(eventually(timeout: .seconds(30)) { Self.value(port, "npu_supervisor_device_healthy{device=\"1\"}") == 0 })
        #expect(eventually(timeout: .seconds(30)) {
            let states = Self.alertStates(port, "NPUDeviceDown", device: "1")
            return states.contains("pending") || states.contains("firing")
        }, "NPUDeviceDown never went pending for device 1")
        #expect(Self.alertStates(port, "NPUDeviceDown", device: "0").isEmpty, "device 0 stays healthy")
        #expect(daemon.terminate() == 0)
    }

    // MARK: The availability account agrees with the client

    @Test func theAvailabilityAccountMatchesWhatTheClientCountedThroughAChaosDrill() throws {
        let daemon = try TestDaemon(
            devices: ["0", "1"], workerArgs: ["--load-ms", "50", "--token-ms", "2"], defaults: "max_inflight = 3",
            extra: "[requests]\nmax_queue = 3\nretries = 0\n\n[availability]\nobjective = 0.999\nwindow = \"10m\"",
            http: "127.0.0.1:0")
        #expect(daemon.waitAllReady() != nil)
        let http = try #require(daemon.status()?.supervisor.http)
        let client = try daemon.client()
        var counted: [String: Int] = [:]
        var sent = 0
        var nextID: UInt64 = 1
        // Rounds of 12 pipelined requests (more than 2 x 3 in flight + 3 queued: some are refused `overloaded`),
        // with crashes, device OOMs, deadlines and cancels mixed in, and a SIGKILL from outside now and then.
        for round in 0..<14 {
            var ids: [UInt64] = []
            for i in 0..<12 {
                let id = nextID
                nextID += 1
                var body = "{\"prompt\": \"r\(round) \(i)\", \"max_new_tokens\": 8"
                var options: RequestOptions?
                switch (round + i) % 13 {
                case 3 where round % 3 == 0: body += ", \"fault\": \"crash\""
                case 5 where round % 4 == 1: body += ", \"fault\": \"device_oom\""
                case 7: body += ", \"fault\": \"sleep\", \"sleep_ms\": 400"; options = RequestOptions(deadlineMS: 100)
                case 9: body += ", \"stream\": true"
                default: break
                }
                try client.sendRequest(id: id, payload: payload(body + "}"), options: options)
                ids.append(id)
                sent += 1
            }
            if round % 5 == 2 { try client.cancel(id: ids[10]) }
            if round % 4 == 3, let pid = daemon.status()?.workers[round % 2].pid { kill(pid, SIGKILL) }
            var open = Set(ids)
            while !open.isEmpty {
                let frame = try #require(try client.readFrame(), "the supervisor closed the connection")
                guard open.contains(frame.requestID) else { continue }
                switch frame.type {
                case .chunk: continue
                case .response: counted["ok", default: 0] += 1
                case .error: counted[frame.errorPayload.code, default: 0] += 1
                default: Issue.record("unexpected \(frame.type)"); continue
                }
                open.remove(frame.requestID)
            }
        }
        let doc = try #require(daemon.status())
        let a = try #require(doc.availability).sinceStart
        var failed = counted
        let ok = failed.removeValue(forKey: "ok") ?? 0
        #expect(counted.values.reduce(0, +) == sent)
        #expect(failed.count >= 3, "the drill produced several kinds of failure: \(failed)")
        #expect(a.received == sent)
        #expect(a.succeeded == ok)
        #expect(a.failed == failed, "client: \(failed); supervisor: \(a.failed)")
        #expect(a.accepted + a.refused == sent && a.answered == a.accepted && a.abandoned == 0)
        let countedFailures = failed.filter { $0.key != "bad_request" && $0.key != "cancelled" }.values.reduce(0, +)
        let clientAvailability = Double(ok) / Double(ok + countedFailures)
        #expect(abs(a.availability - clientAvailability) < 1e-12, "client \(clientAvailability), supervisor \(a.availability)")
        #expect(abs(a.errorBudgetRemaining - (1 - (1 - clientAvailability) / 0.001)) < 1e-9)
        #expect(doc.availability?.window.succeeded == ok, "everything happened inside the window")
        let lost = a.capacityLostSeconds.values.compactMap { $0["down"] }.reduce(0, +)
        #expect(lost > 0, "crashed workers cost capacity")
        // The same numbers in /metrics and on the CLI's one line.
        let metrics = try HealthTests.curl("http://\(http)/metrics").body
        var scraped: [String: Int] = [:]
        for line in metrics.split(separator: "\n") where line.hasPrefix("inference_requests_total{") {
            let status = line.split(separator: "status=\"")[1].split(separator: "\"")[0]
            scraped[String(status), default: 0] += Int(Double(line.split(separator: " ").last!)!)
        }
        #expect(scraped.filter { $0.value > 0 } == counted, "client: \(counted); /metrics: \(scraped)")
        let line = try daemon.ctl(["status"]).stdout.split(separator: "\n").first { $0.hasPrefix("availability: ") }
        #expect(line?.contains("(\(ok) ok, \(countedFailures) failed of \(sent) received)") == true, "\(line ?? "no line")")
        #expect(daemon.terminate() == 0)
    }
}

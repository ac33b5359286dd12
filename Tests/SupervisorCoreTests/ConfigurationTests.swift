import SupervisorCore
import SupervisorRuntime
import Testing

struct ConfigurationTests {
    static let minimal = """
        [defaults]
        command = ["/bin/sh", "-c", "echo {device}"]
        [[device]]
        id = "0"
        [[device]]
        id = "7"
        kind = "gpu"
        max_inflight = 9
        """

    @Test func outputRateLimit() throws {
        let base = "[defaults]\ncommand = [\"/bin/true\"]\n"
        #expect(try ConfigLoader.parse(base + "[[device]]\nid = \"0\"\n", path: "/tmp/c.toml")
            .workers[0].outputRateLimit == 8 << 20)
        let set = try ConfigLoader.parse(base + "output_rate_limit = \"1MiB\"\n[[device]]\nid = \"0\"\n"
                                         + "[[device]]\nid = \"1\"\noutput_rate_limit = 0\n", path: "/tmp/c.toml")
        #expect(set.workers.map(\.outputRateLimit) == [1 << 20, nil])
        #expect(throws: ConfigError.self) {
            try ConfigLoader.parse(base + "output_rate_limit = \"1KiB\"\n[[device]]\nid = \"0\"\n", path: "/tmp/c.toml")
        }
    }

    @Test func defaultsApplyAndDevicesOverride() throws {
        let c = try ConfigLoader.parse(Self.minimal, path: "/etc/npu/c.toml")
        #expect(c.workers.count == 2)
        #expect(c.workers[0].command == ["/bin/sh", "-c", "echo 0"])
        #expect(c.workers[1].command == ["/bin/sh", "-c", "echo 7"])
        #expect(c.workers[0].pinVariable == "ASCEND_RT_VISIBLE_DEVICES")
        #expect(c.workers[1].pinVariable == "CUDA_VISIBLE_DEVICES")
        #expect(c.workers[0].maxInflight == 4)
        #expect(c.workers[1].maxInflight == 9)
        #expect(c.workers[0].policy.stopTimeout == .seconds(15))
        #expect(c.workers[0].policy.startTimeout == .seconds(300), "model loads take minutes: a generous default")
        #expect(c.requestsSocket == "/run/npu-supervisor/requests.sock")
        #expect(c.workers[1].contractEnvironment["NPU_DEVICE_ID"] == "7")
        #expect(c.workers[1].contractEnvironment["CUDA_VISIBLE_DEVICES"] == "7")
        #expect(c.workers[1].contractEnvironment["NPU_SUPERVISOR_FD"] == "3")
    }

    @Test func loopNiceDefaultsToMinusTenAndIsChecked() throws {
        #expect(try ConfigLoader.parse(Self.minimal, path: "/etc/c.toml").loopNice == -10)
        #expect(try ConfigLoader.parse("[supervisor]\nloop_nice = 0\n" + Self.minimal, path: "/etc/c.toml").loopNice == 0)
        #expect(try ConfigLoader.parse("[supervisor]\nloop_nice = -20\n" + Self.minimal, path: "/etc/c.toml").loopNice == -20)
        Self.expectRefused("supervisor", "loop_nice", ["5", "-21", "\"high\"", "-1.5"])
    }

    /// Each value of `key` in `[table]` is refused with a ``ConfigError`` naming `table.key`.
    static func expectRefused(_ table: String, _ key: String, _ values: [String]) {
        for bad in values {
            do {
                _ = try ConfigLoader.parse("[\(table)]\n\(key) = \(bad)\n" + minimal, path: "/etc/c.toml")
                Issue.record("accepted \(key) = \(bad)")
            } catch let error as ConfigError {
                #expect(error.key == "\(table).\(key)", "\(error)")
            } catch {
                Issue.record("\(key) = \(bad): \(error)")
            }
        }
    }

    @Test func burstAffinityIsOffByDefaultAndChecked() throws {
        #expect(try ConfigLoader.parse(Self.minimal, path: "/etc/c.toml").requests.burstAffinity == 0)
        #expect(try ConfigLoader.parse("[requests]\nburst_affinity = 16\n" + Self.minimal, path: "/etc/c.toml")
            .requests.burstAffinity == 16)
        Self.expectRefused("requests", "burst_affinity", ["-1", "1000001", "true", "2.5"])
    }

    @Test func theRequestsHeldAtOnceAreBounded() throws {
        #expect(try ConfigLoader.parse("[requests]\nmax_queue = 7999000\n" + Self.minimal, path: "/etc/c.toml")
            .requests.maxQueue == 7_999_000)
        do {
            _ = try ConfigLoader.parse("[requests]\nmax_queue = 7999995\n" + Self.minimal, path: "/etc/c.toml")
            Issue.record("accepted 7999995 queued + 13 in flight")
        } catch let error as ConfigError {
            #expect(error.key == "requests.max_queue" && "\(error)".contains("not 8000008"), "\(error)")
        }
        #expect(SupervisorConfiguration.maxRequestsHeld < SlotTable<Int>.capacity)
    }

    @Test func relativePathsAreRelativeToTheConfigFile() throws {
        let c = try ConfigLoader.parse("[supervisor]\nrun_dir = \"../run\"\n" + Self.minimal, path: "/srv/app/config/c.toml")
        #expect(c.runDirectory == "/srv/app/run")
        #expect(c.controlSocket == "/srv/app/run/control.sock")
    }

    @Test(arguments: [
        ("500ms", Duration.milliseconds(500)), ("15s", .seconds(15)), ("2m", .seconds(120)), ("1h", .seconds(3600)),
        ("1.5s", .milliseconds(1500)),
    ])
    func durations(text: String, expected: Duration) {
        #expect(parseDuration(text) == expected)
    }

    @Test(arguments: ["", "15", "s", "-1s", "fast",
                      // Too long to convert (found by fuzzing: the conversion trapped), or beyond 100 years.
                      "1000000000000000000000000005s", "1e300ms", "infs", "nans", "3153600001s", "876001h"])
    func badDurations(text: String) {
        #expect(parseDuration(text) == nil)
    }

    @Test func theLongestDurationIsAHundredYears() {
        #expect(parseDuration("3153600000s") == .seconds(3_153_600_000))
        #expect(parseDuration("876000h") == .seconds(3_153_600_000))
    }

    /// A duration or size too large for the machine is a ConfigError (exit 78), never a trap: as a string, a TOML
    /// integer or a TOML float (found by fuzzing, issue 14: `stop_timeout = "1000000000000000000000000005s"`
    /// crashed `--check-config`, start-up and a reload).
    @Test(arguments: [
        ("stop_timeout = \"1000000000000000000000000005s\"", "defaults.stop_timeout"),
        ("stop_timeout = 1e300", "defaults.stop_timeout"),
        ("stop_timeout = inf", "defaults.stop_timeout"),
        ("stop_timeout = nan", "defaults.stop_timeout"),
        ("stop_timeout = 9223372036854775807", "defaults.stop_timeout"),
        ("memory_limit = \"1e30G\"", "defaults.memory_limit"),
        ("memory_limit = \"infK\"", "defaults.memory_limit"),
    ])
    func hugeValuesAreConfigErrors(line: String, key: String) {
        let text = "[defaults]\ncommand = [\"/bin/true\"]\n\(line)\n[[device]]\nid = \"0\""
        do {
            _ = try ConfigLoader.parse(text, path: "/etc/c.toml")
            Issue.record("accepted: \(line)")
        } catch let error as ConfigError {
            #expect(error.key == key, "\(error)")
        } catch {
            Issue.record("\(error)")
        }
    }

    @Test(arguments: [("16MiB", 16 << 20), ("64KiB", 64 << 10), ("1024", 1024), ("2G", 2 << 30)])
    func sizes(text: String, expected: Int) {
        #expect(parseByteSize(text) == expected)
    }

    @Test(arguments: [
        ("[defaults]\ncommand = [\"/bin/true\"]\nenv = { NOTIFY_SOCKET = \"x\" }\n[[device]]\nid = \"0\"",
         "defaults.env.NOTIFY_SOCKET"),
        ("[defaults]\ncommand = [\"/bin/true\"]\n[[device]]\nid = \"a/b\"", "device[0].id"),
        ("[defaults]\ncommand = [\"/bin/true\"]\nrestart = \"sometimes\"\n[[device]]\nid = \"0\"", "defaults.restart"),
        ("[defaults]\ncommand = [\"/bin/true\"]\nheartbeat_interval = \"2s\"\nheartbeat_timeout = \"1s\"\n[[device]]\nid = \"0\"",
         "defaults.heartbeat_timeout"),
        ("[supervisor]\nsocket_mode = \"999\"\n[defaults]\ncommand = [\"/bin/true\"]\n[[device]]\nid = \"0\"",
         "supervisor.socket_mode"),
        ("[requests]\nretries = -1\n[defaults]\ncommand = [\"/bin/true\"]\n[[device]]\nid = \"0\"", "requests.retries"),
        ("[defaults]\n[[device]]\nid = \"0\"", "device[0].command"),
    ])
    func errorsNameTheKey(toml: String, key: String) {
        do {
            _ = try ConfigLoader.parse(toml, path: "/tmp/c.toml")
            Issue.record("accepted a bad config")
        } catch let error as ConfigError {
            #expect(error.key == key, "\(error)")
        } catch {
            Issue.record("unexpected error \(error)")
        }
    }
}

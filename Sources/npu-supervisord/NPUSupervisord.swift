import ArgumentParser
import Glibc
import Logging
import ServiceLifecycle
import UnixSignals
import SupervisorCore
import SupervisorRuntime
import SystemdSupport

@main
struct NPUSupervisord: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "npu-supervisord",
        abstract: "Keeps one inference worker per accelerator device serving.",
        discussion: """
            Exit codes: 0 stopped cleanly (or --check-config passed); 78 configuration error (nothing was
            started); 1 could not start (another instance holds the sockets, a socket could not be bound).
            Signals: SIGTERM/SIGINT drain requests and stop every worker, SIGHUP is reserved for reload.
            """,
        version: Supervisor.version)

    @Option(name: .shortAndLong, help: "Configuration file (TOML).")
    var config: String = "/etc/npu-supervisor/config.toml"

    @Flag(help: "Validate the configuration, print the effective configuration and exit (0 valid, 78 invalid).")
    var checkConfig = false

    @Option(help: "Override the configured log level (trace, debug, info, notice, warning, error).")
    var logLevel: String?

    func run() async throws {
        let configuration: SupervisorConfiguration
        do {
            configuration = try ConfigLoader.load(path: config)
        } catch let error as ConfigError {
            writeErr("npu-supervisord: invalid configuration \(config): \(error)\n")
            throw ExitCode(78)
        }
        if checkConfig {
            writeOut(ConfigRenderer.render(configuration))
            writeErr("npu-supervisord: \(config) is valid (\(configuration.workers.count) device(s))\n")
            return
        }
        let level = Logger.Level(rawValue: logLevel ?? configuration.logLevel) ?? .info
        // Socket activation: read (and unset) LISTEN_* now, before NIO's threads exist.
        _ = ListenFDs.shared
        // Under journald (JOURNAL_STREAM names our stderr) records go there with structured fields (DEVICE=,
        // WORKER_PID=, REASON=, PRIORITY=, ...); otherwise plain lines on stderr.
        let destination = LogDestination.detect()
        LoggingSystem.bootstrap { label in
            switch destination {
            case .journal:
                var handler = JournalLogHandler(label: label, identifier: "npu-supervisord")
                handler.logLevel = level
                return handler
            case .stderr:
                var handler = StreamLogHandler.standardError(label: label)
                handler.logLevel = level
                return handler
            }
        }
        let logger = Logger(label: "npu-supervisord")
        // On plain stderr, workers' output lines are written in the stream handler's own format, a batch at a
        // time (one record per line bounded what a flooding worker could keep).
        let supervisor = Supervisor(config: configuration, configPath: config, logger: logger,
                                    outputLogging: destination == .stderr ? .stderrBatched(label: "npu-supervisord") : .perLine)
        let group = ServiceGroup(configuration: ServiceGroupConfiguration(
            services: [.init(service: SupervisorService(supervisor: supervisor),
                             successTerminationBehavior: .gracefullyShutdownGroup,
                             failureTerminationBehavior: .gracefullyShutdownGroup)],
            gracefulShutdownSignals: [.sigterm, .sigint],
            logger: logger))
        // An untrapped SIGHUP would kill the daemon: trap it now (reload is applied by the supervisor).
        let hangups = Task {
            for await _ in await UnixSignalsSequence(trapping: .sighup) {
                supervisor.reloadRequested()
            }
        }
        defer { hangups.cancel() }
        do {
            try await group.run()
        } catch {
            logger.critical("npu-supervisord failed: \(error)")
            writeErr("npu-supervisord: \(error)\n")
            throw ExitCode(1)
        }
    }
}

func writeErr(_ text: String) { _ = text.withCString { write(2, $0, strlen($0)) } }
func writeOut(_ text: String) { _ = text.withCString { write(1, $0, strlen($0)) } }

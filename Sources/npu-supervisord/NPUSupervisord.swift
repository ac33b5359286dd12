import Glibc
import Logging
import ServiceLifecycle
import UnixSignals
import SupervisorCore
import SupervisorRuntime
import SystemdSupport

/// The daemon's command line. Parsed here rather than with swift-argument-parser (which the CLI uses): that
/// library links FoundationEssentials, 3 MB of the daemon's idle RSS for three options (BENCHMARKS.md).
/// Errors and exit codes are the ones it gave: a usage error prints why and the usage, and exits 64.
struct Arguments {
    static let usage = """
        USAGE: npu-supervisord [--config <config>] [--check-config] [--log-level <log-level>]

        Keeps one inference worker per accelerator device serving.

        OPTIONS:
          -c, --config <config>   Configuration file (TOML). (default: /etc/npu-supervisor/config.toml)
          --check-config          Validate the configuration, print the effective configuration and exit (0 valid,
                                  78 invalid).
          --log-level <log-level> Override the configured log level (trace, debug, info, notice, warning, error,
                                  critical).
          --version               Show the version.
          -h, --help              Show help information.

        Exit codes: 0 stopped cleanly (or --check-config passed); 78 configuration error (nothing was started);
        1 could not start (another instance holds the sockets, a socket could not be bound); 64 usage error.
        Signals: SIGTERM/SIGINT drain requests and stop every worker, SIGHUP reloads the configuration.

        """

    enum Outcome {
        case run(Arguments)
        case help
        case version
    }

    struct UsageError: Error, CustomStringConvertible {
        let description: String
    }

    var config = "/etc/npu-supervisor/config.toml"
    var checkConfig = false
    var logLevel: Logger.Level?

    static func parse(_ argv: [String]) throws(UsageError) -> Outcome {
        var parsed = Arguments()
        var rest = argv[...]
        var optionsEnded = false
        while let argument = rest.popFirst() {
            if optionsEnded || !argument.hasPrefix("-") || argument == "-" {
                throw UsageError(description: "Unexpected argument '\(argument)'")
            }
            if argument == "--" {
                optionsEnded = true  // what follows is not an option (and the daemon takes no arguments)
                continue
            }
            // `--name=value`, `-c=value`, `--name value` and `-c value` alike.
            var name = argument
            var inline: String?
            if let equals = argument.firstIndex(of: "=") {
                name = String(argument[..<equals])
                inline = String(argument[argument.index(after: equals)...])
            }
            func value() throws(UsageError) -> String {
                // A missing value is not taken from the next option (`-c --check-config` is a mistake).
                let next = inline ?? rest.first.flatMap { $0.hasPrefix("-") ? nil : $0 }
                guard let next, !next.isEmpty else { throw UsageError(description: "Missing value for '\(name)'") }
                if inline == nil { rest.removeFirst() }
                return next
            }
            func noValue() throws(UsageError) {
                guard inline == nil else { throw UsageError(description: "'\(name)' takes no value") }
            }
            switch name {
            case "-c", "--config": parsed.config = try value()
            case "--check-config":
                try noValue()
                parsed.checkConfig = true
            case "--log-level":
                let text = try value()
                guard let level = Logger.Level(rawValue: text) else {
                    throw UsageError(description: "The value '\(text)' is invalid for '--log-level': expected one of "
                                     + Logger.Level.allCases.map(\.rawValue).joined(separator: ", "))
                }
                parsed.logLevel = level
            case "-h", "--help":
                try noValue()
                return .help
            case "--version":
                try noValue()
                return .version
            default: throw UsageError(description: "Unknown option '\(argument)'")
            }
        }
        return .run(parsed)
    }
}

@main
struct NPUSupervisord {
    static func main() async {
        let arguments: Arguments
        do {
            switch try Arguments.parse(Array(CommandLine.arguments.dropFirst())) {
            case .run(let parsed): arguments = parsed
            case .help:
                writeOut(Arguments.usage)
                exit(0)
            case .version:
                writeOut(Supervisor.version + "\n")
                exit(0)
            }
        } catch {
            writeErr("Error: \(error)\n" + Arguments.usage)
            exit(64)
        }
        exit(await run(arguments))
    }

    /// Runs the daemon; its exit status.
    static func run(_ arguments: Arguments) async -> Int32 {
        let config = arguments.config
        let configuration: SupervisorConfiguration
        do {
            configuration = try ConfigLoader.load(path: config)
        } catch let error as ConfigError {
            writeErr("npu-supervisord: invalid configuration \(config): \(error)\n")
            return 78
        } catch {
            writeErr("npu-supervisord: \(config): \(error)\n")
            return 78
        }
        if arguments.checkConfig {
            writeOut(ConfigRenderer.render(configuration))
            writeErr("npu-supervisord: \(config) is valid (\(configuration.workers.count) device(s))\n")
            return 0
        }
        let level = arguments.logLevel ?? Logger.Level(rawValue: configuration.logLevel) ?? .info
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
            return 1
        }
        return 0
    }
}

func writeErr(_ text: String) { _ = text.withCString { write(2, $0, strlen($0)) } }
func writeOut(_ text: String) { _ = text.withCString { write(1, $0, strlen($0)) } }

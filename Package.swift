// swift-tools-version:6.0
import PackageDescription

let strict: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
]

// No unsafeFlags anywhere: SwiftPM refuses a package that has them as a dependency, and NPUClient and WorkerKit
// are libraries for other packages. (`-enforce-exclusivity=unchecked` on WireProtocol and SupervisorRuntime once
// saved ~6% of the request path's CPU, BENCHMARKS.md; `swift build -c release -Xswiftc
// -enforce-exclusivity=unchecked` gets it back, for every module of the build.)

let package = Package(
    name: "npu-supervisor",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "npu-supervisord", targets: ["npu-supervisord"]),
        .executable(name: "npu-supervisorctl", targets: ["npu-supervisorctl"]),
        .executable(name: "npu-worker", targets: ["npu-worker"]),
        .executable(name: "npu-cgroup-exec", targets: ["npu-cgroup-exec"]),
        .library(name: "NPUClient", targets: ["NPUClient"]),
        .library(name: "WorkerKit", targets: ["WorkerKit"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
    ],
    targets: [
        // Tiny C shim: what Glibc's Swift module does not expose (posix_spawn extras, environ, pidfd).
        .target(name: "CSupport"),
        // libsystemd (sd_notify, sd_listen_fds, sd_journal_sendv), found with pkg-config.
        .systemLibrary(
            name: "CSystemd", pkgConfig: "libsystemd",
            providers: [.apt(["libsystemd-dev"])]),
        // Frames and message types shared by the daemon, workers, clients and the CLI.
        .target(
            name: "WireProtocol",
            dependencies: [
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ],
            swiftSettings: strict),
        // Where the daemon's sockets are, from its config's [supervisor] table: the one rule the daemon and
        // clients share. Pure, no dependencies.
        .target(name: "SupervisorPaths", swiftSettings: strict),
        // Pure logic: config model, state machine, restart policy, health aggregation. No syscalls, no clock.
        .target(name: "SupervisorCore", dependencies: ["SupervisorPaths"], swiftSettings: strict),
        // toml++ 3.4 (its single header, MIT, LICENSE beside it) behind a C API that catches its exceptions.
        // TOML_EXCEPTIONS=1: its parse errors are exceptions, caught in the shim.
        .target(
            name: "CTOMLParser",
            cxxSettings: [.define("TOML_EXCEPTIONS", to: "1")]),
        // TOML text into Swift values (no Foundation), for the config loader and SocketDiscovery.
        .target(name: "TOMLReader", dependencies: ["CTOMLParser"], swiftSettings: strict),
        // The daemon's sockets from its config file, for clients (a TOML parser; kept out of NPUClient, which is
        // given socket paths and needs none).
        .target(
            name: "SocketDiscovery",
            dependencies: ["SupervisorPaths", "TOMLReader"],
            swiftSettings: strict),
        .target(
            name: "SystemdSupport",
            dependencies: [
                "CSystemd",
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),
        .target(
            name: "SupervisorRuntime",
            dependencies: [
                "CSupport", "WireProtocol", "SupervisorCore", "SystemdSupport",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                "TOMLReader",
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ],
            swiftSettings: strict),
        .target(
            name: "WorkerKit",
            dependencies: [
                "WireProtocol",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ],
            swiftSettings: strict),
        .target(
            name: "NPUClient",
            dependencies: [
                "WireProtocol",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            swiftSettings: strict),
        .executableTarget(
            name: "npu-supervisord",
            dependencies: [
                "SupervisorRuntime", "SupervisorCore", "SystemdSupport",
                // No swift-argument-parser: it links FoundationEssentials (3 MB of idle RSS); see its main.
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
            ],
            swiftSettings: strict),
        .executableTarget(
            name: "npu-supervisorctl",
            dependencies: [
                "NPUClient", "WireProtocol", "SocketDiscovery",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            // Only what it imports itself: a Foundation reached through a dependency must not slip into its code.
            swiftSettings: strict + [.enableUpcomingFeature("MemberImportVisibility")]),
        .executableTarget(
            name: "npu-worker",
            dependencies: [
                "WorkerKit", "WireProtocol", "CSupport",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: strict),
        // Places a worker in its memory cgroup before the worker's own code runs (see its header comment).
        .executableTarget(name: "npu-cgroup-exec"),
        // Benchmarks and drills (BENCHMARKS.md): restart latency, idle memory, load generator with chaos.
        .executableTarget(
            name: "npu-bench",
            dependencies: [
                "NPUClient", "WireProtocol", "CSupport",
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: strict),
        .testTarget(
            name: "WireProtocolTests",
            dependencies: [
                "WireProtocol",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOTestUtils", package: "swift-nio"),
            ]),
        .testTarget(name: "TOMLReaderTests", dependencies: ["TOMLReader"]),
        .testTarget(
            name: "SupervisorCoreTests",
            dependencies: ["SupervisorCore", "SupervisorRuntime"]),
        // What the real-process test suites share: finding the built programs, waiting on events with deadlines,
        // running commands, spawning and reaping a daemon.
        .target(
            name: "TestSupport",
            dependencies: [
                "NPUClient", "WireProtocol",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ],
            path: "Tests/TestSupport"),
        .testTarget(
            name: "SocketDiscoveryTests",
            dependencies: ["SocketDiscovery", "SupervisorCore", "SupervisorRuntime"]),
        .testTarget(
            name: "IntegrationTests",
            dependencies: [
                "NPUClient", "WireProtocol", "SupervisorCore", "TestSupport",
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ]),
        // sd_notify, socket activation, journald, the units: against the real daemon, and under a real systemd
        // booted in namespaces by scripts/systemd-sandbox.sh.
        .testTarget(
            name: "SystemdTests",
            dependencies: [
                "NPUClient", "WireProtocol", "SystemdSupport", "TestSupport",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
            ]),
    ],
    cxxLanguageStandard: .cxx17
)

import Logging
import ServiceLifecycle

/// Runs a ``Supervisor`` as a swift-service-lifecycle `Service`: graceful shutdown (SIGTERM, SIGINT) drains
/// requests and stops the workers before `run()` returns.
public struct SupervisorService: Service {
    let supervisor: Supervisor

    public init(supervisor: Supervisor) { self.supervisor = supervisor }

    public func run() async throws {
        try await supervisor.start()
        await withGracefulShutdownHandler {
            await supervisor.waitUntilStopped()
        } onGracefulShutdown: {
            supervisor.beginShutdown(reason: "signal")
        }
        await supervisor.close()
    }
}

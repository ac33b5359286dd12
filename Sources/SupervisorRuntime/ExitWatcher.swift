@preconcurrency import Dispatch
import CSupport
import Glibc
import NIOCore

/// How the supervisor learns at once that a child exited, on every kernel operators run:
/// - **pidfd** (Linux ≥ 5.3): a pidfd per child, readable when it exits (see `Supervisor.watchExit`).
/// - **waitid thread**, where `pidfd_open` is refused (ENOSYS on the 4.19 kernels of openEuler 20.03, EulerOS
///   2.8 and Kylin V10; EPERM under some container seccomp profiles), or when `NPU_SUPERVISOR_NO_PIDFD=1` forces
///   it (the test suite runs once that way): one thread blocks in `waitid(P_ALL, WEXITED | WNOWAIT)`, which
///   reports an exited child without reaping it, hands the pid to the event loop, and waits until the loop
///   has reaped it (only the loop reaps, each pid by its owner). No signal handler, no signal mask.
/// The choice is made once, at start, and logged.
enum ExitDetection {
    case pidfd
    case waitidThread(reason: String)

    static let chosen: ExitDetection = {
        if let forced = getenv("NPU_SUPERVISOR_NO_PIDFD"), String(cString: forced) != "0", String(cString: forced) != "" {
            return .waitidThread(reason: "NPU_SUPERVISOR_NO_PIDFD is set")
        }
        let fd = npu_pidfd_open(getpid())
        guard fd >= 0 else {
            return .waitidThread(reason: "pidfd_open refused: \(String(cString: strerror(errno)))")
        }
        close(fd)
        return .pidfd
    }()

    static var usesPidfd: Bool { if case .pidfd = chosen { true } else { false } }

    var description: String {
        switch self {
        case .pidfd: "pidfd per child"
        case .waitidThread(let reason): "a waitid thread (\(reason))"
        }
    }
}

/// The waitid thread of ``ExitDetection/waitidThread(reason:)``. Owners register a callback per pid (on the
/// event loop); the callback must reap that pid. A child nobody registered (an orphan adopted by a subreaper,
/// say) is reaped and forgotten, so that it cannot make the thread spin.
final class ExitWaiter: @unchecked Sendable {  // `callbacks` is touched on `loop` only (asserted)
    private let loop: any EventLoop
    private var callbacks: [pid_t: () -> Void] = [:]
    private let handled = DispatchSemaphore(value: 0)
    private let childStarted = DispatchSemaphore(value: 0)

    init(loop: any EventLoop) { self.loop = loop }

    /// Starts the thread (once).
    func start() {
        var thread = pthread_t()
        let me = Unmanaged.passRetained(self).toOpaque()
        let rc = pthread_create(&thread, nil, { argument in
            Unmanaged<ExitWaiter>.fromOpaque(argument!).takeRetainedValue().run()
            return nil
        }, me)
        if rc == 0 { pthread_detach(thread) } else { Unmanaged<ExitWaiter>.fromOpaque(me).release() }
    }

    /// `onExit` runs on the loop once `pid` has exited; it must reap it.
    func watch(_ pid: pid_t, onExit: @escaping () -> Void) {
        loop.assertInEventLoop()
        callbacks[pid] = onExit
        childStarted.signal()
    }

    /// `pid` was reaped another way (its pipe closed first, a safety-net reap): drop its callback, so that the
    /// table stays bounded and a recycled pid cannot fire a stale one.
    func forget(_ pid: pid_t) {
        loop.assertInEventLoop()
        callbacks.removeValue(forKey: pid)
    }

    /// How many children are watched now (tests: it must not grow without bound).
    var watchedCount: Int { callbacks.count }

    private func run() {
        while true {
            let pid = npu_wait_any_exited()
            if pid == -ECHILD {
                // No child at all: wait for one to be started.
                childStarted.wait()
                continue
            }
            guard pid > 0 else {
                usleep(10_000)  // an error other than ECHILD: do not spin
                continue
            }
            loop.execute {
                if let callback = self.callbacks.removeValue(forKey: pid) { callback() }
                // Reaped by its owner by now; anything else (a stray or adopted child) is reaped here.
                var status: Int32 = 0
                _ = waitpid(pid, &status, WNOHANG)
                self.handled.signal()
            }
            handled.wait()
        }
    }
}

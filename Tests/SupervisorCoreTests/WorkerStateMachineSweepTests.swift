import SupervisorCore
import Testing

/// Every state of the worker machine against every event: each pair is either handled (a new state and perhaps
/// an action) or explicitly refused (nothing changes). The table is the specification; a change to the machine
/// that alters any cell must change this table too.
struct WorkerStateMachineSweepTests {
    static let t0 = MonotonicInstant.seconds(1000)
    static let later = t0 + .seconds(1)
    static let farLater = t0 + .seconds(10_000)

    static let policy = WorkerStateMachine.Policy(
        restart: .always, backoff: Backoff(initial: .seconds(1), maximum: .seconds(8), multiplier: 2, jitter: 0),
        backoffResetAfter: .seconds(3600), maxRestarts: 1, restartWindow: .seconds(3600),
        failedRetryInterval: .seconds(300), startTimeout: .seconds(30), stopTimeout: .seconds(15),
        killRepeat: .seconds(5))

    enum Start: String, CaseIterable, Sendable {
        case stopped, starting, ready, stoppingTerm, stoppingKill, backoff, failedRetry, failedHeld
    }

    enum Event: String, CaseIterable, Sendable {
        /// `timer` fires long after every deadline; `earlyTimer` before any (the one-timer design fires early
        /// whenever a deadline moved later).
        case start, stop, restart, spawned, spawnFailed, ready, fault, holdFailed, exited, timer, earlyTimer
    }

    /// Drives a fresh machine into `start` (pid 100 for a running process).
    static func machine(in start: Start) -> WorkerStateMachine {
        var m = WorkerStateMachine(policy: policy)
        func up() {
            _ = m.start(now: t0)
            m.spawned(pid: 100, now: t0)
        }
        switch start {
        case .stopped: break
        case .starting: up()
        case .ready:
            up()
            _ = m.readyReceived(now: t0)
        case .stoppingTerm:
            up()
            _ = m.readyReceived(now: t0)
            _ = m.stop(now: t0)
        case .stoppingKill:
            up()
            _ = m.readyReceived(now: t0)
            _ = m.fault(.hang, now: t0)
        case .backoff:
            up()
            _ = m.exited(.exited(code: 1), now: t0, jitter: 0)
        case .failedRetry:
            up()
            _ = m.exited(.exited(code: 1), now: t0, jitter: 0)
            _ = m.timerFired(now: t0 + .seconds(1))
            m.spawned(pid: 100, now: t0 + .seconds(1))
            _ = m.exited(.exited(code: 1), now: t0 + .seconds(2), jitter: 0)
        case .failedHeld:
            up()
            _ = m.exited(.exited(code: 78), now: t0, jitter: 0)
        }
        return m
    }

    /// "state/action" after the event, or "refused" when the event changed nothing and asked for nothing.
    static func apply(_ event: Event, to start: Start) -> String {
        var m = machine(in: start)
        let before = m
        var action: WorkerStateMachine.Action?
        var accepted = true
        switch event {
        case .start: action = m.start(now: later)
        case .stop: action = m.stop(now: later)
        case .restart: action = m.restart(now: later)
        case .spawned: accepted = m.spawned(pid: 200, now: later)
        case .spawnFailed: action = m.spawnFailed(errno: 2, now: later, jitter: 0)
        case .ready: accepted = m.readyReceived(now: later)
        case .fault: action = m.fault(.protocolError("x"), now: later)
        case .holdFailed: action = m.holdFailed(.deviceUnhealthy("x"), now: later)
        case .exited: action = m.exited(.exited(code: 1), now: later, jitter: 0)
        case .timer: action = m.timerFired(now: farLater)
        case .earlyTimer: action = m.timerFired(now: t0 + .milliseconds(500))
        }
        let unchanged = sameObservable(m, before)
        if !accepted || (action == nil && unchanged && !event.mayChangeOnlyIntent) { return "refused" }
        let shown: String = switch action {
        case nil: "-"
        case .spawn?: "spawn"
        case .signalGroup(let signal)?: signal == 9 ? "KILL" : "TERM"
        }
        return "\(m.stateName)/\(shown)"
    }

    /// Everything a caller can observe of the machine.
    static func sameObservable(_ a: WorkerStateMachine, _ b: WorkerStateMachine) -> Bool {
        a.state == b.state && a.desired == b.desired && a.lastExit == b.lastExit && a.exitCounts == b.exitCounts
            && a.restarts == b.restarts && a.nextDeadline == b.nextDeadline && a.isHeldFailed == b.isHeldFailed
    }

    /// cell = the outcome of (state, event); rows in ``Start`` order, columns in ``Event`` order.
    static let table: [Start: [Event: String]] = [
        .stopped: [
            .start: "stopped/spawn", .stop: "refused", .restart: "stopped/spawn", .spawned: "starting/-",
            .spawnFailed: "stopped/-", .ready: "refused", .fault: "refused", .holdFailed: "stopped/-",
            .exited: "refused", .timer: "refused", .earlyTimer: "refused",
        ],
        .starting: [
            .start: "starting/-", .stop: "stopping/TERM", .restart: "stopping/TERM", .spawned: "refused",
            .spawnFailed: "refused", .ready: "ready/-", .fault: "stopping/KILL", .holdFailed: "stopping/TERM",
            .exited: "backoff/-", .timer: "stopping/KILL", .earlyTimer: "refused",
        ],
        .ready: [
            .start: "ready/-", .stop: "stopping/TERM", .restart: "stopping/TERM", .spawned: "refused",
            .spawnFailed: "refused", .ready: "refused", .fault: "stopping/KILL", .holdFailed: "stopping/TERM",
            .exited: "backoff/-", .timer: "refused", .earlyTimer: "refused",
        ],
        .stoppingTerm: [
            .start: "stopping/-", .stop: "refused", .restart: "stopping/-", .spawned: "refused",
            .spawnFailed: "refused", .ready: "refused", .fault: "stopping/KILL", .holdFailed: "stopping/-",
            .exited: "stopped/-", .timer: "stopping/KILL", .earlyTimer: "refused",
        ],
        .stoppingKill: [
            .start: "stopping/-", .stop: "stopping/-", .restart: "stopping/-", .spawned: "refused",
            .spawnFailed: "refused", .ready: "refused", .fault: "refused", .holdFailed: "stopping/-",
            .exited: "backoff/-", .timer: "stopping/KILL", .earlyTimer: "refused",
        ],
        .backoff: [
            .start: "backoff/spawn", .stop: "stopped/-", .restart: "backoff/spawn", .spawned: "starting/-",
            .spawnFailed: "failed/-", .ready: "refused", .fault: "refused", .holdFailed: "failed/-",
            .exited: "refused", .timer: "backoff/spawn", .earlyTimer: "refused",
        ],
        .failedRetry: [
            .start: "failed/spawn", .stop: "stopped/-", .restart: "failed/spawn", .spawned: "starting/-",
            .spawnFailed: "failed/-", .ready: "refused", .fault: "refused", .holdFailed: "failed/-",
            .exited: "refused", .timer: "failed/spawn", .earlyTimer: "refused",
        ],
        .failedHeld: [
            .start: "failed/spawn", .stop: "stopped/-", .restart: "failed/spawn", .spawned: "starting/-",
            .spawnFailed: "backoff/-", .ready: "refused", .fault: "refused", .holdFailed: "failed/-",
            .exited: "refused", .timer: "refused", .earlyTimer: "refused",
        ],
    ]

    @Test func theTableCoversEveryPair() {
        for start in Start.allCases {
            #expect(Self.table[start]?.count == Event.allCases.count, "row \(start) is incomplete")
        }
    }

    @Test(arguments: Start.allCases)
    func everyEventInState(_ start: Start) {
        for event in Event.allCases {
            let outcome = Self.apply(event, to: start)
            #expect(outcome == Self.table[start]?[event], "\(start) × \(event)")
        }
    }

    @Test func refusedEventsLeaveTheMachineExactlyAsItWas() {
        for start in Start.allCases {
            for event in Event.allCases where Self.table[start]?[event] == "refused" {
                var m = Self.machine(in: start)
                let before = m
                switch event {
                case .spawned: m.spawned(pid: 200, now: Self.later)
                case .spawnFailed: _ = m.spawnFailed(errno: 2, now: Self.later, jitter: 0)
                case .ready: _ = m.readyReceived(now: Self.later)
                case .exited: _ = m.exited(.exited(code: 1), now: Self.later, jitter: 0)
                case .fault: _ = m.fault(.hang, now: Self.later)
                case .stop: _ = m.stop(now: Self.later)
                case .timer: _ = m.timerFired(now: Self.farLater)
                case .earlyTimer: _ = m.timerFired(now: Self.t0 + .milliseconds(500))
                default: continue
                }
                #expect(Self.sameObservable(m, before), "\(start) × \(event) changed the machine")
            }
        }
    }
}

extension WorkerStateMachineSweepTests.Event {
    /// Events whose whole effect may be on intent (desired state, a restart request) rather than state.
    var mayChangeOnlyIntent: Bool {
        switch self {
        case .start, .restart, .holdFailed: true
        default: false
        }
    }
}

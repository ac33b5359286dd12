import Foundation
import Glibc
import Testing
import TestSupport

/// `loop_nice`: the event-loop thread that routes requests runs at it; no other thread of the daemon and no
/// worker does, also after a restart (workers are spawned from that thread: SCHED_RESET_ON_FORK).
@Suite struct LoopPriorityTests {
    @Test func theLoopThreadAloneRunsAtLoopNiceAndWorkersAtZero() throws {
        let daemon = try TestDaemon(devices: ["0", "1"])
        let doc = try #require(daemon.waitAllReady())
        let threads = threadNices(of: daemon.pid)
        #expect(threads.count >= 3, "\(threads)")
        // (libdispatch gives its own threads nice values by QoS, e.g. -4: only the others are compared.)
        let ours = threads.filter { !$0.name.contains("qos") }
        if getuid() == 0 {
            let raised = ours.filter { $0.nice != 0 }
            #expect(raised.count == 1 && raised.first?.nice == -10 && raised.first?.name.hasPrefix("NIO-ELT") == true,
                    "one event-loop thread at -10: \(threads)")
            #expect(daemon.log.contains("request loop at nice -10; workers start at nice 0"))
        } else {
            #expect(ours.allSatisfy { $0.nice == 0 }, "\(threads)")
            #expect(daemon.log.contains("needs CAP_SYS_NICE"))
        }
        for worker in doc.workers {
            let pid = try #require(worker.pid)
            #expect(threadNices(of: pid).allSatisfy { $0.nice == 0 }, "worker \(worker.device): \(threadNices(of: pid))")
        }
        // A restart is spawned from the same thread: the new worker starts at 0 too.
        let victim = try #require(daemon.worker("0")?.pid)
        kill(victim, SIGKILL)
        #expect(eventually { daemon.worker("0")?.pid != victim && daemon.worker("0")?.state == "ready" })
        let replacement = try #require(daemon.worker("0")?.pid)
        #expect(threadNices(of: replacement).allSatisfy { $0.nice == 0 }, "\(threadNices(of: replacement))")
        #expect(daemon.terminate() == 0)
    }

    @Test func loopNiceZeroLeavesEveryThreadAlone() throws {
        let daemon = try TestDaemon(devices: ["0"], supervisor: "loop_nice = 0")
        #expect(daemon.waitAllReady() != nil)
        let threads = threadNices(of: daemon.pid).filter { !$0.name.contains("qos") }
        #expect(threads.count >= 3)
        #expect(threads.allSatisfy { $0.nice == 0 }, "\(threads)")
        #expect(!daemon.log.contains("request loop"))
        #expect(daemon.terminate() == 0)
    }
}

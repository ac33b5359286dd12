import Glibc
import WorkerKit

/// One rank of a tensor-parallel group, as the supervisor describes it in the environment (docs/PROTOCOL.md,
/// "Tensor-parallel groups: what a rank is given"). The reference worker uses it to behave like a real
/// multi-device engine: a TCP rendezvous before `ready`, and a collective with every other rank per request and
/// per token, so that one stopped or dead rank stalls or breaks the whole group as it would with HCCL or NCCL.
struct RankConfig: Sendable {
    var rank: Int
    var worldSize: Int
    var group: String
    var masterAddress: String
    var masterPort: UInt16

    var isLeader: Bool { rank == 0 }

    struct Invalid: Error, CustomStringConvertible {
        var description: String
    }

    /// Nil when the worker is not part of a group (`WORLD_SIZE` unset or 1): it then behaves exactly as a
    /// single-device worker. Throws when the variables are present but inconsistent: a configuration error.
    static func fromEnvironment(_ lookup: (String) -> String? = { getenv($0).map { String(cString: $0) } })
        throws -> RankConfig?
    {
        guard let worldText = lookup("WORLD_SIZE"), !worldText.isEmpty else { return nil }
        guard let world = Int(worldText), world >= 1 else {
            throw Invalid(description: "WORLD_SIZE=\(worldText) is not a positive integer")
        }
        if world == 1 { return nil }
        guard let rankText = lookup("RANK") else { throw Invalid(description: "WORLD_SIZE=\(world) but RANK is not set") }
        guard let rank = Int(rankText), rank >= 0, rank < world else {
            throw Invalid(description: "RANK=\(rankText) is not an integer in 0..<\(world) (WORLD_SIZE=\(world))")
        }
        if let local = lookup("LOCAL_RANK"), local != rankText {
            // One host per group: the supervisor gives LOCAL_RANK = RANK. Anything else is a launcher we do not know.
            throw Invalid(description: "LOCAL_RANK=\(local) differs from RANK=\(rankText); groups span one host")
        }
        guard let address = lookup("MASTER_ADDR"), !address.isEmpty else {
            throw Invalid(description: "WORLD_SIZE=\(world) but MASTER_ADDR is not set")
        }
        guard let portText = lookup("MASTER_PORT"), let port = UInt16(portText), port > 0 else {
            throw Invalid(description: "MASTER_PORT=\(lookup("MASTER_PORT") ?? "(unset)") is not a TCP port (1-65535)")
        }
        return RankConfig(rank: rank, worldSize: world, group: lookup("NPU_GROUP") ?? "", masterAddress: address,
                          masterPort: port)
    }
}

/// A broken rendezvous or communicator: the rank exits non-zero (never 78: the supervisor must restart the group).
struct RankFailure: Error, CustomStringConvertible {
    var description: String
}

/// The rank's links to its peers after the rendezvous: the leader holds one connection per follower, a follower
/// holds one to the leader. Collectives go over these links; losing one ends the process (``lostPeer(_:_:)``),
/// the way a broken HCCL/NCCL communicator ends an inference engine.
final class RankGroup: @unchecked Sendable {
    let config: RankConfig
    /// Leader: follower rank -> socket. Follower: [0: socket to the leader].
    let peers: [Int: Int32]
    /// Guards `sequence` and `acked`; signalled when an acknowledgement arrives.
    private let condition = ConditionLock()
    private var sequence: UInt64 = 0
    private var acked: [Int: UInt64] = [:]
    /// Collectives are ordered on a communicator: one at a time, whatever the number of requests in flight.
    private let collectiveLock = ConditionLock()

    /// Message from the leader to each follower: sequence, request id, step (0 = prefill, then one per token).
    static let messageSize = 20
    /// Sent when the rendezvous is complete.
    static let go = "go\n"

    private init(config: RankConfig, peers: [Int: Int32]) {
        self.config = config
        self.peers = peers
    }

    // MARK: rendezvous

    /// Forms the group: the leader listens on MASTER_ADDR:MASTER_PORT and waits for every follower; a follower
    /// connects (retrying until the leader listens) and waits for the leader's go. Both within `timeout`.
    static func rendezvous(_ config: RankConfig, timeout: Duration) throws -> RankGroup {
        let deadline = Deadline(after: timeout)
        let group = config.isLeader ? try lead(config, deadline: deadline) : try follow(config, deadline: deadline)
        group.startPeerMonitors()
        return group
    }

    private static func lead(_ config: RankConfig, deadline: Deadline) throws -> RankGroup {
        let listener = try listenSocket(config)
        defer { close(listener) }
        var joined: [Int: Int32] = [:]
        let tag = "rank 0"
        printErr("\(tag): rendezvous on \(config.masterAddress):\(config.masterPort), waiting for "
                 + "\(config.worldSize - 1) rank(s) of group \(config.group.isEmpty ? "(unnamed)" : config.group)")
        while joined.count < config.worldSize - 1 {
            guard waitReadable(listener, deadline: deadline) else {
                joined.values.forEach { close($0) }
                let missing = (1..<config.worldSize).filter { joined[$0] == nil }.map(String.init).joined(separator: ", ")
                throw RankFailure(description: "\(tag): rendezvous timed out after \(deadline.total): rank(s) \(missing) never joined")
            }
            let peer = accept(listener, nil, nil)
            if peer < 0 { continue }
            // accept4 is not visible from Swift's Glibc: mark it close-on-exec by hand (no other thread spawns yet).
            _ = fcntl(peer, F_SETFD, FD_CLOEXEC)
            setNoDelay(peer)
            // A peer that connects and says nothing must not hold the rendezvous: its hello gets 5 s at most.
            let helloDeadline = Deadline(after: min(.seconds(5), .milliseconds(deadline.remainingMilliseconds)))
            guard let line = readLine(peer, deadline: helloDeadline) else {
                printErr("\(tag): a peer connected but sent no hello; dropped")
                close(peer)
                continue
            }
            switch validateHello(line, config: config, joined: joined) {
            case .success(let rank):
                joined[rank] = peer
                printErr("\(tag): rank \(rank) joined (\(joined.count + 1)/\(config.worldSize))")
            case .failure(let refusal):
                printErr("\(tag): refused a peer: \(refusal.description)")
                _ = writeAll(peer, Array("refused \(refusal.description)\n".utf8))
                close(peer)
            }
        }
        // Everyone is in: only now does any rank go on to say ready.
        for (rank, peer) in joined where !writeAll(peer, Array(go.utf8)) {
            throw RankFailure(description: "\(tag): lost peer rank \(rank) during the rendezvous: \(errnoText())")
        }
        printErr("\(tag): group complete (\(config.worldSize) ranks)")
        return RankGroup(config: config, peers: joined)
    }

    /// `npu-rank <rank> <world_size> <group>`: checked against the leader's own view of the group.
    static func validateHello(_ line: String, config: RankConfig, joined: [Int: Int32]) -> Result<Int, RankFailure> {
        let words = line.split(separator: " ", omittingEmptySubsequences: false).map(String.init)
        guard words.count == 4, words[0] == "npu-rank", let rank = Int(words[1]), let world = Int(words[2]) else {
            return .failure(RankFailure(description: "not a rank hello: \(line.prefix(80).debugDescription)"))
        }
        if world != config.worldSize {
            return .failure(RankFailure(description: "rank \(rank) has WORLD_SIZE=\(world), this group has \(config.worldSize)"))
        }
        if words[3] != config.group {
            return .failure(RankFailure(description: "rank \(rank) belongs to group \(words[3].debugDescription), not \(config.group.debugDescription)"))
        }
        guard rank >= 1, rank < config.worldSize else {
            return .failure(RankFailure(description: "rank \(rank) is out of range (followers are 1..\(config.worldSize - 1))"))
        }
        if joined[rank] != nil {
            return .failure(RankFailure(description: "rank \(rank) already joined"))
        }
        return .success(rank)
    }

    private static func follow(_ config: RankConfig, deadline: Deadline) throws -> RankGroup {
        let tag = "rank \(config.rank)"
        var attempts = 0
        var lastError = ""
        // The leader may start later than us (or be restarting): retry until the rendezvous deadline.
        while true {
            attempts += 1
            do {
                let fd = try connectSocket(config)
                setNoDelay(fd)
                let hello = "npu-rank \(config.rank) \(config.worldSize) \(config.group)\n"
                guard writeAll(fd, Array(hello.utf8)) else {
                    lastError = errnoText()
                    close(fd)
                    throw RankFailure(description: lastError)
                }
                printErr("\(tag): connected to rank 0 at \(config.masterAddress):\(config.masterPort) "
                         + "(attempt \(attempts)); waiting for the group")
                guard let reply = readLine(fd, deadline: deadline) else {
                    close(fd)
                    throw RankFailure(description: deadline.passed
                        ? "\(tag): rendezvous timed out after \(deadline.total): rank 0 never completed the group"
                        : "\(tag): lost peer rank 0 during the rendezvous: connection closed")
                }
                if reply.hasPrefix("refused ") {
                    close(fd)
                    throw RankFailure(description: "\(tag): rank 0 refused this rank: \(reply.dropFirst(8))")
                }
                guard reply == "go" else {
                    close(fd)
                    throw RankFailure(description: "\(tag): unexpected rendezvous reply from rank 0: \(reply.prefix(80).debugDescription)")
                }
                printErr("\(tag): group complete (\(config.worldSize) ranks)")
                return RankGroup(config: config, peers: [0: fd])
            } catch let error as ConnectRefused {
                lastError = error.description
            }
            if deadline.passed {
                throw RankFailure(description: "\(tag): rendezvous timed out after \(deadline.total): cannot reach rank 0 "
                                  + "at \(config.masterAddress):\(config.masterPort) (\(attempts) attempts; last: \(lastError))")
            }
            // Short at first (the leader is usually a few milliseconds behind: they are spawned together), then
            // every 100 ms.
            sleepFor(.milliseconds(min(100, 2 << min(attempts, 6))))
        }
    }

    // MARK: collectives

    /// Leader: one collective step with every follower (send, then wait for each acknowledgement). Blocks as
    /// long as a follower does not answer: a stopped rank stalls the group, as a real all-reduce would.
    func collective(requestID: UInt64, step: UInt32) {
        precondition(config.isLeader)
        collectiveLock.lock()
        defer { collectiveLock.unlock() }
        condition.lock()
        sequence += 1
        let sequence = self.sequence
        condition.unlock()
        var message = [UInt8]()
        message.reserveCapacity(Self.messageSize)
        appendBigEndian(&message, sequence)
        appendBigEndian(&message, requestID)
        appendBigEndian(&message, step)
        for (rank, fd) in peers.sorted(by: { $0.key < $1.key }) where !writeAll(fd, message) {
            lostPeer(rank, errnoText())
        }
        condition.lock()
        while !peers.keys.allSatisfy({ (acked[$0] ?? 0) >= sequence }) {
            condition.wait()
        }
        condition.unlock()
    }

    /// A reading thread per peer link: the leader collects acknowledgements; a follower takes part in each step.
    /// Either way, end-of-file or an error on the link is a lost peer and ends the process.
    private func startPeerMonitors() {
        for (rank, fd) in peers {
            if config.isLeader {
                Thread.detach { self.leaderReads(from: rank, fd) }
            } else {
                Thread.detach { self.followerLoop(fd) }
            }
        }
    }

    private func leaderReads(from rank: Int, _ fd: Int32) {
        var buffer = [UInt8](repeating: 0, count: 8)
        while true {
            if let failure = readExactly(fd, &buffer) { lostPeer(rank, failure) }
            let sequence = buffer.reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
            condition.lock()
            acked[rank] = sequence
            condition.broadcast()
            condition.unlock()
        }
    }

    private func followerLoop(_ fd: Int32) {
        var buffer = [UInt8](repeating: 0, count: Self.messageSize)
        while true {
            if let failure = readExactly(fd, &buffer) { lostPeer(0, failure) }
            // The step's "compute" is the acknowledgement itself: what matters is that the leader waits for it.
            if !writeAll(fd, Array(buffer[0..<8])) { lostPeer(0, errnoText()) }
        }
    }

    /// The communicator is broken: say which peer and why, then exit 1 (restartable, unlike 78).
    func lostPeer(_ rank: Int, _ why: String) -> Never {
        printErr("rank \(config.rank): lost peer rank \(rank): \(why)")
        Glibc.exit(1)
    }
}

// MARK: sockets

private struct ConnectRefused: Error, CustomStringConvertible {
    var description: String
}

private func resolve(_ config: RankConfig) throws -> (family: Int32, address: [UInt8], length: socklen_t) {
    var hints = addrinfo()
    hints.ai_family = AF_UNSPEC
    hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
    var result: UnsafeMutablePointer<addrinfo>?
    let rc = getaddrinfo(config.masterAddress, String(config.masterPort), &hints, &result)
    guard rc == 0, let first = result else {
        throw RankFailure(description: "rank \(config.rank): cannot resolve MASTER_ADDR=\(config.masterAddress): "
                          + String(cString: gai_strerror(rc)))
    }
    defer { freeaddrinfo(result) }
    let length = first.pointee.ai_addrlen
    let bytes = Array(UnsafeRawBufferPointer(start: first.pointee.ai_addr, count: Int(length)))
    return (first.pointee.ai_family, bytes, length)
}

private func listenSocket(_ config: RankConfig) throws -> Int32 {
    let target = try resolve(config)
    let fd = socket(target.family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { throw RankFailure(description: "rank 0: socket: \(errnoText())") }
    var one: Int32 = 1
    // A group restarted at once must be able to take the port again while the old connections sit in TIME_WAIT.
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
    let bound = target.address.withUnsafeBytes {
        bind(fd, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), target.length)
    }
    guard bound == 0, listen(fd, 64) == 0 else {
        let why = errnoText()
        close(fd)
        throw RankFailure(description: "rank 0: cannot listen on \(config.masterAddress):\(config.masterPort): \(why)")
    }
    return fd
}

private func connectSocket(_ config: RankConfig) throws -> Int32 {
    let target = try resolve(config)
    let fd = socket(target.family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { throw RankFailure(description: "rank \(config.rank): socket: \(errnoText())") }
    let rc = target.address.withUnsafeBytes {
        connect(fd, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), target.length)
    }
    if rc != 0 {
        let why = errnoText()
        close(fd)
        throw ConnectRefused(description: why)
    }
    return fd
}

private func setNoDelay(_ fd: Int32) {
    // One small message per token: Nagle's algorithm would add up to 40 ms to each step.
    var one: Int32 = 1
    setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
}

private func waitReadable(_ fd: Int32, deadline: Deadline) -> Bool {
    while true {
        let remaining = deadline.remainingMilliseconds
        if remaining <= 0 { return false }
        var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        let rc = poll(&pfd, 1, Int32(min(remaining, Int(Int32.max))))
        if rc > 0 { return true }
        if rc < 0 && errno != EINTR { return false }
    }
}

/// One `\n`-terminated line (without it), or nil at EOF, on error or when the deadline passes.
private func readLine(_ fd: Int32, deadline: Deadline) -> String? {
    var bytes: [UInt8] = []
    var byte: UInt8 = 0
    while bytes.count < 512 {
        guard waitReadable(fd, deadline: deadline) else { return nil }
        let n = read(fd, &byte, 1)
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { return nil }
        if byte == UInt8(ascii: "\n") { return String(decoding: bytes, as: UTF8.self) }
        bytes.append(byte)
    }
    return nil
}

/// Nil when the buffer was filled, else why not ("connection closed", or the errno text).
private func readExactly(_ fd: Int32, _ buffer: inout [UInt8]) -> String? {
    var offset = 0
    while offset < buffer.count {
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress! + offset, $0.count - offset) }
        if n == 0 { return "connection closed" }
        if n < 0 {
            if errno == EINTR { continue }
            return errnoText()
        }
        offset += n
    }
    return nil
}

private func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
    var offset = 0
    while offset < bytes.count {
        let n = bytes.withUnsafeBytes { send(fd, $0.baseAddress! + offset, $0.count - offset, Int32(MSG_NOSIGNAL)) }
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { return false }
        offset += n
    }
    return true
}

private func appendBigEndian<T: FixedWidthInteger>(_ bytes: inout [UInt8], _ value: T) {
    withUnsafeBytes(of: value.bigEndian) { bytes.append(contentsOf: $0) }
}

private func errnoText() -> String { String(cString: strerror(errno)) }

/// A monotonic deadline (CLOCK_MONOTONIC: wall-clock steps must not shorten or stretch a rendezvous).
struct Deadline {
    let end: ContinuousClock.Instant
    let total: Duration

    init(after duration: Duration) {
        total = duration
        end = ContinuousClock.now + duration
    }

    var passed: Bool { ContinuousClock.now >= end }

    var remainingMilliseconds: Int {
        let left = end - ContinuousClock.now
        if left <= .zero { return 0 }
        let (seconds, attoseconds) = left.components
        return Int(seconds) * 1000 + Int(attoseconds / 1_000_000_000_000_000) + 1
    }
}

/// pthread mutex + condition variable (the leader's collective waits for acknowledgements read by other threads).
final class ConditionLock: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let cond = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

    init() {
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(cond, nil)
    }

    deinit {
        pthread_cond_destroy(cond)
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
        cond.deallocate()
    }

    func lock() { pthread_mutex_lock(mutex) }
    func unlock() { pthread_mutex_unlock(mutex) }
    func wait() { pthread_cond_wait(cond, mutex) }
    func broadcast() { pthread_cond_broadcast(cond) }
}

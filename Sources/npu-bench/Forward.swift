import ArgumentParser
import CSupport
import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NPUClient

/// `npu-bench forward`: a bare SwiftNIO byte forwarder on one event loop, the floor of any proxy built on NIO's
/// channel pipeline. Each client connection gets its own backend connection (as HAProxy's `mode tcp` does) and
/// bytes are copied both ways as read, one flush per read burst: no decoding, routing, ids, deadlines or metrics.
/// BENCHMARKS.md runs it beside npu-supervisord and HAProxy (`scripts/bench-proxy.py --floors`) to say how
/// much of the supervisor's cost per request is its own work and how much is NIO's event loop and pipeline.
struct Forward: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "forward",
        abstract: "A bare SwiftNIO byte forwarder (one event loop, a backend connection per client), for benchmarks.")
    @Option(help: "Unix socket to listen on.") var listen: String
    @Option(help: "Backend Unix sockets, used in turn per client connection.") var backend: [String]
    @Option(help: "nice value of the event-loop thread (npu-supervisord's loop runs at -10 by default).")
    var loopNice: Int32 = 0
    @Flag(help: "Without NIO: one thread on a plain epoll set (what Swift itself costs on this path).")
    var raw = false

    func run() throws {
        guard !backend.isEmpty else { throw ValidationError("at least one --backend") }
        if raw {
            signal(SIGPIPE, SIG_IGN)  // a peer gone while bytes are on the way: EPIPE, then both are closed
            _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, loopNice)
            try RawForwarder.run(listen: listen, backends: backend)
        }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let loop = group.next()
        let nice = loopNice
        // On Linux, PRIO_PROCESS with id 0 is the calling thread.
        try loop.submit { _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, nice) }.wait()
        let backends = backend
        let next = NIOLockedValueBox(0)
        let server = try ServerBootstrap(group: group)
            .childChannelOption(.autoRead, value: false)
            .childChannelInitializer { client in
                let path = next.withLockedValue { n in
                    defer { n += 1 }
                    return backends[n % backends.count]
                }
                return ClientBootstrap(group: client.eventLoop)
                    .channelInitializer { server in
                        server.pipeline.addHandler(Glue(peer: client))
                    }
                    .connect(unixDomainSocketPath: path)
                    .flatMap { server in
                        // Reading starts once the backend is connected: nothing read is dropped.
                        client.pipeline.addHandler(Glue(peer: server)).flatMap {
                            client.setOption(ChannelOptions.autoRead, value: true)
                        }
                    }
            }
            .bind(unixDomainSocketPath: listen, cleanupExistingSocketFile: true).wait()
        FileHandle.standardError.write("npu-bench forward: \(listen) -> \(backends.joined(separator: ", "))\n".data(using: .utf8)!)
        try server.closeFuture.wait()
    }
}

/// Writes what one side reads to the other, flushing once per read burst; closes both when either closes.
private final class Glue: ChannelInboundHandler, @unchecked Sendable {  // touched on its channel's loop only
    typealias InboundIn = ByteBuffer
    let peer: any Channel
    init(peer: any Channel) { self.peer = peer }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        peer.write(unwrapInboundIn(data), promise: nil)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        peer.flush()
    }

    func channelInactive(context: ChannelHandlerContext) {
        peer.close(promise: nil)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}

/// `npu-bench forward --raw`: the same forwarder without NIO, one thread on one level-triggered epoll set, a
/// 16 KiB read per readable socket and a write to its peer (what HAProxy's `mode tcp` does per event). It says
/// what Swift itself costs on this path, apart from NIO's loop and pipeline (BENCHMARKS.md).
enum RawForwarder {
    static func run(listen path: String, backends: [String]) throws -> Never {
        let listener = try listenSocket(path)
        let epfd = epoll_create1(Int32(EPOLL_CLOEXEC))
        guard epfd >= 0 else { throw ValidationError("epoll_create1: \(String(cString: strerror(errno)))") }
        var peer: [Int32: Int32] = [:]
        /// Bytes read from a socket whose peer did not take them all: the socket is not read until they are written.
        var held: [Int32: [UInt8]] = [:]
        var next = 0
        func watch(_ fd: Int32, _ events: UInt32, _ op: Int32) {
            var event = epoll_event()
            event.events = events
            event.data.fd = fd
            _ = epoll_ctl(epfd, op, fd, &event)
        }
        func drop(_ fd: Int32) {
            guard let other = peer[fd] else { return }
            for f in [fd, other] {
                _ = epoll_ctl(epfd, EPOLL_CTL_DEL, f, nil)
                close(f)
                peer[f] = nil
                held[f] = nil
            }
        }
        let readable = EPOLLIN.rawValue, writable = EPOLLOUT.rawValue
        /// A socket is read while none of its bytes wait for its peer, and watched for room while its peer's do.
        func update(_ fd: Int32) {
            guard let other = peer[fd] else { return }
            watch(fd, (held[fd] == nil ? readable : 0) | (held[other] != nil ? writable : 0), EPOLL_CTL_MOD)
        }
        watch(listener, readable, EPOLL_CTL_ADD)
        var events = [epoll_event](repeating: epoll_event(), count: 64)
        var buffer = [UInt8](repeating: 0, count: 16384)
        while true {
            let n = epoll_wait(epfd, &events, Int32(events.count), -1)
            if n < 0 { continue }
            for i in 0..<Int(n) {
                let fd = events[i].data.fd
                if fd == listener {
                    let client = accept(listener, nil, nil)
                    guard client >= 0 else { continue }
                    let backend = (try? connectUnixSocket(path: backends[next % backends.count])) ?? -1
                    next += 1
                    guard backend >= 0 else { close(client); continue }
                    for f in [client, backend] { _ = fcntl(f, F_SETFL, fcntl(f, F_GETFL) | O_NONBLOCK) }
                    peer[client] = backend
                    peer[backend] = client
                    watch(client, readable, EPOLL_CTL_ADD)
                    watch(backend, readable, EPOLL_CTL_ADD)
                    continue
                }
                guard let other = peer[fd] else { continue }
                let ready = events[i].events
                if ready & writable != 0, var bytes = held[other] {
                    // `fd` can take more of what `other` sent: write it; `other` is read again once all is out.
                    let w = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
                    if w < 0 && errno != EAGAIN && errno != EINTR { drop(fd); continue }
                    if w > 0 { bytes.removeFirst(w) }
                    held[other] = bytes.isEmpty ? nil : bytes
                    update(fd)
                    update(other)
                }
                if held[fd] != nil {
                    // Not read while its last bytes wait for its peer; a hang-up there would be reported forever.
                    if ready & (EPOLLHUP.rawValue | EPOLLERR.rawValue) != 0 { drop(fd) }
                    continue
                }
                guard ready & (readable | EPOLLHUP.rawValue | EPOLLERR.rawValue) != 0 else { continue }
                let r = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR) { drop(fd); continue }
                if r < 0 { continue }
                let w = buffer.withUnsafeBytes { write(other, $0.baseAddress, r) }
                if w < 0 && errno != EAGAIN && errno != EINTR { drop(fd); continue }
                let written = max(0, w)
                if written < r {
                    held[fd] = Array(buffer[written..<r])
                    update(fd)
                    update(other)
                }
            }
        }
    }

    private static func listenSocket(_ path: String) throws -> Int32 {
        unlink(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        let bound = try SocketAddress(unixDomainSocketPath: path).withSockAddr { bind(fd, $0, socklen_t($1)) }
        guard fd >= 0, bound == 0, Glibc.listen(fd, 512) == 0 else {
            throw ValidationError("cannot listen on \(path): \(String(cString: strerror(errno)))")
        }
        return fd
    }
}

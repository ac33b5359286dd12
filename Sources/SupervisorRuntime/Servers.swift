import Glibc
import Logging
import NIOCore
import NIOPosix
import SupervisorCore
import SystemdSupport
import WireProtocol

extension Supervisor {
    /// Binds requests.sock, status.sock and control.sock (or adopts them from systemd socket activation).
    func bindServers() -> EventLoopFuture<Void> {
        let maxFrame = config.maxFrameBytes
        let requests = bind(path: config.requestsSocket, name: "requests") { channel in
            try channel.pipeline.syncOperations.addHandler(ClientHandler(supervisor: self))
        }
        let status = bind(path: config.statusSocket, name: "status") { channel in
            try channel.pipeline.syncOperations.addHandler(StatusHandler(supervisor: self))
        }
        let control = bind(path: config.controlSocket, name: "control") { channel in
            try channel.pipeline.syncOperations.addHandlers([
                ByteToMessageHandler(FrameDecoder(maximumFrameLength: maxFrame)),
                MessageToByteHandler(FrameEncoder()),
                ControlHandler(supervisor: self),
            ])
        }
        return requests.and(status).and(control).and(bindHTTP()).and(bindAgentCheck()).map { all in
            let ((((r, s), c), h), a) = all
            self.servers = [r, s, c] + (h.map { [$0] } ?? []) + (a.map { [$0] } ?? [])
            if let address = self.httpAddress { self.logger.info("HTTP probes and metrics on http://\(address)/") }
        }
    }

    func bind(path: String, name: String,
              initialize: @escaping @Sendable (any Channel) throws -> Void) -> EventLoopFuture<any Channel> {
        let bootstrap = ServerBootstrap(group: eventLoop)
            .serverChannelOption(ChannelOptions.backlog, value: 256)
            .childChannelOption(ChannelOptions.allowRemoteHalfClosure, value: true)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try initialize(channel) }
            }
        if let fd = ListenFDs.shared.take(name: name) {
            logger.info("using \(name) socket passed by systemd (fd \(fd))")
            return bootstrap.withBoundSocket(fd)
        }
        // The instance lock is held, so a socket file here is a stale one from a crashed run.
        return bootstrap.bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true).flatMapThrowing {
            channel in
            guard chmod(path, mode_t(self.config.socketMode)) == 0 else {
                throw SystemError(call: "chmod \(path)", errno: errno)
            }
            if let group = self.config.controlGroup, let gid = groupID(named: group) {
                _ = chown(path, uid_t.max, gid)
            }
            return channel
        }
    }
}

/// status.sock: one JSON document per connection, then close. `socat - UNIX-CONNECT:status.sock` reads it.
final class StatusHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    let supervisor: Supervisor

    init(supervisor: Supervisor) { self.supervisor = supervisor }

    func channelActive(context: ChannelHandlerContext) {
        var buffer: ByteBuffer
        do {
            buffer = try JSONCoding.encode(supervisor.statusDocument(), pretty: true)
        } catch {
            buffer = ByteBuffer(string: "{\"error\": \"status document unencodable: \(error)\"}")
        }
        buffer.writeString("\n")
        let channel = context.channel
        // Half-close after the document: the client sees EOF. Closing outright while it has sent bytes we did
        // not read would make the kernel answer with a reset instead; whatever it sends is read and dropped,
        // and the connection is closed when it closes its side (or after a second).
        let written = context.writeAndFlush(wrapOutboundOut(buffer))
        self.written = written
        written.whenComplete { _ in
            channel.close(mode: .output, promise: nil)
            // The timer must not outlive the connection: holding every channel for a second kept ~2,000
            // connections' memory alive under a client polling in a loop (6 MB in use, 16 MB of heap after).
            let timer = channel.eventLoop.scheduleTask(in: .seconds(1)) { channel.close(promise: nil) }
            channel.closeFuture.whenComplete { _ in timer.cancel() }
        }
    }

    /// The document's write: a client that half-closes at once (`printf x | socat ...`) still gets all of it
    /// (closing with the write pending would drop what the socket buffer did not take).
    private var written: EventLoopFuture<Void>?

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {}

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event {
            let channel = context.channel
            if let written { written.whenComplete { _ in channel.close(promise: nil) } } else { channel.close(promise: nil) }
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }
}

/// A connection's peer credentials (SO_PEERCRED).
struct PeerCredentials {
    var pid: pid_t
    var uid: uid_t
    var gid: gid_t
}

func groupID(named name: String) -> gid_t? {
    if let g = getgrnam(name) { return g.pointee.gr_gid }
    return gid_t(name)
}

/// Reads the peer's credentials (SO_PEERCRED) through NIO's socket option access.
func peerCredentials(of channel: any Channel, _ body: @escaping @Sendable (PeerCredentials?) -> Void) {
    guard let provider = channel as? any SocketOptionProvider else { return body(nil) }
    // ucred is not imported by Glibc's module map; read it as raw bytes of the same layout (pid, uid, gid).
    let future: EventLoopFuture<(Int32, UInt32, UInt32)> = provider.unsafeGetSocketOption(
        level: SocketOptionLevel(SOL_SOCKET), name: SocketOptionName(SO_PEERCRED))
    future.whenComplete { result in
        switch result {
        case .success(let cred): body(PeerCredentials(pid: cred.0, uid: cred.1, gid: cred.2))
        case .failure: body(nil)
        }
    }
}

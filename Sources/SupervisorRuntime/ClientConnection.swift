import NIOCore
import WireProtocol

/// One connection on requests.sock. Answers are appended to one outbound buffer and written once per read
/// burst. Reading stops while the connection has too many requests in flight or its peer does not read its
/// answers (back-pressure instead of unbounded buffers).
///
/// Confined to the supervisor's event loop, whichever loop its channel is on: with `[requests] event_loops = 2`
/// (docs/ARCHITECTURE.md, "The request path's costs") half of the connections have their socket on a second loop,
/// whose ``ClientHandler`` only moves bytes and events here. Everything this class does to its channel (write,
/// close, `autoRead`, `read`, `isWritable`) is safe from another thread in SwiftNIO; its own state is touched
/// only here (hence `@unchecked Sendable`: the handler on the other loop holds it only to pass it back).
final class ClientConnection: @unchecked Sendable {
    let channel: any Channel
    unowned let supervisor: Supervisor
    /// Client request id → the request.
    #if DEBUG
    var requests: [UInt64: PendingRequest] = [:]
    #else
    @exclusivity(unchecked) var requests: [UInt64: PendingRequest] = [:]
    #endif
    #if DEBUG
    var outbound: ByteBuffer
    #else
    @exclusivity(unchecked) var outbound: ByteBuffer
    #endif
    #if DEBUG
    var isDirty = false
    #else
    @exclusivity(unchecked) var isDirty = false
    #endif
    #if DEBUG
    var isReadingPaused = false
    #else
    @exclusivity(unchecked) var isReadingPaused = false
    #endif
    #if DEBUG
    var isOpen = true
    #else
    @exclusivity(unchecked) var isOpen = true
    #endif
    /// The client shut down its sending side (half-close): answer what is in flight, then close.
    #if DEBUG
    var isInputClosed = false
    #else
    @exclusivity(unchecked) var isInputClosed = false
    #endif
    /// Bytes handed to NIO and not yet written to the socket: what a client that does not read costs us.
    #if DEBUG
    var unwrittenBytes = 0
    #else
    @exclusivity(unchecked) var unwrittenBytes = 0
    #endif
    /// The latest write handed to NIO (writes complete in order): a close waits for it.
    #if DEBUG
    var lastWrite: EventLoopFuture<Void>?
    #else
    @exclusivity(unchecked) var lastWrite: EventLoopFuture<Void>?
    #endif
    /// Frames read but not yet admitted (see ``decode(_:)``).
    #if DEBUG
    var reader: FrameReader
    #else
    @exclusivity(unchecked) var reader: FrameReader
    #endif
    /// A decoding loop is running: it decides about closing at its end (reading `reader` from inside it would
    /// overlap its access).
    #if DEBUG
    private(set) var isDecoding = false
    #else
    @exclusivity(unchecked) private(set) var isDecoding = false
    #endif

    init(channel: any Channel, supervisor: Supervisor) {
        self.channel = channel
        self.supervisor = supervisor
        self.outbound = channel.allocator.buffer(capacity: 4096)
        self.reader = FrameReader(maximumFrameLength: supervisor.config.maxFrameBytes)
    }

    /// The connection is up: registered, or refused past `max_connections`.
    func opened() {
        supervisor.eventLoop.assertInEventLoop()
        guard supervisor.clients.count < supervisor.config.requests.maxConnections else {
            let limit = supervisor.config.requests.maxConnections
            let frame = Frame.error(requestID: 0, code: ErrorCode.tooManyConnections,
                                    message: "connection limit (\(limit)) reached; try again later", retryable: true)
            isOpen = false
            let channel = channel
            channel.writeAndFlush(frame.encoded()).whenComplete { _ in channel.close(promise: nil) }
            return
        }
        supervisor.clients[ObjectIdentifier(self)] = self
    }

    /// Bytes read from the socket.
    func received(_ buffer: ByteBuffer) {
        guard isOpen else { return }
        decode(buffer)
    }

    /// Half-close (shutdown(SHUT_WR)): `printf ... | socat` style clients still get their answers.
    func inputClosed() {
        isInputClosed = true
        closeIfInputDone()
    }

    /// The socket closed: requests in flight are cancelled.
    func closed() {
        guard supervisor.clients[ObjectIdentifier(self)] != nil else {
            isOpen = false  // refused at the door, never registered
            return
        }
        isOpen = false
        supervisor.clientGone(self)
    }

    /// Decodes `incoming` (after what is buffered; nil: only what is buffered) while the connection may have
    /// more requests in flight (`max_inflight_per_connection` holds within one read too); the rest stays
    /// buffered until answers make room. Not re-entered: an answer finished while decoding only makes the
    /// running loop go on.
    func decode(_ incoming: ByteBuffer?) {
        guard !isDecoding else { return }
        isDecoding = true
        let supervisor = supervisor
        let limit = supervisor.config.requests.maxInflightPerConnection
        // One clock read for the burst: every request in it was received at the same read.
        let now = NIODeadline.now()
        do {
            try reader.read(incoming ?? ByteBuffer(), while: { self.isOpen && self.requests.count < limit }) { frame in
                switch frame.type {
                case .request: supervisor.clientRequest(self, frame, receivedAt: now)
                case .cancel: supervisor.clientCancel(self, clientID: frame.requestID)
                case .heartbeat: self.send(Frame(type: .heartbeat, requestID: frame.requestID))
                default:
                    self.send(.error(requestID: frame.requestID, code: ErrorCode.unsupported,
                                     message: "\(frame.type) frames are not accepted on the request socket"))
                }
            }
        } catch {
            isDecoding = false
            // The stream cannot be resynchronised: say why, then close. Requests in flight are cancelled.
            send(.error(requestID: 0, code: ErrorCode.protocolError, message: "\(error)"))
            closeAfterFlush()
            return
        }
        isDecoding = false
        if isInputClosed { closeIfInputDone() }
    }

    /// Queues a frame; written at the end of the current burst (``flush()``).
    func send(_ frame: Frame) {
        guard isOpen else { return }
        frame.write(to: &outbound)
        if !isDirty {
            isDirty = true
            supervisor.dirtyClients.append(self)
        }
    }

    func flush() {
        guard isDirty else { return }
        isDirty = false
        guard isOpen else { return }
        let size = outbound.readableBytes
        unwrittenBytes += size
        let limit = supervisor.config.requests.maxClientBufferBytes
        if unwrittenBytes > limit {
            // Reading from this client already stopped (it is not writable); answers for its requests in
            // flight, and streamed chunks, still come. Past the limit it is cut off instead of growing memory.
            supervisor.logger.warning("client does not read its answers; closing it",
                                      metadata: ["unwritten_bytes": "\(unwrittenBytes)", "requests": "\(requests.count)"])
            isOpen = false
            channel.close(promise: nil)
            return
        }
        // The promise is the supervisor loop's: its callback runs here even when the channel's loop completes it.
        let promise = supervisor.eventLoop.makePromise(of: Void.self)
        let connection = NIOLoopBound(self, eventLoop: supervisor.eventLoop)
        promise.futureResult.whenComplete { _ in connection.value.unwrittenBytes -= size }
        lastWrite = promise.futureResult
        channel.writeAndFlush(outbound, promise: promise)
        outbound = channel.allocator.buffer(capacity: 4096)
    }

    /// Closes once what was handed to NIO is written: closing with writes pending would drop them (NIO fails
    /// pending writes on close), and a half-closed client reading a large answer would get it cut short.
    func closeAfterFlush() {
        guard isOpen else { return }
        flush()
        isOpen = false
        let channel = channel
        if let lastWrite {
            lastWrite.whenComplete { _ in channel.close(mode: .all, promise: nil) }
        } else {
            channel.close(mode: .all, promise: nil)
        }
    }

    /// After a half-close (docs/PROTOCOL.md 1.1): closes once every request read has been answered and no whole
    /// frame waits to be admitted. Bytes still buffered then belong to a frame that no input can complete: they
    /// are discarded, and the last frame before EOF says so (`protocol_error`, id 0, the same text as on
    /// control.sock), so that the client knows its last frame was not taken for a request.
    func closeIfInputDone() {
        guard isInputClosed, isOpen, requests.isEmpty else { return }
        // A decoding loop decides at its end; whole frames held back by the limit are admitted first.
        if isDecoding || reader.hasWholeFrame { return }
        let partial = reader.bufferedBytes
        if partial > 0 {
            send(.error(requestID: 0, code: ErrorCode.protocolError,
                        message: FrameDecodingError.partialFrameDiscarded(bytes: partial)))
        }
        closeAfterFlush()
    }

    func updateReading() {
        guard isOpen else { return }
        let shouldPause = requests.count >= supervisor.config.requests.maxInflightPerConnection || !channel.isWritable
        guard shouldPause != isReadingPaused else { return }
        isReadingPaused = shouldPause
        channel.setOption(ChannelOptions.autoRead, value: !shouldPause).whenComplete { _ in }
        if !shouldPause {
            // Frames already read but held back by the limit come first.
            decode(nil)
            channel.read()
        }
    }
}

/// The request socket's per-connection handler, on its channel's event loop: raw bytes and events go to the
/// ``ClientConnection``, which lives on the supervisor's loop. When the channel is on that loop too, directly;
/// on a second loop (`[requests] event_loops = 2`), the reads of one burst are handed over in one task, and every
/// other event after them, in order.
final class ClientHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    let supervisor: Supervisor
    #if DEBUG
    var connection: ClientConnection?
    #else
    @exclusivity(unchecked) var connection: ClientConnection?
    #endif
    /// Whether the channel is on the supervisor's loop (no hand-over).
    private var isLocal = true
    /// Reads of the current burst, for a channel on another loop.
    private var reads: [ByteBuffer] = []

    init(supervisor: Supervisor) {
        self.supervisor = supervisor
    }

    /// Runs `body` on the supervisor's loop after the reads so far: at once when this is that loop.
    private func handOver(_ body: @escaping @Sendable (ClientConnection) -> Void) {
        guard let connection else { return }
        if isLocal {
            body(connection)
            return
        }
        let pending = reads
        reads.removeAll(keepingCapacity: true)
        let supervisor = supervisor
        supervisor.eventLoop.execute {
            for buffer in pending { connection.received(buffer) }
            body(connection)
            supervisor.flushAtEndOfTick()
        }
    }

    func channelActive(context: ChannelHandlerContext) {
        isLocal = context.eventLoop === supervisor.eventLoop
        let connection = ClientConnection(channel: context.channel, supervisor: supervisor)
        self.connection = connection
        handOver { $0.opened() }
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        if isLocal {
            connection?.received(buffer)
        } else {
            reads.append(buffer)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if isLocal {
            supervisor.flushAtEndOfTick()
        } else if !reads.isEmpty {
            handOver { _ in }
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event {
            handOver { $0.inputClosed() }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        handOver { $0.updateReading() }
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        handOver { $0.closed() }
        connection = nil
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}


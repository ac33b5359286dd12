import NIOCore
import SupervisorCore
import WireProtocol

/// One connection on requests.sock. Answers are appended to one outbound buffer and written once per read
/// burst. Reading stops while the connection has too many requests in flight or its peer does not read its
/// answers (back-pressure instead of unbounded buffers).
final class ClientConnection {
    let channel: any Channel
    unowned let supervisor: Supervisor
    /// Client request id → the request.
    #if DEBUG
    var requests = IDMap<PendingRequest>()
    #else
    @exclusivity(unchecked) var requests = IDMap<PendingRequest>()
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
    /// NIO's writability of the channel (false past its high-water mark until it drains below the low one).
    #if DEBUG
    var isWritable = true
    #else
    @exclusivity(unchecked) var isWritable = true
    #endif
    /// ``closeAfterFlush()`` has begun: its last flush can call back into this connection (writability flipping
    /// both ways inside the write resumes reading), and nothing may be decoded, answered or closed a second time.
    #if DEBUG
    var isClosing = false
    #else
    @exclusivity(unchecked) var isClosing = false
    #endif
    /// The client shut down its sending side (half-close): answer what is in flight, then close.
    #if DEBUG
    var isInputClosed = false
    #else
    @exclusivity(unchecked) var isInputClosed = false
    #endif
    /// Decodes frames this connection has buffered but not yet admitted (see ``ClientHandler/decode(_:)``).
    weak var handler: ClientHandler?

    /// NIO's default high-water mark for a channel's pending writes (`WriteBufferWaterMark`, not changed here):
    /// past it the channel is not writable.
    static let highWaterMark = 64 * 1024

    init(channel: any Channel, supervisor: Supervisor) {
        self.channel = channel
        self.supervisor = supervisor
        self.outbound = channel.allocator.buffer(capacity: 4096)
    }

    /// Queues a frame; written at the end of the current burst (``flush()``).
    func send(_ frame: Frame) {
        guard isOpen else { return }
        frame.write(to: &outbound)
        if !isDirty {
            isDirty = true
            supervisor.dirtyClients.append(self)
            supervisor.flushAtEndOfTick()
        }
    }

    /// Queues an answer given in parts (a worker's answer under the client's id: no ``Frame`` built).
    @inline(__always) func send(type: MessageType, flags: FrameFlags, requestID: UInt64, payload: ByteBuffer) {
        guard isOpen else { return }
        Frame.write(type: type, flags: flags, requestID: requestID, payload: payload, to: &outbound)
        if !isDirty {
            isDirty = true
            supervisor.dirtyClients.append(self)
            supervisor.flushAtEndOfTick()
        }
    }

    func flush() {
        guard isDirty else { return }
        isDirty = false
        guard isOpen else { return }
        let size = outbound.readableBytes
        // What NIO still holds for this client: handed over, not yet taken by the socket. Read from NIO at each
        // flush instead of counted through a promise per write (an allocation and a callback each); but not
        // while the channel is writable and this flush is below the limit by NIO's high-water mark: NIO then
        // holds at most that mark, so the sum cannot pass the limit (and asking costs a dynamic cast per flush).
        let limit = supervisor.config.requests.maxClientBufferBytes
        let unwritten = isWritable && size <= limit - Self.highWaterMark
            ? 0 : (try? channel.syncOptions?.getOption(ChannelOptions.bufferedWritableBytes)) ?? 0
        if unwritten + size > limit {
            // Reading from this client already stopped (it is not writable); answers for its requests in
            // flight, and streamed chunks, still come. Past the limit it is cut off instead of growing memory.
            supervisor.logger.warning("client does not read its answers; closing it",
                                      metadata: ["unwritten_bytes": "\(unwritten + size)", "requests": "\(requests.count)"])
            isOpen = false
            channel.close(promise: nil)
            return
        }
        // While NIO holds more than its high-water mark for this client, what comes stays in `outbound`, one
        // buffer whose bytes are counted above, instead of a buffer per flush queued in NIO (each with its own
        // capacity: a stream of small chunks to a client that stopped reading held many times the limit).
        guard isWritable else { return }
        // Taken out before the write, which can call back into this connection (``ByteBuffer/takeForWrite()``).
        let bytes = outbound.takeForWrite()
        channel.writeAndFlush(bytes, promise: nil)
        outbound.reuse(consume bytes, allocator: channel.allocator)
    }

    /// NIO's writability of the channel changed (its high and low water marks): held answers go out once it
    /// is writable again, and reading is paused or resumed.
    func writabilityChanged(_ writable: Bool) {
        isWritable = writable
        if writable && outbound.readableBytes > 0 && isOpen {
            isDirty = true
            flush()
        }
        updateReading()
    }

    /// Closes once what was handed to NIO is written: closing with writes pending would drop them (NIO fails
    /// pending writes on close), and a half-closed client reading a large answer would get it cut short.
    func closeAfterFlush() {
        guard isOpen, !isClosing else { return }
        isClosing = true
        flush()
        isOpen = false
        let channel = channel
        if outbound.readableBytes > 0 {
            // Held while the client was not writable: the last answers go out too.
            channel.write(outbound, promise: nil)
            outbound = ByteBuffer()
        }
        // Writes complete in order: an empty one queued last completes after everything before it is written.
        let written = channel.eventLoop.makePromise(of: Void.self)
        written.futureResult.whenComplete { _ in channel.close(mode: .all, promise: nil) }
        channel.writeAndFlush(ByteBuffer(), promise: written)
    }

    /// After a half-close (docs/PROTOCOL.md 1.1): closes once every request read has been answered and no whole
    /// frame waits to be admitted. Bytes still buffered then belong to a frame that no input can complete: they
    /// are discarded, and the last frame before EOF says so (`protocol_error`, id 0, the same text as on
    /// control.sock), so that the client knows its last frame was not taken for a request.
    func closeIfInputDone() {
        guard isInputClosed, isOpen, !isClosing, requests.isEmpty else { return }
        var partial = 0
        if let handler {
            // A decoding loop decides at its end; whole frames held back by the limit are admitted first.
            if handler.isDecoding || handler.reader.hasWholeFrame { return }
            partial = handler.reader.bufferedBytes
        }
        if partial > 0 {
            send(.error(requestID: 0, code: ErrorCode.protocolError,
                        message: FrameDecodingError.partialFrameDiscarded(bytes: partial)))
        }
        closeAfterFlush()
    }

    func updateReading() {
        guard isOpen, !isClosing else { return }
        let shouldPause = requests.count >= supervisor.config.requests.maxInflightPerConnection || !isWritable
        guard shouldPause != isReadingPaused else { return }
        isReadingPaused = shouldPause
        channel.setOption(ChannelOptions.autoRead, value: !shouldPause).whenComplete { _ in }
        if !shouldPause {
            // Frames already read but held back by the limit come first.
            handler?.decode(nil)
            channel.read()
        }
    }
}

/// The request socket's per-connection handler: raw bytes in, frames decoded here (see ``FrameReader``).
final class ClientHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    let supervisor: Supervisor
    #if DEBUG
    var connection: ClientConnection?
    #else
    @exclusivity(unchecked) var connection: ClientConnection?
    #endif
    #if DEBUG
    var reader: FrameReader
    #else
    @exclusivity(unchecked) var reader: FrameReader
    #endif

    init(supervisor: Supervisor) {
        self.supervisor = supervisor
        self.reader = FrameReader(maximumFrameLength: supervisor.config.maxFrameBytes)
    }

    func channelActive(context: ChannelHandlerContext) {
        guard supervisor.clients.count < supervisor.config.requests.maxConnections else {
            let limit = supervisor.config.requests.maxConnections
            let frame = Frame.error(requestID: 0, code: ErrorCode.tooManyConnections,
                                    message: "connection limit (\(limit)) reached; try again later", retryable: true)
            let channel = context.channel
            context.writeAndFlush(wrapOutboundOut(frame.encoded())).whenComplete { _ in channel.close(promise: nil) }
            return
        }
        let connection = ClientConnection(channel: context.channel, supervisor: supervisor)
        connection.handler = self
        self.connection = connection
        supervisor.clients[ObjectIdentifier(connection)] = connection
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        decode(unwrapInboundIn(data))
    }

    /// A decoding loop is running: it decides about closing at its end (reading `reader` from inside it would
    /// overlap its access).
    #if DEBUG
    private(set) var isDecoding = false
    #else
    @exclusivity(unchecked) private(set) var isDecoding = false
    #endif

    /// Decodes `incoming` (after what is buffered; nil: only what is buffered) while the connection may have
    /// more requests in flight (`max_inflight_per_connection` holds within one read too); the rest stays
    /// buffered until answers make room. Not re-entered: an answer finished while decoding only makes the
    /// running loop go on.
    func decode(_ incoming: ByteBuffer?) {
        guard let connection, !isDecoding else { return }
        isDecoding = true
        let limit = supervisor.config.requests.maxInflightPerConnection
        // One clock read for the burst: every request in it was received at the same read.
        let now = NIODeadline.now()
        do {
            try reader.read(incoming ?? ByteBuffer(), while: {
                connection.isOpen && !connection.isClosing && connection.requests.count < limit
            }) { frame in
                switch frame.type {
                case .request: supervisor.clientRequest(connection, frame, receivedAt: now)
                case .cancel: supervisor.clientCancel(connection, clientID: frame.requestID)
                case .heartbeat: connection.send(Frame(type: .heartbeat, requestID: frame.requestID))
                default:
                    connection.send(.error(requestID: frame.requestID, code: ErrorCode.unsupported,
                                           message: "\(frame.type) frames are not accepted on the request socket"))
                }
            }
        } catch {
            isDecoding = false
            // The stream cannot be resynchronised: say why, then close. Requests in flight are cancelled.
            connection.send(.error(requestID: 0, code: ErrorCode.protocolError, message: "\(error)"))
            connection.closeAfterFlush()
            return
        }
        isDecoding = false
        if connection.isInputClosed { connection.closeIfInputDone() }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        supervisor.flushAtEndOfTick()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        // Half-close (shutdown(SHUT_WR)): `printf ... | socat` style clients still get their answers.
        if case ChannelEvent.inputClosed = event, let connection {
            connection.isInputClosed = true
            connection.closeIfInputDone()
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        connection?.writabilityChanged(context.channel.isWritable)
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        if let connection {
            connection.isOpen = false
            supervisor.clientGone(connection)
        }
        connection = nil
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}

import NIOCore
import WireProtocol

/// One connection on requests.sock. Reading stops while the connection has too many requests in flight or
/// its peer does not read its answers (back-pressure instead of unbounded buffers).
final class ClientConnection: @unchecked Sendable {  // confined to the event loop
    let channel: any Channel
    unowned let supervisor: Supervisor
    /// Client request id → supervisor request id.
    var requests: [UInt64: UInt64] = [:]
    var needsFlush = false
    var isReadingPaused = false

    init(channel: any Channel, supervisor: Supervisor) {
        self.channel = channel
        self.supervisor = supervisor
    }

    /// Queues a frame; flushed at the end of the current read burst.
    func send(_ frame: Frame) {
        channel.write(frame, promise: nil)
        if !needsFlush {
            needsFlush = true
            supervisor.dirtyClients.append(self)
        }
    }

    func flushIfNeeded() {
        if needsFlush {
            needsFlush = false
            channel.flush()
        }
    }

    func updateReading() {
        let shouldPause = requests.count >= supervisor.config.requests.maxInflightPerConnection || !channel.isWritable
        guard shouldPause != isReadingPaused else { return }
        isReadingPaused = shouldPause
        channel.setOption(ChannelOptions.autoRead, value: !shouldPause).whenComplete { _ in }
        if !shouldPause { channel.read() }
    }
}

/// The request socket's per-connection handler.
final class ClientHandler: ChannelInboundHandler {
    typealias InboundIn = Frame
    let supervisor: Supervisor
    var connection: ClientConnection?

    init(supervisor: Supervisor) { self.supervisor = supervisor }

    func channelActive(context: ChannelHandlerContext) {
        let connection = ClientConnection(channel: context.channel, supervisor: supervisor)
        guard supervisor.clients.count < supervisor.config.requests.maxConnections else {
            context.writeAndFlush(NIOAny(Frame.error(requestID: 0, code: ErrorCode.tooManyConnections,
                                                     message: "connection limit (\(supervisor.config.requests.maxConnections)) reached",
                                                     retryable: true)), promise: nil)
            context.close(promise: nil)
            return
        }
        self.connection = connection
        supervisor.clients[ObjectIdentifier(connection)] = connection
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard let connection else { return }
        let frame = unwrapInboundIn(data)
        switch frame.type {
        case .request: supervisor.clientRequest(connection, frame)
        case .cancel: supervisor.clientCancel(connection, clientID: frame.requestID)
        case .heartbeat: connection.send(Frame(type: .heartbeat, requestID: frame.requestID))
        default:
            connection.send(.error(requestID: frame.requestID, code: ErrorCode.unsupported,
                                   message: "\(frame.type) frames are not accepted on the request socket"))
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        supervisor.flushClients()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        connection?.updateReading()
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        if let connection { supervisor.clientGone(connection) }
        connection = nil
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if let error = error as? FrameDecodingError {
            // The stream cannot be resynchronised: say why, then close. Requests in flight are cancelled.
            context.writeAndFlush(NIOAny(Frame.error(requestID: 0, code: ErrorCode.protocolError,
                                                     message: "\(error)")), promise: nil)
        }
        context.close(promise: nil)
    }
}

import NIOCore
import NIOPosix
import SupervisorCore

/// HAProxy's agent check (`server ... agent-check agent-port 8088`): on each connection one line, `up NN%`,
/// `drain` or `down` (``AgentCheck``), then close. Off unless `[http] agent_check` names an address.
extension Supervisor {
    func bindAgentCheck() -> EventLoopFuture<(any Channel)?> {
        guard let address = config.http.agentCheck else { return eventLoop.makeSucceededFuture(nil) }
        let (host, port): (String, Int)
        do {
            (host, port) = try HTTPSettings.parse(address)
        } catch {
            return eventLoop.makeFailedFuture(error)
        }
        return ServerBootstrap(group: eventLoop)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(AgentCheckHandler(supervisor: self))
                }
            }
            .bind(host: host, port: port)
            .map { channel -> (any Channel)? in
                self.logger.info("HAProxy agent check on \(address)")
                return channel
            }
            .flatMapErrorThrowing { error in
                throw SupervisorError("cannot listen for the agent check on \(address) ([http] agent_check): \(error)")
            }
    }
}

final class AgentCheckHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    let supervisor: Supervisor

    init(supervisor: Supervisor) { self.supervisor = supervisor }

    func channelActive(context: ChannelHandlerContext) {
        let line = supervisor.machine.agentCheckAnswer + "\n"
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(ByteBuffer(string: line))).whenComplete { _ in channel.close(promise: nil) }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {}

    func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }
}

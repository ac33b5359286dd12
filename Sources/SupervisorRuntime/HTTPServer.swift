import Glibc
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import SupervisorCore
import SystemdSupport
import WireProtocol

/// The HTTP listener for Kubernetes probes, load balancers and Prometheus (loopback by default):
/// `GET /livez` (the event loop answers), `GET /readyz` (200 when at least `min_ready` workers can serve, else
/// 503 with the reason), `GET /health` (the status document; 503 when unavailable), `GET /metrics`.
extension Supervisor {
    func bindHTTP() -> EventLoopFuture<(any Channel)?> {
        guard let listen = config.http.listen else { return eventLoop.makeSucceededFuture(nil) }
        let bootstrap = ServerBootstrap(group: eventLoop)
            .serverChannelOption(ChannelOptions.backlog, value: 256)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.pipeline.configureHTTPServerPipeline(withErrorHandling: true).flatMapThrowing {
                    // The request front (POST /v1/infer) first; everything else goes on to the probes.
                    try channel.pipeline.syncOperations.addHandler(HTTPFrontHandler(supervisor: self))
                    try channel.pipeline.syncOperations.addHandler(HTTPProbeHandler(supervisor: self))
                }
            }
        let bound: EventLoopFuture<any Channel>
        if let fd = ListenFDs.shared.take(name: "http") {
            bound = bootstrap.withBoundSocket(fd)
        } else {
            do {
                let (host, port) = try HTTPSettings.parse(listen)
                bound = bootstrap.bind(host: host, port: port).flatMapErrorThrowing { error in
                    throw SupervisorError("cannot listen for HTTP on \(listen) ([http] listen): \(error); "
                        + "another daemon may hold the port: give each instance its own port, or \"\" to turn HTTP off")
                }
            } catch {
                return eventLoop.makeFailedFuture(error)
            }
        }
        return bound.map { channel in
            if let address = channel.localAddress {
                let host = address.ipAddress ?? "?"
                self.httpAddress = (host.contains(":") ? "[\(host)]" : host) + ":\(address.port ?? 0)"
            }
            return channel
        }
    }

    /// The answer to one probe request: status code, content type, body.
    func httpAnswer(path: String) -> (HTTPResponseStatus, String, [UInt8]) {
        eventLoop.assertInEventLoop()
        let (health, reason) = aggregate()
        switch path {
        case "/livez":
            return (.ok, "text/plain; charset=utf-8", Array("ok\n".utf8))
        case "/readyz":
            let ready = health != .unavailable && !isShuttingDown
            let why = isShuttingDown ? "shutting down" : reason
            return (ready ? .ok : .serviceUnavailable, "text/plain; charset=utf-8",
                    Array("\(ready ? "ready" : "not ready"): \(why)\n".utf8))
        case "/health":
            guard var body = try? JSONCoding.encode(statusDocument(), pretty: true) else {
                return (.internalServerError, "text/plain; charset=utf-8", Array("status document unencodable\n".utf8))
            }
            body.writeString("\n")
            return (health == .unavailable ? .serviceUnavailable : .ok, "application/json",
                    Array(body.readableBytesView))
        case "/metrics":
            return (.ok, "text/plain; version=0.0.4; charset=utf-8", renderMetrics())
        default:
            return (.notFound, "text/plain; charset=utf-8",
                    Array("not found; try /livez, /readyz, /health or /metrics\n".utf8))
        }
    }
}

final class HTTPProbeHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart
    let supervisor: Supervisor
    var head: HTTPRequestHead?

    init(supervisor: Supervisor) { self.supervisor = supervisor }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): head = h
        case .body: break
        case .end:
            guard let head else { return }
            self.head = nil
            let path = String(head.uri.split(separator: "?", maxSplits: 1).first ?? "")
            var (status, type, body) = supervisor.httpAnswer(path: path)
            if head.method != .GET && head.method != .HEAD {
                (status, type, body) = (.methodNotAllowed, "text/plain; charset=utf-8", Array("GET only\n".utf8))
            }
            var headers = HTTPHeaders()
            headers.add(name: "Content-Type", value: type)
            headers.add(name: "Content-Length", value: "\(body.count)")
            headers.add(name: "Cache-Control", value: "no-store")
            let keepAlive = head.isKeepAlive
            if !keepAlive { headers.add(name: "Connection", value: "close") }
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: status, headers: headers))),
                          promise: nil)
            if head.method != .HEAD {
                context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(bytes: body)))), promise: nil)
            }
            let channel = context.channel
            context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in
                if !keepAlive { channel.close(promise: nil) }
            }
        }
    }
}

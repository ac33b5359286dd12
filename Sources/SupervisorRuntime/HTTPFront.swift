import NIOCore
import NIOHTTP1
import SupervisorCore
import WireProtocol

/// The HTTP request front: `POST /v1/infer` on the HTTP listener (docs/PROTOCOL.md section 12). The body is
/// the payload; the request takes the same path as one from requests.sock (``PendingRequest``, the router, the
/// queue, the deadline lists, retries, ``Supervisor/finish(_:with:)``), so it gets exactly one final answer,
/// written here as an HTTP response. The rules (status per error code, options, token) are
/// ``HTTPFrontPolicy``'s; this file only moves bytes.
extension Supervisor {
    /// Admits one HTTP request, or answers it at once (shutting down, unknown device, no workers, overloaded).
    func submitHTTP(_ exchange: HTTPExchange, payload: ByteBuffer, options: HTTPFrontPolicy.Options) {
        eventLoop.assertInEventLoop()
        guard !isShuttingDown else {
            exchange.finish(.error(requestID: 0, code: ErrorCode.shuttingDown,
                                   message: "the supervisor is shutting down", retryable: true))
            return
        }
        var pinned = -1
        if let device = options.device {
            guard let slot = pinTargets[device] else {
                exchange.finish(.error(requestID: 0, code: ErrorCode.badRequest, message: unknownPinMessage(device)))
                return
            }
            pinned = slot
        }
        if let reason = noWorkersReason(pinned: pinned) {
            exchange.finish(.error(requestID: 0, code: ErrorCode.noWorkers, message: reason, retryable: true))
            return
        }
        let timeout: TimeAmount = options.deadlineMS.map { .milliseconds(Int64($0)) } ?? defaultTimeout
        let id = requests.nextID
        let request = PendingRequest(id: id, sequence: nextSequence, clientID: id, client: nil, payload: payload,
                                     pinned: pinned, timeout: timeout, now: .now())
        nextSequence &+= 1
        request.http = exchange
        exchange.request = request
        if !dispatchNow(request) {
            if case .refuse(let code, let message, let retryable) =
                Admission.queueOrRefuse(queued: queuedCount, maxQueue: config.requests.maxQueue) {
                request.http = nil
                exchange.request = nil
                exchange.finish(.error(requestID: 0, code: code, message: message, retryable: retryable))
                return
            }
            enqueue(request)
        }
        let inserted = requests.insert(request)
        assert(inserted == request.id, "the request table changed between nextID and insert")
        trackDeadline(request)
        flushAll()
    }

    /// The HTTP client hung up before its answer: the request is cancelled and its place freed at once.
    func httpGone(_ request: PendingRequest) {
        eventLoop.assertInEventLoop()
        request.http = nil
        guard !request.isFinished else { return }
        cancelOnWorker(request)
        finish(request, with: nil)
        dispatchQueued()
        flushAll()
    }
}

/// One `POST /v1/infer` waiting for its answer. Loop-confined (the HTTP channel is on the supervisor's loop).
final class HTTPExchange {
    let context: ChannelHandlerContext
    let handler: HTTPFrontHandler
    let version: HTTPVersion
    let keepAlive: Bool
    let format: HTTPFrontPolicy.StreamFormat
    var request: PendingRequest?
    var headSent = false
    var done = false

    init(context: ChannelHandlerContext, handler: HTTPFrontHandler, head: HTTPRequestHead,
         format: HTTPFrontPolicy.StreamFormat) {
        self.context = context
        self.handler = handler
        self.version = head.version
        self.keepAlive = head.isKeepAlive
        self.format = format
    }

    /// A streamed chunk: the first one sends a `200` head with a chunked body.
    func chunk(_ payload: ByteBuffer) {
        guard !done else { return }
        if !headSent {
            headSent = true
            var headers = HTTPHeaders()
            headers.add(name: "Content-Type", value: format == .sse ? "text/event-stream" : "application/x-ndjson")
            headers.add(name: "Cache-Control", value: "no-store")
            if !keepAlive { headers.add(name: "Connection", value: "close") }
            // No Content-Length: NIO sends Transfer-Encoding: chunked (HTTP/1.1) or closes at the end (1.0).
            context.write(handler.wrapOutboundOut(.head(HTTPResponseHead(version: version, status: .ok,
                                                                         headers: headers))), promise: nil)
        }
        let text = String(decoding: payload.readableBytesView, as: UTF8.self)
        let event = format == .sse ? Self.sse(event: "chunk", data: text)
            : "{\"chunk\":\(HTTPFrontPolicy.jsonString(text))}\n"
        context.writeAndFlush(handler.wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: event)))), promise: nil)
    }

    /// The one final answer (nil: the client is gone, nothing to write).
    func finish(_ frame: Frame?) {
        guard !done else { return }
        done = true
        request = nil
        guard let frame else { return }
        if headSent {
            // Streaming began with a 200: the end goes into the body as the last event.
            let event: String
            if frame.type == .response {
                let text = frame.payloadString
                event = format == .sse ? Self.sse(event: "response", data: text)
                    : "{\"response\":\(HTTPFrontPolicy.jsonString(text))}\n"
            } else {
                let body = Self.errorBody(frame.errorPayload)
                event = format == .sse ? Self.sse(event: "error", data: body) : "{\"error\":\(body)}\n"
            }
            context.write(handler.wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: event)))), promise: nil)
            end()
            return
        }
        if frame.type == .response {
            let first = frame.payload.readableBytesView.first
            let type = first == UInt8(ascii: "{") || first == UInt8(ascii: "[")
                ? "application/json" : "application/octet-stream"
            respond(status: 200, contentType: type, body: frame.payload, extra: [])
        } else {
            let error = frame.errorPayload
            let (status, retryAfter) = HTTPFrontPolicy.status(forErrorCode: error.code, retryable: error.retryable)
            var extra = [("X-NPU-Error", error.code)]
            if let retryAfter { extra.append(("Retry-After", "\(retryAfter)")) }
            respond(status: status, contentType: "application/json",
                    body: ByteBuffer(string: Self.errorBody(error) + "\n"), extra: extra)
        }
    }

    func respond(status: Int, contentType: String, body: ByteBuffer, extra: [(String, String)]) {
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: contentType)
        headers.add(name: "Content-Length", value: "\(body.readableBytes)")
        headers.add(name: "Cache-Control", value: "no-store")
        for (name, value) in extra { headers.add(name: name, value: value) }
        if !keepAlive { headers.add(name: "Connection", value: "close") }
        context.write(handler.wrapOutboundOut(.head(HTTPResponseHead(version: version, status: .init(statusCode: status),
                                                                     headers: headers))), promise: nil)
        context.write(handler.wrapOutboundOut(.body(.byteBuffer(body))), promise: nil)
        end()
    }

    func end() {
        let channel = context.channel
        let close = !keepAlive
        context.writeAndFlush(handler.wrapOutboundOut(.end(nil))).whenComplete { _ in
            if close { channel.close(promise: nil) }
        }
        handler.exchangeDone(self)
    }

    static func errorBody(_ error: ErrorPayload) -> String {
        "{\"code\":\(HTTPFrontPolicy.jsonString(error.code)),\"message\":\(HTTPFrontPolicy.jsonString(error.message)),"
            + "\"retryable\":\(error.retryable)}"
    }

    static func sse(event: String, data: String) -> String {
        var out = "event: \(event)\n"
        for line in data.split(separator: "\n", omittingEmptySubsequences: false) { out += "data: \(line)\n" }
        return out + "\n"
    }
}

/// In the HTTP pipeline before ``HTTPProbeHandler``: takes `/v1/infer` requests, passes every other on.
/// NIO's server pipeline handler holds a pipelined next request until this one's response has ended.
final class HTTPFrontHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    let supervisor: Supervisor
    let maxBody: Int

    enum State {
        case idle
        /// Another path: its parts go on to the probe handler.
        case passing
        /// Reading a request's body.
        case reading(HTTPRequestHead, ByteBuffer, HTTPFrontPolicy.Options)
        /// Reading and dropping a body that will be refused at its end.
        case refusing(HTTPRequestHead, code: String, message: String)
        /// The request is with the supervisor.
        case waiting(HTTPExchange)
    }
    var state = State.idle

    init(supervisor: Supervisor) {
        self.supervisor = supervisor
        self.maxBody = min(supervisor.config.http.maxBodyBytes, supervisor.config.maxFrameBytes - 64)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let part = unwrapInboundIn(data)
        switch (part, state) {
        case (.head(let head), _):
            let uri = head.uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
            let path = String(uri.first ?? "")
            guard path == HTTPFrontPolicy.inferPath else {
                state = .passing
                context.fireChannelRead(data)
                return
            }
            state = admit(head: head, query: uri.count > 1 ? String(uri[1]) : nil, context: context)
            if case .reading = state, head.headers.first(name: "expect")?.lowercased() == "100-continue" {
                // curl asks for bodies over 1 KiB and would otherwise wait a second before sending.
                context.writeAndFlush(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: .continue))),
                                      promise: nil)
            }
        case (.body(var chunk), .reading(let head, var body, let options)):
            if body.readableBytes + chunk.readableBytes > maxBody {
                state = .refusing(head, code: "payload_too_large",
                                  message: "request body larger than http.max_body (\(maxBody) bytes)")
                return
            }
            state = .idle  // drop our reference so that the write does not copy the buffer
            body.writeBuffer(&chunk)
            state = .reading(head, body, options)
        case (.body, .refusing):
            break
        case (.end, .reading(let head, let body, let options)):
            let exchange = HTTPExchange(context: context, handler: self, head: head, format: options.stream)
            state = .waiting(exchange)
            supervisor.submitHTTP(exchange, payload: body, options: options)
        case (.end, .refusing(let head, let code, let message)):
            let exchange = HTTPExchange(context: context, handler: self, head: head, format: .ndjson)
            state = .waiting(exchange)
            var extra: [(String, String)] = []
            if code == "unauthorized" { extra.append(("WWW-Authenticate", "Bearer realm=\"npu-supervisor\"")) }
            if code == "method_not_allowed" { extra.append(("Allow", "POST")) }
            refuse(exchange, code: code, message: message, extra: extra)
        case (_, .passing):
            if case .end = part { state = .idle }
            context.fireChannelRead(data)
        default:
            break
        }
    }

    /// Checks a `/v1/infer` head: what to do with its body.
    func admit(head: HTTPRequestHead, query: String?, context: ChannelHandlerContext) -> State {
        let settings = supervisor.config.http
        guard settings.requests else {
            return .refusing(head, code: "not_found", message: "the request front is off (http.requests = false)")
        }
        guard head.method == .POST else {
            return .refusing(head, code: "method_not_allowed", message: "\(HTTPFrontPolicy.inferPath) takes POST")
        }
        if let token = settings.token,
           !HTTPFrontPolicy.isAuthorized(head.headers.first(name: "authorization"), token: token) {
            return .refusing(head, code: "unauthorized", message: "missing or wrong bearer token (Authorization: Bearer ...)")
        }
        if let length = head.headers.first(name: "content-length").flatMap({ Int($0) }), length > maxBody {
            return .refusing(head, code: "payload_too_large",
                             message: "request body of \(length) bytes larger than http.max_body (\(maxBody) bytes)")
        }
        switch HTTPFrontPolicy.options(query: query, header: { head.headers.first(name: $0) }) {
        case .failure(let error):
            return .refusing(head, code: ErrorCode.badRequest, message: error.description)
        case .success(let options):
            return .reading(head, context.channel.allocator.buffer(capacity: 0), options)
        }
    }

    func refuse(_ exchange: HTTPExchange, code: String, message: String, extra: [(String, String)]) {
        let (status, _) = HTTPFrontPolicy.status(forErrorCode: code, retryable: false)
        exchange.done = true
        exchange.respond(status: status, contentType: "application/json",
                         body: ByteBuffer(string: HTTPExchange.errorBody(ErrorPayload(code: code, message: message)) + "\n"),
                         extra: [("X-NPU-Error", code)] + extra)
    }

    /// The exchange's response has ended: the next request on the connection may come.
    func exchangeDone(_ exchange: HTTPExchange) {
        if case .waiting(let current) = state, current === exchange { state = .idle }
    }

    func channelInactive(context: ChannelHandlerContext) {
        if case .waiting(let exchange) = state, let request = exchange.request {
            exchange.done = true
            exchange.request = nil
            supervisor.httpGone(request)
        }
        state = .idle
        context.fireChannelInactive()
    }
}

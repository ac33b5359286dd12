import Glibc
import Logging
import NIOCore
import SupervisorCore
import WireProtocol

extension Supervisor {
    /// Whether the peer may change things: root, the daemon's own user, or a member of `control_group`.
    func isAllowedToMutate(_ peer: PeerCredentials?) -> Bool {
        guard let peer else { return false }
        if peer.uid == 0 || peer.uid == geteuid() { return true }
        guard let name = config.controlGroup, let gid = groupID(named: name) else { return false }
        if peer.gid == gid { return true }
        guard let pw = getpwuid(peer.uid), let group = getgrgid(gid), var members = group.pointee.gr_mem else {
            return false
        }
        let user = String(cString: pw.pointee.pw_name)
        while let member = members.pointee {
            if String(cString: member) == user { return true }
            members += 1
        }
        return false
    }

    /// Runs one control command and answers on `channel` under `requestID`. The read-only verbs are answered
    /// from the machine's state; the others are events for the machine.
    func control(_ command: ControlCommand, requestID: UInt64, peer: PeerCredentials?, channel: any Channel) {
        eventLoop.assertInEventLoop()
        func answer(_ frame: Frame) { channel.writeAndFlush(frame, promise: nil) }
        func fail(_ code: String, _ message: String) {
            answer(.error(requestID: requestID, code: code, message: message))
        }
        guard let verb = ControlVerb(rawValue: command.command) else {
            fail(ErrorCode.badRequest, "unknown command '\(command.command)'; known: \(ControlVerb.known)")
            return
        }
        if verb.isMutating(action: command.action) && !isAllowedToMutate(peer) {
            fail(ErrorCode.permissionDenied,
                 "'\(verb.rawValue)' needs root, the daemon's user or membership of control_group"
                    + (config.controlGroup.map { " (\($0))" } ?? " (none configured)"))
            return
        }
        let devices = machine.devices
        // Devices a reload removed get a message of their own rather than "unknown".
        func removed() -> [String] { machine.workers.filter(\.isRetired).map(\.spec.device) }
        func select(allowEmpty: Bool) throws -> [Int] {
            try WorkerSelection.select(command.devices, among: devices, removed: removed(),
                                       groups: machine.groups.map { ($0.spec.id, $0.slots) }, allowEmpty: allowEmpty)
        }
        do {
            switch verb {
            case .status, .health:
                if verb == .status { _ = try select(allowEmpty: true) }
                let document = statusDocument(devices: verb == .status ? command.devices : nil)
                answer(Frame(type: .response, requestID: requestID, payload: try JSONCoding.encode(document)))
            case .pid:
                var pid: Int32? = getpid()
                if let named = command.devices, !named.isEmpty {
                    guard named.count == 1, named != ["all"] else { throw SupervisorError("pid takes one device") }
                    pid = try select(allowEmpty: false).first.flatMap { machine.workers[$0].pid }
                }
                answer(Frame(type: .response, requestID: requestID, payload: try JSONCoding.encode(PidResult(pid: pid))))
            case .restart where command.rolling == true:
                let selected = try select(allowEmpty: false).filter { !machine.workers[$0].isRetired }
                guard !isShuttingDown else {
                    fail(ErrorCode.commandFailed, "the supervisor is shutting down; restart --rolling refused")
                    return
                }
                feed(.rollingRestart(slots: selected))
                if let why = machine.refusal {
                    fail(ErrorCode.commandFailed, why)
                    return
                }
                let names = machine.rollout.steps.map(\.device)
                let result = ControlResult(ok: true, message: "rolling restart started: \(names.joined(separator: ", ")) "
                                               + "(canary \(machine.rollout.canary ?? "-"); `npu-supervisorctl rollout status`)",
                                           devices: names)
                answer(Frame(type: .response, requestID: requestID, payload: try JSONCoding.encode(result)))
            case .drain, .undrain:
                let selected = try select(allowEmpty: false).filter { !machine.workers[$0].isRetired }
                feed(verb == .drain ? .drain(slots: selected) : .undrain(slots: selected))
                let names = selected.map { devices[$0] }
                let result = ControlResult(ok: true, message: "\(verb.rawValue): \(names.joined(separator: ", "))",
                                           devices: names)
                answer(Frame(type: .response, requestID: requestID, payload: try JSONCoding.encode(result)))
            case .reload:
                reload(waiter: (channel, requestID), wait: command.wait ?? false)
            case .rollout:
                switch command.action ?? "status" {
                case "status": break
                case "pause": feed(.rolloutPause)
                case "resume": feed(.rolloutResume)
                case "undo": feed(.rolloutUndo)
                case let other: throw SupervisorError("unknown rollout action '\(other)'; known: status, pause, resume, undo")
                }
                if let why = machine.refusal, command.action != nil, command.action != "status" {
                    fail(ErrorCode.commandFailed, why)
                    return
                }
                answer(Frame(type: .response, requestID: requestID, payload: try JSONCoding.encode(rolloutStatus())))
            case .start, .stop, .restart:
                let selected = try select(allowEmpty: false)
                guard !isShuttingDown else {
                    fail(ErrorCode.commandFailed, "the supervisor is shutting down; \(verb.rawValue) refused")
                    return
                }
                feed(.control(verb, slots: selected, requestedBy: peer?.uid))
                let names = selected.map { devices[$0] }
                let result = ControlResult(ok: true, message: "\(verb.rawValue): \(names.joined(separator: ", "))",
                                           devices: names)
                answer(Frame(type: .response, requestID: requestID, payload: try JSONCoding.encode(result)))
            case .tail:
                let index = try WorkerSelection.selectOne(command.devices, verb: "tail", among: devices, removed: removed(),
                                                          groups: machine.groups.map { ($0.spec.id, $0.slots) })
                if let lines = command.lines, lines < 0 {
                    throw SupervisorError("tail: lines must be 0 or more (got \(lines))")
                }
                let slot = slots[index]
                let (lines, next) = slot.output.last(command.lines ?? 50)
                if command.follow == true {
                    // Registered before the write: a write that fails (the client already gone) closes the channel
                    // from inside the flush, and its channelInactive must find the follower to remove; a channel
                    // closed before this command was handled has no such event left, hence the check after.
                    let key = ObjectIdentifier(channel)
                    outputFollowers[key] = OutputFollower(device: slot.spec.device, requestID: requestID,
                                                          channel: channel, from: next)
                    followersChanged()
                    for line in lines { channel.write(Frame(type: .chunk, requestID: requestID, string: line), promise: nil) }
                    channel.flush()
                    if !channel.isActive { removeFollower(key) }
                } else {
                    answer(Frame(type: .response, requestID: requestID,
                                 payload: try JSONCoding.encode(TailResult(device: slot.spec.device, lines: lines))))
                }
            case .shutdown:
                let result = ControlResult(ok: true, message: "shutting down", devices: devices)
                answer(Frame(type: .response, requestID: requestID, payload: try JSONCoding.encode(result)))
                shutdown(reason: "shutdown requested by uid \(peer?.uid ?? 0)")
            }
        } catch {
            fail(ErrorCode.badRequest, "\(error)")
        }
    }
}

/// control.sock: `request` frames carrying a JSON ``ControlCommand``; answers are `response` (JSON) or `error`.
/// Also outbound, only to know when the last answer has been written: closing with writes pending would drop
/// them (NIO fails pending writes on close). So its own answers go through the channel (`context.channel`), not
/// `context`, whose writes would start past this handler.
final class ControlHandler: ChannelDuplexHandler {
    typealias InboundIn = Frame
    typealias OutboundIn = Frame
    typealias OutboundOut = Frame
    let supervisor: Supervisor
    var peer: PeerCredentials?
    /// The client's input ended (half-close or close): close once every command read has been answered.
    private var isInputClosed = false
    /// Bytes of a partial frame the input ended inside of, discarded (docs/PROTOCOL.md 1.1).
    private var discardedBytes = 0
    private var isClosing = false
    /// The latest write (writes complete in order).
    private var lastWrite: EventLoopFuture<Void>?

    /// Fired down the pipeline after a deferred answer (`reload` with `wait`) has been written: a half-closed
    /// connection that waited for it may close now.
    struct Answered {}

    init(supervisor: Supervisor) { self.supervisor = supervisor }

    func channelActive(context: ChannelHandlerContext) {
        // The answer comes on the channel's event loop; NIOLoopBound checks that it does.
        let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
        peerCredentials(of: context.channel) { handler.value.peer = $0 }
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        guard frame.type == .request else {
            if frame.type == .cancel {
                supervisor.removeFollower(ObjectIdentifier(context.channel))
                return
            }
            context.channel.writeAndFlush(Frame.error(requestID: frame.requestID, code: ErrorCode.unsupported,
                                                      message: "control.sock accepts request frames only"),
                                          promise: nil)
            return
        }
        do {
            let command = try JSONCoding.decode(ControlCommand.self, from: frame.payload)
            supervisor.control(command, requestID: frame.requestID, peer: peer, channel: context.channel)
        } catch {
            context.channel.writeAndFlush(Frame.error(requestID: frame.requestID, code: ErrorCode.badRequest,
                                                      message: "not a control command: \(JSONCoding.describe(error))"), promise: nil)
        }
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let promise = promise ?? context.eventLoop.makePromise()
        lastWrite = promise.futureResult
        context.write(data, promise: promise)
    }

    func channelInactive(context: ChannelHandlerContext) {
        supervisor.removeFollower(ObjectIdentifier(context.channel))
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event {
            isInputClosed = true
            closeIfInputDone(context: context)
            return
        }
        if event is Answered {
            closeIfInputDone(context: context)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if case .truncated(let bytes) = error as? FrameDecodingError {
            // The decoder's leftovers at end of input: a partial frame (said as the last frame, like requests.sock).
            isInputClosed = true
            discardedBytes = bytes
            closeIfInputDone(context: context)
            return
        }
        if let error = error as? FrameDecodingError {
            context.channel.writeAndFlush(Frame.error(requestID: 0, code: ErrorCode.protocolError, message: "\(error)"),
                                          promise: nil)
        }
        close(context: context)
    }

    /// After the input ended (docs/PROTOCOL.md 1.1): commands are answered as they are read, except `reload`
    /// with `wait`, which is waited for; a `tail` follow ends. Then the partial frame, if any, is said to be
    /// discarded (`protocol_error`, id 0) and the connection closes once everything is written.
    private func closeIfInputDone(context: ChannelHandlerContext) {
        guard isInputClosed, !isClosing else { return }
        let channel = context.channel
        supervisor.removeFollower(ObjectIdentifier(channel))
        if supervisor.reloadWaiters.contains(where: { $0.channel === channel }) { return }
        if discardedBytes > 0 {
            let message = FrameDecodingError.partialFrameDiscarded(bytes: discardedBytes)
            channel.writeAndFlush(Frame.error(requestID: 0, code: ErrorCode.protocolError, message: message), promise: nil)
        }
        close(context: context)
    }

    private func close(context: ChannelHandlerContext) {
        guard !isClosing else { return }
        isClosing = true
        let channel = context.channel
        if let lastWrite {
            lastWrite.whenComplete { _ in channel.close(promise: nil) }
        } else {
            channel.close(promise: nil)
        }
    }
}

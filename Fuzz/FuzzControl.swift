// libFuzzer target: a control command's JSON (PROTOCOL.md section 7), decoded as the daemon decodes it.
import NIOCore

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzControl(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let payload = ByteBuffer(bytes: UnsafeBufferPointer(start: data, count: size))
    if let command = try? JSONCoding.decode(ControlCommand.self, from: payload) {
        let again = try! JSONCoding.encode(command)
        precondition(try! JSONCoding.decode(ControlCommand.self, from: again) == command, "control round trip")
    }
    // A garbled error frame's payload must still become an error.
    _ = Frame(type: .error, requestID: 1, payload: payload).errorPayload
    return 0
}

// libFuzzer target: a control command's JSON (PROTOCOL.md section 7), decoded as the daemon decodes it; and the
// same bytes through the protocol's JSON parser (Sources/WireProtocol/JSON.swift) on their own: whatever it
// accepts, written back by the protocol's writer, parses again to the same document.
import NIOCore

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzControl(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let payload = ByteBuffer(bytes: UnsafeBufferPointer(start: data, count: size))
    if let command = try? JSONCoding.decode(ControlCommand.self, from: payload) {
        let again = try! JSONCoding.encode(command)
        precondition(try! JSONCoding.decode(ControlCommand.self, from: again) == command, "control round trip")
    }
    payload.withUnsafeReadableBytes { bytes in
        guard let document = try? JSONParser.parse(bytes) else { return }
        for pretty in [false, true] {
            var writer = JSONWriter(pretty: pretty)
            writer.write(node(document))
            let again = writer.output.withUnsafeBytes { try? JSONParser.parse($0) }
            precondition(again == document, "JSON write/parse round trip")
        }
    }
    // A garbled error frame's payload must still become an error.
    _ = Frame(type: .error, requestID: 1, payload: payload).errorPayload
    return 0
}

/// The writer's tree for a parsed document.
private func node(_ value: JSONValue) -> JSONNode {
    switch value {
    case .null: return JSONNode(.null)
    case .bool(let b): return JSONNode(.bool(b))
    case .number(let text): return JSONNode(.number(text))
    case .string(let text): return JSONNode(.string(text))
    case .array(let elements):
        let n = JSONNode(.array)
        n.elements = elements.map(node)
        return n
    case .object(let members):
        let n = JSONNode(.object)
        n.members = members.mapValues(node)
        return n
    }
}

// libFuzzer target: the request-options prefix (PROTOCOL.md section 2.4): u16 length + JSON, then the payload.
import NIOCore

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOptions(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let payload = ByteBuffer(bytes: UnsafeBufferPointer(start: data, count: size))
    do {
        let (options, rest) = try RequestOptions.split(payload)
        precondition(rest.readableBytes <= size - 2)
        // What decoded re-encodes, and splits back to the same options and the same rest.
        if let again = try? options.prefixing(rest) {
            let (options2, rest2) = try RequestOptions.split(again)
            precondition(options2 == options && rest2 == rest, "options round trip")
        }
    } catch is RequestOptionsError {
    } catch {
        preconditionFailure("RequestOptions.split threw \(error)")
    }
    return 0
}

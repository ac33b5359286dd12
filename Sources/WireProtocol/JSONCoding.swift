#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import NIOCore

/// JSON helpers for the control, health and error payloads. Inference payloads never pass through here: the
/// supervisor forwards them as opaque bytes.
public enum JSONCoding {
    /// - Throws: `EncodingError` (for example a Double that is NaN or infinite: JSON has no such number).
    public static func encode<T: Encodable>(_ value: T, pretty: Bool = false) throws -> ByteBuffer {
        let encoder = JSONEncoder()
        encoder.outputFormatting = pretty ? [.sortedKeys, .prettyPrinted, .withoutEscapingSlashes] : [.sortedKeys, .withoutEscapingSlashes]
        return ByteBuffer(bytes: try encoder.encode(value))
    }

    /// - Throws: `EncodingError`, as ``encode(_:pretty:)``.
    public static func encodeString<T: Encodable>(_ value: T, pretty: Bool = false) throws -> String {
        String(buffer: try encode(value, pretty: pretty))
    }

    public static func decode<T: Decodable>(_ type: T.Type, from buffer: ByteBuffer) throws -> T {
        try JSONDecoder().decode(type, from: Data(buffer.readableBytesView))
    }

    public static func decode<T: Decodable>(_ type: T.Type, from string: String) throws -> T {
        try JSONDecoder().decode(type, from: Data(string.utf8))
    }
}

extension Frame {
    /// An `error` frame with a JSON ``ErrorPayload``.
    public static func error(requestID: UInt64, code: String, message: String, retryable: Bool = false) -> Frame {
        // Strings and a Bool always encode; should that ever change, the client still gets an error frame.
        let payload = (try? JSONCoding.encode(ErrorPayload(code: code, message: message, retryable: retryable)))
            ?? ByteBuffer(string: #"{"code":"\#(ErrorCode.workerError)","message":"unencodable error","retryable":false}"#)
        return Frame(type: .error, requestID: requestID, payload: payload)
    }

    /// Decodes the payload of an `error` frame; a payload that is not valid JSON becomes a `worker_error`
    /// carrying the raw text, so that a garbled error still reaches the client as an error.
    public var errorPayload: ErrorPayload {
        (try? JSONCoding.decode(ErrorPayload.self, from: payload))
            ?? ErrorPayload(code: ErrorCode.workerError, message: payloadString, retryable: false)
    }
}

extension RequestOptions {
    /// Splits a client `request` payload that carries options (flag ``FrameFlags/hasOptions``) into the
    /// options and the opaque rest.
    public static func split(_ payload: ByteBuffer) throws -> (RequestOptions, ByteBuffer) {
        try split(payload) { try JSONCoding.decode(RequestOptions.self, from: $0) }
    }

    /// The request payload with these options in front of it.
    /// - Throws: `EncodingError`, as ``JSONCoding/encode(_:pretty:)``.
    public func prefixing(_ payload: ByteBuffer) throws -> ByteBuffer {
        RequestOptions.prefixed(try JSONCoding.encode(self), payload: payload)
    }
}

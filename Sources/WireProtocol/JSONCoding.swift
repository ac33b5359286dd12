#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import NIOCore

/// JSON helpers for the control, health and error payloads. Inference payloads never pass through here: the
/// supervisor forwards them as opaque bytes.
public enum JSONCoding {
    public static func encode<T: Encodable>(_ value: T, pretty: Bool = false) -> ByteBuffer {
        let encoder = JSONEncoder()
        encoder.outputFormatting = pretty ? [.sortedKeys, .prettyPrinted, .withoutEscapingSlashes] : [.sortedKeys, .withoutEscapingSlashes]
        // Encoding our own Codable structs cannot fail (no floats that are NaN, no non-string keys).
        let data = try! encoder.encode(value)
        return ByteBuffer(bytes: data)
    }

    public static func encodeString<T: Encodable>(_ value: T, pretty: Bool = false) -> String {
        String(buffer: encode(value, pretty: pretty))
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
        Frame(type: .error, requestID: requestID,
              payload: JSONCoding.encode(ErrorPayload(code: code, message: message, retryable: retryable)))
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
    public func prefixing(_ payload: ByteBuffer) -> ByteBuffer {
        RequestOptions.prefixed(JSONCoding.encode(self), payload: payload)
    }
}

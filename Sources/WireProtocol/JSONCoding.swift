import NIOCore

/// JSON helpers for the control, health and error payloads. Inference payloads never pass through here: the
/// supervisor forwards them as opaque bytes. The coder is this module's own (JSON.swift), not Foundation's.
public enum JSONCoding {
    /// Keys sorted, `/` not escaped; `pretty`: indented as Foundation's `.prettyPrinted`.
    /// - Throws: `EncodingError` (for example a Double that is NaN or infinite: JSON has no such number).
    public static func encode<T: Encodable>(_ value: T, pretty: Bool = false) throws -> ByteBuffer {
        ByteBuffer(bytes: try bytes(of: value, pretty: pretty))
    }

    /// - Throws: `EncodingError`, as ``encode(_:pretty:)``.
    public static func encodeString<T: Encodable>(_ value: T, pretty: Bool = false) throws -> String {
        String(decoding: try bytes(of: value, pretty: pretty), as: UTF8.self)
    }

    /// A decoding error as one sentence for a person (what the error frames and the log say): where, and what
    /// was wrong. `DecodingError`'s own description names Swift types (`CodingKeys(stringValue: ...)`).
    public static func describe(_ error: any Error) -> String {
        guard let error = error as? DecodingError else { return "\(error)" }
        func place(_ path: [any CodingKey]) -> String {
            var text = ""
            for key in path {
                if let index = key.intValue, key.stringValue.hasPrefix("Index ") {
                    text += "[\(index)]"
                } else {
                    text += (text.isEmpty ? "" : ".") + key.stringValue
                }
            }
            return text
        }
        func at(_ context: DecodingError.Context) -> String {
            context.codingPath.isEmpty ? "" : "'\(place(context.codingPath))': "
        }
        switch error {
        case .dataCorrupted(let context):
            return at(context) + context.debugDescription
        case .keyNotFound(let key, let context):
            return "the key '\(place(context.codingPath + [key]))' is missing"
        case .typeMismatch(_, let context), .valueNotFound(_, let context):
            return at(context) + context.debugDescription
        @unknown default:
            return "\(error)"
        }
    }

    private static func bytes<T: Encodable>(of value: T, pretty: Bool) throws -> [UInt8] {
        var writer = JSONWriter(pretty: pretty)
        writer.write(try JSONTreeEncoder.encode(value))
        return writer.output
    }

    /// - Throws: `DecodingError`: `dataCorrupted` for text that is not JSON (saying what and at which byte),
    ///   `keyNotFound`, `valueNotFound`, `typeMismatch` with the coding path otherwise.
    public static func decode<T: Decodable>(_ type: T.Type, from buffer: ByteBuffer) throws -> T {
        try buffer.withUnsafeReadableBytes { try JSONTreeDecoder.decode(type, from: $0) }
    }

    /// - Throws: `DecodingError`, as ``decode(_:from:)-(_,ByteBuffer)``.
    public static func decode<T: Decodable>(_ type: T.Type, from string: String) throws -> T {
        var string = string
        return try string.withUTF8 { try JSONTreeDecoder.decode(type, from: UnsafeRawBufferPointer($0)) }
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

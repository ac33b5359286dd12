// libFuzzer target: FrameDecoder and FrameReader on arbitrary byte streams (PROTOCOL.md section 2).
// Built by scripts/fuzz.sh together with Sources/WireProtocol (same module), not by SwiftPM.
import NIOCore

private let maximum = 1 << 16  // small, so that hostile lengths are exercised against the check

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzFrame(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = UnsafeBufferPointer(start: data, count: size)
    // 1. The decoder on the whole input, then decodeLast as at EOF.
    var decoder = FrameDecoder(maximumFrameLength: maximum)
    var buffer = ByteBuffer(bytes: bytes)
    var decoded: [Frame] = []
    var failed = false
    do {
        while let frame = try decoder.decode(buffer: &buffer) {
            precondition(frame.payload.readableBytes <= maximum - Frame.headerLength)
            decoded.append(frame)
        }
        _ = try decoder.decodeLast(buffer: &buffer, seenEOF: true)
    } catch is FrameDecodingError {
        failed = true
    } catch {
        preconditionFailure("FrameDecoder threw \(error)")
    }
    // 2. FrameReader on the same bytes cut into chunks whose sizes come from the input itself; it must see the
    // same frames (chunking never changes the result) and fail exactly when the decoder did.
    var reader = FrameReader(maximumFrameLength: maximum)
    var seen: [Frame] = []
    var readerFailed = false
    var offset = 0
    var cut = size > 0 ? Int(bytes[0]) : 1
    do {
        while offset < size {
            let n = min(max(cut % 37, 1), size - offset)
            cut = cut &* 31 &+ n
            try reader.read(ByteBuffer(bytes: bytes[offset..<offset + n])) { seen.append($0) }
            offset += n
            // What a read leaves is never a whole frame: only more input can complete it (the half-close rule of
            // requests.sock, docs/PROTOCOL.md 1.1, relies on this to tell a partial frame from held-back ones).
            precondition(!reader.hasWholeFrame, "a whole frame left undecoded")
        }
        try reader.finish()
    } catch is FrameDecodingError {
        readerFailed = true
    } catch {
        preconditionFailure("FrameReader threw \(error)")
    }
    precondition(seen.count >= decoded.count || readerFailed, "FrameReader lost frames")
    precondition(Array(seen.prefix(decoded.count)) == Array(decoded.prefix(seen.count)), "FrameReader disagrees")
    if !failed && !readerFailed { precondition(seen == decoded, "FrameReader disagrees on a clean stream") }
    // 3. Back-pressured reads: one frame at a time via read(_:while:_:) and resume(while:_:).
    var paced = FrameReader(maximumFrameLength: maximum)
    var pacedSeen: [Frame] = []
    do {
        var budget = 1
        try paced.read(ByteBuffer(bytes: bytes), while: { budget > 0 }) { pacedSeen.append($0); budget -= 1 }
        var rounds = 0
        while paced.hasBufferedBytes && rounds <= size {
            budget = 1
            let before = pacedSeen.count
            try paced.resume(while: { budget > 0 }) { pacedSeen.append($0); budget -= 1 }
            if pacedSeen.count == before { break }
            rounds += 1
        }
    } catch is FrameDecodingError {
    } catch {
        preconditionFailure("paced FrameReader threw \(error)")
    }
    precondition(Array(pacedSeen.prefix(decoded.count)) == Array(decoded.prefix(pacedSeen.count)))
    // 4. Round trip: what decoded re-encodes to the bytes it came from.
    var encoded = ByteBuffer()
    for frame in decoded { frame.write(to: &encoded) }
    precondition(Array(encoded.readableBytesView) == Array(bytes.prefix(encoded.readableBytes)), "round trip")
    return 0
}

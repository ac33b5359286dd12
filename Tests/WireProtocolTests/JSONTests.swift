// The test target may use Foundation (the programs may not): its JSONEncoder and JSONDecoder are the reference
// the protocol's own coder (Sources/WireProtocol/JSON.swift) is compared with, byte for byte.
import FoundationEssentials
import NIOCore
import Testing
@testable import WireProtocol

@Suite struct JSONTests {
    // MARK: Reference

    static func foundation<T: Encodable>(_ value: T, pretty: Bool) throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = pretty ? [.sortedKeys, .prettyPrinted, .withoutEscapingSlashes]
            : [.sortedKeys, .withoutEscapingSlashes]
        return String(decoding: try encoder.encode(value), as: UTF8.self)
    }

    static func foundationDecode<T: Decodable>(_ type: T.Type, _ text: String) throws -> T {
        try JSONDecoder().decode(type, from: Data(text.utf8))
    }

    /// Both writers give the same bytes, compact and pretty, and both decoders read them back to the value.
    static func checkSame<T: Codable & Equatable>(_ value: T, sourceLocation: SourceLocation = #_sourceLocation) throws {
        for pretty in [false, true] {
            let ours = try JSONCoding.encodeString(value, pretty: pretty)
            let theirs = try foundation(value, pretty: pretty)
            #expect(ours == theirs, "pretty: \(pretty)", sourceLocation: sourceLocation)
            let decoded = try JSONCoding.decode(T.self, from: theirs)
            #expect(decoded == value, sourceLocation: sourceLocation)
            let viaBuffer = try JSONCoding.decode(T.self, from: ByteBuffer(string: ours))
            #expect(viaBuffer == value, sourceLocation: sourceLocation)
            #expect(try foundationDecode(T.self, ours) == value, sourceLocation: sourceLocation)
        }
    }

    // MARK: The protocol's payloads

    static let health = WorkerHealthLevels(alive: "ok", device: "unknown", model: "loading",
                                           inference: "probe `infer` timed out after 2s", inRotation: false)

    static func fullStatus() -> StatusDocument {
        var worker = WorkerStatus(
            device: "0", kind: "npu", state: "backoff", desired: "up", pid: 4242, restarts: 3,
            lastExit: "signaled(9)", lastExitDetail: "worker killed by SIGKILL \"outside\"\n(not the OOM killer)",
            uptimeSeconds: 12.25, inflight: 2, maxInflight: 16,
            exits: ["signaled": 2, "exited": 1, "oom_killed": 0, "hang": 10],
            nextRestartInSeconds: 0.3, health: health, fallback: false, memoryBytes: 1 << 40,
            memoryLimitBytes: Int.max, revision: "a1b2c3d4", generation: 7, drain: "draining")
        worker.group = "tp0"
        worker.rank = 1
        let idle = WorkerStatus(
            device: "cpu-fallback-1", kind: "cpu", state: "stopped", desired: "down", pid: nil, restarts: 0,
            lastExit: nil, lastExitDetail: nil, uptimeSeconds: 0, inflight: 0, maxInflight: 1, exits: [:],
            nextRestartInSeconds: nil, health: health, fallback: true)
        let span = AvailabilitySpan(
            seconds: 3600.5, received: 1_000_000, accepted: 999_000, refused: 1000, answered: 998_990, abandoned: 10,
            succeeded: 998_000, failed: ["no_workers": 900, "overloaded": 100, "deadline_exceeded": 990],
            availability: 0.99901, errorBudgetRemaining: -8.9,
            capacityLostSeconds: ["0": ["down": 1.5, "draining": 0.25, "failed": 0], "10": [:], "2": ["down": 1e-7]],
            capacityAvailability: 0.9999995)
        let group = GroupStatus(
            id: "tp0", devices: ["2", "3"], state: "ready", desired: "up", serving: true, restarts: 1,
            lastExit: "exited(1)", lastExitRank: 1, lastExitDevice: "3", lastExitDetail: "lost its peer",
            masterPort: 40123, rankTableFile: "/run/npu-supervisor/groups/tp0.rank_table.json",
            nextRestartInSeconds: nil)
        return StatusDocument(
            state: "degraded", reason: "degraded: 3/4 workers ready (device 0 backoff (signaled(9) x1))",
            supervisor: SupervisorInfo(pid: 1, version: "0.1.0", uptimeSeconds: 3600.5, config: "/etc/npu-supervisor/config.toml",
                                       http: nil),
            queueDepth: 0, fallbackActive: true, workers: [worker, idle],
            rollout: RolloutStatus(state: "paused", kind: "upgrade", devices: ["0", "1"], progress: "1/2", canary: "0",
                                   reason: nil),
            availability: AvailabilityStatus(objective: 0.9999, windowSeconds: 300, sinceStart: span, window: span),
            groups: [group])
    }

    @Test func everyPayloadTypeIsWrittenAsFoundationWritesIt() throws {
        try Self.checkSame(Self.fullStatus())
        var bare = Self.fullStatus()
        bare.rollout = nil
        bare.availability = nil
        bare.groups = []
        try Self.checkSame(bare)
        bare.groups = nil
        bare.workers = []
        try Self.checkSame(bare)
        try Self.checkSame(ErrorPayload(code: ErrorCode.noWorkers, message: "no worker: device \"2\" is failed\t(78)",
                                        retryable: true))
        try Self.checkSame(RequestOptions(deadlineMS: 250, device: "tp0"))
        try Self.checkSame(RequestOptions())
        try Self.checkSame(HelloFromSupervisor(device: "3", heartbeatIntervalMS: 1000, maxFrameBytes: 16 << 20))
        try Self.checkSame(HelloFromWorker(pid: 77, device: nil, workerVersion: "1.2", model: "qwen/💡"))
        try Self.checkSame(ControlCommand(command: "tail", devices: ["all"], follow: true, lines: -1, wait: false,
                                          rolling: nil, action: "status"))
        try Self.checkSame(ControlResult(ok: false, message: "", devices: []))
        try Self.checkSame(PidResult(pid: nil))
        try Self.checkSame(PidResult(pid: Int32.min))
        try Self.checkSame(TailResult(device: "q", lines: ["", "a/b", "\u{1B}[31mred\u{1B}[0m", "\u{0}\u{7F}\u{2028}é"]))
    }

    @Test func numbersAreWrittenAsFoundationWritesThem() throws {
        let doubles: [Double] = [0, -0.0, 1, -1, 0.1, 0.30000000000000004, 100, 1e20, 1e21, 1e-7, 123456789012345678,
                                 .pi, .greatestFiniteMagnitude, .leastNonzeroMagnitude, .leastNormalMagnitude, 2.5e-300]
        try Self.checkSame(doubles)
        try Self.checkSame([Float(0.1), 3.4e38, -1.5, 1])
        try Self.checkSame([Int.min, Int.max, 0, -1])
        try Self.checkSame([UInt64.max, 0])
        try Self.checkSame([Int8.min, Int8.max])
        try Self.checkSame(["k": UInt32.max])
    }

    @Test func stringsAreEscapedAsFoundationEscapesThem() throws {
        // Every scalar below 0x80, a few beyond, and random strings of scalars from every plane.
        try Self.checkSame((0..<0x80).map { String(Unicode.Scalar(UInt8($0))) })
        try Self.checkSame(["\u{80}", "\u{FEFF}", "\u{FFFF}", "\u{10FFFF}", "e\u{301}", "👩‍👩‍👧"])
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<200 {
            var text = String.UnicodeScalarView()
            for _ in 0..<Int.random(in: 0..<24, using: &generator) {
                let range: ClosedRange<UInt32> = [0...0x7F, 0x80...0xD7FF, 0xE000...0x10FFFF].randomElement(using: &generator)!
                text.append(Unicode.Scalar(UInt32.random(in: range, using: &generator))!)
            }
            try Self.checkSame([String(text): String(text)])
        }
    }

    @Test func keysAreSortedByTheirBytesAsFoundationSortsThem() throws {
        let keys = ["10", "9", "b", "B", "a_x", "aX", "a", "device_10", "device_2", "é", "z", "", " "]
        try Self.checkSame(Dictionary(uniqueKeysWithValues: keys.enumerated().map { ($1, $0) }))
        try Self.checkSame([[String: [Int]]]())
        try Self.checkSame([["": []], ["x": [1, 2]]] as [[String: [Int]]])
    }

    @Test func nothingEncodableIsRefusedAsFoundationRefusesIt() {
        #expect(throws: EncodingError.self) { try JSONCoding.encode([Double.nan]) }
        #expect(throws: EncodingError.self) { try JSONCoding.encode(["x": Double.infinity]) }
        #expect(throws: EncodingError.self) { try JSONCoding.encode(Float.infinity) }
    }

    // MARK: Reading

    @Test func whatIsValidJSONIsReadAsFoundationReadsIt() throws {
        let texts: [String] = [
            " {\"code\" : \"x\" , \"message\":\"a\\\"b\\\\c\\/d\\b\\f\\n\\r\\t\\u0041\\u00e9\\ud83d\\ude00\", \"retryable\":true}\r\n",
            "{\"code\":\"x\"}",
            "{\"code\":\"x\",\"message\":null,\"extra\":[1,{\"deep\":[[[]]]}],\"retryable\":false}",
            "{\"code\":\"first\",\"code\":\"second\"}",
        ]
        for text in texts {
            let ours = try JSONCoding.decode(ErrorPayload.self, from: text)
            #expect(ours == (try Self.foundationDecode(ErrorPayload.self, text)), "\(text)")
        }
        #expect(try JSONCoding.decode(ErrorPayload.self, from: texts[3]).code == "first")
        // Integers written with a fraction or an exponent, when whole and in range.
        #expect(try JSONCoding.decode([Int].self, from: "[1.0, 1e2, -0, 2E+1, 1.5e1]") == [1, 100, 0, 20, 15])
        #expect(try JSONCoding.decode([UInt64].self, from: "[18446744073709551615]") == [UInt64.max])
        #expect(try JSONCoding.decode([Double].self, from: "[1, -0.5, 1e-300, 2.5E+10]") == [1, -0.5, 1e-300, 2.5e10])
        #expect(try JSONCoding.decode(String.self, from: "\"top\"") == "top")
        #expect(try JSONCoding.decode(Int?.self, from: "null") == nil)
    }

    /// Malformed input: a `DecodingError` saying what is wrong and where, never a crash or a partial value.
    @Test(arguments: [
        ("", "expected a value, found end of input at byte 0"),
        ("{\"code\":\"x\"", "expected ',' or '}' in an object, found end of input at byte 11"),
        ("{\"code\":\"x\"} x", "unexpected text after the value at byte 13"),
        ("[1,]", "expected a value, found ']' at byte 3"),
        ("{\"a\":1,}", "expected a string key in an object, found '}' at byte 7"),
        ("{a:1}", "expected a string key in an object, found 'a' at byte 1"),
        ("nul", "expected a value, found 'n' at byte 0"),
        ("[01]", "a number has a leading zero at byte 2"),
        ("[1.]", "expected a digit after '.', found ']' at byte 3"),
        ("[1e]", "expected a digit in an exponent, found ']' at byte 3"),
        ("[-]", "expected a digit, found ']' at byte 2"),
        ("[NaN]", "expected a value, found 'N' at byte 1"),
        ("\"a\u{1}b\"", "a control character (0x1) inside a string must be escaped at byte 2"),
        ("\"\\ud800\"", "a \\u escape of a lead surrogate is not followed by its trail surrogate at byte 7"),
        ("\"\\udc00\"", "a \\u escape of a lone trail surrogate at byte 7"),
        ("\"\\x\"", "unknown escape '\\'x'' in a string at byte 2"),
        ("\"\\u12g4\"", "a \\u escape needs four hex digits, found 'g' at byte 5"),
        ("\"abc", "a string is not terminated at byte 4"),
        ("/* c */ 1", "expected a value, found '/' at byte 0"),
    ])
    func malformedTextIsADecodingErrorThatSaysWhereAndWhy(text: String, why: String) throws {
        do {
            _ = try JSONCoding.decode([Int].self, from: text)
            Issue.record("\(text) was accepted")
        } catch let DecodingError.dataCorrupted(context) {
            #expect(context.debugDescription == "The given data was not valid JSON: \(why).")
        }
    }

    @Test func invalidUTF8AndDeepNestingAreRefused() throws {
        let bytes: [UInt8] = [UInt8(ascii: "\""), 0xC3, 0x28, UInt8(ascii: "\"")]
        #expect(throws: DecodingError.self) { try JSONCoding.decode(String.self, from: ByteBuffer(bytes: bytes)) }
        let deep = String(repeating: "[", count: 100_000) + String(repeating: "]", count: 100_000)
        do {
            _ = try JSONCoding.decode(JSONValueProbe.self, from: deep)
            Issue.record("100,000 levels were accepted")
        } catch let DecodingError.dataCorrupted(context) {
            #expect(context.debugDescription.contains("nested deeper than 512 levels"))
        }
        let fine = String(repeating: "[", count: 512) + String(repeating: "]", count: 512)
        _ = try JSONCoding.decode(JSONValueProbe.self, from: fine)
    }

    /// Found by review: what Foundation's decoder does and the first version of this one did not.
    @Test func integersAreExactAndOutOfRangeFloatsAreRefused() throws {
        // Through a Double these were 9007199254740992 and 1234567890123456768.
        #expect(try JSONCoding.decode([Int].self, from: "[9007199254740993.0, 9007199254740993e0, -9223372036854775808.0]")
                == [9_007_199_254_740_993, 9_007_199_254_740_993, Int.min])
        #expect(try JSONCoding.decode([Int64].self, from: "[123456789012345678e1, 12345.6789e4]")
                == [1_234_567_890_123_456_780, 123_456_789])
        #expect(try JSONCoding.decode([UInt8].self, from: "[-0, -0.0, 0e5000, 2.55e2]") == [0, 0, 0, 255])
        for text in ["[1.0000000000000001]", "[1e-400]", "[1e40]", "[256e0]", "[-1.0]"] {
            #expect(throws: DecodingError.self, "\(text)") { try JSONCoding.decode([UInt8].self, from: text) }
        }
        #expect(throws: DecodingError.self) { try JSONCoding.decode([Int].self, from: "[1e19]") }
        #expect(try JSONCoding.decode([UInt64].self, from: "[1e19]") == [10_000_000_000_000_000_000])
        // Underflow to zero is out of range, as overflow to infinity is; a zero written as such is not.
        #expect(throws: DecodingError.self) { try JSONCoding.decode([Double].self, from: "[1e-400]") }
        #expect(throws: DecodingError.self) { try JSONCoding.decode([Float].self, from: "[-1e-50]") }
        #expect(try JSONCoding.decode([Double].self, from: "[0.0e-400, -0]") == [0, 0])
        // A byte-order mark in front is skipped, as Foundation skips it.
        #expect(try JSONCoding.decode([Int].self, from: ByteBuffer(bytes: [0xEF, 0xBB, 0xBF] + Array("[1]".utf8))) == [1])
    }

    @Test func aFailedDecodeInAnArrayDoesNotMoveToTheNextElement() throws {
        let lossy = try JSONCoding.decode(LossyInts.self, from: #"[1, "x", 2, {"y": 1}, 3]"#)
        #expect(lossy.values == [1, 2, 3])
        #expect(lossy.values == (try Self.foundationDecode(LossyInts.self, #"[1, "x", 2, {"y": 1}, 3]"#)).values)
    }

    @Test func aNestedContainerAskedForTwiceIsTheSameOne() throws {
        try Self.checkSame(TwiceNested(a: 1, b: 2))
        #expect(try JSONCoding.encodeString(TwiceNested(a: 1, b: 2)) == #"{"list":[1,2],"n":{"a":1,"b":2}}"#)
    }

    /// What the error frames say (`not a control command: ...`): the place and the problem, in words.
    @Test(arguments: [
        ("{\"command\":\"tail\",\"lines\":\"ten\"}", "'lines': Expected to decode Int but found a string instead."),
        ("{\"devices\":[\"0\"]}", "the key 'command' is missing"),
        ("{\"command\":\"stop\",\"devices\":[\"0\",7]}", "'devices[1]': Expected to decode String but found a number instead."),
        ("{\"command\":\"stop\",\"lines\":1e400}", "'lines': Parsed JSON number <1e400> does not fit in Int."),
        ("{\"command\":", "The given data was not valid JSON: expected a value, found end of input at byte 11."),
        ("[]", "Expected to decode Dictionary<String, Any> but found an array instead."),
    ])
    func decodingErrorsAreDescribedForAPerson(text: String, sentence: String) {
        do {
            _ = try JSONCoding.decode(ControlCommand.self, from: text)
            Issue.record("\(text) was accepted")
        } catch {
            #expect(JSONCoding.describe(error) == sentence)
        }
    }

    @Test func wrongTypesAndMissingKeysSayWhichKey() throws {
        do {
            _ = try JSONCoding.decode(ControlCommand.self, from: "{\"command\":\"tail\",\"lines\":\"ten\"}")
            Issue.record("accepted")
        } catch let DecodingError.typeMismatch(_, context) {
            #expect(context.codingPath.map(\.stringValue) == ["lines"])
            #expect(context.debugDescription == "Expected to decode Int but found a string instead.")
        }
        do {
            _ = try JSONCoding.decode(ControlCommand.self, from: "{\"devices\":[\"0\"]}")
            Issue.record("accepted")
        } catch let DecodingError.keyNotFound(key, _) {
            #expect(key.stringValue == "command")
        }
        do {
            _ = try JSONCoding.decode(ControlCommand.self, from: "{\"command\":\"stop\",\"devices\":[\"0\",7]}")
            Issue.record("accepted")
        } catch let DecodingError.typeMismatch(_, context) {
            #expect(context.codingPath.map(\.stringValue) == ["devices", "Index 1"])
        }
        #expect(throws: DecodingError.self) { try JSONCoding.decode([UInt8].self, from: "[300]") }
        #expect(throws: DecodingError.self) { try JSONCoding.decode([Int].self, from: "[1.5]") }
        #expect(throws: DecodingError.self) { try JSONCoding.decode([Int].self, from: "[1e400]") }
        #expect(throws: DecodingError.self) { try JSONCoding.decode([Double].self, from: "[1e400]") }
        #expect(throws: DecodingError.self) { try JSONCoding.decode([Int].self, from: "[null]") }
        #expect(throws: DecodingError.self) { try JSONCoding.decode([String: Int].self, from: "[]") }
    }
}

/// Any JSON value, read through the Decoder protocol (for the nesting tests).
private indirect enum JSONValueProbe: Decodable {
    case array([JSONValueProbe])
    case other

    init(from decoder: any Decoder) throws {
        if var c = try? decoder.unkeyedContainer() {
            var elements: [JSONValueProbe] = []
            while !c.isAtEnd { elements.append(try c.decode(JSONValueProbe.self)) }
            self = .array(elements)
        } else {
            self = .other
        }
    }
}

/// Integers of an array, skipping elements of any other kind (a type that tries one decoding, then another).
private struct LossyInts: Decodable {
    var values: [Int] = []
    private struct Skip: Decodable {}

    init(from decoder: any Decoder) throws {
        var c = try decoder.unkeyedContainer()
        while !c.isAtEnd {
            if let value = try? c.decode(Int.self) {
                values.append(value)
            } else if (try? c.decode(String.self)) == nil {
                _ = try c.decode(Skip.self)
            }
        }
    }
}

/// Writes into a nested keyed and a nested unkeyed container, each asked for twice under its key.
private struct TwiceNested: Codable, Equatable {
    var a: Int
    var b: Int
    enum Keys: String, CodingKey { case n, list, a, b }

    init(a: Int, b: Int) {
        self.a = a
        self.b = b
    }

    func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: Keys.self)
        var first = c.nestedContainer(keyedBy: Keys.self, forKey: .n)
        try first.encode(a, forKey: .a)
        var second = c.nestedContainer(keyedBy: Keys.self, forKey: .n)
        try second.encode(b, forKey: .b)
        var one = c.nestedUnkeyedContainer(forKey: .list)
        try one.encode(a)
        var two = c.nestedUnkeyedContainer(forKey: .list)
        try two.encode(b)
    }

    init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: Keys.self)
        let n = try c.nestedContainer(keyedBy: Keys.self, forKey: .n)
        a = try n.decode(Int.self, forKey: .a)
        b = try n.decode(Int.self, forKey: .b)
    }
}

/// A worker spec's revision: a hash of what the worker process is (command, environment, pinning, working
/// directory, kind, memory limit). Changing any of these needs a new process, so a reload rolls the device;
/// changing anything else (timeouts, probes, `max_inflight`, restart policy) is applied in place.
extension WorkerSpec {
    /// 12 hex digits of a 64-bit FNV-1a hash over the fields that need a restart, in a fixed order.
    public var revision: String {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        func mix(_ text: String) {
            for byte in text.utf8 {
                hash ^= UInt64(byte)
                hash = hash &* 0x0000_0100_0000_01b3
            }
            hash ^= 0xff  // field separator: ["ab", "c"] and ["a", "bc"] differ
            hash = hash &* 0x0000_0100_0000_01b3
        }
        mix(kind.rawValue)
        mix("\(command.count)")
        command.forEach(mix)
        for (key, value) in environment.sorted(by: { $0.key < $1.key }) {
            mix(key)
            mix(value)
        }
        mix(pinVariable ?? "-")
        mix(workingDirectory ?? "-")
        mix(memoryLimit.map { "\($0)" } ?? "-")
        let hex = String(hash, radix: 16)
        return String((String(repeating: "0", count: max(0, 16 - hex.count)) + hex).prefix(12))
    }

    /// Whether `other` is the same process, so that only in-place settings differ.
    public func isSameRevision(as other: WorkerSpec) -> Bool { revision == other.revision }
}

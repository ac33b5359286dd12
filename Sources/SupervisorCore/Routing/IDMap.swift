/// Values under the request ids a client chose (nonzero 64-bit integers): one connection's requests in flight.
///
/// An open-addressing table with linear probing, instead of a `Dictionary`, whose SipHash of every key (three
/// times per request: the duplicate check, the insert, the removal) and bucket bookkeeping were about a tenth of
/// the request path's time in user space (BENCHMARKS.md). A key's slot is the high bits of the key times a
/// random odd multiplier chosen per map: a client cannot aim its ids at one slot without knowing it, and if it
/// could, it would only slow its own lookups (at most `max_inflight_per_connection` entries). Removal shifts
/// the entries after the hole back (no tombstones), and the table grows at half full and shrinks (from 64 slots
/// up) below a sixteenth, so a lookup probes a few slots at most and memory follows what is held.
public struct IDMap<Value> {
    @usableFromInline var keys: ContiguousArray<UInt64>
    @usableFromInline var slots: ContiguousArray<Value?>
    @usableFromInline var shift: UInt64
    @usableFromInline let multiplier: UInt64
    @usableFromInline var held = 0

    @usableFromInline static var minimumCapacity: Int { 16 }

    public init() {
        self.init(multiplier: UInt64.random(in: 1...UInt64.max) | 1)
    }

    /// Entries held.
    public var count: Int { held }
    public var isEmpty: Bool { held == 0 }

    @inlinable func home(_ key: UInt64) -> Int {
        Int(truncatingIfNeeded: (key &* multiplier) >> shift)
    }

    @inlinable func find(_ key: UInt64) -> Int? {
        let mask = keys.count - 1
        var i = home(key)
        while true {
            let k = keys[i]
            if k == key { return i }
            if k == 0 { return nil }
            i = (i + 1) & mask
        }
    }

    /// The value under `key`; setting nil removes it. Key 0 is never held (request id 0 is reserved).
    @inlinable public subscript(key: UInt64) -> Value? {
        get { find(key).flatMap { slots[$0] } }
        set {
            if let newValue { insert(key, newValue) } else { removeValue(forKey: key) }
        }
    }

    @inlinable mutating func insert(_ key: UInt64, _ value: Value) {
        precondition(key != 0, "IDMap: key 0 is the empty marker")
        if let i = find(key) {
            slots[i] = value
            return
        }
        if (held + 1) * 2 > keys.count { resize(to: keys.count * 2) }
        let mask = keys.count - 1
        var i = home(key)
        while keys[i] != 0 { i = (i + 1) & mask }
        keys[i] = key
        slots[i] = value
        held += 1
    }

    /// Removes and returns the value under `key` (nil when there is none).
    @inlinable @discardableResult public mutating func removeValue(forKey key: UInt64) -> Value? {
        guard key != 0, var hole = find(key) else { return nil }
        let value = slots[hole].take()
        keys[hole] = 0
        held -= 1
        // Backward shift: an entry after the hole moves into it unless its home lies cyclically in (hole, j].
        let mask = keys.count - 1
        var j = (hole + 1) & mask
        while keys[j] != 0 {
            let h = home(keys[j])
            let stays = hole <= j ? (hole < h && h <= j) : (hole < h || h <= j)
            if !stays {
                keys[hole] = keys[j]
                slots[hole] = slots[j].take()
                keys[j] = 0
                hole = j
            }
            j = (j + 1) & mask
        }
        // Shrinks only well below what made it grow: a pipelining client's in-flight count swings between zero
        // and its depth with every burst, and resizing at each swing cost an allocation per request.
        if held * 16 < keys.count && keys.count > 4 * Self.minimumCapacity { resize(to: keys.count / 2) }
        return value
    }

    @usableFromInline mutating func resize(to capacity: Int) {
        let oldKeys = keys
        var oldSlots = slots
        keys = ContiguousArray(repeating: 0, count: capacity)
        slots = ContiguousArray(repeating: nil, count: capacity)
        shift = UInt64(64 - capacity.trailingZeroBitCount)
        let mask = capacity - 1
        for index in oldKeys.indices where oldKeys[index] != 0 {
            var i = home(oldKeys[index])
            while keys[i] != 0 { i = (i + 1) & mask }
            keys[i] = oldKeys[index]
            slots[i] = oldSlots[index].take()
        }
    }

    /// Every value held, in no particular order (cold paths: a client gone).
    public var values: [Value] { slots.compactMap { $0 } }

    public mutating func removeAll() {
        self = IDMap(multiplier: multiplier)
    }

    init(multiplier: UInt64) {
        self.multiplier = multiplier
        keys = ContiguousArray(repeating: 0, count: Self.minimumCapacity)
        slots = ContiguousArray(repeating: nil, count: Self.minimumCapacity)
        shift = UInt64(64 - Self.minimumCapacity.trailingZeroBitCount)
    }
}

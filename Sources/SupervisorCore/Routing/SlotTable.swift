/// Values under 64-bit ids that index them: the request path's table of requests in flight.
///
/// An id is a slot index (low 24 bits) and the slot's generation (high 40 bits, never 0, so no id is 0). A lookup
/// is an array access and one comparison, where a dictionary hashes the key (three times per request: insert,
/// the answer's lookup, removal). Removing a value frees its slot and moves the slot to its next generation, so
/// the removed id finds nothing from then on (a worker's late answer for a request retried elsewhere, or
/// cancelled) even after the slot holds another value; an id comes back only after its slot was reused 2^40 - 1
/// times (at a million requests a second through one slot, 12 days; an old id must also still be around then).
/// Freed slots are reused last-freed first (the most recently touched memory). The table holds at most
/// ``capacity`` values and does not shrink: its size is the most values held at once, which admission bounds
/// (`max_queue` and the workers' `max_inflight`, checked against ``capacity`` when the config is read).
public struct SlotTable<Value> {
    @usableFromInline var values: ContiguousArray<Value?> = []
    @usableFromInline var generations: ContiguousArray<UInt64> = []
    @usableFromInline var free: ContiguousArray<UInt32> = []
    @usableFromInline var held = 0
    /// Values held.
    public var count: Int { held }

    public init() {}

    public var isEmpty: Bool { held == 0 }

    /// The most values held at once (2^24 - 1: the index part of an id).
    public static var capacity: Int { (1 << indexBits) - 1 }
    @inlinable static var indexBits: Int { 24 }
    @inlinable static var indexMask: UInt64 { (1 << UInt64(indexBits)) - 1 }
    @inlinable static var generationMask: UInt64 { (1 << UInt64(64 - indexBits)) - 1 }

    @inlinable static func id(index: Int, generation: UInt64) -> UInt64 {
        generation << UInt64(indexBits) | UInt64(truncatingIfNeeded: index)
    }

    /// The id the next ``insert(_:)`` gives (for a value that must know its id before it is stored).
    @inlinable public var nextID: UInt64 {
        if let index = free.last { return Self.id(index: Int(index), generation: generations[Int(index)]) }
        return Self.id(index: values.count, generation: 1)
    }

    /// Stores `value` under ``nextID`` and returns that id.
    @inlinable @discardableResult public mutating func insert(_ value: Value) -> UInt64 {
        held += 1
        if let index = free.popLast() {
            values[Int(index)] = value
            return Self.id(index: Int(index), generation: generations[Int(index)])
        }
        precondition(values.count < Self.capacity, "SlotTable: more than \(Self.capacity) values at once")
        values.append(value)
        generations.append(1)
        return Self.id(index: values.count - 1, generation: 1)
    }

    /// The value under `id`, nil when there is none (never stored, removed, or not an id of this table).
    @inlinable public subscript(id: UInt64) -> Value? {
        let index = Int(truncatingIfNeeded: id & Self.indexMask)
        guard index < values.count, generations[index] == id >> UInt64(Self.indexBits) else { return nil }
        return values[index]
    }

    /// Removes and returns the value under `id` (nil when there is none).
    @inlinable @discardableResult public mutating func remove(_ id: UInt64) -> Value? {
        let index = Int(truncatingIfNeeded: id & Self.indexMask)
        guard index < values.count, generations[index] == id >> UInt64(Self.indexBits),
              let value = values[index].take() else { return nil }
        let next = (generations[index] &+ 1) & Self.generationMask
        generations[index] = next == 0 ? 1 : next
        free.append(UInt32(truncatingIfNeeded: index))
        held -= 1
        return value
    }

    /// Every value held, in slot order (not insertion order). For the cold paths: shutdown, a worker's loss.
    public var allValues: [Value] { values.compactMap { $0 } }
}

/// Values under 64-bit ids that index them: the request path's table of requests in flight.
///
/// An id is a slot index (low 32 bits) and the slot's generation (high 32 bits, never 0, so no id is 0). A lookup
/// is an array access and one comparison, where a dictionary hashes the key (three times per request: insert,
/// the answer's lookup, removal). Removing a value frees its slot and moves the slot to its next generation, so
/// the removed id finds nothing from then on (a worker's late answer for a request retried elsewhere, or
/// cancelled) even after the slot holds another value; an id comes back only after its slot was reused 2^32
/// times. Freed slots are reused last-freed first (the most recently touched memory). The table does not
/// shrink: its size is the most values held at once, which admission bounds (`max_queue` and the workers'
/// `max_inflight`).
public struct SlotTable<Value> {
    @usableFromInline var values: ContiguousArray<Value?> = []
    @usableFromInline var generations: ContiguousArray<UInt32> = []
    @usableFromInline var free: ContiguousArray<UInt32> = []
    @usableFromInline var held = 0
    /// Values held.
    public var count: Int { held }

    public init() {}

    public var isEmpty: Bool { held == 0 }

    @inlinable static func id(index: Int, generation: UInt32) -> UInt64 {
        UInt64(generation) << 32 | UInt64(UInt32(truncatingIfNeeded: index))
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
        precondition(values.count < Int(UInt32.max), "SlotTable: more than 2^32 - 1 values at once")
        values.append(value)
        generations.append(1)
        return Self.id(index: values.count - 1, generation: 1)
    }

    /// The value under `id`, nil when there is none (never stored, removed, or not an id of this table).
    @inlinable public subscript(id: UInt64) -> Value? {
        let index = Int(truncatingIfNeeded: id & 0xFFFF_FFFF)
        guard index < values.count, generations[index] == UInt32(truncatingIfNeeded: id >> 32) else { return nil }
        return values[index]
    }

    /// Removes and returns the value under `id` (nil when there is none).
    @inlinable @discardableResult public mutating func remove(_ id: UInt64) -> Value? {
        let index = Int(truncatingIfNeeded: id & 0xFFFF_FFFF)
        guard index < values.count, generations[index] == UInt32(truncatingIfNeeded: id >> 32),
              let value = values[index].take() else { return nil }
        let next = generations[index] &+ 1
        generations[index] = next == 0 ? 1 : next
        free.append(UInt32(truncatingIfNeeded: index))
        held -= 1
        return value
    }

    /// Every value held, in slot order (not insertion order). For the cold paths: shutdown, a worker's loss.
    public var allValues: [Value] { values.compactMap { $0 } }
}

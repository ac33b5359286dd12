import Testing
@testable import SupervisorCore

/// The request path's table of requests in flight (``SlotTable``): ids that index it, and removed ids that find
/// nothing even after their slot holds another value.
@Suite struct SlotTableTests {
    @Test func idsAreNonZeroAndNextIDIsWhatInsertGives() {
        var table = SlotTable<String>()
        #expect(table.isEmpty)
        for name in ["a", "b", "c"] {
            let expected = table.nextID
            let id = table.insert(name)
            #expect(id == expected)
            #expect(id != 0)
            #expect(table[id] == name)
        }
        #expect(table.count == 3)
    }

    @Test func aRemovedIDFindsNothingEvenWhenItsSlotIsReused() {
        var table = SlotTable<String>()
        let first = table.insert("first")
        let removed = table.remove(first)
        #expect(removed == "first")
        #expect(table[first] == nil)
        #expect(table.isEmpty)
        let second = table.insert("second")
        // The same slot (last freed, first reused), a new generation: the old id is not the new one's.
        #expect(second & 0xFF_FFFF == first & 0xFF_FFFF)
        #expect(second != first)
        #expect(table[first] == nil)
        #expect(table[second] == "second")
        let again = table.remove(first)
        #expect(again == nil)
        #expect(table[second] == "second")
        #expect(table.count == 1)
    }

    /// Ids are a 24-bit slot index and a 40-bit generation: a slot reused many times gives a new id each time.
    @Test func aSlotReusedGivesADifferentIDEveryTime() {
        var table = SlotTable<Int>()
        var seen = Set<UInt64>()
        for i in 0..<10_000 {
            let id = table.insert(i)
            #expect(id & 0xFF_FFFF == 0, "one slot, reused")
            #expect(seen.insert(id).inserted)
            table.remove(id)
        }
        #expect(SlotTable<Int>.capacity == (1 << 24) - 1)
    }

    @Test func idsThatAreNotTheTablesFindNothing() {
        var table = SlotTable<Int>()
        let id = table.insert(7)
        let strangers: [UInt64] = [0, 1, UInt64.max, id &+ 1, id ^ (1 << 32), (id & 0xFF_FFFF) | (9 << 24), 1 << 24 | 5, 1 << 32]
        for stranger in strangers {
            #expect(table[stranger] == nil, "id \(stranger)")
        }
        for stranger in strangers {
            let removed = table.remove(stranger)
            #expect(removed == nil, "id \(stranger)")
        }
        #expect(table[id] == 7)
        #expect(table.count == 1)
    }

    /// A table driven at random against a dictionary of the ids it gave: the same answers throughout, every id
    /// given once, and the table no larger than the most values held at once.
    @Test func itAgreesWithADictionaryUnderRandomUse() {
        var table = SlotTable<UInt64>()
        var model: [UInt64: UInt64] = [:]
        var given = Set<UInt64>()
        var removedIDs: [UInt64] = []
        var generator = SystemRandomNumberGenerator()
        var most = 0
        for step in 0..<20_000 {
            if model.isEmpty || Int.random(in: 0..<100, using: &generator) < 55 {
                let value = UInt64(step)
                let id = table.insert(value)
                #expect(!given.contains(id), "id \(id) given twice")
                given.insert(id)
                model[id] = value
            } else {
                let id = model.keys.randomElement(using: &generator)!
                let removed = table.remove(id)
                #expect(removed == model.removeValue(forKey: id))
                removedIDs.append(id)
            }
            most = max(most, model.count)
            #expect(table.count == model.count)
        }
        for (id, value) in model {
            #expect(table[id] == value)
        }
        for id in removedIDs.suffix(500) {
            #expect(table[id] == nil)
        }
        #expect(table.allValues.count == model.count)
        #expect(Set(table.allValues) == Set(model.values))
        #expect(table.values.count == most)
    }
}

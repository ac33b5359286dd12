import Testing
@testable import SupervisorCore

/// One connection's requests by the ids its client chose (``IDMap``): the same answers as a dictionary, through
/// growth, shrinking and removals from the middle of probe runs.
@Suite struct IDMapTests {
    /// Random use against a dictionary. With `multiplier` 1 every small key has home slot 0: one long cluster,
    /// every removal shifts entries back (the worst case, made on purpose); with the random multiplier, ids as
    /// clients choose them (sequential, or random).
    @Test(arguments: [nil, UInt64(1)])
    func itAgreesWithADictionary(multiplier: UInt64?) {
        var map = multiplier.map { IDMap<UInt64>(multiplier: $0) } ?? IDMap<UInt64>()
        var model: [UInt64: UInt64] = [:]
        var generator = SystemRandomNumberGenerator()
        var nextSequential: UInt64 = 1
        for step in 0..<30_000 {
            let roll = Int.random(in: 0..<100, using: &generator)
            // Phases: grow to a few thousand, then drain below a handful (the table shrinks), then again.
            let growing = (step / 5_000) % 2 == 0
            if roll < (growing ? 60 : 35) || model.isEmpty {
                let key: UInt64 = roll % 2 == 0 ? nextSequential : UInt64.random(in: 1...UInt64.max, using: &generator)
                nextSequential += 1
                map[key] = UInt64(step)
                model[key] = UInt64(step)
            } else if roll < 90 {
                let key = model.keys.randomElement(using: &generator)!
                let removed = map.removeValue(forKey: key)
                #expect(removed == model.removeValue(forKey: key))
            } else {
                let absent = UInt64.random(in: 1...UInt64.max, using: &generator)
                #expect(map[absent] == model[absent])
                let removed = map.removeValue(forKey: absent)
                #expect(removed == model.removeValue(forKey: absent))
            }
            if step % 997 == 0 {
                for (key, value) in model { #expect(map[key] == value) }
            }
            #expect(map.count == model.count)
        }
        for (key, value) in model { #expect(map[key] == value) }
        #expect(Set(map.values) == Set(model.values))
        #expect(map.keys.count <= max(64, 32 * max(1, model.count)), "the table shrank with what it holds")
    }

    @Test func settingNilRemovesAndZeroIsNeverHeld() {
        var map = IDMap<String>()
        map[7] = "seven"
        map[7] = "SEVEN"
        #expect(map[7] == "SEVEN" && map.count == 1)
        map[7] = nil
        #expect(map[7] == nil && map.isEmpty)
        #expect(map[0] == nil)
        let removed = map.removeValue(forKey: 0)
        #expect(removed == nil)
        map[1] = "one"
        map.removeAll()
        #expect(map.isEmpty && map[1] == nil)
    }
}

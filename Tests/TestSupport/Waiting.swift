import Glibc

/// Waits for `condition` to hold, checking every 10 ms, for at most `timeout`. Returns whether it held.
/// This is how tests wait: on an event, with a deadline. Never sleep a fixed time and then assert.
public func eventually(timeout: Duration = .seconds(10), _ condition: () throws -> Bool) rethrows -> Bool {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if try condition() { return true }
        usleep(10_000)
    }
    return try condition()
}

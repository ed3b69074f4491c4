import Foundation
import Synchronization
import Testing
@testable import FlotillaAgent

/// The node's checks share one timer: probes run at their interval, never more than the bound at
/// once, stop when cancelled or when a probe says so.
@Suite struct HealthSchedulerTests {
    final class Counter: Sendable {
        let state = Mutex<(runs: [String: Int], inFlight: Int, peak: Int)>(([:], 0, 0))
        func begin(_ name: String) {
            state.withLock {
                $0.runs[name, default: 0] += 1
                $0.inFlight += 1
                $0.peak = max($0.peak, $0.inFlight)
            }
        }
        func end() { state.withLock { $0.inFlight -= 1 } }
        func runs(_ name: String) -> Int { state.withLock { $0.runs[name] ?? 0 } }
        var peak: Int { state.withLock { $0.peak } }
        var total: Int { state.withLock { $0.runs.values.reduce(0, +) } }
    }

    /// Waits until `condition` holds, up to 90 s: the suites run side by side on a two-core
    /// machine, and under CI's load other suites have held the cooperative pool for 40 s.
    func eventually(_ condition: () async -> Bool) async throws -> Bool {
        let deadline = ContinuousClock.now + .seconds(90)
        while ContinuousClock.now < deadline {
            if await condition() { return true }
            try await Task.sleep(for: .milliseconds(5))
        }
        return await condition()
    }

    @Test func probesRunAtTheirIntervalAndStopWhenCancelled() async throws {
        let scheduler = HealthScheduler(concurrency: 8)
        let counter = Counter()
        let began = ContinuousClock.now
        await scheduler.schedule(instance: "a", firstAfter: .zero, interval: .milliseconds(50)) {
            counter.begin("a"); counter.end(); return true
        }
        await scheduler.schedule(instance: "b", firstAfter: .zero, interval: .milliseconds(400)) {
            counter.begin("b"); counter.end(); return true
        }
        #expect(try await eventually { counter.runs("a") >= 5 && counter.runs("b") >= 2 })
        let elapsed = (ContinuousClock.now - began) / .milliseconds(1)
        let a = counter.runs("a"), b = counter.runs("b")
        // Never more often than the interval (a loaded machine runs them less often).
        #expect(Double(a) <= elapsed / 50 + 2, "a ran \(a) times in \(elapsed) ms")
        #expect(Double(b) <= elapsed / 400 + 2, "b ran \(b) times in \(elapsed) ms")
        await scheduler.cancel(instance: "a")
        let cancelledAt = counter.runs("a")
        try await Task.sleep(for: .milliseconds(200))
        #expect(counter.runs("a") <= cancelledAt + 1, "a went on after it was cancelled")
        #expect(await scheduler.scheduled == 1)
        await scheduler.shutdown()
    }

    @Test func aProbeThatSaysStopIsNotRunAgain() async throws {
        let scheduler = HealthScheduler()
        let counter = Counter()
        await scheduler.schedule(instance: "ready", firstAfter: .zero, interval: .milliseconds(20)) {
            counter.begin("ready"); counter.end()
            return counter.runs("ready") < 3  // ready at the third answer
        }
        #expect(try await eventually { counter.runs("ready") >= 3 })
        #expect(try await eventually { await scheduler.scheduled == 0 })
        try await Task.sleep(for: .milliseconds(100))
        #expect(counter.runs("ready") == 3)
        await scheduler.shutdown()
    }

    @Test func aThousandDueChecksRunWithinTheBound() async throws {
        let scheduler = HealthScheduler(concurrency: 16)
        let counter = Counter()
        for number in 0..<1000 {
            await scheduler.schedule(instance: "i\(number)", firstAfter: .zero, interval: .seconds(60)) {
                counter.begin("i\(number)")
                try? await Task.sleep(for: .milliseconds(2))
                counter.end()
                return true
            }
        }
        let deadline = ContinuousClock.now + .seconds(20)
        while counter.total < 1000, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(10)) }
        #expect(counter.total == 1000)
        #expect(counter.peak <= 16 && counter.peak > 1, "peak \(counter.peak)")
        await scheduler.shutdown()
    }
}

@Suite struct MinHeapTests {
    @Test func popsInOrder() {
        var heap = MinHeap<Int>()
        var generator = SystemRandomNumberGenerator()
        let values = (0..<500).map { _ in Int.random(in: 0..<1000, using: &generator) }
        for value in values { heap.push(value) }
        var popped: [Int] = []
        while let value = heap.pop() { popped.append(value) }
        #expect(popped == values.sorted())
    }
}

import FlotillaCore
import Foundation
import Testing

@Suite("Autoscaling decisions")
struct AutoscaleTests {
    let policy = AutoscalePolicy(metric: .requestsPerSecond, target: 10, min: 1, max: 5, scaleUpCooldownSeconds: 30, scaleDownCooldownSeconds: 60)

    @Test("up at once by the ratio, clamped to max; then not again before the cool-down")
    func scaleUp() {
        var state = AutoscaleState(now: 0)
        let up = state.decide(current: 1, value: 35, target: 10, policy: policy, now: 1)
        #expect(up?.from == 1 && up?.to == 4)
        #expect(state.decide(current: 4, value: 100, target: 10, policy: policy, now: 10) == nil)
        #expect(state.decide(current: 4, value: 100, target: 10, policy: policy, now: 31)?.to == 5)
    }

    @Test("within 10 % of the target nothing changes")
    func tolerance() {
        var state = AutoscaleState(now: 0)
        #expect(state.decide(current: 3, value: 10.9, target: 10, policy: policy, now: 100) == nil)
        #expect(state.decide(current: 3, value: 9.1, target: 10, policy: policy, now: 200) == nil)
    }

    @Test("down only after a whole window of lower load, to the most wanted in it; never below min")
    func scaleDown() {
        var state = AutoscaleState(now: 0)
        _ = state.decide(current: 1, value: 50, target: 10, policy: policy, now: 0)  // → 5
        // Load drops at 10 s; a burst at 40 s wants 3.
        for time in stride(from: 10.0, through: 59, by: 5) {
            let value = time == 40 ? 6.0 : 0.0
            #expect(state.decide(current: 5, value: value, target: 10, policy: policy, now: time) == nil, "at \(time)")
        }
        // 60 s after the last change: the highest wanted in the window is 3 (the burst at 40 s).
        let down = state.decide(current: 5, value: 0, target: 10, policy: policy, now: 61)
        #expect(down?.to == 3)
        // Another window later, to min and not below.
        for time in stride(from: 65.0, through: 120, by: 5) { _ = state.decide(current: 3, value: 0, target: 10, policy: policy, now: time) }
        let floor = state.decide(current: 3, value: 0, target: 10, policy: policy, now: 125)
        #expect(floor?.to == 1)
        #expect(state.decide(current: 1, value: 0, target: 10, policy: policy, now: 500) == nil)
    }

    @Test("a count outside the bounds goes back inside at once; no figure means no change")
    func bounds() {
        var state = AutoscaleState(now: 0)
        #expect(state.decide(current: 9, value: nil, target: 10, policy: policy, now: 1)?.to == 5)
        #expect(state.decide(current: 0, value: nil, target: 10, policy: policy, now: 2)?.to == 1)
        #expect(state.decide(current: 3, value: nil, target: 10, policy: policy, now: 3) == nil)
    }

    @Test("policies decode, refuse what cannot scale, and a memory target may be a share of mem")
    func decoding() throws {
        func decode(_ autoscale: String) throws -> AppDefinition {
            let object = try JSONDecoder().decode([String: JSONValue].self, from: Data(#"{"id": "/web", "cmd": "sleep 100", "mem": 128, "autoscale": \#(autoscale)}"#.utf8))
            return try AppDefinition.decode(object)
        }
        let app = try decode(#"{"metric": "memory", "target": 0.5, "max": 4}"#)
        #expect(app.autoscale?.min == 1)
        #expect(app.autoscale?.scaleDownCooldownSeconds == 300)
        #expect(app.autoscale?.resolvedTarget(memMiB: 128) == Double(64 << 20))
        func refused(_ autoscale: String) -> String {
            do {
                _ = try decode(autoscale)
                return "accepted"
            } catch {
                return "\(error)"
            }
        }
        #expect(refused(#"{"metric": "errorRate", "target": 0.1, "max": 4}"#).contains("/autoscale/metric"))
        #expect(refused(#"{"metric": "cpu", "target": 0.5, "min": 3, "max": 2}"#).contains("/autoscale/max"))
        #expect(refused(#"{"metric": "cpu", "target": 0, "max": 2}"#).contains("/autoscale/target"))
        #expect(refused(#"{"metric": "cpu", "target": 1, "max": 2, "step": 1}"#).contains("/autoscale/step"))
        // Changing the policy restarts nothing.
        var other = app
        other.autoscale = nil
        other.alerts = [AlertRule(name: "a", metric: .cpu, warning: 1, critical: nil)]
        #expect(!app.requiresRestart(comparedTo: other))
    }
}

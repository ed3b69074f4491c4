import FlotillaCore
@testable import FlotillaProxy
import Testing

@Suite struct PickerTests {
    final class States: @unchecked Sendable {
        var byKey: [String: TargetState] = [:]
        func state(_ target: RouteTarget) -> TargetState {
            let key = "\(target.host):\(target.port)"
            if let existing = byKey[key] { return existing }
            let created = TargetState(host: target.host, port: target.port)
            byKey[key] = created
            return created
        }
    }

    func route(_ weights: [Double], states: States = States()) -> RouteRuntime {
        let targets = weights.enumerated().map {
            RouteTarget(serviceID: "s\($0.offset)", service: "web", host: "127.0.0.1", port: 9000 + $0.offset, weight: $0.element)
        }
        let metrics = ProxyMetrics(shards: 1)
        return RouteRuntime(
            route: Route(rule: RouteRule(), targets: targets, services: ["web"]), states: states.state, metrics: metrics.forRoute("/"),
            apps: metrics.forApp)
    }

    @Test func roundRobinIsEven() {
        let picker = Picker(strategy: .roundRobin)
        let all = route([1 / 3, 1 / 3, 1 / 3])
        var counts: [Int: Int] = [:]
        for _ in 0..<300 { counts[picker.pick(from: all)!.state.port, default: 0] += 1 }
        #expect(counts.values.allSatisfy { $0 == 100 })
    }

    @Test func weightsShapeTheShares() {
        let picker = Picker(strategy: .roundRobin)
        let all = route([0.2, 0.4, 0.4])
        var counts: [Int: Int] = [:]
        for _ in 0..<10_000 { counts[picker.pick(from: all)!.state.port, default: 0] += 1 }
        #expect(abs(Double(counts[9000]!) / 10_000 - 0.2) < 0.02)
        #expect(abs(Double(counts[9001]!) / 10_000 - 0.4) < 0.02)
    }

    @Test func ejectedTargetsAreSkippedUntilTheCoolDownEnds() throws {
        let picker = Picker(strategy: .roundRobin)
        let all = route([0.5, 0.5])
        let first = all.targets[0].state
        for _ in 0..<3 { first.connectFailed(limit: 3, coolDown: .milliseconds(50)) }
        #expect((0..<10).allSatisfy { _ in picker.pick(from: all)?.state.port == 9001 })
        #expect(first.isEjected())
        #expect(!first.isEjected(now: TargetState.uptimeNanoseconds() + 100_000_000))
        first.succeeded()
        #expect(!first.isEjected())
    }

    @Test func allEjectedStillPicksSomethingButNotTheOneJustTried() {
        let picker = Picker(strategy: .random)
        let single = route([1])
        single.targets[0].state.connectFailed(limit: 1, coolDown: .seconds(10))
        #expect(picker.pick(from: single)?.state.port == 9000)
        #expect(picker.pick(from: single, excluding: single.targets[0].state) == nil)
        let pair = route([0.5, 0.5])
        #expect((0..<10).allSatisfy { _ in picker.pick(from: pair, excluding: pair.targets[0].state)?.state.port == 9001 })
    }

    @Test func leastConnectionsPrefersTheIdle() {
        let picker = Picker(strategy: .leastConnections)
        let pair = route([0.5, 0.5])
        pair.targets[0].state.started()
        #expect(picker.pick(from: pair)?.state.port == 9001)
    }
}

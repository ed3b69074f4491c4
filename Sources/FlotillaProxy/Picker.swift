import FlotillaCore
import Synchronization

/// Chooses a target for a request among a route's targets, skipping ejected ones (unless all are).
final class Picker: Sendable {
    let strategy: BalancingStrategy
    let health: UpstreamHealth
    private let counter = Atomic<UInt64>(0)

    init(strategy: BalancingStrategy, health: UpstreamHealth) {
        self.strategy = strategy
        self.health = health
    }

    func pick(from targets: [RouteTarget], excluding excluded: Set<String> = []) -> RouteTarget? {
        var candidates = targets.filter { !excluded.contains($0.key) && !health.isEjected($0.key) }
        if candidates.isEmpty { candidates = targets.filter { !excluded.contains($0.key) } }
        guard !candidates.isEmpty else { return nil }
        if candidates.count == 1 { return candidates[0] }
        let weighted = Set(candidates.map(\.weight)).count > 1
        switch strategy {
        case .leastConnections:
            return candidates.min { health.inFlight($0.key) < health.inFlight($1.key) }
        case .random:
            return weighted ? weightedChoice(candidates, Double.random(in: 0..<1)) : candidates.randomElement()
        case .roundRobin:
            let tick = counter.wrappingAdd(1, ordering: .relaxed).oldValue
            if weighted {
                // Spread the weighted choice evenly over the ticks (a low-discrepancy sequence).
                let position = Double((tick &* 0x9E37_79B9_7F4A_7C15) >> 11) / Double(UInt64(1) << 53)
                return weightedChoice(candidates, position)
            }
            return candidates[Int(tick % UInt64(candidates.count))]
        }
    }

    private func weightedChoice(_ candidates: [RouteTarget], _ position: Double) -> RouteTarget {
        let total = candidates.reduce(0) { $0 + $1.weight }
        var remaining = position * total
        for candidate in candidates {
            remaining -= candidate.weight
            if remaining < 0 { return candidate }
        }
        return candidates[candidates.count - 1]
    }
}

extension RouteTarget {
    var key: String { "\(host):\(port)" }
}

import FlotillaCore
import Synchronization

/// Chooses a target among a route's, skipping ejected ones (unless all are). Lock-free: a
/// round-robin counter and the targets' own atomics.
final class Picker: Sendable {
    let strategy: BalancingStrategy
    private let counter = Atomic<UInt64>(0)

    init(strategy: BalancingStrategy) {
        self.strategy = strategy
    }

    func pick(from route: RouteRuntime, excluding excluded: TargetState? = nil) -> RouteRuntime.Target? {
        let targets = route.targets
        switch targets.count {
        case 0: return nil
        case 1: return targets[0].state === excluded ? nil : targets[0]
        default: break
        }
        let now = TargetState.uptimeNanoseconds()
        func usable(_ target: RouteRuntime.Target) -> Bool { target.state !== excluded && !target.state.isEjected(now: now) }
        switch strategy {
        case .leastConnections:
            return targets.filter(usable).min { $0.state.inFlight < $1.state.inFlight } ?? fallback(targets, excluded)
        case .random:
            let candidates = targets.filter(usable)
            guard !candidates.isEmpty else { return fallback(targets, excluded) }
            return route.weighted ? weightedChoice(candidates, Double.random(in: 0..<1)) : candidates.randomElement()
        case .roundRobin:
            let tick = counter.wrappingAdd(1, ordering: .relaxed).oldValue
            if route.weighted {
                let candidates = targets.filter(usable)
                guard !candidates.isEmpty else { return fallback(targets, excluded) }
                // Spread the weighted choice evenly over the ticks (a low-discrepancy sequence).
                let position = Double((tick &* 0x9E37_79B9_7F4A_7C15) >> 11) / Double(UInt64(1) << 53)
                return weightedChoice(candidates, position)
            }
            // Walk from the next slot to the first usable target: no allocation on the hot path.
            let start = Int(tick % UInt64(targets.count))
            for offset in 0..<targets.count {
                let candidate = targets[(start + offset) % targets.count]
                if usable(candidate) { return candidate }
            }
            return fallback(targets, excluded)
        }
    }

    /// Every target ejected: better to try one than to refuse the request.
    private func fallback(_ targets: [RouteRuntime.Target], _ excluded: TargetState?) -> RouteRuntime.Target? {
        targets.first { $0.state !== excluded }
    }

    private func weightedChoice(_ candidates: [RouteRuntime.Target], _ position: Double) -> RouteRuntime.Target {
        let total = candidates.reduce(0) { $0 + $1.weight }
        var remaining = position * total
        for candidate in candidates {
            remaining -= candidate.weight
            if remaining < 0 { return candidate }
        }
        return candidates[candidates.count - 1]
    }
}

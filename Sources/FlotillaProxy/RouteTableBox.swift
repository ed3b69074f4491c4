public import FlotillaCore
import Synchronization

/// The live table: replaced whole on every registry change. Requests read it through a per-loop
/// cache (`UpstreamPool.table(from:)`) that takes the lock only when `generation` has moved, so
/// the request path shares nothing written between event loops.
final class ProxyTableBox: Sendable {
    private let table = Mutex(ProxyTable.empty)
    private let changes = Atomic<UInt64>(0)

    var current: ProxyTable { table.withLock { $0 } }

    /// Moves after every update; a reader that saw a generation sees at least that table.
    var generation: UInt64 { changes.load(ordering: .acquiring) }

    func update(_ newTable: ProxyTable) {
        table.withLock { $0 = newTable }
        changes.wrappingAdd(1, ordering: .releasing)
    }
}

/// How the proxy picks among a route's healthy targets.
public enum BalancingStrategy: String, Sendable, CaseIterable {
    case roundRobin = "rr"
    case random
    case leastConnections = "leastconn"
}

public import FlotillaCore
import Synchronization

/// The live table: replaced whole on every registry change, read per request. A reader holds the
/// lock only to take a reference to the current snapshot, and keeps the table it started with.
final class ProxyTableBox: Sendable {
    private let table = Mutex(ProxyTable.empty)

    var current: ProxyTable { table.withLock { $0 } }

    func update(_ newTable: ProxyTable) { table.withLock { $0 = newTable } }
}

/// How the proxy picks among a route's healthy targets.
public enum BalancingStrategy: String, Sendable, CaseIterable {
    case roundRobin = "rr"
    case random
    case leastConnections = "leastconn"
}

public import FlotillaCore
import Synchronization

/// The live route table: replaced whole on every registry change, read per request. A reader
/// takes the lock only to copy out a reference-counted snapshot, so a swap never blocks a request
/// for longer than that copy, and a request keeps the table it started with.
public final class RouteTableBox: Sendable {
    private let table = Mutex(RouteTable.empty)

    public init() {}

    public var current: RouteTable { table.withLock { $0 } }

    public func update(_ newTable: RouteTable) { table.withLock { $0 = newTable } }
}

/// How the proxy picks among a route's healthy targets.
public enum BalancingStrategy: String, Sendable, CaseIterable {
    case roundRobin = "rr"
    case random
    case leastConnections = "leastconn"
}

import NIOCore
import Synchronization

/// One `UpstreamPool` per event loop, so a request and its upstream connection share a thread.
final class UpstreamPools: Sendable {
    private struct LoopPool: @unchecked Sendable {
        // Touched only on its own event loop; the lock guards the dictionary, not the pool.
        let pool: UpstreamPool
    }

    private let pools = Mutex<[ObjectIdentifier: LoopPool]>([:])

    init() {}

    func pool(for eventLoop: any EventLoop) -> UpstreamPool {
        let key = ObjectIdentifier(eventLoop)
        return pools.withLock { pools in
            if let existing = pools[key] { return existing.pool }
            let pool = UpstreamPool(eventLoop: eventLoop)
            pools[key] = LoopPool(pool: pool)
            return pool
        }
    }

    /// Asks every loop to drop idle connections to targets that left the route table.
    func prune(keeping live: Set<String>, idleLimit: TimeAmount) {
        let all = pools.withLock { Array($0.values) }
        for entry in all {
            entry.pool.eventLoop.execute { entry.pool.prune(keeping: live, idleLimit: idleLimit) }
        }
    }
}

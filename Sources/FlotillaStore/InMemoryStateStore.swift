import Foundation
import Synchronization

/// A store in memory with the same semantics as the durable backends, for unit tests and for
/// `--data-dir :memory:` experiments. Nothing survives the process.
public final class InMemoryStateStore: StateStore {
    private struct Lease {
        var ttl: Int64
        var expires: ContinuousClock.Instant
    }

    private struct State {
        var entries: [String: StoreEntry] = [:]
        var leaseOf: [String: StoreLease.ID] = [:]
        var leases: [StoreLease.ID: Lease] = [:]
        var nextLease: StoreLease.ID = 0
        var index: UInt64 = 0
    }

    private let state = Mutex(State())
    private let notifier = ChangeNotifier()

    public let limits: StoreLimits

    /// - Parameter limits: refuse transactions above these, as etcd does (tests of callers that
    ///   must split their writes); unlimited by default.
    public init(limits: StoreLimits = .unlimited) {
        self.limits = limits
    }

    public var displayName: String { "memory" }

    public func get(_ key: String) async throws -> StoreEntry? {
        sweepExpiredLeases()
        return state.withLock { $0.entries[key] }
    }

    public func list(prefix: String) async throws -> StoreListing {
        sweepExpiredLeases()
        return state.withLock { state in
            StoreListing(entries: Self.entries(under: prefix, in: state), index: state.index)
        }
    }

    public func snapshot(prefixes: [String]) async throws -> StoreSnapshot {
        sweepExpiredLeases()
        return state.withLock { state in
            StoreSnapshot(
                entries: Dictionary(prefixes.map { ($0, Self.entries(under: $0, in: state)) }, uniquingKeysWith: { first, _ in first }),
                index: state.index)
        }
    }

    private static func entries(under prefix: String, in state: State) -> [StoreEntry] {
        state.entries.values.filter { $0.key.hasPrefix(prefix) }.sorted { $0.key < $1.key }
    }

    public func currentIndex() async throws -> UInt64 {
        state.withLock { $0.index }
    }

    public func commit(_ transaction: StoreTransaction) async throws -> UInt64 {
        let operations = transaction.mutations.count
        if operations > limits.maxOperations || transaction.preconditions.count > limits.maxOperations {
            throw StoreError.tooLarge("\(operations) operations (at most \(limits.maxOperations) in one transaction)")
        }
        sweepExpiredLeases()
        let (index, events) = try state.withLock { state throws(StoreError) -> (UInt64, [StoreEvent]) in
            for condition in transaction.preconditions {
                let holds: Bool
                switch condition {
                case .absent(let key): holds = state.entries[key] == nil
                case .present(let key): holds = state.entries[key] != nil
                case .modifyIndex(let key, let expected): holds = state.entries[key]?.modifyIndex == expected
                }
                if !holds { throw StoreError.preconditionFailed(condition) }
            }
            for case .put(_, _, _, let lease) in transaction.mutations where lease != 0 && state.leases[lease] == nil {
                throw StoreError.leaseNotFound(lease)
            }
            state.index += 1
            let index = state.index
            var events: [StoreEvent] = []
            for mutation in transaction.mutations {
                switch mutation {
                case .put(let key, let value, let flags, let lease):
                    let created = state.entries[key]?.createIndex ?? index
                    let entry = StoreEntry(key: key, value: value, createIndex: created, modifyIndex: index, flags: flags)
                    state.entries[key] = entry
                    state.leaseOf[key] = lease == 0 ? nil : lease
                    events.append(StoreEvent(kind: .put, entry: entry))
                case .delete(let key):
                    if state.entries.removeValue(forKey: key) != nil {
                        state.leaseOf.removeValue(forKey: key)
                        events.append(Self.deletion(key, at: index))
                    }
                case .deletePrefix(let prefix):
                    let doomed = state.entries.keys.filter { $0.hasPrefix(prefix) }.sorted()
                    for key in doomed {
                        state.entries.removeValue(forKey: key)
                        state.leaseOf.removeValue(forKey: key)
                        events.append(Self.deletion(key, at: index))
                    }
                }
            }
            return (index, events)
        }
        notifier.committed(index: index, events: events)
        return index
    }

    private static func deletion(_ key: String, at index: UInt64) -> StoreEvent {
        StoreEvent(kind: .delete, entry: StoreEntry(key: key, value: Data(), createIndex: 0, modifyIndex: index))
    }

    public func waitForChange(prefix: String, after index: UInt64, timeout: Duration) async throws -> UInt64 {
        await notifier.wait(prefix: prefix, after: index, timeout: timeout)
        return notifier.latestIndex
    }

    public func watch(prefix: String, after index: UInt64) -> AsyncThrowingStream<[StoreEvent], any Error> {
        notifier.watch(prefix: prefix, after: index)
    }

    // MARK: Leases

    public func grantLease(ttl: Int64) async throws -> StoreLease {
        let ttl = max(ttl, 1)
        let id = state.withLock { state -> StoreLease.ID in
            state.nextLease += 1
            state.leases[state.nextLease] = Lease(ttl: ttl, expires: .now + .seconds(ttl))
            return state.nextLease
        }
        scheduleSweep(after: .seconds(ttl))
        return StoreLease(id: id, ttl: ttl)
    }

    public func keepAlive(_ lease: StoreLease.ID) async throws {
        sweepExpiredLeases()
        let ttl = try state.withLock { state throws(StoreError) -> Int64 in
            guard var held = state.leases[lease] else { throw StoreError.leaseNotFound(lease) }
            held.expires = .now + .seconds(held.ttl)
            state.leases[lease] = held
            return held.ttl
        }
        scheduleSweep(after: .seconds(ttl))
    }

    public func revokeLease(_ lease: StoreLease.ID) async throws {
        sweepExpiredLeases()
        guard state.withLock({ $0.leases[lease] != nil }) else { throw StoreError.leaseNotFound(lease) }
        end([lease])
    }

    /// Leases are checked on every call and by a timer at each lease's expiry.
    private func scheduleSweep(after delay: Duration) {
        Task { [weak self] in
            try? await Task.sleep(for: delay + .milliseconds(50))
            self?.sweepExpiredLeases()
        }
    }

    private func sweepExpiredLeases() {
        let now = ContinuousClock.now
        let expired = state.withLock { state in state.leases.filter { $0.value.expires <= now }.map(\.key) }
        if !expired.isEmpty { end(expired) }
    }

    /// Deletes the leases and their keys in one commit.
    private func end(_ leases: [StoreLease.ID]) {
        let ending = Set(leases)
        let outcome = state.withLock { state -> (UInt64, [StoreEvent])? in
            for lease in ending { state.leases.removeValue(forKey: lease) }
            let doomed = state.leaseOf.filter { ending.contains($0.value) }.map(\.key).sorted()
            guard !doomed.isEmpty else { return nil }
            state.index += 1
            for key in doomed {
                state.entries.removeValue(forKey: key)
                state.leaseOf.removeValue(forKey: key)
            }
            return (state.index, doomed.map { Self.deletion($0, at: state.index) })
        }
        if let (index, events) = outcome { notifier.committed(index: index, events: events) }
    }
}

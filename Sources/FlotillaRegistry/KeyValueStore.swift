public import FlotillaCore
public import FlotillaStore
public import Foundation
import Synchronization

/// Consul's KV store over the state store (keys under `kv/`): values up to 512 KiB, flags,
/// check-and-set, recursive reads and deletes, and blocking reads whose index moves only when
/// something under the queried key or prefix changes, deletes included.
public final class KeyValueStore: Sendable {
    public static let maximumValueBytes = 512 * 1024
    static let prefix = "kv/"

    public struct Entry: Sendable, Hashable {
        public var key: String
        public var value: Data
        public var flags: UInt64
        public var createIndex: UInt64
        public var modifyIndex: UInt64
        /// How many times the key's lock was acquired (Consul's `LockIndex`).
        public var lockIndex: UInt64 = 0
        /// The session holding the key's lock, if any.
        public var session: String?
    }

    /// A key's lock, kept beside its value under `kvlock/` so the value is stored as it was sent.
    struct LockState: Codable, Hashable {
        var session: String?
        var lockIndex: UInt64
    }
    static let lockPrefix = "kvlock/"

    public struct Read: Sendable {
        public var entries: [Entry]
        /// What `X-Consul-Index` says: the last change under the key or prefix.
        public var index: UInt64
    }

    let store: any StateStore

    private struct Tombstones {
        /// Recent deletes, so a prefix's index moves when a key under it goes away.
        var entries: [(key: String, index: UInt64)] = []
        /// The index below which deletes were forgotten (or the index at start): never report less.
        var floor: UInt64 = 1
    }

    // A lock, not an actor: a blocking read woken by a commit goes straight on, with no hop onto
    // a busy executor.
    private let tombstones = Mutex(Tombstones())
    /// Keys whose lock was lost with an invalidated session: nobody acquires them until then
    /// (Consul's lock-delay, kept in memory as Consul keeps it).
    let lockDelays = Mutex<[String: ContinuousClock.Instant]>([:])
    private static let tombstoneLimit = 10_000

    public init(store: any StateStore) {
        self.store = store
    }

    /// Call once at start: indexes reported later never fall below the store's index now.
    public func start() async throws {
        let index = max(1, try await store.currentIndex())
        tombstones.withLock { $0.floor = index }
    }

    /// Rejects keys Consul would reject, or that cannot be stored.
    public static func validate(_ key: String) throws(FlotillaError) {
        if key.utf8.count > 2048 { throw .badRequest("key is longer than 2048 bytes") }
        if key.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7F }) {
            throw .badRequest("key contains a control character")
        }
    }

    public func get(_ key: String, recurse: Bool) async throws -> Read {
        let converted = try await entries(key, recurse: recurse)
        return Read(entries: converted, index: index(of: key, recurse: recurse, entries: converted))
    }

    /// The entries at `key` (or under it), with their locks.
    func entries(_ key: String, recurse: Bool) async throws -> [Entry] {
        let storeKey = Self.prefix + key
        let values: [StoreEntry]
        let locks: [StoreEntry]
        if recurse {
            values = try await store.list(prefix: storeKey).entries
            locks = values.isEmpty ? [] : try await store.list(prefix: Self.lockPrefix + key).entries
        } else {
            values = try await store.get(storeKey).map { [$0] } ?? []
            locks = values.isEmpty ? [] : try await store.get(Self.lockPrefix + key).map { [$0] } ?? []
        }
        var lockStates: [String: LockState] = [:]
        for lock in locks { lockStates[String(lock.key.dropFirst(Self.lockPrefix.count))] = try? StateCodec.decode(LockState.self, from: lock.value) }
        return values.map {
            let key = String($0.key.dropFirst(Self.prefix.count))
            let lock = lockStates[key]
            return Entry(
                key: key, value: $0.value, flags: $0.flags, createIndex: $0.createIndex, modifyIndex: $0.modifyIndex,
                lockIndex: lock?.lockIndex ?? 0, session: lock?.session)
        }
    }

    /// A blocking read: returns when the key's (or prefix's) index passes `after`, or after `wait`.
    public func get(_ key: String, recurse: Bool, after: UInt64?, wait: Duration) async throws -> Read {
        var read = try await get(key, recurse: recurse)
        guard let after, after > 0, read.index <= after else { return read }
        let deadline = ContinuousClock.now + wait
        while read.index <= after {
            let left = deadline - ContinuousClock.now
            if left <= .zero { break }
            _ = try await store.waitForChange(prefix: Self.prefix + key, after: max(after, read.index), timeout: left)
            read = try await get(key, recurse: recurse)
        }
        return read
    }

    /// `PUT`: false when the `cas` condition does not hold (nothing written).
    public func put(_ key: String, value: Data, flags: UInt64, cas: UInt64?) async throws -> Bool {
        guard value.count <= Self.maximumValueBytes else {
            throw FlotillaError.invalid(message: "Value exceeds \(Self.maximumValueBytes) byte limit", details: [])
        }
        var preconditions: [StorePrecondition] = []
        if let cas { preconditions.append(cas == 0 ? .absent(Self.prefix + key) : .modifyIndex(Self.prefix + key, equals: cas)) }
        do {
            try await store.commit(StoreTransaction(preconditions: preconditions, mutations: [.put(Self.prefix + key, value, flags: flags)]))
            return true
        } catch StoreError.preconditionFailed {
            return false
        }
    }

    /// `DELETE`: false when the `cas` condition does not hold.
    public func delete(_ key: String, recurse: Bool, cas: UInt64?) async throws -> Bool {
        let storeKey = Self.prefix + key
        var preconditions: [StorePrecondition] = []
        if let cas, !recurse { preconditions.append(.modifyIndex(storeKey, equals: cas)) }
        let lockKey = Self.lockPrefix + key
        do {
            let index = try await store.commit(
                StoreTransaction(
                    preconditions: preconditions,
                    mutations: recurse ? [.deletePrefix(storeKey), .deletePrefix(lockKey)] : [.delete(storeKey), .delete(lockKey)]))
            recordDeletes([key], at: index)
            return true
        } catch StoreError.preconditionFailed {
            return false
        }
    }

    /// Remembers deletes so the index of a key or prefix they touched moves past them.
    func recordDeletes(_ keys: [String], at index: UInt64) {
        guard !keys.isEmpty else { return }
        tombstones.withLock { state in
            for key in keys { state.entries.append((key, index)) }
            if state.entries.count > Self.tombstoneLimit {
                let dropped = state.entries.prefix(state.entries.count - Self.tombstoneLimit / 2)
                state.floor = max(state.floor, dropped.map(\.index).max() ?? state.floor)
                state.entries.removeFirst(dropped.count)
            }
        }
    }

    private func index(of key: String, recurse: Bool, entries: [Entry]) -> UInt64 {
        tombstones.withLock { state in
            var index = state.floor
            for entry in entries { index = max(index, entry.modifyIndex) }
            for tombstone in state.entries.reversed() where tombstone.index > index {
                // A recursive delete of a parent also removed this key.
                let related = recurse ? (tombstone.key.hasPrefix(key) || key.hasPrefix(tombstone.key)) : key.hasPrefix(tombstone.key)
                if related { index = tombstone.index }
            }
            return index
        }
    }
}

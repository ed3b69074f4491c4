import FlotillaCore
import FlotillaStore
public import Foundation
import Synchronization

/// Consul's locks on KV keys: `?acquire=<session>` and `?release=<session>`, with `LockIndex`,
/// `Session` and the lock-delay that follows an invalidated session.
extension KeyValueStore {
    /// A lock operation could not be attempted (Consul answers these with 500 and this text).
    public struct LockError: Error, CustomStringConvertible {
        public let description: String
    }

    /// `PUT ?acquire=`: takes the key's lock for `session` and writes the value. False when another
    /// session holds it, or while the key is in its lock-delay. Acquiring again by the holder
    /// updates the value and keeps `LockIndex`.
    public func acquire(_ key: String, value: Data, flags: UInt64, session: String) async throws -> Bool {
        try checkSize(value)
        for _ in 0..<Self.lockRetries {
            if isLockDelayed(key) { return false }
            let (lockEntry, lock) = try await currentLock(key)
            if let holder = lock?.session, holder != session { return false }
            let next = LockState(session: session, lockIndex: lock?.session == session ? lock!.lockIndex : (lock?.lockIndex ?? 0) + 1)
            let sessionKey = SessionStore.storeKey(session)
            do {
                try await store.commit(
                    StoreTransaction(
                        preconditions: [.present(sessionKey), lockPrecondition(key, lockEntry)],
                        mutations: [.put(Self.prefix + key, value, flags: flags), .put(Self.lockPrefix + key, try StateCodec.encode(next))]))
                return true
            } catch StoreError.preconditionFailed(.present(sessionKey)) {
                throw LockError(description: "invalid session \"\(session)\"")
            } catch StoreError.preconditionFailed {
                continue  // The lock changed meanwhile: look again.
            }
        }
        return false
    }

    /// `PUT ?release=`: gives the lock up and writes the value (the request's body, as Consul does).
    /// False when `session` does not hold it.
    public func release(_ key: String, value: Data, flags: UInt64, session: String) async throws -> Bool {
        try checkSize(value)
        for _ in 0..<Self.lockRetries {
            let (lockEntry, lock) = try await currentLock(key)
            guard let lock, lock.session == session else { return false }
            let next = LockState(session: nil, lockIndex: lock.lockIndex)
            do {
                try await store.commit(
                    StoreTransaction(
                        preconditions: [lockPrecondition(key, lockEntry)],
                        mutations: [.put(Self.prefix + key, value, flags: flags), .put(Self.lockPrefix + key, try StateCodec.encode(next))]))
                return true
            } catch StoreError.preconditionFailed {
                continue
            }
        }
        return false
    }

    /// What invalidating `session` does to the keys it holds, as one guarded change: with
    /// `deleteKeys` they go, otherwise their locks do (values stay, their indexes move).
    func invalidation(of session: String, deleteKeys: Bool) async throws -> (
        mutations: [StoreMutation], preconditions: [StorePrecondition], deleted: [String], held: [String]
    ) {
        var mutations: [StoreMutation] = []
        var preconditions: [StorePrecondition] = []
        var deleted: [String] = []
        var held: [String] = []
        for entry in try await store.list(prefix: Self.lockPrefix).entries {
            guard let lock = try? StateCodec.decode(LockState.self, from: entry.value), lock.session == session else { continue }
            let key = String(entry.key.dropFirst(Self.lockPrefix.count))
            held.append(key)
            preconditions.append(.modifyIndex(entry.key, equals: entry.modifyIndex))
            let value = try await store.get(Self.prefix + key)
            if deleteKeys {
                mutations += [.delete(Self.prefix + key), .delete(entry.key)]
                deleted.append(key)
            } else if let value {
                preconditions.append(.modifyIndex(value.key, equals: value.modifyIndex))
                mutations += [
                    .put(value.key, value.value, flags: value.flags),
                    .put(entry.key, try StateCodec.encode(LockState(session: nil, lockIndex: lock.lockIndex))),
                ]
            } else {
                mutations.append(.delete(entry.key))
            }
        }
        return (mutations, preconditions, deleted, held)
    }

    /// The keys whose lock `session` holds.
    func keysHeld(by session: String) async throws -> [String] {
        try await store.list(prefix: Self.lockPrefix).entries.compactMap { entry in
            guard let lock = try? StateCodec.decode(LockState.self, from: entry.value), lock.session == session else { return nil }
            return String(entry.key.dropFirst(Self.lockPrefix.count))
        }
    }

    /// What invalidating a session does to one key it held: with `deleteKey` the key goes,
    /// otherwise its lock does (the value stays, its index moves). Nothing happens when the lock
    /// is no longer that session's.
    func loseLock(_ key: String, session: String, deleteKey: Bool) async throws {
        for _ in 0..<Self.lockRetries {
            let (lockEntry, lock) = try await currentLock(key)
            guard let lockEntry, let lock, lock.session == session else { return }
            let value = try await store.get(Self.prefix + key)
            var preconditions = [lockPrecondition(key, lockEntry)]
            var mutations: [StoreMutation]
            if deleteKey {
                mutations = [.delete(Self.prefix + key), .delete(lockEntry.key)]
            } else if let value {
                preconditions.append(.modifyIndex(value.key, equals: value.modifyIndex))
                mutations = [
                    .put(value.key, value.value, flags: value.flags),
                    .put(lockEntry.key, try StateCodec.encode(LockState(session: nil, lockIndex: lock.lockIndex))),
                ]
            } else {
                mutations = [.delete(lockEntry.key)]
            }
            do {
                let committed = try await store.commit(StoreTransaction(preconditions: preconditions, mutations: mutations))
                if deleteKey { recordDeletes([key], at: committed) }
                return
            } catch StoreError.preconditionFailed {
                continue
            }
        }
    }

    /// Starts the lock-delay of keys whose session was invalidated (at most 60 s, as in Consul).
    func startLockDelay(_ keys: [String], seconds: Double) {
        let delay = min(seconds, 60)
        guard delay > 0, !keys.isEmpty else { return }
        let until = ContinuousClock.now + .milliseconds(Int64(delay * 1000))
        lockDelays.withLock { delays in
            let now = ContinuousClock.now
            delays = delays.filter { $0.value > now }
            for key in keys { delays[key] = until }
        }
    }

    func isLockDelayed(_ key: String) -> Bool {
        lockDelays.withLock { ($0[key].map { $0 > ContinuousClock.now }) ?? false }
    }

    func currentLock(_ key: String) async throws -> (StoreEntry?, LockState?) {
        let entry = try await store.get(Self.lockPrefix + key)
        return (entry, try entry.map { try StateCodec.decode(LockState.self, from: $0.value) })
    }

    func lockPrecondition(_ key: String, _ entry: StoreEntry?) -> StorePrecondition {
        entry.map { .modifyIndex($0.key, equals: $0.modifyIndex) } ?? .absent(Self.lockPrefix + key)
    }

    func checkSize(_ value: Data) throws {
        guard value.count <= Self.maximumValueBytes else {
            throw FlotillaError.invalid(message: "Value exceeds \(Self.maximumValueBytes) byte limit", details: [])
        }
    }

    static let lockRetries = 8
}

public import FlotillaCore
import FlotillaStore
public import Foundation

/// Consul's `/v1/txn` over the KV store: every operation is checked against the state the ones
/// before it left, and the whole list is applied in one store transaction or not at all.
extension KeyValueStore {
    /// Consul 1.14 and later allow 128 operations in one transaction.
    public static let maximumTransactionOperations = 128

    public struct TransactionOperation: Sendable {
        public enum Verb: String, Sendable, CaseIterable {
            case set, cas, lock, unlock, get, getOrEmpty = "get-or-empty", getTree = "get-tree"
            case checkIndex = "check-index", checkSession = "check-session", checkNotExists = "check-not-exists"
            case delete, deleteTree = "delete-tree", deleteCAS = "delete-cas"

            var writes: Bool {
                switch self {
                case .set, .cas, .lock, .unlock, .delete, .deleteTree, .deleteCAS: return true
                default: return false
                }
            }
        }

        public var verb: Verb
        public var key: String
        public var value: Data
        public var flags: UInt64
        public var index: UInt64
        public var session: String

        public init(verb: Verb, key: String, value: Data = Data(), flags: UInt64 = 0, index: UInt64 = 0, session: String = "") {
            self.verb = verb
            self.key = key
            self.value = value
            self.flags = flags
            self.index = index
            self.session = session
        }
    }

    public enum TransactionOutcome: Sendable {
        /// Each result is an entry; `valueShown` is false where Consul blanks the value (writes, checks).
        case committed([(entry: Entry, valueShown: Bool)])
        /// Nothing was applied; each failing operation with Consul's reason.
        case failed([(operation: Int, what: String)])
    }

    /// Runs the operations. A concurrent write to a key the transaction read makes it start over,
    /// so what it checked is what it changed.
    public func transaction(_ operations: [TransactionOperation]) async throws -> TransactionOutcome {
        for _ in 0..<Self.lockRetries {
            if let outcome = try await attemptTransaction(operations) { return outcome }
        }
        throw FlotillaError.unavailable("the keys of this transaction kept changing under it; retry")
    }

    private func attemptTransaction(_ operations: [TransactionOperation]) async throws -> TransactionOutcome? {
        // What each touched key holds now (nil: absent), and the conditions that keep it so.
        var state: [String: Entry?] = [:]
        var preconditions: [StorePrecondition] = []
        var lockEntries: [String: StoreEntry?] = [:]
        func load(_ key: String) async throws -> Entry? {
            if let known = state[key] { return known }
            let value = try await store.get(Self.prefix + key)
            let lockEntry = try await store.get(Self.lockPrefix + key)
            preconditions.append(value.map { .modifyIndex($0.key, equals: $0.modifyIndex) } ?? .absent(Self.prefix + key))
            preconditions.append(lockPrecondition(key, lockEntry))
            lockEntries[key] = lockEntry
            let lock = try lockEntry.map { try StateCodec.decode(LockState.self, from: $0.value) }
            let entry = value.map {
                Entry(key: key, value: $0.value, flags: $0.flags, createIndex: $0.createIndex, modifyIndex: $0.modifyIndex,
                      lockIndex: lock?.lockIndex ?? 0, session: lock?.session)
            }
            state[key] = .some(entry)
            return entry
        }
        func tree(_ prefix: String) async throws -> [Entry] {
            // Keys already touched by this transaction show as it left them.
            var byKey: [String: Entry?] = [:]
            for entry in try await entries(prefix, recurse: true) { byKey[entry.key] = .some(entry) }
            for (key, entry) in state where key.hasPrefix(prefix) { byKey[key] = .some(entry) }
            return byKey.values.compactMap { $0 }.sorted { $0.key < $1.key }
        }

        var errors: [(operation: Int, what: String)] = []
        var mutations: [StoreMutation] = []
        /// Results in order; an entry written here gets its indexes once the commit has one.
        var results: [(key: String, entry: Entry, valueShown: Bool, written: Bool)] = []
        var sessionsChecked: Set<String> = []
        var deletedKeys: [String] = []
        for (position, operation) in operations.enumerated() {
            let key = operation.key
            switch operation.verb {
            case .getTree, .deleteTree:
                break
            default:
                if key.isEmpty {
                    errors.append((position, "Must provide key"))
                    continue
                }
            }
            func write(_ entry: Entry) throws {
                state[key] = .some(entry)
                mutations.append(.put(Self.prefix + key, entry.value, flags: entry.flags))
                mutations.append(.put(Self.lockPrefix + key, try StateCodec.encode(LockState(session: entry.session, lockIndex: entry.lockIndex))))
                results.append((key, entry, false, true))
            }
            func fresh(_ current: Entry?) -> Entry {
                var entry = current ?? Entry(key: key, value: Data(), flags: 0, createIndex: 0, modifyIndex: 0)
                entry.value = operation.value
                entry.flags = operation.flags
                return entry
            }
            switch operation.verb {
            case .set:
                try write(fresh(try await load(key)))
            case .cas:
                let current = try await load(key)
                let holds = operation.index == 0 ? current == nil : current?.modifyIndex == operation.index
                if holds { try write(fresh(current)) } else { errors.append((position, "failed to set key \"\(key)\", index is stale")) }
            case .lock:
                let current = try await load(key)
                if operation.session.isEmpty {
                    errors.append((position, "missing session"))
                } else if !(try await sessionExists(operation.session, checked: &sessionsChecked, preconditions: &preconditions)) {
                    errors.append((position, "invalid session \"\(operation.session)\""))
                } else if isLockDelayed(key) {
                    errors.append((position, "failed to lock key \"\(key)\" due to lock delay"))
                } else if let holder = current?.session, holder != operation.session {
                    errors.append((position, "failed to lock key \"\(key)\", lock is already held"))
                } else {
                    var entry = fresh(current)
                    if current?.session != operation.session { entry.lockIndex += 1 }
                    entry.session = operation.session
                    try write(entry)
                }
            case .unlock:
                let current = try await load(key)
                if let current, current.session == operation.session, !operation.session.isEmpty {
                    var entry = fresh(current)
                    entry.session = nil
                    try write(entry)
                } else {
                    errors.append((position, "failed to unlock key \"\(key)\", lock isn't held, or is held by another session"))
                }
            case .get:
                if let current = try await load(key) { results.append((key, current, true, false)) } else {
                    errors.append((position, "key \"\(key)\" doesn't exist"))
                }
            case .getOrEmpty:
                let current = try await load(key) ?? Entry(key: key, value: Data(), flags: 0, createIndex: 0, modifyIndex: 0)
                results.append((key, current, true, false))
            case .getTree:
                for entry in try await tree(key) { results.append((entry.key, entry, true, false)) }
            case .checkIndex:
                if let current = try await load(key) {
                    if current.modifyIndex == operation.index { results.append((key, current, false, false)) } else {
                        errors.append((position, "failed index check for key \"\(key)\", current modify index \(current.modifyIndex) != \(operation.index)"))
                    }
                } else {
                    errors.append((position, "failed to check index, key \"\(key)\" doesn't exist"))
                }
            case .checkSession:
                if let current = try await load(key) {
                    if (current.session ?? "") == operation.session { results.append((key, current, false, false)) } else {
                        errors.append((position, "failed session check for key \"\(key)\", current session \"\(current.session ?? "")\" != \"\(operation.session)\""))
                    }
                } else {
                    errors.append((position, "failed to check session, key \"\(key)\" doesn't exist"))
                }
            case .checkNotExists:
                if try await load(key) != nil { errors.append((position, "key \"\(key)\" exists")) }
            case .delete:
                _ = try await load(key)
                state[key] = .some(nil)
                mutations += [.delete(Self.prefix + key), .delete(Self.lockPrefix + key)]
                deletedKeys.append(key)
            case .deleteTree:
                for entry in try await tree(key) { state[entry.key] = .some(nil) }
                mutations += [.deletePrefix(Self.prefix + key), .deletePrefix(Self.lockPrefix + key)]
                deletedKeys.append(key)
            case .deleteCAS:
                let current = try await load(key)
                if let current, current.modifyIndex != operation.index {
                    errors.append((position, "failed to delete key \"\(key)\", index is stale"))
                } else {
                    state[key] = .some(nil)
                    mutations += [.delete(Self.prefix + key), .delete(Self.lockPrefix + key)]
                    deletedKeys.append(key)
                }
            }
        }
        if !errors.isEmpty { return .failed(errors) }
        guard operations.contains(where: { $0.verb.writes }) else {
            return .committed(results.map { ($0.entry, $0.valueShown) })
        }
        let committed: UInt64
        do {
            committed = try await store.commit(StoreTransaction(preconditions: preconditions, mutations: mutations))
        } catch StoreError.preconditionFailed {
            return nil
        }
        recordDeletes(deletedKeys, at: committed)
        return .committed(results.map { result in
            var entry = result.entry
            if result.written {
                entry.modifyIndex = committed
                if entry.createIndex == 0 { entry.createIndex = committed }
            }
            return (entry, result.valueShown)
        })
    }

    private func sessionExists(_ id: String, checked: inout Set<String>, preconditions: inout [StorePrecondition]) async throws -> Bool {
        if checked.contains(id) { return true }
        guard try await store.get(SessionStore.storeKey(id)) != nil else { return false }
        checked.insert(id)
        preconditions.append(.present(SessionStore.storeKey(id)))
        return true
    }
}

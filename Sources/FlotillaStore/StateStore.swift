public import Foundation

/// One stored value with the indexes of the writes that created and last changed it.
public struct StoreEntry: Sendable, Hashable {
    public var key: String
    public var value: Data
    public var createIndex: UInt64
    public var modifyIndex: UInt64
    /// An opaque number the writer attaches (Consul KV's `Flags`).
    public var flags: UInt64

    public init(key: String, value: Data, createIndex: UInt64, modifyIndex: UInt64, flags: UInt64 = 0) {
        self.key = key
        self.value = value
        self.createIndex = createIndex
        self.modifyIndex = modifyIndex
        self.flags = flags
    }
}

/// The entries under a prefix and the store's index at the moment they were read.
public struct StoreListing: Sendable {
    public var entries: [StoreEntry]
    public var index: UInt64

    public init(entries: [StoreEntry], index: UInt64) {
        self.entries = entries
        self.index = index
    }
}

/// A condition a transaction checks before it applies anything (etcd's `Compare`).
public enum StorePrecondition: Sendable, Hashable {
    case absent(String)
    case present(String)
    /// The key exists with exactly this modify index (Consul's `?cas=N`).
    case modifyIndex(String, equals: UInt64)
}

/// One change in a transaction.
public enum StoreMutation: Sendable, Hashable {
    case put(String, Data, flags: UInt64 = 0)
    case delete(String)
    case deletePrefix(String)
}

/// Writes applied all together or not at all, under one new index.
public struct StoreTransaction: Sendable {
    public var preconditions: [StorePrecondition]
    public var mutations: [StoreMutation]

    public init(preconditions: [StorePrecondition] = [], mutations: [StoreMutation] = []) {
        self.preconditions = preconditions
        self.mutations = mutations
    }

    public var isEmpty: Bool { mutations.isEmpty }
}

public enum StoreError: Error, Sendable, Equatable {
    /// A precondition did not hold: nothing was written.
    case preconditionFailed(StorePrecondition)
    /// The backend could not read or write (disk full, database locked, etcd unreachable).
    case backend(String)
}

extension StoreError: CustomStringConvertible {
    public var description: String {
        switch self {
        case .preconditionFailed(let condition): return "store precondition failed: \(condition)"
        case .backend(let message): return "store error: \(message)"
        }
    }
}

/// Flotilla's state: an ordered key space in which every committed transaction gets the next value
/// of one global, monotonically increasing index (Consul's index, etcd's revision), and in which a
/// reader can wait for a change above an index it holds. SQLite serves one machine; etcd serves a
/// cluster; callers see no difference.
///
/// ```swift
/// let index = try await store.commit(StoreTransaction(mutations: [.put("apps/web", data)]))
/// let next = try await store.waitForChange(prefix: "apps/", after: index, timeout: .seconds(300))
/// ```
public protocol StateStore: Sendable {
    /// The entry at `key`, or nil.
    func get(_ key: String) async throws -> StoreEntry?

    /// Every entry whose key starts with `prefix`, in key order, with the index they were read at.
    func list(prefix: String) async throws -> StoreListing

    /// Applies the transaction atomically and durably: when this returns, the write survives a crash.
    /// - Returns: the index the transaction was committed at.
    /// - Throws: `StoreError.preconditionFailed` when a precondition did not hold (nothing written).
    @discardableResult
    func commit(_ transaction: StoreTransaction) async throws -> UInt64

    /// The index of the latest committed write.
    func currentIndex() async throws -> UInt64

    /// Waits until a key under `prefix` changes at an index above `after`, or until `timeout` passes.
    /// - Returns: the store's index when it returned (a return does not promise a change).
    func waitForChange(prefix: String, after index: UInt64, timeout: Duration) async throws -> UInt64
}

extension StateStore {
    /// Writes one key.
    @discardableResult
    public func put(_ key: String, _ value: Data) async throws -> UInt64 {
        try await commit(StoreTransaction(mutations: [.put(key, value)]))
    }
}

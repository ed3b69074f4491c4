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
    /// Writes `key`. A key written under a lease is deleted when the lease ends (revoked, or not
    /// kept alive within its TTL); lease 0 is none.
    case put(String, Data, flags: UInt64 = 0, lease: StoreLease.ID = 0)
    case delete(String)
    case deletePrefix(String)

    /// The key or prefix it touches.
    public var key: String {
        switch self {
        case .put(let key, _, _, _), .delete(let key), .deletePrefix(let key): return key
        }
    }
}

/// A lease: keys written under it live as long as it is kept alive (etcd's leases; a node's record
/// is held by one, so a node that stops heartbeating disappears by itself).
public struct StoreLease: Sendable, Hashable {
    public typealias ID = Int64
    public var id: ID
    /// The seconds it lives without a keep-alive, as granted.
    public var ttl: Int64

    public init(id: ID, ttl: Int64) {
        self.id = id
        self.ttl = ttl
    }
}

/// One change a watch saw.
public struct StoreEvent: Sendable, Hashable {
    public enum Kind: Sendable, Hashable { case put, delete }
    public var kind: Kind
    public var key: String
    /// The entry as written (for a delete: key and the delete's index only, empty value).
    public var entry: StoreEntry

    public init(kind: Kind, entry: StoreEntry) {
        self.kind = kind
        self.key = entry.key
        self.entry = entry
    }

    /// The index of the commit that made this change.
    public var index: UInt64 { entry.modifyIndex }
}

/// Entries under several prefixes, all read at one index.
public struct StoreSnapshot: Sendable {
    /// Per prefix asked for, its entries in key order.
    public var entries: [String: [StoreEntry]]
    public var index: UInt64

    public init(entries: [String: [StoreEntry]], index: UInt64) {
        self.entries = entries
        self.index = index
    }

    public subscript(prefix: String) -> [StoreEntry] { entries[prefix] ?? [] }
}

/// What one commit may hold. etcd refuses a transaction of more than 128 operations or 1.5 MiB by
/// default; callers writing many independent records split them (`commitInChunks`), callers whose
/// writes must land together keep within the limits.
public struct StoreLimits: Sendable, Hashable {
    public var maxOperations: Int
    public var maxBytes: Int

    public init(maxOperations: Int, maxBytes: Int) {
        self.maxOperations = maxOperations
        self.maxBytes = maxBytes
    }

    public static let unlimited = StoreLimits(maxOperations: .max, maxBytes: .max)
    /// etcd's defaults (`--max-txn-ops`, `--max-request-bytes`), less room for the request's framing.
    public static let etcdDefaults = StoreLimits(maxOperations: 128, maxBytes: 1_500_000)
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
    /// The backend cannot be reached at all (every etcd member down or partitioned away): nothing
    /// was written, and the caller may try again later.
    case unavailable(String)
    /// A watch asked for changes the store no longer holds (compacted below `oldest`): re-list.
    case compacted(oldest: UInt64)
    /// The lease does not exist (expired, revoked, or never granted).
    case leaseNotFound(StoreLease.ID)
    /// The transaction is larger than the backend accepts in one commit: nothing was written.
    case tooLarge(String)
}

extension StoreError: CustomStringConvertible {
    public var description: String {
        switch self {
        case .preconditionFailed(let condition): return "store precondition failed: \(condition)"
        case .backend(let message): return "store error: \(message)"
        case .unavailable(let message): return "the state store is unreachable: \(message)"
        case .compacted(let oldest): return "the store no longer holds changes before index \(oldest): read again"
        case .leaseNotFound(let id): return "lease \(id) not found (expired or revoked)"
        case .tooLarge(let message): return "transaction too large for the store: \(message)"
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

    /// Entries under each prefix, all read at one index (one consistent view across kinds of state).
    func snapshot(prefixes: [String]) async throws -> StoreSnapshot

    /// Every change under `prefix` committed at an index above `after`, in index order, each
    /// commit's changes in one batch, deletes included. The stream ends with
    /// `StoreError.compacted` when the store no longer holds changes that old (read again, then
    /// watch from the listing's index), and with `StoreError.unavailable` when the backend is gone.
    func watch(prefix: String, after index: UInt64) -> AsyncThrowingStream<[StoreEvent], any Error>

    /// Grants a lease that lives `ttl` seconds unless kept alive.
    func grantLease(ttl: Int64) async throws -> StoreLease

    /// Renews a lease for its whole TTL. Throws `StoreError.leaseNotFound` once it has ended.
    func keepAlive(_ lease: StoreLease.ID) async throws

    /// Ends a lease now, deleting every key written under it.
    func revokeLease(_ lease: StoreLease.ID) async throws

    /// The largest transaction one commit accepts.
    var limits: StoreLimits { get }

    /// A one-line description for logs and `flotilla status` (`sqlite:/path`, `etcd://a,b`).
    var displayName: String { get }
}

extension StateStore {
    public var limits: StoreLimits { .unlimited }

    /// Commits independent mutations in as few transactions as the backend's limits allow. Each
    /// chunk is atomic; the whole is not, so use it only where every record stands on its own
    /// (instance records of one scaling step, say).
    /// - Returns: the index of the last chunk's commit (nil when there was nothing to write).
    @discardableResult
    public func commitInChunks(_ mutations: [StoreMutation]) async throws -> UInt64? {
        var last: UInt64?
        for chunk in StoreChunking.chunks(of: mutations, within: limits) {
            last = try await commit(StoreTransaction(mutations: chunk))
        }
        return last
    }

    /// Writes one key.
    @discardableResult
    public func put(_ key: String, _ value: Data) async throws -> UInt64 {
        try await commit(StoreTransaction(mutations: [.put(key, value)]))
    }
}

/// Splits mutations into transactions that fit a backend's limits.
public enum StoreChunking {
    /// The bytes a mutation adds to a request, as etcd counts them closely enough to stay within.
    public static func size(of mutation: StoreMutation) -> Int {
        switch mutation {
        case .put(let key, let value, _, _): return key.utf8.count + value.count + 32
        case .delete(let key), .deletePrefix(let key): return 2 * key.utf8.count + 16
        }
    }

    public static func chunks(of mutations: [StoreMutation], within limits: StoreLimits) -> [[StoreMutation]] {
        var chunks: [[StoreMutation]] = []
        var current: [StoreMutation] = []
        var bytes = 0
        for mutation in mutations {
            let size = size(of: mutation)
            if !current.isEmpty && (current.count >= limits.maxOperations || bytes + size > limits.maxBytes) {
                chunks.append(current)
                current = []
                bytes = 0
            }
            current.append(mutation)
            bytes += size
        }
        if !current.isEmpty { chunks.append(current) }
        return chunks
    }
}

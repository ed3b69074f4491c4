import Foundation
import GRDB
import Synchronization

/// The embedded backend: one SQLite database in WAL mode with `synchronous=FULL`, so a commit is on
/// disk before it is acknowledged and survives `kill -9` of the agent or a power cut.
public final class SQLiteStateStore: StateStore {
    /// A pool: one writer, and readers that run beside it on WAL snapshots, so reads never wait
    /// for a commit's sync.
    private let database: DatabasePool
    private let notifier = ChangeNotifier()
    private let path: String
    private let sweeper = Mutex<Task<Void, Never>?>(nil)

    /// Opens (creating if needed) the database at `path`.
    public init(path: String) throws {
        self.path = path
        var configuration = Configuration()
        configuration.busyMode = .timeout(5)
        configuration.prepareDatabase { db in
            try db.execute(sql: "PRAGMA synchronous = FULL")
        }
        configuration.maximumReaderCount = 4
        database = try DatabasePool(path: path, configuration: configuration)
        try database.write { db in
            try db.execute(
                sql: """
                    CREATE TABLE IF NOT EXISTS entries (
                        key TEXT PRIMARY KEY NOT NULL,
                        value BLOB NOT NULL,
                        create_index INTEGER NOT NULL,
                        modify_index INTEGER NOT NULL,
                        flags INTEGER NOT NULL DEFAULT 0
                    ) WITHOUT ROWID;
                    CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL);
                    INSERT OR IGNORE INTO meta (name, value) VALUES ('index', 0);
                    CREATE TABLE IF NOT EXISTS leases (
                        id INTEGER PRIMARY KEY NOT NULL,
                        ttl INTEGER NOT NULL,
                        expires REAL NOT NULL
                    );
                    """)
            // Databases made before leases existed gain the column in place.
            let columns = try String.fetchAll(db, sql: "SELECT name FROM pragma_table_info('entries')")
            if !columns.contains("lease") {
                try db.execute(sql: "ALTER TABLE entries ADD COLUMN lease INTEGER NOT NULL DEFAULT 0")
            }
            try db.execute(sql: "CREATE INDEX IF NOT EXISTS entries_by_lease ON entries (lease) WHERE lease != 0")
        }
        notifier.start(at: try database.read { db in try Self.readIndex(db) })
        // Leases outlive the process in the database (their expiry is wall-clock time): one that
        // ran out while the agent was down ends at the first sweep.
        sweeper.withLock {
            $0 = Task.detached { [weak self] in
                while !Task.isCancelled {
                    try? await Task.sleep(for: .milliseconds(250))
                    guard let self else { return }
                    await self.sweepExpiredLeases()
                }
            }
        }
    }

    deinit {
        sweeper.withLock { $0?.cancel() }
    }

    public var displayName: String { "sqlite:\(path)" }

    public func get(_ key: String) async throws -> StoreEntry? {
        try await database.read { db in
            try Row.fetchOne(db, sql: "SELECT * FROM entries WHERE key = ?", arguments: [key]).map(Self.entry)
        }
    }

    public func list(prefix: String) async throws -> StoreListing {
        try await database.read { db in
            let rows = try Row.fetchAll(
                db, sql: "SELECT * FROM entries WHERE key >= ? AND key < ? ORDER BY key",
                arguments: [prefix, prefix + "\u{10FFFF}"])
            return StoreListing(entries: rows.map(Self.entry), index: try Self.readIndex(db))
        }
    }

    public func snapshot(prefixes: [String]) async throws -> StoreSnapshot {
        try await database.read { db in
            var entries: [String: [StoreEntry]] = [:]
            for prefix in prefixes {
                entries[prefix] = try Row.fetchAll(
                    db, sql: "SELECT * FROM entries WHERE key >= ? AND key < ? ORDER BY key",
                    arguments: [prefix, prefix + "\u{10FFFF}"]
                ).map(Self.entry)
            }
            return StoreSnapshot(entries: entries, index: try Self.readIndex(db))
        }
    }

    public func currentIndex() async throws -> UInt64 {
        try await database.read { db in try Self.readIndex(db) }
    }

    /// Commits go through a group-commit queue: transactions that arrive while a disk sync is under
    /// way are applied together in the next SQLite transaction, each under its own index and inside
    /// its own savepoint (so one failed precondition fails only its own transaction), and share one
    /// sync. Under concurrency this turns N fsyncs into one, as etcd does with its WAL.
    public func commit(_ transaction: StoreTransaction) async throws -> UInt64 {
        try await enqueue(.transaction(transaction))
    }

    /// Every write, lease endings included, goes through the one queue, so changes reach watchers
    /// in index order.
    private func enqueue(_ work: Work) async throws -> UInt64 {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<UInt64, any Error>) in
            let startDrainer = pending.withLock { state -> Bool in
                state.queue.append((work, continuation))
                if state.draining { return false }
                state.draining = true
                return true
            }
            if startDrainer {
                Task.detached { await self.drain() }
            }
        }
    }

    private enum Work {
        case transaction(StoreTransaction)
        /// Ends the leases the closure picks and deletes their keys; answers 1 if it picked any.
        case endLeases(@Sendable (Database) throws -> [Int64])
    }

    private typealias Pending = (work: Work, continuation: CheckedContinuation<UInt64, any Error>)

    private struct PendingState {
        var queue: [Pending] = []
        var draining = false
    }

    private let pending = Mutex(PendingState())

    private func drain() async {
        while true {
            let batch = pending.withLock { state -> [Pending] in
                let batch = state.queue
                state.queue.removeAll()
                if batch.isEmpty { state.draining = false }
                return batch
            }
            if batch.isEmpty { return }
            await apply(batch)
        }
    }

    private enum Outcome {
        case committed(UInt64, [StoreEvent])
        /// Lease endings: whether any lease was picked, and the commit its key deletions made.
        case leasesEnded(Bool, (UInt64, [StoreEvent])?)
        case failed(any Error)
    }

    private func apply(_ batch: [Pending]) async {
        let outcomes: [Outcome]
        do {
            outcomes = try await database.write { db -> [Outcome] in
                var index = try Self.readIndex(db)
                var outcomes: [Outcome] = []
                for item in batch {
                    var result: Outcome = .failed(StoreError.backend("not applied"))
                    try db.inSavepoint {
                        do {
                            switch item.work {
                            case .transaction(let transaction):
                                let events = try Self.apply(transaction, at: index + 1, in: db)
                                index += 1
                                result = .committed(index, events)
                            case .endLeases(let choose):
                                let (found, keys) = try Self.endLeases(choose, in: db)
                                if keys.isEmpty {
                                    result = .leasesEnded(found, nil)
                                } else {
                                    index += 1
                                    result = .leasesEnded(found, (index, keys.map { Self.deletion($0, at: index) }))
                                }
                            }
                            return .commit
                        } catch let error as StoreError {
                            result = .failed(error)
                            return .rollback
                        }
                    }
                    outcomes.append(result)
                }
                try db.execute(sql: "UPDATE meta SET value = ? WHERE name = 'index'", arguments: [index])
                return outcomes
            }
        } catch {
            for item in batch { item.continuation.resume(throwing: StoreError.backend("\(error)")) }
            return
        }
        for (item, outcome) in zip(batch, outcomes) {
            switch outcome {
            case .committed(let index, let events):
                notifier.committed(index: index, events: events)
                item.continuation.resume(returning: index)
            case .leasesEnded(let found, let commit):
                if let (index, events) = commit { notifier.committed(index: index, events: events) }
                item.continuation.resume(returning: found ? 1 : 0)
            case .failed(let error):
                item.continuation.resume(throwing: error)
            }
        }
    }

    /// Checks the preconditions and writes the mutations of one transaction at `index`.
    private static func apply(_ transaction: StoreTransaction, at index: UInt64, in db: Database) throws -> [StoreEvent] {
        for condition in transaction.preconditions {
            let modifyIndex: UInt64?
            switch condition {
            case .absent(let key), .present(let key), .modifyIndex(let key, _):
                modifyIndex = try UInt64.fetchOne(db, sql: "SELECT modify_index FROM entries WHERE key = ?", arguments: [key])
            }
            let holds: Bool
            switch condition {
            case .absent: holds = modifyIndex == nil
            case .present: holds = modifyIndex != nil
            case .modifyIndex(_, let expected): holds = modifyIndex == expected
            }
            if !holds { throw StoreError.preconditionFailed(condition) }
        }
        var events: [StoreEvent] = []
        for mutation in transaction.mutations {
            switch mutation {
            case .put(let key, let value, let flags, let lease):
                if lease != 0, try Int64.fetchOne(db, sql: "SELECT id FROM leases WHERE id = ?", arguments: [lease]) == nil {
                    throw StoreError.leaseNotFound(lease)
                }
                let created = try UInt64.fetchOne(
                    db,
                    sql: """
                        INSERT INTO entries (key, value, create_index, modify_index, flags, lease) VALUES (?, ?, ?, ?, ?, ?)
                        ON CONFLICT(key) DO UPDATE SET value = excluded.value, modify_index = excluded.modify_index,
                        flags = excluded.flags, lease = excluded.lease
                        RETURNING create_index
                        """,
                    // SQLite integers are signed: keep all 64 bits of the flags by their bit pattern.
                    arguments: [key, value, index, index, Int64(bitPattern: flags), lease]) ?? index
                events.append(StoreEvent(kind: .put, entry: StoreEntry(key: key, value: value, createIndex: created, modifyIndex: index, flags: flags)))
            case .delete(let key):
                try db.execute(sql: "DELETE FROM entries WHERE key = ?", arguments: [key])
                if db.changesCount > 0 { events.append(deletion(key, at: index)) }
            case .deletePrefix(let prefix):
                let range: StatementArguments = [prefix, prefix + "\u{10FFFF}"]
                let keys = try String.fetchAll(db, sql: "SELECT key FROM entries WHERE key >= ? AND key < ? ORDER BY key", arguments: range)
                try db.execute(sql: "DELETE FROM entries WHERE key >= ? AND key < ?", arguments: range)
                events += keys.map { deletion($0, at: index) }
            }
        }
        return events
    }

    private static func deletion(_ key: String, at index: UInt64) -> StoreEvent {
        StoreEvent(kind: .delete, entry: StoreEntry(key: key, value: Data(), createIndex: 0, modifyIndex: index))
    }

    public func watch(prefix: String, after index: UInt64) -> AsyncThrowingStream<[StoreEvent], any Error> {
        notifier.watch(prefix: prefix, after: index)
    }

    // MARK: Leases

    public func grantLease(ttl: Int64) async throws -> StoreLease {
        let ttl = max(ttl, 1)
        let id = try await database.write { db -> Int64 in
            try db.execute(
                sql: "INSERT INTO leases (ttl, expires) VALUES (?, ?)", arguments: [ttl, Date().timeIntervalSince1970 + Double(ttl)])
            return db.lastInsertedRowID
        }
        return StoreLease(id: id, ttl: ttl)
    }

    public func keepAlive(_ lease: StoreLease.ID) async throws {
        let now = Date().timeIntervalSince1970
        let renewed = try await database.write { db -> Bool in
            try db.execute(sql: "UPDATE leases SET expires = ? + ttl WHERE id = ? AND expires > ?", arguments: [now, lease, now])
            return db.changesCount > 0
        }
        if !renewed {
            await sweepExpiredLeases()
            throw StoreError.leaseNotFound(lease)
        }
    }

    public func revokeLease(_ lease: StoreLease.ID) async throws {
        if try await !end(leases: { db in
            try Int64.fetchAll(db, sql: "SELECT id FROM leases WHERE id = ?", arguments: [lease])
        }) {
            throw StoreError.leaseNotFound(lease)
        }
    }

    private func sweepExpiredLeases() async {
        let now = Date().timeIntervalSince1970
        // A read first: the writer's queue is touched only when a lease has run out.
        guard let earliest = try? await database.read({ db in try Double.fetchOne(db, sql: "SELECT MIN(expires) FROM leases") }),
            earliest <= now
        else { return }
        _ = try? await end(leases: { db in try Int64.fetchAll(db, sql: "SELECT id FROM leases WHERE expires <= ?", arguments: [now]) })
    }

    /// Deletes the chosen leases and every key under them, the keys under one new index.
    /// - Returns: whether any lease was chosen.
    private func end(leases choose: @escaping @Sendable (Database) throws -> [Int64]) async throws -> Bool {
        try await enqueue(.endLeases(choose)) == 1
    }

    private static func endLeases(_ choose: (Database) throws -> [Int64], in db: Database) throws -> (Bool, [String]) {
        let leases = try choose(db)
        var keys: [String] = []
        for lease in leases {
            keys += try String.fetchAll(db, sql: "SELECT key FROM entries WHERE lease = ?", arguments: [lease])
            try db.execute(sql: "DELETE FROM entries WHERE lease = ?", arguments: [lease])
            try db.execute(sql: "DELETE FROM leases WHERE id = ?", arguments: [lease])
        }
        return (!leases.isEmpty, keys.sorted())
    }

    public func waitForChange(prefix: String, after index: UInt64, timeout: Duration) async throws -> UInt64 {
        await notifier.wait(prefix: prefix, after: index, timeout: timeout)
        return notifier.latestIndex
    }

    private static func readIndex(_ db: Database) throws -> UInt64 {
        try UInt64.fetchOne(db, sql: "SELECT value FROM meta WHERE name = 'index'") ?? 0
    }

    private static func entry(_ row: Row) -> StoreEntry {
        StoreEntry(
            key: row["key"], value: row["value"], createIndex: row["create_index"], modifyIndex: row["modify_index"],
            flags: UInt64(bitPattern: row["flags"] as Int64))
    }
}

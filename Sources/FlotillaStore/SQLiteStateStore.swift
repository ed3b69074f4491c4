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

    /// Opens (creating if needed) the database at `path`.
    public init(path: String) throws {
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
                    """)
        }
        notifier.start(at: try database.read { db in try Self.readIndex(db) })
    }

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

    public func currentIndex() async throws -> UInt64 {
        try await database.read { db in try Self.readIndex(db) }
    }

    /// Commits go through a group-commit queue: transactions that arrive while a disk sync is under
    /// way are applied together in the next SQLite transaction, each under its own index and inside
    /// its own savepoint (so one failed precondition fails only its own transaction), and share one
    /// sync. Under concurrency this turns N fsyncs into one, as etcd does with its WAL.
    public func commit(_ transaction: StoreTransaction) async throws -> UInt64 {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<UInt64, any Error>) in
            let startDrainer = pending.withLock { state -> Bool in
                state.queue.append((transaction, continuation))
                if state.draining { return false }
                state.draining = true
                return true
            }
            if startDrainer {
                Task.detached { await self.drain() }
            }
        }
    }

    private typealias Pending = (transaction: StoreTransaction, continuation: CheckedContinuation<UInt64, any Error>)

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
        case committed(UInt64, [String])
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
                            let keys = try Self.apply(item.transaction, at: index + 1, in: db)
                            index += 1
                            result = .committed(index, keys)
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
            case .committed(let index, let keys):
                notifier.committed(index: index, keys: keys)
                item.continuation.resume(returning: index)
            case .failed(let error):
                item.continuation.resume(throwing: error)
            }
        }
    }

    /// Checks the preconditions and writes the mutations of one transaction at `index`.
    private static func apply(_ transaction: StoreTransaction, at index: UInt64, in db: Database) throws -> [String] {
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
        var keys: [String] = []
        for mutation in transaction.mutations {
            switch mutation {
            case .put(let key, let value, let flags):
                try db.execute(
                    sql: """
                        INSERT INTO entries (key, value, create_index, modify_index, flags) VALUES (?, ?, ?, ?, ?)
                        ON CONFLICT(key) DO UPDATE SET value = excluded.value, modify_index = excluded.modify_index,
                        flags = excluded.flags
                        """,
                    // SQLite integers are signed: keep all 64 bits of the flags by their bit pattern.
                    arguments: [key, value, index, index, Int64(bitPattern: flags)])
                keys.append(key)
            case .delete(let key):
                try db.execute(sql: "DELETE FROM entries WHERE key = ?", arguments: [key])
                if db.changesCount > 0 { keys.append(key) }
            case .deletePrefix(let prefix):
                let range: StatementArguments = [prefix, prefix + "\u{10FFFF}"]
                keys += try String.fetchAll(db, sql: "SELECT key FROM entries WHERE key >= ? AND key < ?", arguments: range)
                try db.execute(sql: "DELETE FROM entries WHERE key >= ? AND key < ?", arguments: range)
            }
        }
        return keys
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

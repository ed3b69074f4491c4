import Foundation
import Synchronization

/// A store in memory with the same semantics as the durable backends, for unit tests and for
/// `--data-dir :memory:` experiments. Nothing survives the process.
public final class InMemoryStateStore: StateStore {
    private struct State {
        var entries: [String: StoreEntry] = [:]
        var index: UInt64 = 0
    }

    private let state = Mutex(State())
    private let notifier = ChangeNotifier()

    public init() {}

    public func get(_ key: String) async throws -> StoreEntry? {
        state.withLock { $0.entries[key] }
    }

    public func list(prefix: String) async throws -> StoreListing {
        state.withLock { state in
            let entries = state.entries.values.filter { $0.key.hasPrefix(prefix) }.sorted { $0.key < $1.key }
            return StoreListing(entries: entries, index: state.index)
        }
    }

    public func currentIndex() async throws -> UInt64 {
        state.withLock { $0.index }
    }

    public func commit(_ transaction: StoreTransaction) async throws -> UInt64 {
        let (index, keys) = try state.withLock { state throws(StoreError) -> (UInt64, [String]) in
            for condition in transaction.preconditions {
                let holds: Bool
                switch condition {
                case .absent(let key): holds = state.entries[key] == nil
                case .present(let key): holds = state.entries[key] != nil
                case .modifyIndex(let key, let expected): holds = state.entries[key]?.modifyIndex == expected
                }
                if !holds { throw StoreError.preconditionFailed(condition) }
            }
            state.index += 1
            let index = state.index
            var keys: [String] = []
            for mutation in transaction.mutations {
                switch mutation {
                case .put(let key, let value, let flags):
                    let created = state.entries[key]?.createIndex ?? index
                    state.entries[key] = StoreEntry(key: key, value: value, createIndex: created, modifyIndex: index, flags: flags)
                    keys.append(key)
                case .delete(let key):
                    if state.entries.removeValue(forKey: key) != nil { keys.append(key) }
                case .deletePrefix(let prefix):
                    let doomed = state.entries.keys.filter { $0.hasPrefix(prefix) }
                    for key in doomed { state.entries.removeValue(forKey: key) }
                    keys += doomed
                }
            }
            return (index, keys)
        }
        notifier.committed(index: index, keys: keys)
        return index
    }

    public func waitForChange(prefix: String, after index: UInt64, timeout: Duration) async throws -> UInt64 {
        await notifier.wait(prefix: prefix, after: index, timeout: timeout)
        return notifier.latestIndex
    }
}

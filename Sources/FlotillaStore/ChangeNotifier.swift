import Synchronization

/// Wakes readers waiting for a change under a prefix. Shared by the local backends; a waiter is
/// resumed at most once, by the first of: a matching commit, its timeout, or cancellation.
final class ChangeNotifier: Sendable {
    private struct Waiter {
        let prefix: String
        let after: UInt64
        let continuation: CheckedContinuation<Void, Never>
    }

    private struct State {
        var nextID: UInt64 = 0
        var waiters: [UInt64: Waiter] = [:]
        /// The latest committed index and the keys of recent commits, so that a waiter arriving just
        /// after a commit it has not seen returns at once.
        var lastIndex: UInt64 = 0
        var recent: [(index: UInt64, keys: [String])] = []
    }

    private let state = Mutex(State())
    private static let recentLimit = 256

    /// Sets the index the backend opened at, before any commit.
    func start(at index: UInt64) {
        state.withLock { $0.lastIndex = index }
    }

    /// Call after a commit became durable, with every key it touched.
    func committed(index: UInt64, keys: [String]) {
        let ready: [CheckedContinuation<Void, Never>] = state.withLock { state in
            state.lastIndex = max(state.lastIndex, index)
            state.recent.append((index, keys))
            if state.recent.count > Self.recentLimit { state.recent.removeFirst(state.recent.count - Self.recentLimit) }
            var ready: [CheckedContinuation<Void, Never>] = []
            for (id, waiter) in state.waiters where index > waiter.after && keys.contains(where: { $0.hasPrefix(waiter.prefix) }) {
                ready.append(waiter.continuation)
                state.waiters.removeValue(forKey: id)
            }
            return ready
        }
        for continuation in ready { continuation.resume() }
    }

    func wait(prefix: String, after index: UInt64, timeout: Duration) async {
        let id = state.withLock { state -> UInt64 in
            state.nextID += 1
            return state.nextID
        }
        // The waiter is resumed straight from the committing task; the timer only matters when
        // nothing changes.
        let timer = Task {
            try? await Task.sleep(for: timeout)
            self.cancel(id)
        }
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let resumeNow = self.state.withLock { state -> Bool in
                    if Task.isCancelled { return true }
                    if state.lastIndex > index {
                        // Commits happened that the caller has not seen: return now if one of
                        // them touched the prefix, or if they are too old to tell.
                        guard let oldest = state.recent.first?.index, oldest <= index + 1 else { return true }
                        if state.recent.contains(where: { $0.index > index && $0.keys.contains { $0.hasPrefix(prefix) } }) {
                            return true
                        }
                    }
                    state.waiters[id] = Waiter(prefix: prefix, after: index, continuation: continuation)
                    return false
                }
                if resumeNow { continuation.resume() }
            }
        } onCancel: {
            self.cancel(id)
        }
        timer.cancel()
    }

    /// The latest committed index, without asking the backend.
    var latestIndex: UInt64 { state.withLock { $0.lastIndex } }

    private func cancel(_ id: UInt64) {
        let waiter = state.withLock { $0.waiters.removeValue(forKey: id) }
        waiter?.continuation.resume()
    }
}

import Synchronization

/// Wakes readers waiting for a change under a prefix and feeds watches. Shared by every backend:
/// the local ones call `committed` after each commit; the etcd backend calls it from its watch on
/// the whole prefix. A waiter is resumed at most once, by the first of: a matching commit, its
/// timeout, or cancellation.
package final class ChangeNotifier: Sendable {
    private struct Waiter {
        let prefix: String
        let after: UInt64
        let continuation: CheckedContinuation<Void, Never>
    }

    private struct Subscriber {
        let prefix: String
        let continuation: AsyncThrowingStream<[StoreEvent], any Error>.Continuation
    }

    private struct State {
        var nextID: UInt64 = 0
        var waiters: [UInt64: Waiter] = [:]
        var subscribers: [UInt64: Subscriber] = [:]
        /// The latest committed index seen.
        var lastIndex: UInt64 = 0
        /// Every commit above this index is in `recent` (the history is complete from here on).
        var historyStart: UInt64 = 0
        var recent: [(index: UInt64, events: [StoreEvent])] = []
        var recentStart = 0
    }

    private let state = Mutex(State())
    /// Commits kept for waiters and watches that arrive late.
    private let recentLimit: Int
    /// Batches a watch may hold unread before it is ended as fallen behind (it re-lists).
    private let subscriberBuffer: Int

    package init(recentLimit: Int = 4096, subscriberBuffer: Int = 65536) {
        self.recentLimit = recentLimit
        self.subscriberBuffer = subscriberBuffer
    }

    /// Sets the index the backend opened at, before any commit.
    package func start(at index: UInt64) {
        state.withLock {
            $0.lastIndex = index
            $0.historyStart = index
        }
    }

    /// Call after a commit became durable (or was seen on the backend's watch), with its changes.
    package func committed(index: UInt64, events: [StoreEvent]) {
        let (ready, overflowed): ([CheckedContinuation<Void, Never>], [AsyncThrowingStream<[StoreEvent], any Error>.Continuation]) =
            state.withLock { state in
                guard index > state.lastIndex else { return ([], []) }
                state.lastIndex = index
                state.recent.append((index, events))
                if state.recent.count - state.recentStart > recentLimit {
                    state.historyStart = state.recent[state.recentStart].index
                    state.recentStart += 1
                    if state.recentStart > recentLimit {
                        state.recent.removeFirst(state.recentStart)
                        state.recentStart = 0
                    }
                }
                var ready: [CheckedContinuation<Void, Never>] = []
                for (id, waiter) in state.waiters where index > waiter.after && events.contains(where: { $0.key.hasPrefix(waiter.prefix) }) {
                    ready.append(waiter.continuation)
                    state.waiters.removeValue(forKey: id)
                }
                var overflowed: [AsyncThrowingStream<[StoreEvent], any Error>.Continuation] = []
                for (id, subscriber) in state.subscribers {
                    let matching = events.filter { $0.key.hasPrefix(subscriber.prefix) }
                    if matching.isEmpty { continue }
                    if case .dropped = subscriber.continuation.yield(matching) {
                        overflowed.append(subscriber.continuation)
                        state.subscribers.removeValue(forKey: id)
                    }
                }
                return (ready, overflowed)
            }
        for continuation in ready { continuation.resume() }
        for continuation in overflowed { continuation.finish(throwing: StoreError.compacted(oldest: index)) }
    }

    /// The history before `index` is lost (the etcd watch fell behind a compaction, or came back
    /// after an outage it could not replay): every waiter and watch is told to read again.
    package func invalidate(at index: UInt64) {
        let (waiters, subscribers) = state.withLock { state in
            state.lastIndex = max(state.lastIndex, index)
            state.historyStart = state.lastIndex
            state.recent.removeAll()
            state.recentStart = 0
            let waiters = state.waiters.values.map(\.continuation)
            let subscribers = state.subscribers.values.map(\.continuation)
            state.waiters.removeAll()
            state.subscribers.removeAll()
            return (waiters, subscribers)
        }
        for waiter in waiters { waiter.resume() }
        for subscriber in subscribers { subscriber.finish(throwing: StoreError.compacted(oldest: index)) }
    }

    /// Ends every watch with `error` (the store is closing).
    package func finishAll(throwing error: any Error) {
        let subscribers = state.withLock { state in
            let subscribers = state.subscribers.values.map(\.continuation)
            state.subscribers.removeAll()
            return subscribers
        }
        for subscriber in subscribers { subscriber.finish(throwing: error) }
    }

    package func wait(prefix: String, after index: UInt64, timeout: Duration) async {
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
                        if index < state.historyStart { return true }
                        for position in state.recentStart..<state.recent.count {
                            let commit = state.recent[position]
                            if commit.index > index && commit.events.contains(where: { $0.key.hasPrefix(prefix) }) { return true }
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

    /// Changes under `prefix` above `after`: the ones still held, then each new commit's.
    package func watch(prefix: String, after index: UInt64) -> AsyncThrowingStream<[StoreEvent], any Error> {
        let (stream, continuation) = AsyncThrowingStream<[StoreEvent], any Error>.makeStream(
            bufferingPolicy: .bufferingOldest(subscriberBuffer))
        let id = state.withLock { state -> UInt64? in
            if index < state.historyStart { return nil }
            for position in state.recentStart..<state.recent.count {
                let commit = state.recent[position]
                guard commit.index > index else { continue }
                let matching = commit.events.filter { $0.key.hasPrefix(prefix) }
                if !matching.isEmpty { continuation.yield(matching) }
            }
            state.nextID += 1
            state.subscribers[state.nextID] = Subscriber(prefix: prefix, continuation: continuation)
            return state.nextID
        }
        guard let id else {
            let oldest = state.withLock { $0.historyStart }
            continuation.finish(throwing: StoreError.compacted(oldest: oldest))
            return stream
        }
        continuation.onTermination = { [weak self] _ in
            _ = self?.state.withLock { $0.subscribers.removeValue(forKey: id) }
        }
        return stream
    }

    /// The latest committed index, without asking the backend.
    package var latestIndex: UInt64 { state.withLock { $0.lastIndex } }

    private func cancel(_ id: UInt64) {
        let waiter = state.withLock { $0.waiters.removeValue(forKey: id) }
        waiter?.continuation.resume()
    }
}

public import Foundation
import Synchronization

/// One event for `/v2/events` and the CLI: Marathon's `eventType` and its fields.
public struct FlotillaEvent: Sendable, Hashable {
    public var type: String
    public var fields: [String: JSONValue]

    public init(type: String, fields: [String: JSONValue], timestamp: Date = Date()) {
        self.type = type
        var fields = fields
        fields["eventType"] = .string(type)
        fields["timestamp"] = .string(Timestamp.format(timestamp))
        self.fields = fields
    }
}

/// Fans events out to every subscriber. A slow subscriber loses its oldest events rather than
/// holding up the control loop (the buffer is bounded per subscriber).
public final class EventBus: Sendable {
    private struct State {
        var nextID = 0
        var subscribers: [Int: AsyncStream<FlotillaEvent>.Continuation] = [:]
    }

    private let state = Mutex(State())
    private let bufferSize: Int

    public init(bufferSize: Int = 1024) {
        self.bufferSize = bufferSize
    }

    public func publish(_ event: FlotillaEvent) {
        let subscribers = state.withLock { Array($0.subscribers.values) }
        for subscriber in subscribers {
            subscriber.yield(event)
        }
    }

    /// A stream of every event published from now on; it ends when the consumer stops iterating.
    public func subscribe() -> AsyncStream<FlotillaEvent> {
        let (stream, continuation) = AsyncStream.makeStream(
            of: FlotillaEvent.self, bufferingPolicy: .bufferingNewest(bufferSize))
        let id = state.withLock { state in
            state.nextID += 1
            state.subscribers[state.nextID] = continuation
            return state.nextID
        }
        continuation.onTermination = { [weak self] _ in
            self?.state.withLock { _ = $0.subscribers.removeValue(forKey: id) }
        }
        return stream
    }

    public func finishAll() {
        let subscribers = state.withLock { state in
            defer { state.subscribers.removeAll() }
            return Array(state.subscribers.values)
        }
        for subscriber in subscribers { subscriber.finish() }
    }

    public var subscriberCount: Int { state.withLock { $0.subscribers.count } }
}

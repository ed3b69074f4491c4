import FlotillaCore
import NIOCore
import Synchronization

/// `/v2/events` streams share one subscription to the bus: each event is rendered to its
/// server-sent-event bytes once, and every stream is handed the same buffer. A hundred
/// subscribers then cost one rendering of an event, not a hundred.
final class EventStreamHub: Sendable {
    /// One event, ready to write: `event: <type>\ndata: <json>\n\n`.
    struct Frame: Sendable {
        let type: String
        let bytes: ByteBuffer
    }

    private struct State {
        var nextID = 0
        var streams: [Int: AsyncStream<Frame>.Continuation] = [:]
        var started = false
    }

    private let state = Mutex(State())
    private let events: EventBus
    private let bufferSize: Int

    /// A slow stream loses its oldest frames beyond `bufferSize`, as a bus subscriber does.
    init(events: EventBus, bufferSize: Int = 1024) {
        self.events = events
        self.bufferSize = bufferSize
    }

    /// Every event published from now on (the bus subscription exists before this returns, so an
    /// event the caller publishes next is in the stream).
    func subscribe() -> AsyncStream<Frame> {
        let (stream, continuation) = AsyncStream.makeStream(of: Frame.self, bufferingPolicy: .bufferingNewest(bufferSize))
        let (id, first) = state.withLock { state in
            state.nextID += 1
            state.streams[state.nextID] = continuation
            defer { state.started = true }
            return (state.nextID, !state.started)
        }
        continuation.onTermination = { [weak self] _ in
            self?.state.withLock { _ = $0.streams.removeValue(forKey: id) }
        }
        if first { startFanOut() }
        return stream
    }

    var streamCount: Int { state.withLock { $0.streams.count } }

    private func startFanOut() {
        let subscription = events.subscribe()
        Task { [self] in
            for await published in subscription {
                let streams = state.withLock { Array($0.streams.values) }
                guard !streams.isEmpty else { continue }
                let frame = Self.render(published)
                for stream in streams { stream.yield(frame) }
            }
            // The bus ended (shutdown): so does every stream.
            let streams = state.withLock { state in
                defer { state.streams.removeAll() }
                return Array(state.streams.values)
            }
            for stream in streams { stream.finish() }
        }
    }

    static func render(_ published: PublishedEvent) -> Frame {
        let event = MarathonEvent(published)
        var bytes = Array("event: \(event.type)\ndata: ".utf8)
        JSONValue.object(event.fields).write(into: &bytes)
        bytes.append(contentsOf: "\n\n".utf8)
        return Frame(type: event.type, bytes: ByteBuffer(bytes: bytes))
    }
}

import AsyncHTTPClient
public import FlotillaCore
public import FlotillaStore
import Foundation
public import Logging
import NIOCore
import NIOHTTP1
public import ServiceLifecycle

/// Marathon's HTTP callbacks (`/v2/eventSubscriptions`): every event on the bus is POSTed, as the
/// same JSON `/v2/events` sends, to each subscribed URL. Each URL gets its events in order from a
/// queue of its own; a failed delivery is tried twice more (after 0.5 s and 1 s), then dropped
/// and logged, so one dead subscriber never holds up another or the control plane. Subscriptions
/// are kept in the store and survive restarts.
public actor EventSubscriptions: Service {
    static let prefix = "event-subscriptions/"
    static let queueLimit = 1000
    static let attempts = 3

    private let store: any StateStore
    private let events: EventBus
    private let logger: Logger
    private var urls: Set<String> = []
    private var queues: [String: AsyncStream<MarathonEvent>.Continuation] = [:]
    private var client: HTTPClient?
    private var loaded = false

    public init(store: any StateStore, events: EventBus, logger: Logger) {
        self.store = store
        self.events = events
        self.logger = logger
    }

    public func load() async throws {
        guard !loaded else { return }
        for entry in try await store.list(prefix: Self.prefix).entries {
            urls.insert(String(decoding: entry.value, as: UTF8.self))
        }
        loaded = true
    }

    public func run() async throws {
        try await load()
        var configuration = HTTPClient.Configuration(redirectConfiguration: .disallow)
        configuration.timeout = .init(connect: .seconds(5), read: .seconds(10))
        let client = HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
        self.client = client
        await withDiscardingTaskGroup { group in
            // When the bus ends (shutdown), every queue ends too, and with it its delivery task
            // (those of URLs subscribed later run unstructured; they end the same way).
            group.addTask {
                await self.fanOut()
                await self.finishQueues()
            }
            for url in urls { startQueue(url, in: &group) }
        }
        // The bus can end before this service is told to stop (the event streams close first).
        try? await gracefulShutdown()
        try? await client.shutdown()
    }

    private func startQueue(_ url: String, in group: inout DiscardingTaskGroup) {
        let stream = openQueue(url)
        group.addTask { await self.deliver(stream, to: url) }
    }

    private func openQueue(_ url: String) -> AsyncStream<MarathonEvent> {
        let (stream, continuation) = AsyncStream.makeStream(of: MarathonEvent.self, bufferingPolicy: .bufferingNewest(Self.queueLimit))
        queues[url] = continuation
        return stream
    }

    private func finishQueues() {
        for queue in queues.values { queue.finish() }
        queues.removeAll()
        client = nil
    }

    private func fanOut() async {
        for await published in events.subscribe().cancelOnGracefulShutdown() {
            guard !queues.isEmpty else { continue }
            // Rendered once for every subscriber.
            let event = MarathonEvent(published)
            for queue in queues.values { queue.yield(event) }
        }
    }

    private func deliver(_ stream: AsyncStream<MarathonEvent>, to url: String) async {
        for await event in stream {
            guard let client else { return }
            var failure = ""
            for attempt in 1...Self.attempts {
                var request = HTTPClientRequest(url: url)
                request.method = .POST
                request.headers.add(name: "Content-Type", value: "application/json; charset=UTF-8")
                request.headers.add(name: "Accept", value: "application/json")
                request.body = .bytes(ByteBuffer(bytes: JSONValue.object(event.fields).serialized()))
                do {
                    let response = try await client.execute(request, timeout: .seconds(10))
                    _ = try? await response.body.collect(upTo: 64 * 1024)
                    if (200..<300).contains(response.status.code) {
                        failure = ""
                        break
                    }
                    failure = "answered \(response.status.code)"
                } catch {
                    failure = "\(error)"
                }
                if Task.isCancelled { return }
                if attempt < Self.attempts { try? await Task.sleep(for: .milliseconds(500 * attempt)) }
            }
            if !failure.isEmpty {
                logger.warning("event \(event.type) not delivered to \(url) after \(Self.attempts) attempts: \(failure)")
            }
        }
    }

    // MARK: - API

    public func list() -> [String] { urls.sorted() }

    /// Subscribes `url` (idempotent). Throws for a URL that is not http(s).
    public func subscribe(_ url: String) async throws {
        guard let parsed = URL(string: url), ["http", "https"].contains(parsed.scheme?.lowercased() ?? ""), parsed.host != nil else {
            throw FlotillaError.invalid([FieldError("/callbackUrl", "'\(url)' is not an http or https URL")])
        }
        guard !urls.contains(url) else { return }
        try await store.commit(StoreTransaction(mutations: [.put(Self.key(url), Data(url.utf8))]))
        urls.insert(url)
        if client != nil {
            // Running: a queue of its own now (before, run() starts the queues of loaded URLs).
            let stream = openQueue(url)
            Task { await self.deliver(stream, to: url) }
        }
    }

    public func unsubscribe(_ url: String) async throws {
        guard urls.contains(url) else { return }
        try await store.commit(StoreTransaction(mutations: [.delete(Self.key(url))]))
        urls.remove(url)
        queues.removeValue(forKey: url)?.finish()
    }

    static func key(_ url: String) -> String {
        prefix + Data(url.utf8).base64EncodedString().replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "+", with: "-")
    }
}

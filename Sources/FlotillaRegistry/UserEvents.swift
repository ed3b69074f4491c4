public import Foundation

/// Consul's user events (`/v1/event/fire`, `/v1/event/list`): named payloads kept in memory, the
/// last 256, as a Consul agent keeps what it received. They do not outlive the agent (Consul's
/// are gossip and do not either).
public actor UserEvents {
    public struct Event: Sendable, Hashable {
        public var id: String
        public var name: String
        public var payload: Data?
        public var nodeFilter: String
        public var serviceFilter: String
        public var tagFilter: String
        /// Lamport time: the order in which this agent received events, from 1.
        public var lamportTime: UInt64
    }

    public static let capacity = 256
    private var events: [Event] = []
    private var clock: UInt64 = 0
    private var waiters: [UInt64: CheckedContinuation<Void, Never>] = [:]
    private var nextWaiter: UInt64 = 0

    public init() {}

    public func fire(name: String, payload: Data?, nodeFilter: String, serviceFilter: String, tagFilter: String) -> Event {
        clock += 1
        let event = Event(
            id: UUID().uuidString.lowercased(), name: name, payload: payload, nodeFilter: nodeFilter, serviceFilter: serviceFilter,
            tagFilter: tagFilter, lamportTime: clock)
        events.append(event)
        if events.count > Self.capacity { events.removeFirst(events.count - Self.capacity) }
        for waiter in waiters.values { waiter.resume() }
        waiters.removeAll()
        return event
    }

    /// Oldest first; `name` matches exactly.
    public func list(name: String?) -> [Event] {
        guard let name, !name.isEmpty else { return events }
        return events.filter { $0.name == name }
    }

    /// Consul's index for event lists: the last event's id folded to 64 bits (1 with none).
    public func index(name: String?) -> UInt64 {
        list(name: name).last.map { Self.index(of: $0.id) } ?? 1
    }

    /// Returns when the index for `name` is no longer `seen`, or after `wait`.
    public func waitForChange(name: String?, seen: UInt64?, wait: Duration) async {
        guard let seen, seen > 0, index(name: name) == seen else { return }
        let deadline = ContinuousClock.now + wait
        while index(name: name) == seen && ContinuousClock.now < deadline {
            nextWaiter += 1
            let id = nextWaiter
            let timer = Task { [weak self] in
                try? await Task.sleep(until: deadline)
                await self?.release(id)
            }
            await withCheckedContinuation { waiters[id] = $0 }
            timer.cancel()
        }
    }

    private func release(_ id: UInt64) {
        waiters.removeValue(forKey: id)?.resume()
    }

    /// The two halves of the UUID's hex digits XORed, as Consul computes `X-Consul-Index` for events.
    static func index(of id: String) -> UInt64 {
        let hex = id.replacingOccurrences(of: "-", with: "")
        guard hex.count == 32, let high = UInt64(hex.prefix(16), radix: 16), let low = UInt64(hex.suffix(16), radix: 16) else { return 1 }
        return max(1, high ^ low)
    }
}

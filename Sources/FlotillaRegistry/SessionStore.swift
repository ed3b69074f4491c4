public import FlotillaCore
public import FlotillaStore
public import Foundation
public import Logging
public import ServiceLifecycle

/// One Consul session: what a lock holder is. Stored under `sessions/<id>`.
public struct ConsulSession: Sendable, Hashable, Codable {
    public enum Behavior: String, Sendable, Hashable, Codable {
        case release, delete
    }

    public var id: String
    public var name: String
    public var node: String
    /// Nanoseconds, as Consul reports it.
    public var lockDelayNanoseconds: UInt64
    public var behavior: Behavior
    /// As the client wrote it ("30s", "15.0s"); empty for none.
    public var ttl: String
    public var nodeChecks: [String]
    public var serviceChecks: [String]
    public var createIndex: UInt64 = 0

    /// Every check whose going critical (or away) invalidates the session.
    public var checkIDs: [String] { nodeChecks + serviceChecks }
    public var ttlSeconds: Double? { ttl.isEmpty ? nil : GoDuration.seconds(ttl).flatMap { $0 > 0 ? $0 : nil } }
}

/// Consul's sessions (`/v1/session/*`): created with a TTL, a lock delay, a behaviour and the
/// checks they hang on; invalidated when destroyed, when they are not renewed within twice their
/// TTL (Consul's own margin), or when one of their checks goes critical or is removed. An
/// invalidated session releases (or deletes, with `Behavior: delete`) every key it holds, and
/// those keys cannot be acquired for its lock delay.
public actor SessionStore: Service {
    static let prefix = "sessions/"
    public static func storeKey(_ id: String) -> String { prefix + id }
    public static let minimumTTL = 10.0
    public static let maximumTTL = 86_400.0

    private let store: any StateStore
    private let kv: KeyValueStore
    private let registry: Registry
    private let logger: Logger
    private var sessions: [String: ConsulSession] = [:]
    /// When each session with a TTL expires unless renewed: 2 × TTL after its creation or renewal.
    private var deadlines: [String: ContinuousClock.Instant] = [:]
    /// The index of the last change to any session, for blocking queries on the session lists.
    private var index: UInt64 = 1
    private var waiters: [UInt64: CheckedContinuation<Void, Never>] = [:]
    private var nextWaiter: UInt64 = 0
    private var loaded = false

    public init(store: any StateStore, kv: KeyValueStore, registry: Registry, logger: Logger) {
        self.store = store
        self.kv = kv
        self.registry = registry
        self.logger = logger
    }

    /// Reads the sessions from the store. Sessions that survived a restart get a full 2 × TTL from
    /// now, as Consul gives them when a new leader takes over.
    public func load() async throws {
        guard !loaded else { return }
        let listing = try await store.list(prefix: Self.prefix)
        for entry in listing.entries {
            guard var session = try? StateCodec.decode(ConsulSession.self, from: entry.value) else { continue }
            session.createIndex = entry.createIndex
            sessions[session.id] = session
            arm(session)
        }
        index = max(1, listing.index)
        loaded = true
    }

    public func run() async throws {
        try await load()
        var seen: UInt64 = 0
        while !Task.isCancelled && !Task.isShuttingDownGracefully {
            // Wake on every change of any check, and at least once a second for the TTLs.
            let view = await registry.view(waitingFor: .checks, after: seen, wait: .seconds(1))
            seen = view.index(of: .checks)
            await sweep(view)
        }
    }

    // MARK: - Endpoints

    /// `PUT /v1/session/create`.
    public func create(_ body: [String: JSONValue]) async throws -> String {
        let fields = Dictionary(body.map { ($0.key.lowercased(), $0.value) }, uniquingKeysWith: { first, _ in first })
        let view = await registry.currentView()
        let node = fields["node"]?.stringValue.flatMap { $0.isEmpty ? nil : $0 } ?? registry.localNode
        guard view.node(named: node) != nil else { throw SessionError("Missing node registration") }
        var lockDelay: UInt64 = 15_000_000_000
        if let value = fields["lockdelay"], value != .null { lockDelay = try Self.lockDelay(value) }
        var behavior = ConsulSession.Behavior.release
        if let text = fields["behavior"]?.stringValue, !text.isEmpty {
            guard let parsed = ConsulSession.Behavior(rawValue: text) else { throw SessionError("Invalid Behavior setting '\(text)'") }
            behavior = parsed
        }
        let ttl = fields["ttl"]?.stringValue ?? ""
        if !ttl.isEmpty && ttl != "0" {
            guard let seconds = GoDuration.seconds(ttl) else { throw SessionError("Session TTL '\(ttl)' invalid: time: invalid duration \"\(ttl)\"") }
            if seconds != 0 && (seconds < Self.minimumTTL || seconds > Self.maximumTTL) {
                throw SessionError("Invalid Session TTL '\(Int64(seconds * 1e9))', must be between [10s=24h0m0s]")
            }
        }
        // Checks: `NodeChecks` (default serfHealth), `ServiceChecks` [{ID}], and the older `Checks`.
        var nodeChecks = [CatalogBuilder.nodeCheckID]
        if let value = fields["nodechecks"], value != .null { nodeChecks = try Self.strings(value, field: "NodeChecks") }
        if let value = fields["checks"], value != .null {
            let checks = try Self.strings(value, field: "Checks")
            if fields["nodechecks"] == nil || fields["nodechecks"] == .null {
                nodeChecks = checks == [CatalogBuilder.nodeCheckID] || checks.isEmpty ? checks : Array(Set(checks + nodeChecks)).sorted()
            } else {
                nodeChecks = Array(Set(checks + nodeChecks)).sorted()
            }
        }
        var serviceChecks: [String] = []
        if let value = fields["servicechecks"], value != .null {
            guard case .array(let items) = value else { throw FlotillaError.badRequest("ServiceChecks must be a list of {\"ID\": ...}") }
            for item in items {
                let object = Dictionary((item.objectValue ?? [:]).map { ($0.key.lowercased(), $0.value) }, uniquingKeysWith: { first, _ in first })
                guard let id = object["id"]?.stringValue else { throw FlotillaError.badRequest("each ServiceChecks entry needs an ID") }
                serviceChecks.append(id)
            }
        }
        for checkID in nodeChecks + serviceChecks {
            guard let status = Self.status(of: checkID, node: node, in: view) else { throw SessionError("Missing check '\(checkID)' registration") }
            if status == .critical { throw SessionError("Check '\(checkID)' is in critical state") }
        }
        var session = ConsulSession(
            id: UUID().uuidString.lowercased(), name: fields["name"]?.stringValue ?? "", node: node, lockDelayNanoseconds: lockDelay,
            behavior: behavior, ttl: ttl == "0" ? "" : ttl, nodeChecks: nodeChecks, serviceChecks: serviceChecks)
        let committed = try await store.commit(
            StoreTransaction(preconditions: [.absent(Self.storeKey(session.id))], mutations: [.put(Self.storeKey(session.id), try StateCodec.encode(session))]))
        session.createIndex = committed
        sessions[session.id] = session
        arm(session)
        changed(at: committed)
        return session.id
    }

    /// `PUT /v1/session/destroy/<id>`: true whether or not it existed, as in Consul.
    public func destroy(_ id: String) async throws {
        guard let session = sessions[id] else { return }
        try await invalidate(session, why: "destroyed")
    }

    /// `PUT /v1/session/renew/<id>`: the session, or nil when it is unknown (or already expired).
    public func renew(_ id: String) -> ConsulSession? {
        guard let session = sessions[id] else { return nil }
        arm(session)
        return session
    }

    public func info(_ id: String) -> [ConsulSession] { sessions[id].map { [$0] } ?? [] }
    public func list() -> [ConsulSession] { sessions.values.sorted { $0.createIndex < $1.createIndex } }
    public func sessions(onNode node: String) -> [ConsulSession] { list().filter { $0.node == node } }
    public func currentIndex() -> UInt64 { index }

    /// Returns once a session changed after `seen`, or after `wait`.
    public func waitForChange(after seen: UInt64?, wait: Duration) async {
        guard let seen, seen > 0, index <= seen else { return }
        nextWaiter += 1
        let id = nextWaiter
        let timer = Task { [weak self] in
            try? await Task.sleep(for: wait)
            await self?.release(id)
        }
        await withCheckedContinuation { waiters[id] = $0 }
        timer.cancel()
    }

    private func release(_ id: UInt64) {
        waiters.removeValue(forKey: id)?.resume()
    }

    // MARK: - Invalidation

    private func arm(_ session: ConsulSession) {
        if let ttl = session.ttlSeconds {
            deadlines[session.id] = ContinuousClock.now + .milliseconds(Int64(ttl * 2 * 1000))
        }
    }

    /// Invalidates sessions whose TTL ran out or whose checks are critical or gone.
    private func sweep(_ view: RegistryView) async {
        let now = ContinuousClock.now
        for session in list() {
            var why: String?
            if let deadline = deadlines[session.id], deadline <= now {
                why = "its TTL of \(session.ttl) passed twice without a renewal"
            } else {
                for checkID in session.checkIDs {
                    switch Self.status(of: checkID, node: session.node, in: view) {
                    case nil: why = "its check '\(checkID)' was removed"
                    case .critical?: why = "its check '\(checkID)' is critical"
                    default: continue
                    }
                    break
                }
            }
            guard let why else { continue }
            do {
                try await invalidate(session, why: why)
            } catch {
                logger.error("could not invalidate session \(session.id) (\(why)), will retry: \(error)")
            }
        }
    }

    /// Ends a session in one transaction: the session goes and every key it holds is released
    /// (or deleted), each guarded by its lock's index, so a lock that changed meanwhile makes the
    /// whole attempt start over instead of being overwritten. A lock taken with the session in the
    /// instant before it went is released right after.
    private func invalidate(_ session: ConsulSession, why: String) async throws {
        // Gone from reads and sweeps before the first await: a second invalidation cannot start.
        guard sessions.removeValue(forKey: session.id) != nil else { return }
        deadlines[session.id] = nil
        let deleteKeys = session.behavior == .delete
        var held: [String] = []
        var committed: UInt64?
        do {
            for _ in 0..<KeyValueStore.lockRetries {
                let effect = try await kv.invalidation(of: session.id, deleteKeys: deleteKeys)
                held = effect.held
                // The lock delay starts before the locks go, so a woken contender meets it.
                kv.startLockDelay(held, seconds: Double(session.lockDelayNanoseconds) / 1e9)
                do {
                    committed = try await store.commit(
                        StoreTransaction(preconditions: effect.preconditions, mutations: effect.mutations + [.delete(Self.storeKey(session.id))]))
                    kv.recordDeletes(effect.deleted, at: committed!)
                    break
                } catch StoreError.preconditionFailed {
                    continue
                }
            }
            if committed == nil {
                // The keys kept changing: the session goes first, then each lock on its own.
                committed = try await store.commit(StoreTransaction(mutations: [.delete(Self.storeKey(session.id))]))
            }
        } catch {
            sessions[session.id] = session
            arm(session)
            throw error
        }
        changed(at: committed!)
        for key in try await kv.keysHeld(by: session.id) {
            try await kv.loseLock(key, session: session.id, deleteKey: deleteKeys)
        }
        logger.info("session \(session.id) (\(session.name)) invalidated: \(why); \(held.count) lock(s) \(deleteKeys ? "deleted" : "released")")
    }

    private func changed(at committed: UInt64) {
        index = max(index + 1, committed)
        for waiter in waiters.values { waiter.resume() }
        waiters.removeAll()
    }

    // MARK: - Parsing

    /// A check's status as the session sees it: node checks by id on its node, service checks
    /// anywhere; nil when there is no such check.
    static func status(of checkID: String, node: String, in view: RegistryView) -> CheckStatus? {
        if let known = view.node(named: node), let check = view.checks(ofNode: known).first(where: { $0.checkID == checkID }) {
            return check.status
        }
        return view.services.lazy.flatMap(\.checks).first { $0.checkID == checkID }?.status
    }

    /// Consul's `LockDelay`: a duration string, or a number of nanoseconds; values under a
    /// microsecond are taken as seconds (`15` means 15 s).
    static func lockDelay(_ value: JSONValue) throws -> UInt64 {
        var nanoseconds: Double
        switch value {
        case .string(let text):
            guard let seconds = GoDuration.seconds(text) else { throw FlotillaError.badRequest("Request decode failed: LockDelay '\(text)' is not a duration") }
            nanoseconds = seconds * 1e9
        case .number(let number):
            nanoseconds = number
        default:
            throw FlotillaError.badRequest("Request decode failed: LockDelay must be a duration")
        }
        guard nanoseconds >= 0, nanoseconds.isFinite else { throw FlotillaError.badRequest("Request decode failed: LockDelay must not be negative") }
        if nanoseconds > 0 && nanoseconds < 1000 { nanoseconds *= 1e9 }
        return UInt64(nanoseconds.rounded())
    }

    static func strings(_ value: JSONValue, field: String) throws -> [String] {
        guard case .array(let items) = value else { throw FlotillaError.badRequest("\(field) must be a list of check ids") }
        return try items.map { item in
            guard let text = item.stringValue else { throw FlotillaError.badRequest("\(field) must be a list of check ids") }
            return text
        }
    }
}

/// A session request Consul answers with 500 and this text (clients such as Patroni match it).
public struct SessionError: Error, CustomStringConvertible {
    public let description: String
    init(_ description: String) { self.description = description }
}

public import FlotillaCore
public import FlotillaStore
import Foundation
public import Logging
public import ServiceLifecycle

/// Where the registry learns about nodes and instances: the control plane, seen through this
/// protocol so the registry does not depend on it.
public protocol RegistrySource: Sendable {
    /// The nodes, every live instance, the store index they reflect, and a generation number that
    /// changes whenever any of them does.
    func registryInput() async -> RegistryInput
    /// Returns once the generation is above `generation` (at once if it already is).
    func waitForChange(after generation: UInt64) async -> UInt64
}

public struct RegistryInput: Sendable {
    public var nodes: [NodeInfo]
    public var instances: [Instance]
    /// Every app, for the routes its tags declare even while no instance runs.
    public var apps: [AppDefinition]
    public var index: UInt64
    public var generation: UInt64

    public init(nodes: [NodeInfo], instances: [Instance], apps: [AppDefinition] = [], index: UInt64, generation: UInt64) {
        self.nodes = nodes
        self.instances = instances
        self.apps = apps
        self.index = index
        self.generation = generation
    }
}

/// Runs the checks of externally registered services (HTTP and TCP); the agent provides it.
public protocol CheckProber: Sendable {
    func probeHTTP(url: String, timeoutSeconds: Double) async -> (passed: Bool, output: String)
    func probeTCP(host: String, port: Int, timeoutSeconds: Double) async -> (passed: Bool, output: String)
}

/// What a blocking query waits on; each has its own index, which moves only when what that query
/// returns changes (Consul's per-table and per-service indexes).
public enum RegistryTopic: Sendable, Hashable {
    case services
    case service(String)
    case nodes
    case node(String)
    case checks
}

/// A consistent view of the catalog, with the indexes each query reports.
public struct RegistryView: Sendable {
    public var nodes: [CatalogNode]
    public var services: [CatalogService]
    public var datacenter: String
    public var localNode: String
    var topicIndexes: [RegistryTopic: UInt64]
    var floorIndex: UInt64
    /// Tags of every service apps declare, registered or not (for routes with no instance).
    public var declaredTags: [String: [String]] = [:]

    /// The index to report for a topic: when its answer last changed (never 0, never backwards).
    public func index(of topic: RegistryTopic) -> UInt64 { max(1, topicIndexes[topic] ?? floorIndex) }

    public func services(named name: String) -> [CatalogService] { services.filter { $0.name == name } }
    public func node(named name: String) -> CatalogNode? { nodes.first { $0.name == name } }

    /// `serfHealth` for each node: a node the registry knows is alive (its agent registered it).
    public func nodeCheck(_ node: CatalogNode) -> CatalogCheck {
        CatalogCheck(
            node: node.name, checkID: CatalogBuilder.nodeCheckID, name: "Serf Health Status", status: .passing, notes: "",
            output: "Agent alive and reachable", serviceID: "", serviceName: "", serviceTags: [], type: "", createIndex: 1, modifyIndex: 1)
    }
}

/// The service registry: builds the Consul-shaped catalog from running instances and services
/// registered through the agent API, keeps Consul's indexes, and wakes blocking queries.
public actor Registry: Service {
    private let store: any StateStore
    private let source: any RegistrySource
    private let prober: (any CheckProber)?
    private let logger: Logger
    public nonisolated let datacenter: String
    public nonisolated let localNode: String
    public nonisolated let localAddress: String

    private var view: RegistryView {
        didSet {
            viewBox.update(view)
            onViewChange?(view)
        }
    }
    /// Told of every new view (the proxy's route table is built from it).
    private let onViewChange: (@Sendable (RegistryView) -> Void)?
    /// The latest view for readers that cannot await (DNS).
    public nonisolated let viewBox: RegistryViewBox
    private var external: [String: ExternalService] = [:]
    private var entryStamps: [String: (create: UInt64, modify: UInt64, content: CatalogService)] = [:]
    private var topicContent: [RegistryTopic: Int] = [:]
    private var waiters: [UInt64: (topic: RegistryTopic, after: UInt64, continuation: CheckedContinuation<Void, Never>)] = [:]
    private var nextWaiter: UInt64 = 0
    /// Waiters released (by their timeout) before they registered: they must not register later.
    private var releasedEarly: Set<UInt64> = []
    private var checkTasks: [String: Task<Void, Never>] = [:]
    private var loaded = false
    /// Every app's service ports become TCP routes (not only labelled apps).
    private let routeServicePorts: Bool

    public static let externalPrefix = "registry/services/"

    public init(
        store: any StateStore, source: any RegistrySource, prober: (any CheckProber)?, datacenter: String, localNode: String,
        localAddress: String, logger: Logger, routeServicePorts: Bool = false, onViewChange: (@Sendable (RegistryView) -> Void)? = nil
    ) {
        self.routeServicePorts = routeServicePorts
        self.onViewChange = onViewChange
        self.store = store
        self.source = source
        self.prober = prober
        self.datacenter = datacenter
        self.localNode = localNode
        self.localAddress = localAddress
        self.logger = logger
        let empty = RegistryView(nodes: [], services: [], datacenter: datacenter, localNode: localNode, topicIndexes: [:], floorIndex: 1)
        self.view = empty
        self.viewBox = RegistryViewBox(empty)
    }

    public func run() async throws {
        try await load()
        await withDiscardingTaskGroup { group in
            group.addTask { await self.followSource() }
            group.addTask { await self.reapLoop() }
        }
        for task in checkTasks.values { task.cancel() }
        for (_, waiter) in waiters { waiter.continuation.resume() }
        waiters.removeAll()
    }

    /// Loads external registrations and builds the first view.
    public func load() async throws {
        guard !loaded else { return }
        let listing = try await store.list(prefix: Self.externalPrefix)
        for service in StateCodec.decodeAll(ExternalService.self, from: listing.entries) { external[service.id] = service }
        view.floorIndex = max(1, listing.index)
        loaded = true
        await rebuild(await source.registryInput())
        for service in external.values { startChecks(of: service) }
    }

    private func followSource() async {
        var generation: UInt64 = 0
        while !Task.isCancelled && !Task.isShuttingDownGracefully {
            let seen = generation
            let next = try? await cancelWhenGracefulShutdown { await self.source.waitForChange(after: seen) }
            guard let next else { return }
            generation = next
            await rebuild(await source.registryInput())
        }
    }

    /// Every second: TTLs that ran out are written as critical (so the index moves and blocking
    /// queries wake), and services critical for longer than `DeregisterCriticalServiceAfter` go.
    private func reapLoop() async {
        while !Task.isCancelled && !Task.isShuttingDownGracefully {
            try? await Task.sleep(for: .seconds(1))
            await reap(now: Date())
        }
    }

    func reap(now: Date) async {
        var changed: [ExternalService] = []
        var doomed: [String] = []
        for service in external.values {
            var updated = service
            var dirty = false
            for (index, check) in service.checks.enumerated() {
                if let ttl = check.ttlSeconds, check.status != .critical, let at = Timestamp.parse(check.updatedAt), now.timeIntervalSince(at) > ttl {
                    updated.checks[index].status = .critical
                    updated.checks[index].output = "TTL expired: no update for \(Int(ttl)) s"
                    updated.checks[index].criticalSince = Timestamp.format(now)
                    dirty = true
                }
                if let limit = check.deregisterCriticalServiceAfterSeconds, let since = updated.checks[index].criticalSince.flatMap(Timestamp.parse),
                    updated.checks[index].status == .critical, now.timeIntervalSince(since) > limit
                {
                    doomed.append(service.id)
                }
            }
            if dirty { changed.append(updated) }
        }
        do {
            for id in Set(doomed) {
                logger.info("deregistering \(id): critical for longer than DeregisterCriticalServiceAfter")
                try await deregister(id)
            }
            for service in changed where !doomed.contains(service.id) { try await save(service) }
        } catch {
            logger.error("registry reaper: \(error)")
        }
    }

    // MARK: - Reads

    public func currentView() -> RegistryView { view }

    /// Consul's blocking query: returns when the topic's index passes `index`, or after `wait`.
    public func view(waitingFor topic: RegistryTopic, after index: UInt64?, wait: Duration) async -> RegistryView {
        guard let index, index > 0, view.index(of: topic) <= index else { return view }
        nextWaiter += 1
        let id = nextWaiter
        await withTaskGroup(of: Void.self) { group in
            group.addTask {
                await withCheckedContinuation { continuation in
                    Task { await self.register(id: id, topic: topic, after: index, continuation: continuation) }
                }
            }
            group.addTask {
                try? await Task.sleep(for: wait)
                await self.release(id)
            }
            await group.next()
            group.cancelAll()
            await self.release(id)
            await group.waitForAll()
        }
        releasedEarly.remove(id)
        return view
    }

    private func register(id: UInt64, topic: RegistryTopic, after: UInt64, continuation: CheckedContinuation<Void, Never>) {
        if releasedEarly.remove(id) != nil || view.index(of: topic) > after || !loaded {
            continuation.resume()
        } else {
            waiters[id] = (topic, after, continuation)
        }
    }

    private func release(_ id: UInt64) {
        if let waiter = waiters.removeValue(forKey: id) {
            waiter.continuation.resume()
        } else {
            releasedEarly.insert(id)
        }
    }

    // MARK: - Building

    private func rebuild(_ input: RegistryInput) async {
        let now = Date()
        let index = max(input.index, view.floorIndex)
        var services = input.instances.flatMap { CatalogBuilder.services(of: $0, routeServicePorts: routeServicePorts) }
        services += external.values.map { CatalogBuilder.services(of: $0, now: now) }
        // Stamp each entry: created when first seen, modified when its content changes.
        var stamps: [String: (create: UInt64, modify: UInt64, content: CatalogService)] = [:]
        for service in services {
            if let previous = entryStamps[service.id] {
                stamps[service.id] = (previous.create, previous.content == service ? previous.modify : index, service)
            } else {
                stamps[service.id] = (index, index, service)
            }
        }
        entryStamps = stamps
        services = services.map { service in
            var stamped = service
            let stamp = stamps[service.id]!
            stamped.createIndex = stamp.create
            stamped.modifyIndex = stamp.modify
            stamped.checks = stamped.checks.map { check in
                var check = check
                check.createIndex = stamp.create
                check.modifyIndex = stamp.modify
                return check
            }
            return stamped
        }.sorted { ($0.name, $0.node, $0.id) < ($1.name, $1.node, $1.id) }
        var nodes = CatalogBuilder.nodes(input.nodes)
        if !nodes.contains(where: { $0.name == localNode }) {
            nodes.append(CatalogNode(name: localNode, address: localAddress, meta: [:]))
        }

        // Which topics changed: compare a digest of each topic's answer with the last one.
        var content: [RegistryTopic: Int] = [:]
        var hasher = Hasher()
        var byName: [String: [CatalogService]] = [:]
        for service in services { byName[service.name, default: []].append(service) }
        content[.services] = {
            var hasher = Hasher()
            for name in byName.keys.sorted() {
                hasher.combine(name)
                hasher.combine(Set(byName[name]!.flatMap(\.tags)))
            }
            return hasher.finalize()
        }()
        for (name, entries) in byName {
            var serviceHasher = Hasher()
            serviceHasher.combine(entries)
            content[.service(name)] = serviceHasher.finalize()
        }
        hasher.combine(nodes)
        content[.nodes] = hasher.finalize()
        for node in nodes {
            var nodeHasher = Hasher()
            nodeHasher.combine(node)
            nodeHasher.combine(services.filter { $0.node == node.name })
            content[.node(node.name)] = nodeHasher.finalize()
        }
        var checksHasher = Hasher()
        checksHasher.combine(services.map(\.checks))
        checksHasher.combine(nodes)
        content[.checks] = checksHasher.finalize()

        var topicIndexes = view.topicIndexes
        for (topic, digest) in content where topicContent[topic] != digest {
            topicIndexes[topic] = index
        }
        // A topic that vanished (a service with no instance left) changed too; keep its index so it
        // never goes backwards.
        for topic in topicContent.keys where content[topic] == nil {
            topicIndexes[topic] = index
        }
        topicContent = content
        var declared: [String: [String]] = [:]
        for app in input.apps {
            for service in CatalogBuilder.declaredServices(of: app, routeServicePorts: routeServicePorts) { declared[service.name, default: []] += service.tags }
        }
        var newView = RegistryView(
            nodes: nodes, services: services, datacenter: datacenter, localNode: localNode, topicIndexes: topicIndexes,
            floorIndex: view.floorIndex)
        newView.declaredTags = declared
        view = newView
        for (id, waiter) in waiters where view.index(of: waiter.topic) > waiter.after {
            waiters.removeValue(forKey: id)
            waiter.continuation.resume()
        }
    }

    // MARK: - Agent API: registration

    /// `PUT /v1/agent/service/register`: adds or replaces a service on this node.
    public func register(_ service: ExternalService) async throws {
        try await save(service)
        checkTasks.removeValue(forKey: service.id)?.cancel()
        startChecks(of: service)
    }

    public func deregister(_ id: String) async throws {
        guard external[id] != nil else { throw FlotillaError.notFound("Unknown service ID \"\(id)\". Ensure that the service ID is passed, not the service name.") }
        let index = try await store.commit(StoreTransaction(mutations: [.delete(Self.externalPrefix + id)]))
        external[id] = nil
        checkTasks.removeValue(forKey: id)?.cancel()
        await rebuildAfterLocalWrite(index)
    }

    public func externalServices() -> [ExternalService] { external.values.sorted { $0.id < $1.id } }

    /// `PUT /v1/agent/check/pass|warn|fail|update/<id>`.
    public func updateCheck(_ checkID: String, status: CheckStatus, output: String) async throws {
        guard var service = external.values.first(where: { $0.checks.contains { $0.id == checkID } }),
            let index = service.checks.firstIndex(where: { $0.id == checkID })
        else { throw FlotillaError.notFound("Unknown check ID \"\(checkID)\". Ensure that the check ID is passed, not the check name.") }
        let now = Timestamp.format(Date())
        let wasCritical = service.checks[index].status == .critical
        service.checks[index].status = status
        service.checks[index].output = output
        service.checks[index].updatedAt = now
        service.checks[index].criticalSince = status == .critical ? (wasCritical ? service.checks[index].criticalSince : now) : nil
        try await save(service)
    }

    private func save(_ service: ExternalService) async throws {
        let index = try await store.commit(StoreTransaction(mutations: [.put(Self.externalPrefix + service.id, try StateCodec.encode(service))]))
        external[service.id] = service
        await rebuildAfterLocalWrite(index)
    }

    private func rebuildAfterLocalWrite(_ index: UInt64) async {
        var input = await source.registryInput()
        input.index = max(input.index, index)
        await rebuild(input)
    }

    // MARK: - Checks of external services

    private func startChecks(of service: ExternalService) {
        guard let prober, service.checks.contains(where: { $0.http != nil || $0.tcp != nil }) else { return }
        let serviceID = service.id
        checkTasks[service.id] = Task {
            await withDiscardingTaskGroup { group in
                for check in service.checks where check.http != nil || check.tcp != nil {
                    group.addTask {
                        while !Task.isCancelled {
                            let began = ContinuousClock.now
                            let outcome: (passed: Bool, output: String)
                            if let url = check.http {
                                outcome = await prober.probeHTTP(url: url, timeoutSeconds: check.timeoutSeconds)
                            } else {
                                let (host, port) = Self.hostPort(check.tcp ?? "")
                                outcome = await prober.probeTCP(host: host, port: port, timeoutSeconds: check.timeoutSeconds)
                            }
                            if Task.isCancelled { return }
                            await self.recordProbe(serviceID: serviceID, checkID: check.id, outcome)
                            try? await Task.sleep(until: began + .milliseconds(Int64(check.intervalSeconds * 1000)))
                        }
                    }
                }
            }
        }
    }

    private func recordProbe(serviceID: String, checkID: String, _ outcome: (passed: Bool, output: String)) async {
        guard let service = external[serviceID], let check = service.checks.first(where: { $0.id == checkID }) else { return }
        let status: CheckStatus = outcome.passed ? .passing : .critical
        guard status != check.status || outcome.output != check.output else { return }
        try? await updateCheck(checkID, status: status, output: outcome.output)
    }

    static func hostPort(_ text: String) -> (String, Int) {
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]) else { return (text, 0) }
        return (String(text[..<colon]).trimmingCharacters(in: CharacterSet(charactersIn: "[]")), port)
    }
}

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
    /// Nodes that are down: still in the catalog, with a critical `serfHealth` (as Consul keeps a
    /// failed member until it is removed).
    public var downNodes: [NodeInfo] = []
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

/// An HTTP check as Consul describes it.
public struct HTTPCheckRequest: Sendable {
    public var url: String
    public var method: String
    public var headers: [String: [String]]
    public var body: String?
    /// False (Consul's default): the instance's certificate is verified.
    public var tlsSkipVerify: Bool
}

/// Runs the checks of externally registered services and of the node (HTTP, TCP and commands);
/// the agent provides it.
public protocol CheckProber: Sendable {
    func probeHTTP(_ request: HTTPCheckRequest, timeoutSeconds: Double) async -> (passed: Bool, output: String)
    func probeTCP(host: String, port: Int, timeoutSeconds: Double) async -> (passed: Bool, output: String)
    func probeCommand(_ arguments: [String], timeoutSeconds: Double) async -> (passed: Bool, output: String)
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
    /// The apps that declare each of those services.
    public var declaredApps: [String: Set<String>] = [:]

    /// The index to report for a topic: when its answer last changed (never 0, never backwards).
    public func index(of topic: RegistryTopic) -> UInt64 { max(1, topicIndexes[topic] ?? floorIndex) }

    public func services(named name: String) -> [CatalogService] { services.filter { $0.name == name } }
    public func node(named name: String) -> CatalogNode? { nodes.first { $0.name == name } }

    /// Checks on nodes beyond `serfHealth`: registered without a service, and node maintenance.
    public var extraNodeChecks: [String: [CatalogCheck]] = [:]

    /// `serfHealth` for each node: passing while its agent renews its record, critical once down.
    public func nodeCheck(_ node: CatalogNode) -> CatalogCheck {
        CatalogCheck(
            node: node.name, checkID: CatalogBuilder.nodeCheckID, name: "Serf Health Status", status: node.alive ? .passing : .critical, notes: "",
            output: node.alive ? "Agent alive and reachable" : "Agent not live or unreachable", serviceID: "", serviceName: "", serviceTags: [],
            type: "", createIndex: 1, modifyIndex: 1)
    }

    /// Every check of a node: `serfHealth`, then the node's own checks.
    public func checks(ofNode node: CatalogNode) -> [CatalogCheck] {
        [nodeCheck(node)] + (extraNodeChecks[node.name] ?? [])
    }

    /// A service entry's health as Consul's health endpoints judge it: the worst of its own checks
    /// and its node's.
    public func status(of entry: CatalogService) -> CheckStatus {
        let nodeDown = node(named: entry.node)?.alive == false
        return max(entry.status, nodeDown ? .critical : .passing, (extraNodeChecks[entry.node] ?? []).map(\.status).max() ?? .passing)
    }

    /// Every check anywhere, node checks first.
    public var allChecks: [CatalogCheck] { nodes.flatMap(checks(ofNode:)) + services.flatMap(\.checks) }
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
    /// Checks registered on a node rather than a service, by check id.
    private var nodeChecks: [String: NodeCheckRecord] = [:]
    /// Nodes registered through the catalog API.
    private var externalNodes: [String: ExternalNode] = [:]
    /// Services in maintenance mode (by service id), and the node's (key "").
    private var maintenance: [String: MaintenanceRecord] = [:]
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
    static let nodeChecksPrefix = "registry/checks/"
    static let externalNodesPrefix = "registry/nodes/"
    static let maintenancePrefix = "registry/maintenance/"
    public static let nodeMaintenanceCheckID = "_node_maintenance"
    public static func serviceMaintenanceCheckID(_ serviceID: String) -> String { "_service_maintenance:\(serviceID)" }
    /// Node checks are one node's: two nodes may each have a check of the same id.
    static func nodeCheckKey(_ node: String, _ checkID: String) -> String { node + "/" + checkID }

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
        for record in StateCodec.decodeAll(NodeCheckRecord.self, from: try await store.list(prefix: Self.nodeChecksPrefix).entries) {
            nodeChecks[Self.nodeCheckKey(record.node, record.check.id)] = record
        }
        for node in StateCodec.decodeAll(ExternalNode.self, from: try await store.list(prefix: Self.externalNodesPrefix).entries) {
            externalNodes[node.name] = node
        }
        for record in StateCodec.decodeAll(MaintenanceRecord.self, from: try await store.list(prefix: Self.maintenancePrefix).entries) {
            maintenance[record.serviceID ?? ""] = record
        }
        view.floorIndex = max(1, listing.index)
        loaded = true
        await rebuild(await source.registryInput())
        for service in external.values { startChecks(of: service) }
        for record in nodeChecks.values where record.node == localNode { startProbe(owner: nil, check: record.check) }
    }

    private func followSource() async {
        var generation: UInt64 = 0
        while !Task.isCancelled && !Task.isShuttingDownGracefully {
            let seen = generation
            let next = try? await cancelWhenGracefulShutdown { await self.source.waitForChange(after: seen) }
            guard let next else { return }
            generation = next
            let began = ContinuousClock.now
            await rebuild(await source.registryInput())
            // A rebuild reads every instance: under a stream of changes (ten thousand starting)
            // the registry takes at most a quarter of a core, and the changes that arrive
            // meanwhile share the next rebuild (at most 250 ms later). A quiet registry, or a
            // small one, rebuilds at once.
            let took = ContinuousClock.now - began
            if took > .milliseconds(1) { try? await Task.sleep(for: min(took * 3, .milliseconds(250))) }
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
        var expiredNodeChecks: [NodeCheckRecord] = []
        for record in nodeChecks.values {
            let check = record.check
            if let ttl = check.ttlSeconds, check.status != .critical, let at = Timestamp.parse(check.updatedAt), now.timeIntervalSince(at) > ttl {
                var updated = record
                updated.check.status = .critical
                updated.check.output = "TTL expired: no update for \(Int(ttl)) s"
                updated.check.criticalSince = Timestamp.format(now)
                expiredNodeChecks.append(updated)
            }
        }
        do {
            for id in Set(doomed) {
                logger.info("deregistering \(id): critical for longer than DeregisterCriticalServiceAfter")
                try await deregister(id)
            }
            for service in changed where !doomed.contains(service.id) { try await save(service) }
            for record in expiredNodeChecks { try await saveNodeCheck(record) }
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
        // Maintenance mode set through the agent API: a critical check on the service.
        for (position, service) in services.enumerated() {
            guard let record = maintenance[service.id] else { continue }
            let checkID = Self.serviceMaintenanceCheckID(service.id)
            guard !service.checks.contains(where: { $0.checkID == checkID }) else { continue }
            services[position].checks.append(
                CatalogCheck(
                    node: service.node, checkID: checkID, name: "Service Maintenance Mode", status: .critical, notes: record.reason,
                    output: record.reason, serviceID: service.id, serviceName: service.name, serviceTags: service.tags, type: "maintenance",
                    createIndex: 0, modifyIndex: 0))
        }
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
        nodes += CatalogBuilder.nodes(input.downNodes.filter { down in !input.nodes.contains { $0.name == down.name } }, alive: false)
        nodes.sort { $0.name < $1.name }
        if !nodes.contains(where: { $0.name == localNode }) {
            nodes.append(CatalogNode(name: localNode, address: localAddress, meta: [:], isAgent: true))
        }
        for node in externalNodes.values.sorted(by: { $0.name < $1.name }) where !nodes.contains(where: { $0.name == node.name }) {
            nodes.append(CatalogNode(name: node.name, address: node.address, meta: node.meta))
        }
        var extraNodeChecks: [String: [CatalogCheck]] = [:]
        for record in nodeChecks.values.sorted(by: { $0.check.id < $1.check.id }) {
            let check = CatalogBuilder.applyTTL(record.check, now: now)
            extraNodeChecks[record.node, default: []].append(
                CatalogCheck(
                    node: record.node, checkID: check.id, name: check.name, status: check.status, notes: check.notes, output: check.output,
                    serviceID: "", serviceName: "", serviceTags: [], type: check.type, createIndex: index, modifyIndex: index))
        }
        if let record = maintenance[""] {
            extraNodeChecks[localNode, default: []].append(
                CatalogCheck(
                    node: localNode, checkID: Self.nodeMaintenanceCheckID, name: "Node Maintenance Mode", status: .critical, notes: record.reason,
                    output: record.reason, serviceID: "", serviceName: "", serviceTags: [], type: "maintenance", createIndex: index,
                    modifyIndex: index))
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
        var nodeChecksHasher = Hasher()
        for name in extraNodeChecks.keys.sorted() {
            nodeChecksHasher.combine(name)
            nodeChecksHasher.combine(extraNodeChecks[name]!.map { [$0.checkID, $0.status.rawValue, $0.output, $0.notes] })
        }
        let nodeChecksDigest = nodeChecksHasher.finalize()
        for (name, entries) in byName {
            var serviceHasher = Hasher()
            serviceHasher.combine(entries)
            // Health answers carry the node's checks too.
            if entries.contains(where: { extraNodeChecks[$0.node] != nil }) { serviceHasher.combine(nodeChecksDigest) }
            content[.service(name)] = serviceHasher.finalize()
        }
        hasher.combine(nodes)
        content[.nodes] = hasher.finalize()
        for node in nodes {
            var nodeHasher = Hasher()
            nodeHasher.combine(node)
            nodeHasher.combine(services.filter { $0.node == node.name })
            if extraNodeChecks[node.name] != nil { nodeHasher.combine(nodeChecksDigest) }
            content[.node(node.name)] = nodeHasher.finalize()
        }
        var checksHasher = Hasher()
        checksHasher.combine(services.map(\.checks))
        checksHasher.combine(nodes)
        checksHasher.combine(nodeChecksDigest)
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
        var declaredApps: [String: Set<String>] = [:]
        for app in input.apps {
            for service in CatalogBuilder.declaredServices(of: app, routeServicePorts: routeServicePorts) {
                declared[service.name, default: []] += service.tags
                declaredApps[service.name, default: []].insert(app.id.path)
            }
        }
        var newView = RegistryView(
            nodes: nodes, services: services, datacenter: datacenter, localNode: localNode, topicIndexes: topicIndexes,
            floorIndex: view.floorIndex)
        newView.declaredTags = declared
        newView.declaredApps = declaredApps
        newView.extraNodeChecks = extraNodeChecks
        view = newView
        for (id, waiter) in waiters where view.index(of: waiter.topic) > waiter.after {
            waiters.removeValue(forKey: id)
            waiter.continuation.resume()
        }
    }

    // MARK: - Agent API: registration

    /// `PUT /v1/agent/service/register` (and services from `/v1/catalog/register`): adds or
    /// replaces a service.
    public func register(_ service: ExternalService) async throws {
        try await save(service)
        stopProbes(ofService: service.id)
        startChecks(of: service)
    }

    public func deregister(_ id: String) async throws {
        guard external[id] != nil else { throw FlotillaError.notFound("Unknown service ID \"\(id)\". Ensure that the service ID is passed, not the service name.") }
        let index = try await store.commit(
            StoreTransaction(mutations: [.delete(Self.externalPrefix + id), .delete(Self.maintenancePrefix + "service/" + id)]))
        external[id] = nil
        maintenance[id] = nil
        stopProbes(ofService: id)
        await rebuildAfterLocalWrite(index)
    }

    public func externalServices() -> [ExternalService] { external.values.sorted { $0.id < $1.id } }

    /// `PUT /v1/agent/check/register`: a check on one of the services registered here, or on the
    /// node when `serviceID` is nil. A check with the same id is replaced.
    public func registerCheck(_ check: ExternalCheck, serviceID: String?) async throws {
        if let serviceID {
            guard var service = external[serviceID] else { throw FlotillaError.notFound("ServiceID \"\(serviceID)\" does not exist") }
            service.checks.removeAll { $0.id == check.id }
            service.checks.append(check)
            try await register(service)
            return
        }
        if nodeChecks[Self.nodeCheckKey(localNode, check.id)] == nil, let owner = external.values.first(where: { $0.node == localNode && $0.checks.contains { $0.id == check.id } }) {
            throw FlotillaError.badRequest("check \"\(check.id)\" belongs to service \"\(owner.id)\"; deregister it first")
        }
        let record = NodeCheckRecord(node: localNode, check: check)
        try await saveNodeCheck(record)
        checkTasks.removeValue(forKey: Self.probeKey(serviceID: nil, checkID: check.id))?.cancel()
        startProbe(owner: nil, check: check)
    }

    /// `PUT /v1/agent/check/deregister/<id>`.
    public func deregisterCheck(_ checkID: String, node: String? = nil) async throws {
        let key = Self.nodeCheckKey(node ?? localNode, checkID)
        if nodeChecks[key] != nil {
            let index = try await store.commit(StoreTransaction(mutations: [.delete(Self.nodeChecksPrefix + key)]))
            nodeChecks[key] = nil
            checkTasks.removeValue(forKey: Self.probeKey(serviceID: nil, checkID: checkID))?.cancel()
            await rebuildAfterLocalWrite(index)
            return
        }
        guard var service = external.values.first(where: { $0.node == (node ?? localNode) && $0.checks.contains { $0.id == checkID } }) else {
            throw FlotillaError.notFound("Unknown check ID \"\(checkID)\". Ensure that the check ID is passed, not the check name.")
        }
        service.checks.removeAll { $0.id == checkID }
        try await register(service)
    }

    /// `PUT /v1/agent/service/maintenance/<id>` (a service of any kind: an app's instance or one
    /// registered here) and `PUT /v1/agent/maintenance` (`serviceID` nil: the node). Enabling
    /// twice keeps the first reason, as Consul does.
    public func setMaintenance(serviceID: String?, enabled: Bool, reason: String?) async throws {
        let key = serviceID ?? ""
        if let serviceID, !view.services.contains(where: { $0.id == serviceID }) {
            throw FlotillaError.notFound("No service registered with ID \"\(serviceID)\"")
        }
        let storeKey = Self.maintenancePrefix + (serviceID.map { "service/" + $0 } ?? "node")
        if enabled {
            guard maintenance[key] == nil else { return }
            let what = serviceID == nil ? "node" : "service"
            let text = (reason ?? "").isEmpty
                ? "Maintenance mode is enabled for this \(what), but no reason was provided. This is a default message." : reason!
            let record = MaintenanceRecord(serviceID: serviceID, reason: text)
            let index = try await store.commit(StoreTransaction(mutations: [.put(storeKey, try StateCodec.encode(record))]))
            maintenance[key] = record
            await rebuildAfterLocalWrite(index)
        } else {
            guard maintenance[key] != nil else { return }
            let index = try await store.commit(StoreTransaction(mutations: [.delete(storeKey)]))
            maintenance[key] = nil
            await rebuildAfterLocalWrite(index)
        }
    }

    /// `PUT /v1/catalog/register`: a node (created or updated unless `skipNodeUpdate`), and
    /// optionally a service on it and checks (whose status is as given: no agent runs them).
    public func catalogRegister(node: ExternalNode, skipNodeUpdate: Bool, service: ExternalService?, checks: [(check: ExternalCheck, serviceID: String?)]) async throws {
        if node.name != localNode && (!skipNodeUpdate || externalNodes[node.name] == nil) {
            let index = try await store.commit(
                StoreTransaction(mutations: [.put(Self.externalNodesPrefix + node.name, try StateCodec.encode(node))]))
            externalNodes[node.name] = node
            await rebuildAfterLocalWrite(index)
        }
        var services: [String: ExternalService] = [:]
        if let service { services[service.id] = service }
        for (check, serviceID) in checks {
            if let serviceID {
                guard var owner = services[serviceID] ?? external[serviceID], owner.node == node.name else {
                    throw FlotillaError.notFound("ServiceID \"\(serviceID)\" does not exist on node \"\(node.name)\"")
                }
                owner.checks.removeAll { $0.id == check.id }
                owner.checks.append(check)
                services[serviceID] = owner
            } else {
                try await saveNodeCheck(NodeCheckRecord(node: node.name, check: check))
            }
        }
        for service in services.values { try await register(service) }
    }

    /// `PUT /v1/catalog/deregister`: one service, one check, or a whole external node with all it had.
    public func catalogDeregister(node: String, serviceID: String?, checkID: String?) async throws {
        if let serviceID {
            guard external[serviceID]?.node == node else { throw FlotillaError.notFound("Unknown service \"\(serviceID)\" on node \"\(node)\"") }
            try await deregister(serviceID)
        } else if let checkID {
            try await deregisterCheck(checkID, node: node)
        } else {
            guard node != localNode else { throw FlotillaError.badRequest("node \(node) runs this agent; deregister its services instead") }
            guard externalNodes[node] != nil else { throw FlotillaError.notFound("Unknown node \"\(node)\"") }
            let services = external.values.filter { $0.node == node }.map(\.id)
            let checks = nodeChecks.filter { $0.value.node == node }.map(\.key)
            var mutations: [StoreMutation] = [.delete(Self.externalNodesPrefix + node)]
            mutations += services.flatMap { [.delete(Self.externalPrefix + $0), .delete(Self.maintenancePrefix + "service/" + $0)] }
            mutations += checks.map { .delete(Self.nodeChecksPrefix + $0) }
            let index = try await store.commit(StoreTransaction(mutations: mutations))
            // Committed: now it is gone from what readers see.
            for id in services {
                external[id] = nil
                maintenance[id] = nil
                stopProbes(ofService: id)
            }
            for key in checks { nodeChecks[key] = nil }
            externalNodes[node] = nil
            await rebuildAfterLocalWrite(index)
        }
    }

    /// `PUT /v1/agent/check/pass|warn|fail|update/<id>`, and the results of probes.
    public func updateCheck(_ checkID: String, status: CheckStatus, output: String, serviceID: String? = nil) async throws {
        func updated(_ check: ExternalCheck) -> ExternalCheck {
            var check = check
            let now = Timestamp.format(Date())
            let wasCritical = check.status == .critical
            check.status = status
            check.output = output
            check.updatedAt = now
            check.criticalSince = status == .critical ? (wasCritical ? check.criticalSince : now) : nil
            return check
        }
        if serviceID == nil, var record = nodeChecks[Self.nodeCheckKey(localNode, checkID)] {
            record.check = updated(record.check)
            try await saveNodeCheck(record)
            return
        }
        let owner = serviceID.flatMap { external[$0] } ?? external.values.first { $0.node == localNode && $0.checks.contains { $0.id == checkID } }
        guard var service = owner,
            let index = service.checks.firstIndex(where: { $0.id == checkID })
        else { throw FlotillaError.notFound("Unknown check ID \"\(checkID)\". Ensure that the check ID is passed, not the check name.") }
        service.checks[index] = updated(service.checks[index])
        try await save(service)
    }

    private func save(_ service: ExternalService) async throws {
        let index = try await store.commit(StoreTransaction(mutations: [.put(Self.externalPrefix + service.id, try StateCodec.encode(service))]))
        external[service.id] = service
        await rebuildAfterLocalWrite(index)
    }

    private func saveNodeCheck(_ record: NodeCheckRecord) async throws {
        let key = Self.nodeCheckKey(record.node, record.check.id)
        let index = try await store.commit(StoreTransaction(mutations: [.put(Self.nodeChecksPrefix + key, try StateCodec.encode(record))]))
        nodeChecks[key] = record
        await rebuildAfterLocalWrite(index)
    }

    private func rebuildAfterLocalWrite(_ index: UInt64) async {
        var input = await source.registryInput()
        input.index = max(input.index, index)
        await rebuild(input)
    }

    // MARK: - Checks the agent runs

    static func probeKey(serviceID: String?, checkID: String) -> String {
        serviceID.map { "service:\($0)/\(checkID)" } ?? "node/\(checkID)"
    }

    private func startChecks(of service: ExternalService) {
        for check in service.checks { startProbe(owner: service.id, check: check) }
    }

    private func stopProbes(ofService serviceID: String) {
        for key in checkTasks.keys where key.hasPrefix("service:\(serviceID)/") { checkTasks.removeValue(forKey: key)?.cancel() }
    }

    /// Runs one HTTP, TCP or command check every interval until it is cancelled.
    private func startProbe(owner serviceID: String?, check: ExternalCheck) {
        guard let prober, check.isProbed else { return }
        let key = Self.probeKey(serviceID: serviceID, checkID: check.id)
        checkTasks[key] = Task {
            while !Task.isCancelled {
                let began = ContinuousClock.now
                let outcome: (passed: Bool, output: String)
                if let url = check.http {
                    let request = HTTPCheckRequest(
                        url: url, method: check.method ?? "GET", headers: check.header ?? [:], body: check.body,
                        tlsSkipVerify: check.tlsSkipVerify ?? false)
                    outcome = await prober.probeHTTP(request, timeoutSeconds: check.timeoutSeconds)
                } else if let arguments = check.args {
                    outcome = await prober.probeCommand(arguments, timeoutSeconds: check.timeoutSeconds)
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

    private func recordProbe(serviceID: String?, checkID: String, _ outcome: (passed: Bool, output: String)) async {
        let current = serviceID.map { external[$0]?.checks.first { $0.id == checkID } } ?? nodeChecks[Self.nodeCheckKey(localNode, checkID)]?.check
        guard let check = current else { return }
        let status: CheckStatus = outcome.passed ? .passing : .critical
        guard status != check.status || outcome.output != check.output else { return }
        try? await updateCheck(checkID, status: status, output: outcome.output, serviceID: serviceID)
    }

    static func hostPort(_ text: String) -> (String, Int) {
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]) else { return (text, 0) }
        return (String(text[..<colon]).trimmingCharacters(in: CharacterSet(charactersIn: "[]")), port)
    }
}

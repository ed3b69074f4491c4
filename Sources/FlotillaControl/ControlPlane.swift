public import FlotillaCore
import FlotillaScheduler
public import FlotillaStore
import Foundation
public import Logging
public import ServiceLifecycle

/// The scheduler's side of Flotilla: holds desired state (apps, versions, deployments), turns every
/// change into a durable transaction and a deployment, and drives instances towards it through the
/// pure `Reconciler` and `Placer`. Reads are served from memory; every write goes to the store first.
public actor ControlPlane: Service {
    let store: any StateStore
    let events: EventBus
    private let logger: Logger
    let lock = AsyncLock()
    /// Where `portDefinitions[].port: 0` service ports come from (Marathon's local_port_min/max).
    public nonisolated let servicePortRange: ClosedRange<Int>
    /// Whether a user an app asks to run as exists where it will run.
    private let userExists: @Sendable (String) -> Bool

    // Everything a read shows; each change bumps `generation`, so readers can cache what they
    // render from a snapshot until the state moves.
    // The five that an app's JSON is made of also say which apps they touched (`Tracked`), so
    // `/v2/apps` re-renders only those (`appListing`, `appDetails`).
    var apps = Tracked<AppID, AppRecord>.byApp() { didSet { if !draining { generation &+= 1 } } }
    private var specs = Tracked.specs() { didSet { if !draining { generation &+= 1 } } }
    private var statuses = Tracked.statuses() { didSet { if !draining { generation &+= 1 } } }
    private var deployments = Tracked.deployments() { didSet { if !draining { generation &+= 1 } } }
    private var deploymentResults: [String: DeploymentResult] = [:]
    /// Groups with a record of their own (dependencies, version); others are implied by app ids.
    var groupRecords: [GroupID: GroupRecord] = [:] { didSet { generation &+= 1 } }
    /// Failed deployments whose rollback is being started: still reported as running.
    private var rollingBack: [String: Deployment] = [:]
    private var failures = Tracked<AppID, TaskFailure>.byApp() { didSet { if !draining { generation &+= 1 } } }
    /// Per app (by flat name): the generation its JSON last changed at; `stampEpoch` for all.
    private var appStamps: [String: UInt64] = [:]
    private var stampEpoch: UInt64 = 0
    /// Set while touches are drained: that changes nothing a reader sees.
    private var draining = false
    /// Apps (by flat name) touched since a reconcile pass last planned them.
    private var dirtyApps: Set<String> = []
    /// Apps whose plan changes with time alone (a warm set's keep-alive): planned every pass.
    private var timedApps: Set<String> = []
    /// Every app is planned in the next pass (after a reload or a change of nodes).
    private var replanAll = true
    private var lastFullPass = ContinuousClock.now
    private let fullPassInterval: Duration = .seconds(60)
    private var nodes: [String: NodeInfo] = [:] {
        didSet {
            generation &+= 1
            replanAll = true  // placement has other room
        }
    }
    /// Nodes that registered once and whose live record is gone (their lease ended): down.
    private var downNodes: [String: NodeInfo] = [:] { didSet { generation &+= 1 } }
    private var backoffs: [AppID: Backoff] = [:]
    private var queue: [AppID: QueueEntry] = [:] { didSet { generation &+= 1 } }
    private var generation: UInt64 = 0 {
        didSet {
            for waiter in generationWaiters.values { waiter.resume(returning: generation) }
            generationWaiters.removeAll()
        }
    }
    private var generationWaiters: [UInt64: CheckedContinuation<UInt64, Never>] = [:]
    private var nextGenerationWaiter: UInt64 = 0
    private var index: UInt64 = 0
    private var lastVersion = ""
    private var loaded = false
    /// A commit failed without a definite answer (the store did not reply): memory may lag the
    /// store, and is read afresh before the next pass or change.
    private var stale = false
    /// Instance records still at their old key (`instances/<id>`): the leader moves them.
    private var legacyInstanceKeys: [String] = []
    private var generator = SystemRandomNumberGenerator()
    /// Whether this agent schedules. A lone agent always does; in a cluster the leader election
    /// says (`setRole`), and a follower keeps its memory in step with the store instead.
    public private(set) var leading = true
    /// While leading in a cluster: the condition every commit carries, which fails once another
    /// candidate holds the lead, so a deposed leader can never write.
    private var leaderGuard: StorePrecondition?
    /// When this agent took the lead: node loss is judged only after a whole node lease has
    /// passed under it (a live node has renewed its record by then).
    private var leadingSince: Date?
    /// How long a node's record outlives its last heartbeat; set by the server in a cluster.
    public var nodeLossGrace: Duration = .seconds(12)
    public func setNodeLossGrace(_ grace: Duration) { nodeLossGrace = grace }

    private let (wakeups, wakeupContinuation) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))

    /// How often a pass runs with no change to prompt it (backoffs that end, queued apps).
    private let tickInterval: Duration
    /// Whether apps may use `secrets` (the agent has a secrets key), as Marathon's secrets feature.
    private let secretsEnabled: Bool

    public init(
        store: any StateStore, events: EventBus, logger: Logger, servicePortRange: ClosedRange<Int> = 10_000...20_000,
        userExists: (@Sendable (String) -> Bool)? = nil, tickInterval: Duration = .seconds(1), secretsEnabled: Bool = false
    ) {
        self.tickInterval = tickInterval
        self.secretsEnabled = secretsEnabled
        self.servicePortRange = servicePortRange
        self.userExists = userExists ?? { getpwnam($0) != nil }
        self.store = store
        self.events = events
        self.logger = logger
    }

    // MARK: - Service

    public func run() async throws {
        try await load()
        await withDiscardingTaskGroup { group in
            group.addTask { await self.watchStatuses() }
            group.addTask { await self.watchNodes() }
            group.addTask { await self.followStore() }
            group.addTask { await self.reconcileLoop() }
            group.addTask { await self.tick() }
        }
    }

    /// Reads everything the control plane owns from the store. Called once at start.
    public func load() async throws {
        guard !loaded else { return }
        try await reload()
        logger.info("loaded \(apps.count) app(s), \(specs.count) instance(s), \(deployments.count) deployment(s) at index \(index)")
    }

    /// Reads the state again when memory may not match the store (not loaded yet, or a commit that
    /// got no answer).
    func refreshIfNeeded() async throws {
        guard !loaded || stale else { return }
        try await reload()
        if stale { logger.notice("state read again after a commit the store did not confirm (index \(index))") }
        stale = false
    }

    /// Replaces memory with the store's state, all of it read at one index and swapped in at once.
    private func reload() async throws {
        let prefixes = [
            StateKeys.apps, StateKeys.instances, StateKeys.statuses, StateKeys.deployments, StateKeys.deploymentResults, StateKeys.failures,
            StateKeys.nodes, StateKeys.groups,
        ]
        let snapshot = try await store.snapshot(prefixes: prefixes)
        func all<Value: Decodable>(_ type: Value.Type, _ prefix: String) -> [Value] {
            StateCodec.decodeAll(type, from: snapshot[prefix]) { key, error in
                self.logger.error("skipping unreadable record \(key): \(error)")
            }
        }
        apps.replaceAll(with: Dictionary(all(AppRecord.self, StateKeys.apps).map { ($0.id, $0) }, uniquingKeysWith: { $1 }))
        specs.replaceAll(with: Dictionary(all(InstanceSpec.self, StateKeys.instances).map { ($0.id, $0) }, uniquingKeysWith: { $1 }))
        // Records an earlier version kept as `instances/<id>` move under their node's prefix.
        legacyInstanceKeys = snapshot[StateKeys.instances].map(\.key).filter { !$0.dropFirst(StateKeys.instances.count).contains("/") }
        statuses.replaceAll(with: Dictionary(all(InstanceStatus.self, StateKeys.statuses).map { ($0.id, $0) }, uniquingKeysWith: { $1 }))
        deployments.replaceAll(with: Dictionary(all(Deployment.self, StateKeys.deployments).map { ($0.id, $0) }, uniquingKeysWith: { $1 }))
        deploymentResults = Dictionary(all(DeploymentResult.self, StateKeys.deploymentResults).map { ($0.id, $0) }, uniquingKeysWith: { $1 })
        failures.replaceAll(with: Dictionary(all(TaskFailure.self, StateKeys.failures).map { ($0.appID, $0) }, uniquingKeysWith: { $1 }))
        nodes = Dictionary(all(NodeInfo.self, StateKeys.nodes).map { ($0.name, $0) }, uniquingKeysWith: { $1 })
        groupRecords = Dictionary(all(GroupRecord.self, StateKeys.groups).map { ($0.id, $0) }, uniquingKeysWith: { $1 })
        index = snapshot.index
        lastVersion = max(lastVersion, apps.values.map(\.version).max() ?? "")
        loaded = true
    }

    // MARK: - Leadership

    /// Told by the leader election. Becoming leader reads the whole state afresh (the previous
    /// leader wrote it) and resumes its deployments from there; following stops scheduling.
    public func setRole(_ role: LeaderElection.Role) async {
        await lock.acquire()
        defer { lock.release() }
        switch role {
        case .leader(let guardCondition):
            do {
                try await reload()
            } catch {
                logger.error("taking the lead, could not read the state: \(error); the next pass reads it again")
                loaded = false
            }
            // Backoffs and the launch queue are the old leader's memory: they start again here.
            backoffs.removeAll()
            leaderGuard = guardCondition
            leadingSince = Date()
            leading = true
            logger.notice("scheduling: \(apps.count) app(s), \(specs.count) instance(s), \(deployments.count) deployment(s) resumed")
            wake()
        case .follower(let leader):
            if leading { logger.notice("following \(leader?.name ?? "no leader yet"): this node schedules nothing") }
            leading = false
            leaderGuard = nil
            leadingSince = nil
        }
    }

    /// While following, memory tracks the store so that reads, the registry, DNS and the proxy on
    /// this node show the cluster's state: one read of the whole state, then the change feed from
    /// that index, each commit's changes applied as they come (only the changed records are
    /// decoded). A feed that fell behind a compaction, or broke, starts again with a read.
    private func followStore() async {
        while !Task.isCancelled && !Task.isShuttingDownGracefully {
            if leading {
                try? await Task.sleep(for: .milliseconds(500))
                continue
            }
            do {
                await lock.acquire()
                do {
                    if !leading { try await reload() }
                } catch {
                    lock.release()
                    throw error
                }
                let from = index
                lock.release()
                let feed = store.watch(prefix: "", after: from)
                // Cancelled by the agent's graceful shutdown (the feed itself may stay quiet for long).
                try await cancelWhenGracefulShutdown {
                    for try await batch in feed {
                        guard await self.applyFollowed(batch) else { return }
                    }
                }
            } catch is CancellationError {
                return
            } catch StoreError.compacted {
                logger.notice("the store's change feed passed a compaction: reading the state again")
            } catch {
                logger.error("following the store failed, retrying: \(error)")
                try? await Task.sleep(for: .milliseconds(500))
            }
        }
    }

    /// Applies one commit's changes while following; false once this agent leads (it stops following).
    private func applyFollowed(_ batch: [StoreEvent]) async -> Bool {
        await lock.acquire()
        defer { lock.release() }
        guard !leading else { return false }
        apply(batch)
        return true
    }

    /// One commit's changes, as a follower applies them to memory.
    private func apply(_ batch: [StoreEvent]) {
        func decoded<Value: Decodable>(_ type: Value.Type, _ event: StoreEvent) -> Value? {
            guard event.kind == .put else { return nil }
            do {
                return try StateCodec.decode(type, from: event.entry.value)
            } catch {
                logger.error("skipping unreadable record \(event.key): \(error)")
                return nil
            }
        }
        func name(_ event: StoreEvent, after prefix: String) -> String { String(event.key.dropFirst(prefix.count)) }
        for event in batch {
            let key = event.key
            if key.hasPrefix(StateKeys.instances) {
                specs[StateKeys.instanceID(ofKey: key)] = decoded(InstanceSpec.self, event)
            } else if key.hasPrefix(StateKeys.statuses) {
                statuses[name(event, after: StateKeys.statuses)] = decoded(InstanceStatus.self, event)
            } else if key.hasPrefix(StateKeys.apps) {
                let flat = name(event, after: StateKeys.apps)
                if let record = decoded(AppRecord.self, event) {
                    apps[record.id] = record
                    lastVersion = max(lastVersion, record.version)
                } else if let id = apps.keys.first(where: { $0.flatName == flat }) {
                    apps[id] = nil
                }
            } else if key.hasPrefix(StateKeys.deployments) {
                deployments[name(event, after: StateKeys.deployments)] = decoded(Deployment.self, event)
            } else if key.hasPrefix(StateKeys.deploymentResults) {
                deploymentResults[name(event, after: StateKeys.deploymentResults)] = decoded(DeploymentResult.self, event)
            } else if key.hasPrefix(StateKeys.failures) {
                let flat = name(event, after: StateKeys.failures)
                if let failure = decoded(TaskFailure.self, event) {
                    failures[failure.appID] = failure
                } else if let id = failures.keys.first(where: { $0.flatName == flat }) {
                    failures[id] = nil
                }
            } else if key.hasPrefix(StateKeys.nodes) {
                nodes[name(event, after: StateKeys.nodes)] = decoded(NodeInfo.self, event)
            } else if key.hasPrefix(StateKeys.groups) {
                let flat = name(event, after: StateKeys.groups)
                if let group = decoded(GroupRecord.self, event) {
                    groupRecords[group.id] = group
                } else if let id = groupRecords.keys.first(where: { $0.flatName == flat }) {
                    groupRecords[id] = nil
                }
            }
        }
        if let last = batch.last { index = max(index, last.index) }
    }

    /// Nodes come and go (their records are held by leases): placement sees the current ones, and
    /// the API the ones that are down.
    private func watchNodes() async {
        while !Task.isCancelled && !Task.isShuttingDownGracefully {
            do {
                let snapshot = try await store.snapshot(prefixes: [StateKeys.nodes, StateKeys.nodeRecords])
                let fresh = Dictionary(
                    StateCodec.decodeAll(NodeInfo.self, from: snapshot[StateKeys.nodes]).map { ($0.name, $0) }, uniquingKeysWith: { $1 })
                let down = Dictionary(
                    StateCodec.decodeAll(NodeInfo.self, from: snapshot[StateKeys.nodeRecords]).filter { fresh[$0.name] == nil }.map { ($0.name, $0) },
                    uniquingKeysWith: { $1 })
                if down != downNodes {
                    for name in Set(down.keys).subtracting(downNodes.keys).sorted() { logger.warning("node \(name) is down: its record's lease ended") }
                    downNodes = down
                }
                if fresh != nodes {
                    nodes = fresh
                    if leading { wake() }
                }
                let seen = snapshot.index
                // "node" covers both prefixes.
                _ = try await cancelWhenGracefulShutdown { try await self.store.waitForChange(prefix: "node", after: seen, timeout: .seconds(5)) }
            } catch is CancellationError {
                return
            } catch {
                logger.error("node watch failed, retrying: \(error)")
                try? await Task.sleep(for: .milliseconds(500))
            }
        }
    }

    /// The store index memory reflects (every commit of this leader, or the last reload of a follower).
    public func memoryIndex() -> UInt64 { index }

    /// Waits (up to `timeout`) until memory reflects the store at `target` or later: a follower
    /// that forwarded a write answers only once it can show it (read-your-writes).
    public func waitForIndex(_ target: UInt64, timeout: Duration) async {
        let deadline = ContinuousClock.now + timeout
        while index < target && ContinuousClock.now < deadline && !Task.isCancelled {
            try? await Task.sleep(for: .milliseconds(10))
        }
    }

    /// The nodes placement knows, for `flotilla nodes` and the API.
    public func knownNodes() -> [NodeInfo] { nodes.values.sorted { $0.name < $1.name } }

    /// Forgets a node that is down (decommissioned): it leaves `flotilla nodes` and the catalog.
    /// Its instances are settled by `unreachableStrategy` as before.
    public func forgetNode(_ name: String) async throws {
        await lock.acquire()
        defer { lock.release() }
        if nodes[name] != nil {
            throw FlotillaError.conflict(message: "node \(name) is up: stop its agent first (a node is forgotten only once it is down)", deploymentIDs: [])
        }
        guard downNodes[name] != nil else { throw FlotillaError.notFound("no node '\(name)' is known") }
        try await commit(preconditions: [.absent(StateKeys.node(name))], deletes: [StateKeys.nodeRecord(name)])
        downNodes[name] = nil
        logger.notice("forgot node \(name)")
    }

    // MARK: - Reads

    /// Changes whenever anything a read shows changes.
    public func currentGeneration() -> UInt64 { generation }

    /// Returns once the generation is above `seen` (at once if it already is, or on cancellation).
    public func waitForChange(after seen: UInt64) async -> UInt64 {
        if generation > seen || Task.isCancelled { return generation }
        nextGenerationWaiter += 1
        let id = nextGenerationWaiter
        return await withTaskCancellationHandler {
            await withCheckedContinuation { continuation in
                if generation > seen || Task.isCancelled {
                    continuation.resume(returning: generation)
                } else {
                    generationWaiters[id] = continuation
                }
            }
        } onCancel: {
            Task { await self.cancelGenerationWaiter(id) }
        }
    }

    private func cancelGenerationWaiter(_ id: UInt64) {
        generationWaiters.removeValue(forKey: id)?.resume(returning: generation)
    }

    /// The last snapshot made, good while the generation and index stay (with ten thousand
    /// instances a snapshot costs a few milliseconds; readers between two changes share one).
    private var lastSnapshot: ControlSnapshot?
    /// The instance ids of each app in `lastSnapshot` (by flat name).
    private var snapshotMembers: [String: Set<String>] = [:]

    public func snapshot() -> ControlSnapshot {
        if let lastSnapshot, lastSnapshot.generation == generation, lastSnapshot.index == index { return lastSnapshot }
        drainTouches()
        var instances: [String: Instance]
        if let lastSnapshot, stampEpoch <= lastSnapshot.generation {
            // The previous snapshot's instances, with those of the apps touched since joined anew
            // (the registry takes a snapshot on every change: ten thousand instances, one app moved).
            instances = lastSnapshot.instances
            for (flat, stamp) in appStamps where stamp > lastSnapshot.generation {
                for id in snapshotMembers[flat] ?? [] { instances[id] = nil }
                let ids = specs.members[flat] ?? []
                for id in ids {
                    if let spec = specs[id] { instances[id] = Instance(spec: spec, status: statuses[id]) }
                }
                snapshotMembers[flat] = ids.isEmpty ? nil : ids
            }
        } else {
            instances = [:]
            instances.reserveCapacity(specs.count)
            for (id, spec) in specs { instances[id] = Instance(spec: spec, status: statuses[id]) }
            snapshotMembers = specs.members
        }
        let snapshot = ControlSnapshot(
            apps: apps.dictionary, instances: instances, deployments: deployments.dictionary, failures: failures.dictionary, queue: queue,
            nodes: nodes, downNodes: downNodes, index: index, generation: generation)
        lastSnapshot = snapshot
        return snapshot
    }

    /// Folds what the tracked dictionaries touched into the per-app stamps.
    private func drainTouches() {
        draining = true
        defer { draining = false }
        for touches in [apps.drain(), specs.drain(), statuses.drain(), deployments.drain(), failures.drain()] {
            if touches.all {
                stampEpoch = generation
                appStamps.removeAll()
                replanAll = true
            }
            for name in touches.apps { appStamps[name] = generation }
            dirtyApps.formUnion(touches.apps)
        }
    }

    private func stamp(of id: AppID) -> UInt64 {
        max(stampEpoch, appStamps[id.flatName] ?? 0)
    }

    /// Every app, by id, with the stamp its JSON has now: a fragment rendered at an app's stamp
    /// is good until the stamp moves.
    public func appListing() -> AppListing {
        drainTouches()
        let sorted = apps.values.sorted { $0.id < $1.id }
        return AppListing(apps: sorted, stamps: sorted.map { stamp(of: $0.id) }, generation: generation)
    }

    /// What the JSON of these apps is made of (one pass over the instances), with their stamps.
    public func appDetails(_ ids: Set<AppID>) -> [AppID: AppDetail] {
        guard !ids.isEmpty else { return [:] }
        drainTouches()
        var details: [AppID: AppDetail] = [:]
        for id in ids {
            guard let record = apps[id] else { continue }
            details[id] = AppDetail(record: record, instances: [], deployments: [], failure: failures[id], stamp: stamp(of: id))
        }
        for (id, spec) in specs where details[spec.appID] != nil {
            details[spec.appID]!.instances.append(Instance(spec: spec, status: statuses[id]))
        }
        for deployment in deployments.values {
            for app in deployment.affectedApps where details[app] != nil { details[app]!.deployments.append(deployment) }
        }
        for id in details.keys {
            details[id]!.instances.sort { $0.spec.stagedAt < $1.spec.stagedAt }
            details[id]!.deployments.sort { $0.version < $1.version }
        }
        return details
    }

    /// An active deployment, or how a finished one ended.
    public func deploymentStatus(_ id: String) throws -> (active: Deployment?, result: DeploymentResult?) {
        if let active = deployments[id] ?? rollingBack[id] { return (active, nil) }
        if let result = deploymentResults[id] { return (nil, result) }
        throw FlotillaError.notFound("Deployment \(id) is neither running nor among the recently finished")
    }

    public func versions(of id: AppID) async throws -> [String] {
        guard apps[id] != nil else { throw FlotillaError.notFound("App '\(id)' does not exist") }
        let listing = try await store.list(prefix: StateKeys.versions(of: id))
        return listing.entries.map { String($0.key.dropFirst(StateKeys.versions(of: id).count)) }.sorted(by: >)
    }

    public func version(_ version: String, of id: AppID) async throws -> AppRecord {
        guard apps[id] != nil else { throw FlotillaError.notFound("App '\(id)' does not exist") }
        guard let entry = try await store.get(StateKeys.version(version, of: id)) else {
            throw FlotillaError.notFound("App '\(id)' has no version \(version)")
        }
        return try StateCodec.decode(AppRecord.self, from: entry.value)
    }

    // MARK: - Changes

    /// `POST /v2/apps`: a new app and the deployment that starts it.
    public func create(_ definition: AppDefinition, clientIP: String? = nil) async throws -> ChangeResult {
        await lock.acquire()
        defer { lock.release() }
        return try await self.createLocked(definition, clientIP: clientIP)
    }

    private func createLocked(_ requested: AppDefinition, clientIP: String?) async throws -> ChangeResult {
        try await applyLocked([AppChange(current: nil, definition: requested)], force: false, clientIP: clientIP, uri: "/v2/apps")
    }

    /// `PUT`/`PATCH /v2/apps/{id}`: merge `fields` over the current definition (or replace it when
    /// `partial` is false), roll back when the body names only a `version`, create when absent.
    public func update(_ id: AppID, fields: [String: JSONValue], partial: Bool, force: Bool, clientIP: String? = nil) async throws -> ChangeResult {
        await lock.acquire()
        defer { lock.release() }
        return try await self.updateLocked(id, fields: fields, partial: partial, force: force, clientIP: clientIP)
    }

    private func updateLocked(_ id: AppID, fields: [String: JSONValue], partial: Bool, force: Bool, clientIP: String?) async throws -> ChangeResult {
        try requireLoaded()
        if let idField = fields["id"]?.stringValue, let bodyID = try? AppID(idField), bodyID != id {
            throw FlotillaError.invalid([FieldError("/id", "the body's id '\(bodyID)' differs from the path's '\(id)'")])
        }
        let isRollback = fields["version"]?.stringValue != nil && fields.keys.allSatisfy({ $0 == "version" || $0 == "id" })
        guard let current = apps[id] else {
            if isRollback { throw FlotillaError.notFound("App '\(id)' does not exist, so it has no version to roll back to") }
            // Marathon creates the app when a PUT names one that does not exist.
            var object = fields
            object["id"] = .string(id.path)
            return try await createLocked(try AppDefinition.decode(object), clientIP: clientIP)
        }
        let definition: AppDefinition
        var restoredConfig: String?
        if isRollback, let wanted = fields["version"]?.stringValue {
            // Rollback: the definition as it was at that version, under a new version.
            guard let entry = try await store.get(StateKeys.version(wanted, of: id)) else {
                throw FlotillaError.notFound("App '\(id)' has no version \(wanted)")
            }
            let record = try StateCodec.decode(AppRecord.self, from: entry.value)
            definition = record.definition
            restoredConfig = record.configVersion
        } else {
            definition = try mergedDefinition(id, fields: fields, partial: partial)
        }
        return try await changeLocked(
            current, to: definition, restart: false, force: force, clientIP: clientIP, uri: "/v2/apps\(id)", configVersion: restoredConfig)
    }

    /// `POST /v2/apps/{id}/restart`: replace every instance, honouring the upgrade strategy.
    public func restart(_ id: AppID, force: Bool) async throws -> ChangeResult {
        await lock.acquire()
        defer { lock.release() }
        guard let current = self.apps[id] else { throw FlotillaError.notFound("App '\(id)' does not exist") }
        return try await self.changeLocked(current, to: current.definition, restart: true, force: force, clientIP: nil, uri: "/v2/apps\(id)/restart")
    }

    /// - Parameter configVersion: for a rollback, the config version being restored, so instances
    ///   still running that configuration (a warm blue-green set, the untouched part of a rolling
    ///   update) count as current and are kept.
    private func changeLocked(
        _ current: AppRecord, to requested: AppDefinition, restart: Bool, force: Bool, clientIP: String?, uri: String,
        configVersion restoredConfig: String? = nil
    ) async throws -> ChangeResult {
        try await applyLocked(
            [AppChange(current: current, definition: requested, restart: restart, restoredConfig: restoredConfig)], force: force,
            clientIP: clientIP, uri: uri)
    }

    /// One change to one app inside a deployment: a new app (`current` nil) or a new version of one.
    struct AppChange {
        var current: AppRecord?
        var definition: AppDefinition
        var restart = false
        /// For a rollback: the config version being restored.
        var restoredConfig: String?
    }

    /// Validates, commits and then shows a change of one or more apps as one deployment: every app
    /// gets its new version in the same transaction, or none does.
    /// - Parameter layers: the order in which apps start or change (Marathon's dependency order);
    ///   each layer is a deployment step that waits for the one before. Default: all at once.
    func applyLocked(
        _ requestedChanges: [AppChange], removals: [AppRecord] = [], layers: [[AppID]]? = nil, force: Bool, clientIP: String?, uri: String,
        extraPuts: [(String, any Encodable & Sendable)] = [], extraDeletes: [String] = [], version chosenVersion: String? = nil,
        publishPosts: Bool = true
    ) async throws -> ChangeResult {
        try requireLoaded()
        if stale { try await refreshIfNeeded() }
        var changes = requestedChanges
        guard !changes.isEmpty || !removals.isEmpty else {
            throw FlotillaError.invalid([FieldError("/", "nothing to change")])
        }
        var assigned: [AppID: AppDefinition] = [:]
        var preconditions: [StorePrecondition] = []
        var cancelled: Set<String> = []
        for removed in removals { cancelled.formUnion(try conflictingDeployments(for: removed.id, force: force)) }
        for index in changes.indices {
            let id = changes[index].definition.id
            if let current = changes[index].current {
                cancelled.formUnion(try conflictingDeployments(for: current.id, force: force))
            } else {
                if apps[id] != nil {
                    throw FlotillaError.conflict(message: "An app with id [\(id)] already exists.", deploymentIDs: [])
                }
                // A deployment still stopping an app of that id holds it, as in Marathon.
                cancelled.formUnion(try conflictingDeployments(for: id, force: force))
                let others = Set(apps.keys).subtracting(removals.map(\.id)).union(changes.map(\.definition.id).filter { $0 != id })
                if let parent = others.first(where: { $0.contains(id) || id.contains($0) }) {
                    throw FlotillaError.invalid([
                        FieldError("/id", "'\(id)' would nest with the app '\(parent)'; an app id cannot be a group of another app")
                    ])
                }
                preconditions.append(.absent(StateKeys.app(id)))
            }
            if !secretsEnabled && !changes[index].definition.secrets.isEmpty {
                throw FlotillaError.invalid([
                    FieldError("/secrets", "Feature secrets is not enabled: start the agent with --secrets-key-file (make a key with 'flotilla secrets keygen')")
                ])
            }
            if let user = changes[index].definition.user, !user.isEmpty, user != changes[index].current?.definition.user, !userExists(user) {
                throw FlotillaError.invalid([FieldError("/user", "there is no user '\(user)' on this node; create it, or leave 'user' out to run as the agent's user")])
            }
            changes[index].definition = try withServicePorts(changes[index].definition, previous: changes[index].current?.definition, alsoTaken: assigned)
            assigned[id] = changes[index].definition
        }
        let version = chosenVersion ?? nextVersion()
        var records: [AppRecord] = []
        var targets: [Deployment.Target] = []
        var configVersions: [AppID: String] = [:]
        var actions: [AppID: Deployment.ActionKind] = [:]
        for change in changes {
            let definition = change.definition
            let record: AppRecord
            if let current = change.current {
                let configChanged = change.restart || definition.requiresRestart(comparedTo: current.definition)
                let configVersion =
                    configChanged ? (change.restart ? version : change.restoredConfig ?? version) : current.versionInfo.lastConfigChangeAt
                record = AppRecord(definition: definition, version: version, versionInfo: VersionInfo(lastScalingAt: version, lastConfigChangeAt: configVersion))
                actions[definition.id] = configChanged ? .restartApplication : .scaleApplication
            } else {
                record = AppRecord(definition: definition, version: version, versionInfo: VersionInfo(lastScalingAt: version, lastConfigChangeAt: version))
                if definition.instances > 0 { actions[definition.id] = .scaleApplication }
            }
            records.append(record)
            configVersions[definition.id] = record.configVersion
            targets.append(.init(app: definition.id, targetVersion: version, previousVersion: change.current?.version))
        }
        for removed in removals {
            targets.append(.init(app: removed.id, targetVersion: nil, previousVersion: removed.version))
        }
        // Removed apps stop first; a new app is started (with no instances), then scaled in its layer.
        var steps: [[Deployment.Action]] = []
        if !removals.isEmpty { steps.append(removals.map { .init(action: .stopApplication, app: $0.id) }) }
        let created = changes.filter { $0.current == nil }.map(\.definition.id)
        if !created.isEmpty { steps.append(created.map { .init(action: .startApplication, app: $0) }) }
        for layer in layers ?? [changes.map(\.definition.id)] {
            let step = layer.compactMap { id in actions[id].map { Deployment.Action(action: $0, app: id) } }
            if !step.isEmpty { steps.append(step) }
        }
        let deployment = newDeployment(version: version, targets: targets, steps: steps, configVersions: configVersions)
        let cancelledIDs = cancelled.sorted()
        let cancelledResults = cancellationResults(cancelledIDs, reason: "replaced by deployment \(deployment.id) (force)")
        var puts: [(String, any Encodable & Sendable)] = []
        for record in records {
            puts += [(StateKeys.app(record.id), record), (StateKeys.version(version, of: record.id), record)]
        }
        puts.append((StateKeys.deployment(deployment.id), deployment))
        puts += cancelledResults.map { (StateKeys.deploymentResult($0.id), $0) }
        puts += extraPuts
        // Removed apps are kept beside the deployment until it ends: cancelling it brings them back.
        puts += removals.map { (StateKeys.removedApp($0.id, by: deployment.id), $0) }
        let removedKeys = removals.flatMap { [StateKeys.app($0.id), StateKeys.failure($0.id)] }
        try await commit(
            preconditions: preconditions, puts: puts, deletes: cancelledIDs.map { StateKeys.deployment($0) } + removedKeys + extraDeletes,
            deletePrefixes: removals.map { StateKeys.versions(of: $0.id) } + cancelledIDs.map { StateKeys.removedApps(of: $0) })
        // Committed: now it is shown.
        finishCancelled(cancelledResults)
        for removed in removals {
            apps[removed.id] = nil
            failures[removed.id] = nil
            backoffs[removed.id] = nil
            queue[removed.id] = nil
        }
        for (change, record) in zip(changes, records) {
            apps[record.id] = record
            let configChanged = change.current == nil || record.configVersion != change.current?.configVersion
            if configChanged { backoffs[record.id] = nil }
        }
        deployments[deployment.id] = deployment
        publishChange(
            records: publishPosts ? records : [], deployment: deployment, original: changes.compactMap(\.current) + removals, target: records,
            clientIP: clientIP, uri: uri)
        wake()
        return ChangeResult(version: version, deploymentID: deployment.id, app: records.count == 1 ? records[0] : nil)
    }

    /// `PUT`/`PATCH /v2/apps`: several apps in one deployment; each body is merged over its app (or
    /// replaces it when `partial` is false), an app that does not exist is created. All are checked
    /// before any is applied.
    public func updateMany(_ bodies: [(AppID, [String: JSONValue])], partial: Bool, force: Bool, clientIP: String? = nil) async throws -> ChangeResult {
        await lock.acquire()
        defer { lock.release() }
        try requireLoaded()
        guard !bodies.isEmpty else { throw FlotillaError.invalid([FieldError("/", "the list of apps is empty")]) }
        var seen: Set<AppID> = []
        var changes: [AppChange] = []
        for (index, (id, fields)) in bodies.enumerated() {
            guard seen.insert(id).inserted else { throw FlotillaError.invalid([FieldError("/\(index)/id", "app '\(id)' is listed twice")]) }
            do {
                changes.append(AppChange(current: apps[id], definition: try mergedDefinition(id, fields: fields, partial: partial)))
            } catch FlotillaError.invalid(let message, let details) {
                throw FlotillaError.invalid(message: message, details: details.map { FieldError("/\(index)" + $0.path, $0.errors.joined(separator: "; ")) })
            }
        }
        // The apps' dependencies order the deployment, as in a group.
        var graph: [AppID: Set<AppID>] = [:]
        var all = apps.mapValues(\.definition)
        for change in changes { all[change.definition.id] = change.definition }
        for (id, definition) in all {
            graph[id] = Set(definition.dependencies.flatMap { path -> [AppID] in
                guard let group = try? GroupID(path) else { return [] }
                return all.keys.filter { $0.path == path || group.contains($0) }
            }).subtracting([id])
        }
        guard let layers = DeploymentSteps.layers(of: Set(changes.map(\.definition.id)), dependencies: graph) else {
            throw FlotillaError.invalid([FieldError("/", "Dependency graph has cyclic dependencies.")])
        }
        return try await applyLocked(changes, layers: layers, force: force, clientIP: clientIP, uri: "/v2/apps")
    }

    /// `fields` merged over the app's current definition (or on their own when `partial` is false
    /// or the app is new), decoded and validated.
    func mergedDefinition(_ id: AppID, fields: [String: JSONValue], partial: Bool) throws -> AppDefinition {
        var object = partial ? ((apps[id]).flatMap { try? JSONValue(encoding: $0.definition).objectValue } ?? [:]) : [:]
        for (key, value) in fields where key != "version" { object[key] = value }
        // The legacy `ports` replaces the port definitions it stands for.
        if fields["ports"] != nil && fields["portDefinitions"] == nil { object["portDefinitions"] = nil }
        object["id"] = .string(id.path)
        return try AppDefinition.decode(object)
    }

    /// `DELETE /v2/apps/{id}`: the app goes at once; a deployment stops its instances.
    public func delete(_ id: AppID, force: Bool) async throws -> ChangeResult {
        await lock.acquire()
        defer { lock.release() }
        try self.requireLoaded()
        guard let current = self.apps[id] else { throw FlotillaError.notFound("App '\(id)' does not exist") }
        return try await applyLocked([], removals: [current], force: force, clientIP: nil, uri: "/v2/apps\(id)", publishPosts: false)
    }

    /// Kills instances; with `scale`, lowers the app's `instances` by as many so they are not replaced.
    /// - Returns: the killed instances, and the scaling change when there was one.
    public func kill(instanceIDs: [String], scale: Bool, force: Bool) async throws -> (killed: [Instance], change: ChangeResult?) {
        await lock.acquire()
        defer { lock.release() }
        try self.requireLoaded()
        let known = instanceIDs.compactMap { self.specs[$0] }
        var change: ChangeResult?
        if scale {
            var perApp: [AppID: Int] = [:]
            for spec in known where spec.goal == .run { perApp[spec.appID, default: 0] += 1 }
            for (appID, count) in perApp.sorted(by: { $0.key < $1.key }) {
                guard let current = self.apps[appID] else { continue }
                var definition = current.definition
                definition.instances = max(0, definition.instances - count)
                change = try await self.changeLocked(current, to: definition, restart: false, force: force, clientIP: nil, uri: "/v2/tasks/delete")
            }
        }
        var mutations: [(String, InstanceSpec)] = []
        for var spec in known where spec.goal == .run {
            spec.goal = .stop
            spec.stopReason = scale ? "killed and scaled down through the API" : "killed through the API"
            mutations.append((StateKeys.instance(spec), spec))
        }
        if !mutations.isEmpty {
            try await self.commit(puts: mutations)
            for (_, spec) in mutations { self.specs[spec.id] = spec }
        }
        self.wake()
        return (known.map { Instance(spec: $0, status: self.statuses[$0.id]) }, change)
    }

    /// `DELETE /v2/deployments/{id}`: without force, a new deployment back to where the apps were;
    /// with force, the deployment is dropped and the apps stay as they are.
    public func cancelDeployment(_ id: String, force: Bool) async throws -> ChangeResult? {
        await lock.acquire()
        defer { lock.release() }
        guard let deployment = self.deployments[id] else { throw FlotillaError.notFound("DeploymentPlan \(id) does not exist") }
        let reason = force ? "cancelled with force: the apps stay as they are" : "cancelled: the previous version is being restored"
        let cancelledResults = cancellationResults([id], reason: reason)
        // The removed apps it kept are read before they go.
        var removed: [AppID: AppRecord] = [:]
        for entry in try await store.list(prefix: StateKeys.removedApps(of: id)).entries {
            if let record = try? StateCodec.decode(AppRecord.self, from: entry.value) { removed[record.id] = record }
        }
        try await self.commit(
            puts: cancelledResults.map { (StateKeys.deploymentResult($0.id), $0) }, deletes: [StateKeys.deployment(id)],
            deletePrefixes: [StateKeys.removedApps(of: id)])
        finishCancelled(cancelledResults)
        if force { return nil }
        // Every app back where it was, in one deployment: changed apps to their previous version,
        // removed apps recreated, created apps removed.
        var changes: [AppChange] = []
        var removals: [AppRecord] = []
        for target in deployment.targets {
            if let previous = target.previousVersion {
                let entry = try await self.store.get(StateKeys.version(previous, of: target.app))
                guard let restored = try entry.map({ try StateCodec.decode(AppRecord.self, from: $0.value) }) ?? removed[target.app] else {
                    continue
                }
                changes.append(
                    AppChange(current: apps[target.app], definition: restored.definition, restoredConfig: apps[target.app] == nil ? nil : restored.configVersion))
            } else if let current = self.apps[target.app] {
                removals.append(current)
            }
        }
        guard !changes.isEmpty || !removals.isEmpty else { return nil }
        return try await applyLocked(changes, removals: removals, force: true, clientIP: nil, uri: "/v2/deployments/\(id)", publishPosts: false)
    }

    /// `DELETE /v2/queue/{id}/delay`: forget the crash backoff so the app launches now.
    public func resetDelay(_ id: AppID) throws {
        guard apps[id] != nil else { throw FlotillaError.notFound("App '\(id)' does not exist") }
        backoffs[id] = nil
        wake()
    }

    // MARK: - Reconciliation

    /// Asks for a pass now. A status an agent reports is `urgent: false`: such passes run at most
    /// every `statusCoalescing`, so a thousand instances reporting in over two seconds cost tens
    /// of passes rather than hundreds (a pass plans every instance of the apps it touches). An
    /// API write, a tick or a pass that must go on wakes at once, ending the wait.
    private func wake(urgent: Bool = true) {
        if urgent {
            urgentWake = true
            coalescing?.cancel()
        }
        wakeupContinuation.yield()
    }

    private var urgentWake = false
    private var coalescing: Task<Void, Never>?
    private var lastPassEnded = ContinuousClock.now - .seconds(1)
    static let statusCoalescing = Duration.milliseconds(25)

    /// Reconciles on every wake-up; wake-ups coalesce, so a burst of changes costs one pass.
    /// Told about each reconcile pass (its time, commit included, and what it planned): `/metrics`.
    private var passObserver: (@Sendable (PassReport) -> Void)?

    public func observePasses(_ observer: @escaping @Sendable (PassReport) -> Void) {
        passObserver = observer
    }

    /// One reconcile pass: how long it took and which apps it planned.
    public struct PassReport: Sendable {
        public var duration: Duration
        /// The apps planned (by flat name).
        public var planned: Set<String>
        /// Every app was planned (after a reload, a change of nodes, or the periodic full pass).
        public var full: Bool
    }
    private var lastPass: (planned: Set<String>, full: Bool) = ([], false)
    /// When each deployment under way was last evaluated.
    private var lastEvaluated: [String: ContinuousClock.Instant] = [:]
    /// The instances of apps in deployments, as the pass that last planned each app left them.
    private var deploymentInstances: [AppID: [Instance]] = [:]
    /// Whether each app in a deployment had arrived, when it was last looked at.
    private var deploymentComplete: [CompletionKey: Bool] = [:]
    private struct CompletionKey: Hashable {
        var app: AppID
        var version: String?
    }

    private func reconcileLoop() async {
        wake()
        for await _ in wakeups {
            if Task.isCancelled || Task.isShuttingDownGracefully { return }
            guard leading else { continue }
            let since = ContinuousClock.now - lastPassEnded
            if !urgentWake, since < Self.statusCoalescing {
                let wait = Task { _ = try? await Task.sleep(for: Self.statusCoalescing - since) }
                coalescing = wait
                await wait.value
                coalescing = nil
            }
            urgentWake = false
            await lock.acquire()
            do {
                try await refreshIfNeeded()
                let began = ContinuousClock.now
                try await reconcile()
                lastPassEnded = .now
                passObserver?(PassReport(duration: lastPassEnded - began, planned: lastPass.planned, full: lastPass.full))
            } catch is CancellationError {
                // Shutting down.
            } catch {
                logger.error("reconcile failed, will retry: \(error)")
            }
            lock.release()
        }
    }

    /// A pass every second even without changes: backoff delays end, queued apps get another try.
    private func tick() async {
        while !Task.isCancelled && !Task.isShuttingDownGracefully {
            try? await Task.sleep(for: tickInterval)
            wake()
        }
        wakeupContinuation.finish()
    }

    /// Waits for the agents' status writes and folds them in.
    /// While leading: the agents' status writes, folded in as they come (one listing, then the
    /// change feed of `status/`, so a change costs the records it touches). A follower has them
    /// from its feed of the whole state (`followStore`).
    private func watchStatuses() async {
        while !Task.isCancelled && !Task.isShuttingDownGracefully {
            guard leading else {
                try? await Task.sleep(for: .milliseconds(500))
                continue
            }
            do {
                let listing = try await store.list(prefix: StateKeys.statuses)
                await lock.acquire()
                absorb(listing)
                lock.release()
                let feed = store.watch(prefix: StateKeys.statuses, after: listing.index)
                try await cancelWhenGracefulShutdown {
                    for try await batch in feed {
                        guard await self.absorbChanges(batch) else { return }
                    }
                }
            } catch is CancellationError {
                return
            } catch StoreError.compacted {
                logger.notice("the status feed passed a store compaction: listing again")
            } catch {
                logger.error("status watch failed, retrying: \(error)")
                try? await Task.sleep(for: .milliseconds(500))
            }
        }
    }

    /// Every status at once: the ones that changed are observed, the ones gone are dropped.
    private func absorb(_ listing: StoreListing) {
        var changed = false
        var seen: Set<String> = []
        for status in StateCodec.decodeAll(InstanceStatus.self, from: listing.entries) {
            seen.insert(status.id)
            if observe(status) { changed = true }
        }
        for id in Set(statuses.keys).subtracting(seen) {
            statuses[id] = nil
            changed = true
        }
        index = max(index, listing.index)
        if changed { wake() }
    }

    /// One commit's status changes. False once this agent no longer leads (the feed stops).
    private func absorbChanges(_ batch: [StoreEvent]) async -> Bool {
        await lock.acquire()
        defer { lock.release() }
        guard leading else { return false }
        var changed = false
        for event in batch {
            let id = String(event.key.dropFirst(StateKeys.statuses.count))
            guard event.kind == .put else {
                if statuses.removeValue(forKey: id) != nil { changed = true }
                continue
            }
            do {
                if observe(try StateCodec.decode(InstanceStatus.self, from: event.entry.value)) { changed = true }
            } catch {
                logger.error("skipping unreadable status \(event.key): \(error)")
            }
        }
        if let last = batch.last { index = max(index, last.index) }
        if changed { wake(urgent: false) }
        return true
    }

    /// Takes in one status an agent wrote, telling what changed. Returns whether anything did.
    private func observe(_ status: InstanceStatus) -> Bool {
        let previous = statuses[status.id]
        if previous == status { return false }
        statuses[status.id] = status
        // Events are the leader's to tell (a follower's `/v2/events` streams the leader's).
        guard leading, let spec = specs[status.id] else { return true }
        if previous?.state != status.state {
            events.publish(.statusUpdate(spec, status))
        }
        if status.draining && previous?.draining != true {
            events.publish(.instanceChanged(spec, condition: "Killing", draining: true))
        }
        publishHealthEvents(spec: spec, previous: previous?.health ?? [], current: status.health)
        if let previous, previous.isHealthy != status.isHealthy, !spec.definition.healthChecks.isEmpty {
            events.publish(.instanceHealthChanged(spec, healthy: status.isHealthy))
        }
        return true
    }

    /// One pass over every app: retire ended instances, start, stop and switch what the plans say,
    /// and settle deployments that arrived or failed. The pass works on copies of memory; memory
    /// (and the events) show its changes only once the store has committed them, so a commit that
    /// fails leaves nothing half-shown and the next pass starts from what is durable.
    func reconcile() async throws {
        try requireLoaded()
        let now = Date()
        let nowText = Timestamp.format(now)

        try await moveLegacyInstanceKeys()
        // `nodes` is kept current by `watchNodes` (agents register and renew themselves).
        // Instances on nodes that are down are settled first, in a commit of their own.
        try await settleUnreachable(now: now, nowText: nowText)

        // Which apps this pass plans: those whose inputs changed since they were last planned, and
        // those whose plan depends on time (a backoff or a warm set running out, a deployment under
        // way); every app after a reload, a change of nodes, and once a minute as a safety net.
        drainTouches()
        let full = replanAll || ContinuousClock.now - lastFullPass > fullPassInterval
        var planning: Set<String>
        if full {
            planning = Set(apps.members.keys).union(specs.members.keys)
        } else {
            planning = dirtyApps.union(timedApps)
            for id in queue.keys { planning.insert(id.flatName) }
            // A deployment's apps are planned when something touches them like any other (their
            // instances' statuses, the deployment's own record when it passes a step).
        }
        lastPass = (planning, full)
        var nextSpecs = PassChanges(specs)
        var nextStatuses = PassChanges(statuses)
        var nextFailures = failures
        var nextDeployments = deployments
        var nextBackoffs = backoffs
        var changedDeployments: Set<String> = []
        // One pass commits what one transaction of the store may hold (etcd: 128 operations,
        // 1.5 MB); the rest waits for the next pass, which runs at once.
        var budget = PassBudget(limits: store.limits)
        var pending: [ControlEvent] = []
        var puts: [(String, any Encodable & Sendable)] = []
        var deletes: [String] = []

        // Ended instances: remember failures, start backoff, count crashes against deployments, forget them.
        // (An instance's end touches its app, so only the planned apps can have any.)
        for flat in planning.sorted() {
            for id in specs.members[flat] ?? [] {
                guard let spec = specs[id], let status = statuses[id], status.state.isTerminal else { continue }
                guard budget.take(operations: 3, bytes: 4096) else { break }
                let unexpected = spec.goal == .run && (status.state.countsAsFailure || status.killedUnhealthy)
                if unexpected, let app = apps[spec.appID] {
                    // Marathon backs off after any end the app did not ask for, exit 0 included.
                    var backoff = nextBackoffs[spec.appID] ?? Backoff()
                    backoff.recordFailure(of: app.definition, at: now)
                    nextBackoffs[spec.appID] = backoff
                    let failure = TaskFailure(
                        appID: spec.appID, taskID: id, host: spec.host, node: spec.node, state: status.killedUnhealthy ? .killed : status.state,
                        message: status.message ?? "", timestamp: status.updatedAt, version: spec.version)
                    nextFailures[spec.appID] = failure
                    puts.append((StateKeys.failure(spec.appID), failure))
                    for deployment in nextDeployments.values {
                        guard let counted = DeploymentProgress.recordingCrash(deployment, of: spec, status: status) else { continue }
                        nextDeployments[deployment.id] = counted
                        changedDeployments.insert(deployment.id)
                    }
                }
                if status.killedUnhealthy { pending.append(.unhealthyTaskKill(spec, reason: status.message ?? "unhealthy")) }
                nextSpecs[id] = nil
                nextStatuses[id] = nil
                deletes += [StateKeys.instance(spec), StateKeys.status(id)]
            }
        }

        // Plan the apps (and apps that are gone but still have instances).
        func instances(of flat: String) -> [Instance] {
            nextSpecs.values(ofApp: flat).map { Instance(spec: $0, status: nextStatuses[$0.id]) }
        }
        var byApp: [AppID: [Instance]] = [:]
        var appIDs: Set<AppID> = []
        for flat in planning {
            for id in apps.members[flat] ?? [] { appIDs.insert(id) }
            let found = instances(of: flat)
            // Usually one app per flat name (`/a/b` and `/a_b` share one): the array as it is.
            if let first = found.first?.spec.appID, found.allSatisfy({ $0.spec.appID == first }), byApp[first] == nil {
                byApp[first] = found
                appIDs.insert(first)
                continue
            }
            for instance in found {
                byApp[instance.spec.appID, default: []].append(instance)
                appIDs.insert(instance.spec.appID)
            }
        }
        // Indexed once, the first time an app launches in this pass (it reads every instance):
        // placing an app then costs O(log nodes) per instance.
        var placement: PlacementState?
        var newQueue = full ? [:] : queue.filter { !planning.contains($0.key.flatName) }
        var nextTimed = full ? [] : timedApps.subtracting(planning)
        func update(_ id: String, _ change: (inout InstanceSpec) -> Void) {
            guard var spec = nextSpecs[id], budget.take(operations: 1, bytes: PassBudget.size(of: spec)) else { return }
            let wasRunning = spec.goal == .run
            change(&spec)
            nextSpecs[id] = spec
            puts.append((StateKeys.instance(spec), spec))
            if wasRunning && spec.goal == .stop { placement?.stopping(spec) }
        }
        // Apps whose turn in a deployment has not come (their dependencies are not ready yet).
        let heldBack = nextDeployments.values.reduce(into: Set<AppID>()) { $0.formUnion(DeploymentSteps.heldBack($1)) }
        for appID in appIDs.sorted() where !heldBack.contains(appID) {
            let app = apps[appID]
            let appInstances = byApp[appID] ?? []
            // A warm set's keep-alive runs out with time: its app is planned every pass until then.
            if appInstances.contains(where: { $0.spec.standbyUntil != nil }) { nextTimed.insert(appID.flatName) }
            let plan = Reconciler.plan(app: app, instances: appInstances, now: now)
            for stop in plan.stop {
                update(stop.instanceID) {
                    $0.goal = .stop
                    $0.stopReason = stop.reason
                }
            }
            for id in plan.activate {
                update(id) {
                    $0.standby = false
                    $0.standbyUntil = nil
                }
            }
            for standby in plan.standby {
                update(standby.instanceID) {
                    $0.standby = true
                    $0.standbyUntil = Timestamp.format(standby.until)
                }
            }
            if !plan.activate.isEmpty || !plan.standby.isEmpty {
                logger.info("\(appID): switching \(plan.activate.count) instance(s) in, \(plan.standby.count) out of service")
                for id in plan.activate + plan.standby.map(\.instanceID) {
                    if let spec = nextSpecs[id] { pending.append(.instanceChanged(spec, condition: spec.standby ? "Standby" : "Running", draining: false)) }
                }
            }
            guard let app, plan.launch > 0 else { continue }
            let backoff = nextBackoffs[appID] ?? Backoff()
            let delay = backoff.secondsLeft(at: now)
            if delay > 0 {
                newQueue[appID] = QueueEntry(app: appID, count: plan.launch, since: queue[appID]?.since ?? nowText, delaySeconds: delay, placement: nil)
                continue
            }
            let sample = InstanceSpec(
                id: InstanceSpec.newID(for: appID), appID: appID, version: app.version, configVersion: app.configVersion,
                definition: app.definition, node: "", host: "", ports: [], stagedAt: nowText)
            let affordable = budget.room(eachOf: PassBudget.size(of: sample) + 64)
            if affordable < plan.launch { budget.leaveRestForNextPass() }
            guard affordable > 0 else { continue }
            if placement == nil {
                let everyInstance = nextSpecs.allValues.map { Instance(spec: $0, status: nextStatuses[$0.id]) }
                placement = PlacementState(ClusterSnapshot(nodes: nodes.values.sorted { $0.name < $1.name }, instances: everyInstance))
            }
            let result = placement!.place(app.definition, count: min(plan.launch, affordable), using: &generator)
            budget.take(operations: result.placements.count, bytes: result.placements.count * (PassBudget.size(of: sample) + 64))
            for placement in result.placements {
                // Copies of the sample share its definition.
                var spec = sample
                spec.id = InstanceSpec.newID(for: appID)
                spec.node = placement.node.name
                spec.host = placement.node.host
                spec.ports = placement.ports
                spec.standby = plan.launchStandby
                nextSpecs[spec.id] = spec
                puts.append((StateKeys.instance(spec), spec))
            }
            if result.unplaced > 0 {
                newQueue[appID] = QueueEntry(app: appID, count: result.unplaced, since: queue[appID]?.since ?? nowText, delaySeconds: 0, placement: result)
                if queue[appID] == nil, let explanation = result.explanation {
                    logger.warning("\(appID): \(result.unplaced) instance(s) wait for resources: \(explanation)")
                }
            }
        }

        // Deployments: the pure state machine says which arrived, failed or passed a step. One is
        // looked at when this pass planned one of its apps (only those can have moved it on), and
        // at least every second for its progress deadline.
        var live: [AppID: [Instance]] = [:]
        let evaluated = nextDeployments.values.filter { deployment in
            full || changedDeployments.contains(deployment.id) || deployment.affectedApps.contains { planning.contains($0.flatName) }
                || ContinuousClock.now - (lastEvaluated[deployment.id] ?? lastFullPass) >= .seconds(1)
        }
        // An app's instances change only when something touches it, so those of the apps this
        // pass did not plan are the ones gathered before (a deployment of a hundred apps does not
        // gather ten thousand instances for every status that arrives).
        for deployment in evaluated {
            lastEvaluated[deployment.id] = .now
            for app in deployment.affectedApps where live[app] == nil {
                if !full, !planning.contains(app.flatName), let known = deploymentInstances[app] {
                    live[app] = known
                } else {
                    live[app] = instances(of: app.flatName).filter { $0.spec.appID == app }
                }
            }
        }
        lastEvaluated = lastEvaluated.filter { nextDeployments[$0.key] != nil }
        let deploying = nextDeployments.values.reduce(into: Set<AppID>()) { $0.formUnion($1.affectedApps) }
        deploymentInstances = deploymentInstances.filter { deploying.contains($0.key) }.merging(live) { $1 }
        // Whether an app has arrived changes only with the app or its instances, so it is known
        // for the apps this pass did not plan (by app and version: a removal asks of no version).
        var complete = full ? [:] : deploymentComplete.filter { deploying.contains($0.key.app) && !planning.contains($0.key.app.flatName) }
        func isComplete(_ app: AppRecord?, _ id: AppID) -> Bool {
            let key = CompletionKey(app: id, version: app?.version)
            if let known = complete[key] { return known }
            let answer = Reconciler.isComplete(app: app, instances: live[id] ?? [])
            complete[key] = answer
            return answer
        }
        var succeeded: [Deployment] = []
        var failed: [(Deployment, String)] = []
        var advancedSteps: [(Deployment, [Int])] = []
        for deployment in evaluated.sorted(by: { $0.version < $1.version }) {
            switch DeploymentProgress.evaluate(deployment, apps: apps.dictionary, now: now, instances: { live[$0] ?? [] }, isComplete: isComplete) {
            case .succeeded:
                succeeded.append(deployment)
            case .failed(let reason):
                failed.append((deployment, reason))
            case .advanced(let step, let finished):
                var advanced = deployment
                advanced.currentStep = step
                nextDeployments[deployment.id] = advanced
                changedDeployments.insert(deployment.id)
                advancedSteps.append((advanced, finished))
            case .waiting:
                break
            }
        }
        deploymentComplete = complete
        let ended = Set(succeeded.map(\.id) + failed.map(\.0.id))
        deletes += ended.sorted().map { StateKeys.deployment($0) }
        for id in changedDeployments.subtracting(ended).sorted() {
            if let deployment = nextDeployments[id] { puts.append((StateKeys.deployment(id), deployment)) }
        }
        var results: [DeploymentResult] = []
        for deployment in succeeded {
            results.append(DeploymentResult(deployment: deployment, status: .succeeded, reason: nil, finishedAt: nowText))
        }
        for (deployment, reason) in failed {
            results.append(DeploymentResult(deployment: deployment, status: .failed, reason: reason, finishedAt: nowText))
        }
        for result in results { puts.append((StateKeys.deploymentResult(result.id), result)) }
        if !puts.isEmpty || !deletes.isEmpty {
            try await commit(puts: puts, deletes: deletes, deletePrefixes: results.map { StateKeys.removedApps(of: $0.id) })
            // Committed: memory shows it, in one step (no await between these).
            for id in ended { nextDeployments[id] = nil }
            specs.apply(nextSpecs.changes)
            statuses.apply(nextStatuses.changes)
            failures = nextFailures
            deployments = nextDeployments
        }
        backoffs = nextBackoffs
        if !(queue.isEmpty && newQueue.isEmpty) { queue = newQueue }
        timedApps = nextTimed
        // Planned: clean until something touches them again (this pass's own commit touched the
        // apps it changed, and those are planned once more next time). A pass that ran out of
        // room leaves them all to the next.
        if !budget.exhausted {
            dirtyApps.subtract(planning)
            if full {
                replanAll = false
                lastFullPass = .now
            }
        }
        // A pass that ran out of room in its transaction goes on at once.
        if budget.exhausted { wake() }
        for event in pending { events.publish(event) }
        // Wake exactly when the first crash backoff ends, not at the next tick.
        if let soonest = newQueue.values.map(\.delaySeconds).filter({ $0 > 0 }).min() {
            Task { [weak self] in
                try? await Task.sleep(for: .milliseconds(Int64(soonest * 1000) + 5))
                await self?.wake()
            }
        }
        // Steps moved on: say so. The apps the new steps release are planned in a pass of their
        // own, now rather than at the next tick.
        if !advancedSteps.isEmpty { wake() }
        for (advanced, finished) in advancedSteps {
            for step in finished {
                events.publish(.deploymentStepSuccess(advanced, step: step))
                for action in advanced.steps[step - 1] where action.action == .stopApplication { publishTerminated(action.app) }
            }
            events.publish(.deploymentInfo(advanced, original: [], target: []))
        }
        // Results become visible in the same step as the deployments leave. A failed deployment
        // that rolls back stays visible as running until its result can name the rollback, so no
        // reader sees "failed" without where it went back to.
        let rollingBackIDs = Set(failed.filter { DeploymentProgress.rollsBack($0.0, apps: apps.dictionary) }.map { $0.0.id })
        for (deployment, _) in failed where rollingBackIDs.contains(deployment.id) { rollingBack[deployment.id] = deployment }
        for result in results where !rollingBackIDs.contains(result.id) { deploymentResults[result.id] = result }
        for deployment in succeeded {
            if let last = deployment.steps.last, deployment.totalSteps == max(1, deployment.currentStep) {
                for action in last where action.action == .stopApplication { publishTerminated(action.app) }
            }
            events.publish(.deploymentStepSuccess(deployment, step: deployment.totalSteps))
            events.publish(.deploymentSuccess(deployment))
        }
        for (deployment, reason) in failed {
            var result = results.first { $0.id == deployment.id }!
            logger.warning("deployment \(deployment.id) failed: \(reason)")
            events.publish(.deploymentStepFailure(deployment, step: deployment.currentStep))
            events.publish(.deploymentFailed(deployment, reason: reason))
            guard rollingBackIDs.contains(deployment.id) else { continue }
            defer { rollingBack[deployment.id] = nil }
            do {
                if let rollback = try await autoRollback(deployment) {
                    result.rollbackDeploymentID = rollback.deploymentID
                    result.rolledBackTo = deployment.targets.first?.previousVersion ?? rollback.version
                    try await commit(puts: [(StateKeys.deploymentResult(result.id), result)])
                }
            } catch {
                deploymentResults[deployment.id] = result
                throw error
            }
            deploymentResults[deployment.id] = result
        }
        pruneDeploymentResults()
    }

    /// What a pass changes in one of the tracked dictionaries, kept aside (the dictionary itself is
    /// not copied) and applied once the store has committed it.
    private struct PassChanges<Value: Sendable> {
        let base: Tracked<String, Value>
        private(set) var changes: [String: Value?] = [:]

        init(_ base: Tracked<String, Value>) { self.base = base }

        subscript(key: String) -> Value? {
            get {
                if let changed = changes[key] { return changed }
                return base[key]
            }
            set { changes[key] = .some(newValue) }
        }

        /// The values of one app, as the pass has them now.
        func values(ofApp flat: String) -> [Value] {
            var keys = base.members[flat] ?? []
            for (key, value) in changes where value != nil && Self.belongs(key, to: flat) { keys.insert(key) }
            return keys.compactMap { self[$0] }
        }

        /// Every value, as the pass has them now.
        var allValues: [Value] {
            var all = base.dictionary
            for (key, value) in changes { all[key] = value }
            return Array(all.values)
        }

        /// Instance ids start with their app's flat name.
        private static func belongs(_ key: String, to flat: String) -> Bool {
            InstanceSpec.appFlatName(ofInstanceID: key).map { $0 == flat } ?? false
        }
    }

    /// Moves instance records an earlier version wrote at `instances/<id>` to `instances/<node>/<id>`,
    /// as many per commit as one transaction holds.
    private func moveLegacyInstanceKeys() async throws {
        guard !legacyInstanceKeys.isEmpty else { return }
        var budget = PassBudget(limits: store.limits)
        var moved: [String] = []
        var puts: [(String, any Encodable & Sendable)] = []
        for key in legacyInstanceKeys {
            let id = StateKeys.instanceID(ofKey: key)
            let spec = specs[id]
            guard budget.take(operations: 2, bytes: spec.map(PassBudget.size(of:)) ?? 0) else { break }
            if let spec { puts.append((StateKeys.instance(spec), spec)) }
            moved.append(key)
        }
        try await commit(puts: puts, deletes: moved)
        legacyInstanceKeys.removeFirst(moved.count)
        logger.notice("moved \(moved.count) instance record(s) under their node's prefix\(legacyInstanceKeys.isEmpty ? "" : "; \(legacyInstanceKeys.count) to go")")
        if !legacyInstanceKeys.isEmpty { wake() }
    }

    /// In a cluster, instances on a node whose lease ended: `TASK_UNREACHABLE` at once; after the
    /// app's `unreachableStrategy.inactiveAfterSeconds` written off (asked to stop, so a node that
    /// comes back kills them) and replaced on nodes that are up; after `expungeAfterSeconds`
    /// forgotten. Judged only once this leader has led for a whole node lease (a live node has
    /// renewed its record by then). One commit, guarded by those nodes still being absent: a node
    /// that registered again meanwhile keeps its instances.
    private func settleUnreachable(now: Date, nowText: String) async throws {
        guard leaderGuard != nil, let since = leadingSince, now.timeIntervalSince(since) >= Double(nodeLossGrace.components.seconds) else { return }
        var downNodes: Set<String> = []
        var changedSpecs: [String: InstanceSpec] = [:]
        var changedStatuses: [String: InstanceStatus] = [:]
        var expunged: [String] = []
        var budget = PassBudget(limits: store.limits)
        // Usually no instance is on a node that is down: found without sorting every instance.
        let onLostNodes = specs.filter { nodes[$0.value.node] == nil }
        guard !onLostNodes.isEmpty else { return }
        for (id, spec) in onLostNodes.sorted(by: { $0.key < $1.key }) {
            // Many instances on a lost node: as many as one transaction holds now, the rest next pass.
            guard budget.take(operations: 2, bytes: PassBudget.size(of: spec) + 2048) else {
                wake()
                break
            }
            if let status = statuses[id], status.state.isTerminal { continue }
            guard var status = statuses[id], status.state == .unreachable else {
                var status = statuses[id] ?? InstanceStatus(id: id, state: .unreachable, updatedAt: nowText)
                status.state = .unreachable
                status.message = "node \(spec.node) is down: its agent stopped renewing its record"
                status.updatedAt = nowText
                status.draining = false
                changedStatuses[id] = status
                downNodes.insert(spec.node)
                continue
            }
            guard case .after(let inactive, let expunge) = apps[spec.appID]?.definition.unreachableStrategy ?? .default else { continue }
            let unreachableFor = now.timeIntervalSince(Timestamp.parse(status.updatedAt) ?? now)
            if unreachableFor >= max(inactive, expunge) {
                expunged.append(id)
                downNodes.insert(spec.node)
            } else if unreachableFor >= inactive && spec.goal == .run {
                var writtenOff = spec
                writtenOff.goal = .stop
                writtenOff.stopReason = "replaced: its node \(spec.node) was down for \(Int(unreachableFor)) s"
                changedSpecs[id] = writtenOff
                status.message = "node \(spec.node) is down; replaced on a node that is up (expunged after \(Int(max(inactive, expunge))) s)"
                changedStatuses[id] = status
                downNodes.insert(spec.node)
            }
        }
        guard !downNodes.isEmpty else { return }
        var puts: [(String, any Encodable & Sendable)] = changedSpecs.sorted { $0.key < $1.key }.map { (StateKeys.instance($0.value), $0.value) }
        puts += changedStatuses.sorted { $0.key < $1.key }.map { (StateKeys.status($0.key), $0.value) }
        do {
            try await commit(
                preconditions: downNodes.sorted().map { .absent(StateKeys.node($0)) }, puts: puts,
                deletes: expunged.flatMap { id in [specs[id].map(StateKeys.instance) ?? StateKeys.instances + id, StateKeys.status(id)] })
        } catch FlotillaError.conflict {
            logger.notice("a node came back while its instances were being marked unreachable: left as they are")
            return
        }
        for (id, status) in changedStatuses.sorted(by: { $0.key < $1.key }) {
            guard let spec = changedSpecs[id] ?? specs[id] else { continue }
            if statuses[id]?.state != .unreachable {
                logger.warning("\(id) is unreachable: its node \(spec.node) is down")
                events.publish(.statusUpdate(spec, status))
            } else {
                logger.warning("\(id) is written off with its node \(spec.node): replacing it")
                events.publish(.instanceChanged(spec, condition: "UnreachableInactive", draining: false))
            }
        }
        for (id, spec) in changedSpecs { specs[id] = spec }
        for (id, status) in changedStatuses { statuses[id] = status }
        for id in expunged {
            logger.warning("\(id) is expunged: its node \(specs[id]?.node ?? "?") stayed down")
            specs[id] = nil
            statuses[id] = nil
        }
    }

    /// After a failed deployment: the previous version of each app, as a new deployment, when its
    /// strategy says so.
    private func autoRollback(_ deployment: Deployment) async throws -> ChangeResult? {
        var result: ChangeResult?
        for target in deployment.targets {
            guard let previous = target.previousVersion, let current = apps[target.app], current.definition.upgradeStrategy.autoRollback,
                let entry = try await store.get(StateKeys.version(previous, of: target.app))
            else { continue }
            let restored = try StateCodec.decode(AppRecord.self, from: entry.value)
            logger.warning("rolling \(target.app) back to \(previous) after deployment \(deployment.id) failed")
            result = try await changeLocked(
                current, to: restored.definition, restart: false, force: true, clientIP: nil, uri: "/v2/deployments/\(deployment.id)",
                configVersion: restored.configVersion)
        }
        return result
    }

    private func pruneDeploymentResults() {
        guard deploymentResults.count > 200 else { return }
        let doomed = deploymentResults.values.sorted { $0.finishedAt < $1.finishedAt }.prefix(deploymentResults.count - 200)
        for result in doomed { deploymentResults[result.id] = nil }
        let keys = doomed.map { StateKeys.deploymentResult($0.id) }
        let guardCondition = leaderGuard
        Task { _ = try? await self.store.commit(StoreTransaction(preconditions: guardCondition.map { [$0] } ?? [], mutations: keys.map { .delete($0) })) }
    }

    // MARK: - Helpers

    /// The definition with its port-0 service ports assigned, keeping the ones `previous` had.
    func withServicePorts(
        _ definition: AppDefinition, previous: AppDefinition?, alsoTaken: [AppID: AppDefinition] = [:]
    ) throws(FlotillaError) -> AppDefinition {
        var inUse: Set<Int> = []
        var others = apps.mapValues(\.definition)
        others.merge(alsoTaken) { $1 }
        for (id, other) in others where id != definition.id {
            for port in other.ports where port.servicePort != 0 { inUse.insert(port.servicePort) }
        }
        return try ServicePorts.assign(definition, previous: previous, inUse: inUse, range: servicePortRange)
    }

    func requireLoaded() throws {
        if !loaded { throw FlotillaError.unavailable("the agent is still starting; try again in a moment") }
    }

    /// How cancelled deployments ended, for `/flotilla/v1/deployments/{id}` and `flotilla deploy`.
    private func cancellationResults(_ ids: [String], reason: String) -> [DeploymentResult] {
        let now = Timestamp.format(Date())
        return ids.compactMap { deployments[$0] }.map { DeploymentResult(deployment: $0, status: .cancelled, reason: reason, finishedAt: now) }
    }

    private func finishCancelled(_ results: [DeploymentResult]) {
        for result in results {
            deployments[result.id] = nil
            deploymentResults[result.id] = result
        }
    }

    /// Deployments that hold `app`; with `force` they are cancelled, without it they conflict.
    private func conflictingDeployments(for app: AppID, force: Bool) throws -> [String] {
        let holding = deployments.values.filter { $0.affectedApps.contains(app) }.map(\.id).sorted()
        if !holding.isEmpty && !force {
            throw FlotillaError.conflict(
                message: "App is locked by one or more deployments. Override with the option '?force=true'. View details at '/v2/deployments/<DEPLOYMENT_ID>'.",
                deploymentIDs: holding)
        }
        return holding
    }

    /// App versions are timestamps; two changes in one millisecond still get distinct, ordered versions.
    func nextVersion() -> String {
        var date = Date()
        var version = Timestamp.format(date)
        while version <= lastVersion {
            date = date.addingTimeInterval(0.001)
            version = Timestamp.format(date)
        }
        lastVersion = version
        return version
    }

    private func newDeployment(
        version: String, targets: [Deployment.Target], steps: [[Deployment.Action]], configVersions: [AppID: String] = [:]
    ) -> Deployment {
        Deployment(
            id: UUID().uuidString.lowercased(), version: version, targets: targets, steps: steps, startedAt: Timestamp.format(Date()),
            targetConfigVersions: Dictionary(uniqueKeysWithValues: configVersions.map { ($0.key.path, $0.value) }))
    }

    func commit(
        preconditions: [StorePrecondition] = [], puts: [(String, any Encodable & Sendable)] = [], deletes: [String] = [],
        deletePrefixes: [String] = []
    ) async throws {
        guard leading else {
            throw FlotillaError.unavailable("this agent does not schedule (it follows the cluster's leader): send the change to the leader (GET /v2/leader)")
        }
        var mutations: [StoreMutation] = []
        for (key, value) in puts { mutations.append(.put(key, try StateCodec.encode(value))) }
        mutations += deletes.map { .delete($0) }
        mutations += deletePrefixes.map { .deletePrefix($0) }
        do {
            index = try await store.commit(StoreTransaction(preconditions: preconditions + (leaderGuard.map { [$0] } ?? []), mutations: mutations))
        } catch StoreError.preconditionFailed(let failed) where failed == leaderGuard {
            // Another candidate leads now: this one writes nothing more.
            leading = false
            leaderGuard = nil
            logger.warning("a commit found the lead taken by another node: stepping down")
            throw FlotillaError.unavailable("this agent lost the cluster's lead while applying the change; nothing was written: retry against the leader")
        } catch StoreError.preconditionFailed {
            throw FlotillaError.conflict(message: "the app changed while this request was applied; retry", deploymentIDs: [])
        } catch StoreError.tooLarge(let detail) {
            // Refused whole before anything was written: memory still matches the store.
            throw FlotillaError.unavailable("the change is too large for one transaction of the store (\(detail)); nothing was written")
        } catch let error as StoreError {
            // A request that timed out may still be applied by the store once it answers again:
            // memory no longer knows the store's state, so it is read again before the next change.
            stale = true
            throw FlotillaError.unavailable(
                "the change is not confirmed (\(error)); it may still take effect once the store answers: read the app back before retrying")
        }
    }


    // MARK: - Events (typed; the API renders them in Marathon's shape)

    private func publishChange(
        records: [AppRecord], deployment: Deployment, original: [AppRecord], target: [AppRecord]? = nil, clientIP: String?, uri: String
    ) {
        for record in records { events.publish(.apiPost(definition: record.definition, clientIP: clientIP, uri: uri)) }
        events.publish(.deploymentInfo(deployment, original: original, target: target ?? records))
    }

    /// Every instance of a removed app has stopped.
    private func publishTerminated(_ app: AppID) {
        events.publish(.appTerminated(app))
    }

    /// A check's verdict that flipped, and each counted failure.
    private func publishHealthEvents(spec: InstanceSpec, previous: [HealthResult], current: [HealthResult]) {
        for (index, result) in current.enumerated() {
            let before = index < previous.count ? previous[index] : HealthResult()
            if let alive = result.alive, alive != before.alive { events.publish(.healthStatusChanged(spec, alive: alive)) }
            if result.consecutiveFailures > before.consecutiveFailures { events.publish(.failedHealthCheck(spec, checkIndex: index)) }
        }
    }
}

/// How much one reconcile pass may still write: the store's transaction limits, less room for
/// the leader guard, deployment records and results.
struct PassBudget {
    private(set) var operations: Int
    private(set) var bytes: Int
    /// Something was left for the next pass.
    private(set) var exhausted = false

    init(limits: StoreLimits) {
        operations = limits.maxOperations == .max ? .max : max(8, limits.maxOperations - 16)
        bytes = limits.maxBytes == .max ? .max : max(64 << 10, limits.maxBytes - (256 << 10))
    }

    /// Takes room for some writes; false (and nothing taken) when they do not fit.
    @discardableResult
    mutating func take(operations wanted: Int, bytes size: Int) -> Bool {
        guard wanted <= operations, size <= bytes else {
            exhausted = true
            return false
        }
        if operations != .max { operations -= wanted }
        if bytes != .max { bytes -= size }
        return true
    }

    mutating func leaveRestForNextPass() { exhausted = true }

    /// How many writes of `size` bytes each still fit.
    mutating func room(eachOf size: Int) -> Int {
        let fit = min(operations, bytes == .max ? .max : bytes / max(size, 1))
        if fit == 0 { exhausted = true }
        return fit
    }

    static func size(of spec: InstanceSpec) -> Int { (try? StateCodec.encode(spec).count) ?? 8192 }
}

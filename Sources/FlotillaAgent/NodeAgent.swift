import AsyncHTTPClient
public import FlotillaCore
public import FlotillaImage
public import FlotillaStore
import Foundation
import Glibc
public import Logging
public import ServiceLifecycle

/// The node side: runs the instances the scheduler assigned to this node, reports what happens to
/// them, and after a restart adopts the processes that outlived it and kills any it cannot account for.
public actor NodeAgent: Service {
    public struct Configuration: Sendable {
        public var node: NodeInfo
        public var dataDirectory: String
        public var logMaxBytes: Int64
        public var logKeep: Int
        /// How long and how much of instances' logs this node keeps, those of ended instances too.
        public var logRetention: LogRetention = .default
        /// Whether instances stop with the agent. By default they keep running, and the next agent adopts
        /// them, so upgrading or restarting the agent drops no request.
        public var stopInstancesOnExit: Bool
        /// In a cluster, the node's record is held by a lease of this many seconds, renewed every
        /// third of it: a node that stops (or loses the store for longer) disappears by itself and
        /// is `down`. Nil: the record stays (one node, nobody else to tell).
        public var nodeLeaseTTL: Int64?

        public init(
            node: NodeInfo, dataDirectory: String, logMaxBytes: Int64 = 10 << 20, logKeep: Int = 3, stopInstancesOnExit: Bool = false
        ) {
            self.node = node
            self.dataDirectory = dataDirectory
            self.logMaxBytes = logMaxBytes
            self.logKeep = logKeep
            self.stopInstancesOnExit = stopInstancesOnExit
        }
    }

    private let configuration: Configuration
    private let store: any StateStore
    private let logger: Logger
    private let cgroups: Cgroups
    /// Every driver this agent has, by name; `exec` always.
    private let drivers: [String: any InstanceDriver]
    public nonisolated let sandboxRoot: String
    private let watcher = ProcessWatcher()
    private let agentEnvironment = ProcessInfo.processInfo.environment

    private var processes: [String: SupervisedProcess] = [:]
    /// Instances whose driver is still preparing them (pulling an image), not yet started.
    private var preparing: [String: Task<Void, Never>] = [:]
    /// Cleared when the agent begins to stop: nothing starts after that.
    private var launching = true
    /// Exits being handled (their clean-up awaited), so a stop waits for them.
    private var exitsInFlight = 0
    /// Starts under way in a driver: a stopping agent waits for them to finish or be undone, so
    /// nothing they made (a mount, a namespace) outlives it.
    private var startsInFlight = 0
    /// Instances whose start is inside a driver now.
    private var starting: Set<String> = []
    /// Instances being stopped, with the reason the exit will be reported with.
    private var stopping: [String: String] = [:]
    /// Every health and readiness check of this node, on one timer (`HealthScheduler`).
    private let healthScheduler = HealthScheduler()
    /// Instances whose health checks are scheduled.
    private var healthChecked: Set<String> = []
    /// Instances whose readiness check is scheduled (until its first ready answer).
    private var readinessChecked: Set<String> = []
    /// Instances waiting for a start slot, in order (`launchQueue` from `launchHead` on), with the
    /// spec each was queued with; at most `maximumConcurrentStarts` start at once.
    private var launchQueue: [String] = []
    private var launchHead = 0
    private var queuedSpecs: [String: InstanceSpec] = [:]
    private var launchWorkers = 0
    /// Starts inside a driver whose instance was stopped meanwhile: undone when the driver returns.
    private var cancelledStarts: Set<String> = []
    static let maximumConcurrentStarts = 8
    /// Statuses to commit (ids, newest in `written`), and the writers waiting for that commit:
    /// writes that arrive while one commits go together in the next (group commit).
    private var pendingStatusIDs: [String] = []
    private var pendingStatusSet: Set<String> = []
    private var flushWaiters: [CheckedContinuation<Void, any Error>] = []
    private var flushing = false
    /// Statuses per transaction (etcd takes at most 128 operations in one).
    static let statusesPerCommit = 100
    /// Made in `run()` and shut down when it ends: an agent that never runs owns no client.
    private var httpClient: HTTPClient?
    /// Downloads Marathon's `fetch` artifacts into sandboxes; made in `run()`.
    private var fetcher: ArtifactFetcher?
    private let commands = CommandRunner()
    /// The last status this agent wrote per instance, to avoid rewriting what is already there.
    private var written: [String: InstanceStatus] = [:]
    /// This node's instance records, as the store's change feed last said (`followAssignments`).
    private var assigned: [String: InstanceSpec] = [:]
    private var assignedLoaded = false
    /// A change came that the sync loop has not seen yet; and the loop waiting for one.
    private var syncPending = false
    private var syncWaiters: [CheckedContinuation<Void, Never>] = []
    private var lastCollection = Date.distantPast
    /// Where instances' secrets are read at start; nil when this node has no secrets key.
    private let secretValues: (any SecretValues)?
    /// Where instances' tokens come from; nil when access control is off.
    private let workloadTokens: (any WorkloadTokens)?

    /// - Parameters:
    ///   - images: the node's image store; with it (and a runtime, `containers`) the agent runs OCI images.
    public init(
        configuration: Configuration, store: any StateStore, cgroups: Cgroups, images: ImageStore? = nil,
        containers: ContainerOptions? = nil, secrets: (any SecretValues)? = nil, workloadTokens: (any WorkloadTokens)? = nil, logger: Logger
    ) {
        self.secretValues = secrets
        self.workloadTokens = workloadTokens
        self.configuration = configuration
        self.store = store
        self.logger = logger
        self.cgroups = cgroups
        self.sandboxRoot = configuration.dataDirectory + "/sandboxes"
        let exec = ExecDriver(cgroups: cgroups)
        var drivers: [String: any InstanceDriver] = [exec.name: exec]
        if let images, let containers {
            var bridge: ContainerBridge?
            if let options = containers.bridge {
                do {
                    bridge = ContainerBridge(
                        network: try BridgeNetwork(
                            configuration: BridgeNetworkConfiguration(
                                stateDirectory: URL(fileURLWithPath: configuration.dataDirectory + "/bridge"), bridgeName: options.name,
                                cidr: options.cidr, namePrefix: options.namePrefix)))
                } catch {
                    logger.error("container/bridge networking is off: \(error)")
                }
            }
            let oci = OCIDriver(
                configuration: .init(runtime: containers.runtime, containersDirectory: configuration.dataDirectory + "/containers", rootfs: containers.rootfs),
                images: images,
                cgroups: cgroups, bridge: bridge)
            if let reason = oci.unavailableReason() {
                logger.warning("OCI containers are off on this node: \(reason)")
            } else {
                logger.info("OCI containers with \((try? oci.runtimePath.get()) ?? containers.runtime), root filesystems by \(oci.overlayAvailable ? "overlayfs" : "copy")")
            }
            drivers[oci.name] = oci
        }
        self.drivers = drivers
    }

    /// What the OCI driver needs from the command line.
    public struct ContainerOptions: Sendable {
        /// `--oci-runtime`: runc, crun, or a path.
        public var runtime: String
        /// The bridge for `container/bridge` networking; nil turns it off.
        public var bridge: BridgeOptions?
        /// `--container-rootfs`: overlayfs, copies, or overlayfs where it works.
        public var rootfs: ContainerRootfsMode

        public init(runtime: String = "runc", bridge: BridgeOptions? = nil, rootfs: ContainerRootfsMode = .auto) {
            self.runtime = runtime
            self.bridge = bridge
            self.rootfs = rootfs
        }
    }

    /// `--bridge-name` and `--bridge-cidr`; the prefix names the agent's network namespaces and nft table.
    public struct BridgeOptions: Sendable {
        public var name: String
        public var cidr: String
        public var namePrefix: String

        public init(name: String, cidr: String, namePrefix: String) {
            self.name = name
            self.cidr = cidr
            self.namePrefix = namePrefix
        }
    }

    /// The drivers that can run instances here, as the node record advertises them.
    public nonisolated var availableDrivers: [String] {
        drivers.values.filter { $0.unavailableReason() == nil }.map(\.name).sorted()
    }

    func sandbox(of instanceID: String) -> String { sandboxRoot + "/" + instanceID }

    /// The instances this agent supervises now (started, not yet exited), for metrics.
    public func supervisedInstances() -> [SupervisedInstance] {
        processes.compactMap { id, process in
            assigned[id].map { SupervisedInstance(id: id, app: $0.appID, pid: process.pid, driver: $0.definition.driver) }
        }
    }

    func logs(of instanceID: String) -> InstanceLogs {
        InstanceLogs(directory: sandbox(of: instanceID), maxBytes: configuration.logMaxBytes, keep: configuration.logKeep)
    }

    private func driver(for spec: InstanceSpec) -> (any InstanceDriver)? { drivers[spec.definition.driver] }

    private func driver(named name: String?) -> any InstanceDriver { drivers[name ?? "exec"] ?? drivers["exec"]! }

    public func run() async throws {
        let client = HealthProbe.makeHTTPClient()
        httpClient = client
        // Artifacts follow redirects by the fetcher's own rules, so they get a client of their own.
        let fetchClient = HTTPClient(eventLoopGroupProvider: .singleton, configuration: ArtifactFetcher.httpClientConfiguration())
        fetcher = ArtifactFetcher(httpClient: fetchClient, cacheDirectory: configuration.dataDirectory + "/fetch-cache", logger: logger)
        do {
            try await runAgent()
        } catch {
            try? await client.shutdown()
            try? await fetchClient.shutdown()
            throw error
        }
        try? await client.shutdown()
        try? await fetchClient.shutdown()
    }

    private func runAgent() async throws {
        try FileManager.default.createDirectory(atPath: sandboxRoot, withIntermediateDirectories: true)
        var node = configuration.node
        node.drivers = availableDrivers
        let record = try StateCodec.encode(node)
        let lease = try await register(record)
        try await recover()
        await withDiscardingTaskGroup { group in
            group.addTask { await self.consumeExits() }
            group.addTask { await self.sampleLogsLoop() }
            if let ttl = self.configuration.nodeLeaseTTL {
                group.addTask { await self.heartbeat(record: record, lease: lease, ttl: ttl) }
            }
            group.addTask {
                await self.reconcileLoop()
                await self.stopLaunching()
                await self.waitForStartsUnderWay()
                if self.configuration.stopInstancesOnExit { await self.stopAll() }
                await self.stopAllHealthChecks()
                self.watcher.stop()
                self.commands.stop()
            }
        }
    }

    /// Keeps the node's lease alive; if it ended (a store outage longer than the TTL), holds the
    /// record under a new one.
    private func heartbeat(record: Data, lease first: StoreLease.ID?, ttl: Int64) async {
        var lease = first
        while !Task.isCancelled && !Task.isShuttingDownGracefully {
            try? await cancelWhenGracefulShutdown { try await Task.sleep(for: .milliseconds(ttl * 1000 / 3)) }
            if Task.isShuttingDownGracefully || Task.isCancelled { break }
            do {
                if let held = lease {
                    try await store.keepAlive(held)
                } else {
                    lease = try await register(record)
                }
            } catch StoreError.leaseNotFound {
                logger.warning("this node's lease ended (no renewal reached the store for \(ttl) s): registering again")
                lease = try? await register(record)
                // Meanwhile the leader may have marked this node's instances unreachable.
                if lease != nil { await republishStatuses() }
            } catch {
                logger.warning("node heartbeat: \(error)")
            }
        }
        // Leaving for good (instances stop with the agent): the record goes now, not at the TTL.
        if let held = lease, configuration.stopInstancesOnExit { try? await store.revokeLease(held) }
    }

    /// Tells the store again how every instance here is, as of now: after this node's record was
    /// gone, the leader may have marked them `TASK_UNREACHABLE`.
    private func republishStatuses() async {
        let now = Timestamp.format(Date())
        let current = written.values.filter { !$0.state.isTerminal }.map { status -> InstanceStatus in
            var refreshed = status
            refreshed.updatedAt = now
            return refreshed
        }
        guard !current.isEmpty else { return }
        do {
            try await write(current)
            logger.notice("back in the cluster: reported \(current.count) instance(s) as they are")
        } catch {
            logger.warning("could not report this node's instances after registering again: \(error); the next change reports them")
        }
    }

    /// Writes the node's record, under a new lease in a cluster. Returns the lease.
    private func register(_ record: Data) async throws -> StoreLease.ID? {
        let key = StateKeys.node(configuration.node.name)
        guard let ttl = configuration.nodeLeaseTTL else {
            try await store.put(key, record)
            return nil
        }
        let lease = try await store.grantLease(ttl: ttl)
        // The record without a lease stays when the node goes: `flotilla nodes` shows it down.
        try await store.commit(
            StoreTransaction(mutations: [.put(key, record, lease: lease.id), .put(StateKeys.nodeRecord(configuration.node.name), record)]))
        return lease.id
    }

    /// Waits (up to a minute: an image pull is not a start) for starts that are in a driver.
    private func waitForStartsUnderWay() async {
        let deadline = Date().addingTimeInterval(60)
        while startsInFlight > 0 && Date() < deadline { try? await Task.sleep(for: .milliseconds(20)) }
    }

    /// Stops every instance (SIGTERM, then SIGKILL after its grace period) and records them killed.
    private func stopAll() async {
        let ids = Array(processes.keys)
        guard !ids.isEmpty else {
            // An exit may still be cleaning up after its instance: let it finish.
            let deadline = Date().addingTimeInterval(5)
            while exitsInFlight > 0 && Date() < deadline { try? await Task.sleep(for: .milliseconds(20)) }
            return
        }
        logger.info("stopping \(ids.count) instance(s) before exit")
        var graces: [String: Double] = [:]
        for entry in (try? await store.list(prefix: StateKeys.instances(on: configuration.node.name)).entries) ?? [] {
            if let spec = try? StateCodec.decode(InstanceSpec.self, from: entry.value) { graces[spec.id] = spec.definition.killGracePeriod }
        }
        for id in ids {
            stopping[id] = "stopped with the agent"
            stopHealthChecks(id)
            if let process = processes[id] { driver(named: written[id]?.driver).signal(process, instanceID: id, SIGTERM) }
        }
        let deadline = Date().addingTimeInterval(graces.values.max() ?? AppDefinition.Defaults.taskKillGracePeriodSeconds)
        while (!processes.isEmpty || exitsInFlight > 0) && Date() < deadline {
            try? await Task.sleep(for: .milliseconds(50))
        }
        for (id, process) in processes { driver(named: written[id]?.driver).signal(process, instanceID: id, SIGKILL) }
        let killDeadline = Date().addingTimeInterval(2)
        while (!processes.isEmpty || exitsInFlight > 0) && Date() < killDeadline {
            try? await Task.sleep(for: .milliseconds(20))
        }
    }

    // MARK: - Reconciling with the scheduler's wishes

    /// Syncs on every change to this node's assignments (the feed wakes it), and every 2 s anyway
    /// (a start that was refused gets another try, logs rotate).
    private func reconcileLoop() async {
        await withDiscardingTaskGroup { group in
            group.addTask { await self.followAssignments() }
            while !Task.isCancelled && !Task.isShuttingDownGracefully {
                if let specs = assignedSpecs() {
                    do {
                        try await sync(specs)
                    } catch {
                        logger.error("agent sync failed, retrying: \(error)")
                    }
                }
                await waitForAssignments(timeout: .seconds(2))
            }
            // The feed's stream ends when its task is cancelled.
            group.cancelAll()
        }
    }

    /// This node's instance records, kept from one listing and then the change feed: a change
    /// costs the records it touches, not a listing of the cluster's instances.
    private func followAssignments() async {
        while !Task.isCancelled && !Task.isShuttingDownGracefully {
            do {
                let listing = try await store.list(prefix: StateKeys.instances(on: configuration.node.name))
                assigned = Dictionary(
                    decodeAssigned(listing.entries).map { ($0.id, $0) }, uniquingKeysWith: { $1 })
                assignedLoaded = true
                wakeSync()
                let feed = store.watch(prefix: StateKeys.instances(on: configuration.node.name), after: listing.index)
                try await cancelWhenGracefulShutdown {
                    for try await batch in feed { await self.applyAssigned(batch) }
                }
            } catch StoreError.compacted {
                logger.notice("the instance feed passed a store compaction: listing again")
            } catch is CancellationError {
                return
            } catch {
                logger.warning("following this node's instances failed, listing again: \(error)")
                try? await Task.sleep(for: .milliseconds(500))
            }
        }
    }

    private func applyAssigned(_ batch: [StoreEvent]) {
        for event in batch {
            let id = StateKeys.instanceID(ofKey: event.key)
            if event.kind == .delete {
                assigned[id] = nil
            } else if let spec = decodeAssigned([event.entry]).first {
                assigned[id] = spec
            } else {
                assigned[id] = nil  // another node's, or unreadable
            }
        }
        wakeSync()
    }

    private func decodeAssigned(_ entries: [StoreEntry]) -> [InstanceSpec] {
        StateCodec.decodeAll(InstanceSpec.self, from: entries) { key, error in
            logger.error("skipping unreadable instance record \(key): \(error)")
        }.filter { $0.node == configuration.node.name }
    }

    private func assignedSpecs() -> [InstanceSpec]? { assignedLoaded ? Array(assigned.values) : nil }

    private func wakeSync() {
        syncPending = true
        let waiters = syncWaiters
        syncWaiters.removeAll()
        for waiter in waiters { waiter.resume() }
    }

    /// Returns when the assignments changed since the last call, or after `timeout`.
    private func waitForAssignments(timeout: Duration) async {
        if syncPending {
            syncPending = false
            return
        }
        let timer = Task {
            try? await cancelWhenGracefulShutdown { try await Task.sleep(for: timeout) }
            if !Task.isCancelled { self.wakeSync() }
        }
        await withCheckedContinuation { syncWaiters.append($0) }
        timer.cancel()
        syncPending = false
    }

    /// One pass: launch what should run, stop what should stop. Returns the index it read at.
    @discardableResult
    func sync() async throws -> UInt64 {
        let listing = try await store.list(prefix: StateKeys.instances(on: configuration.node.name))
        try await sync(decodeAssigned(listing.entries))
        await waitForLaunches()
        return listing.index
    }

    /// One pass over this node's instance records.
    func sync(_ specs: [InstanceSpec]) async throws {
        var updates: [InstanceStatus] = []
        var launches: [InstanceSpec] = []
        let now = Timestamp.format(Date())
        for spec in specs {
            let status = written[spec.id]
            if processes[spec.id] != nil {
                if spec.goal == .stop && stopping[spec.id] == nil {
                    let draining = spec.definition.drainSeconds > 0
                    beginStop(spec, reason: spec.stopReason ?? "killed", drainSeconds: spec.definition.drainSeconds)
                    if var killing = status {
                        killing.state = .killing
                        killing.draining = draining
                        killing.updatedAt = now
                        updates.append(killing)
                    }
                }
                continue
            }
            if let status, status.state.isTerminal { continue }
            switch spec.goal {
            case .run:
                if preparing[spec.id] == nil, !starting.contains(spec.id), queuedSpecs[spec.id] == nil, status == nil || status?.state == .staging {
                    launches.append(spec)
                }
            case .stop:
                preparing.removeValue(forKey: spec.id)?.cancel()
                queuedSpecs[spec.id] = nil
                if starting.contains(spec.id) {
                    // Inside its driver: the start is undone when it returns, and only then is
                    // the instance killed (no process outlives the status that says it ended).
                    cancelledStarts.insert(spec.id)
                    continue
                }
                updates.append(InstanceStatus(id: spec.id, state: .killed, message: spec.stopReason, updatedAt: now))
            }
        }
        // In order of id, which starts with the app's name: an app's instances start together,
        // so their statuses touch (and the scheduler replans) one app at a time, not all of them.
        for spec in launches.sorted(by: { $0.id < $1.id }) { queueLaunch(spec) }
        if !updates.isEmpty { try await write(updates) }
        if Date().timeIntervalSince(lastCollection) > collectionInterval { collectGarbage(keeping: Set(specs.map(\.id))) }
    }

    /// Queues a start; workers (at most `maximumConcurrentStarts`) take them in order, so a
    /// thousand starts neither go one by one nor crowd out health checks and the API.
    private func queueLaunch(_ spec: InstanceSpec) {
        guard launching else { return }
        queuedSpecs[spec.id] = spec
        launchQueue.append(spec.id)
        while launchWorkers < Self.maximumConcurrentStarts, launchWorkers < queuedSpecs.count {
            launchWorkers += 1
            Task { await self.launchWorker() }
        }
    }

    private func launchWorker() async {
        while launchHead < launchQueue.count {
            let id = launchQueue[launchHead]
            launchHead += 1
            // A spec no longer queued was stopped (or taken) meanwhile.
            guard let spec = queuedSpecs.removeValue(forKey: id), launching, processes[id] == nil else { continue }
            // Not waited for: the next start goes on while this status joins the next commit.
            if let update = await launch(spec) { writeLater([update]) }
        }
        launchWorkers -= 1
        if launchWorkers == 0 {
            launchQueue.removeAll(keepingCapacity: true)
            launchHead = 0
            let waiters = launchesDoneWaiters
            launchesDoneWaiters.removeAll()
            for waiter in waiters { waiter.resume() }
        }
    }

    private var launchesDoneWaiters: [CheckedContinuation<Void, Never>] = []

    /// Returns once no start is queued or under way in a worker.
    func waitForLaunches() async {
        guard launchWorkers > 0 else { return }
        await withCheckedContinuation { launchesDoneWaiters.append($0) }
    }

    /// Starts an instance, or begins preparing it (an image pull) in the background. Returns the
    /// status to write now, or nil when a preparation will write it.
    private func launch(_ spec: InstanceSpec) async -> InstanceStatus? {
        let now = Timestamp.format(Date())
        guard let driver = driver(for: spec) else {
            return InstanceStatus(
                id: spec.id, state: .failed, message: "this node has no '\(spec.definition.driver)' driver; see 'flotilla nodes'", updatedAt: now)
        }
        if let reason = driver.unavailableReason() {
            return InstanceStatus(id: spec.id, state: .failed, message: "the \(driver.name) driver cannot run here: \(reason)", updatedAt: now)
        }
        let artifacts = spec.definition.fetch.map {
            ArtifactRequest(uri: $0.uri, extract: $0.extract, executable: $0.executable, cache: $0.cache, outputFile: $0.outputFile, destPath: $0.destPath)
        }
        if driver.needsPreparation(spec) || !artifacts.isEmpty {
            let id = spec.id
            let staging = InstanceStatus(id: id, state: .staging, driver: driver.name, message: "preparing", updatedAt: now)
            written[id] = staging
            let sandbox = sandbox(of: id)
            let fetcher = fetcher
            preparing[id] = Task {
                do {
                    let progress: @Sendable (String) -> Void = { message in Task { await self.recordProgress(id, message) } }
                    if !artifacts.isEmpty, let fetcher {
                        try FileManager.default.createDirectory(atPath: sandbox, withIntermediateDirectories: true)
                        try await fetcher.fetch(artifacts, into: sandbox, progress: progress)
                    }
                    try await driver.prepare(spec, progress: progress)
                } catch {
                    await self.finishPreparing(spec, failure: error)
                    return
                }
                await self.finishPreparing(spec, failure: nil)
            }
            return staging
        }
        return await start(spec, driver: driver)
    }

    /// Shows what a preparation is doing (`pulling registry/app:1: 12.5 of 48.0 MB`) in the status message.
    private func recordProgress(_ id: String, _ message: String) async {
        guard preparing[id] != nil, var status = written[id], status.state == .staging, status.message != message else { return }
        status.message = message
        status.updatedAt = Timestamp.format(Date())
        do { try await write([status]) } catch { logger.debug("could not record the progress of \(id): \(error)") }
    }

    /// Ends preparations and refuses new starts: an instance that began starting before is stopped
    /// with the rest (`start` checks again once its driver returns).
    private func stopLaunching() {
        launching = false
        queuedSpecs.removeAll()
        for task in preparing.values { task.cancel() }
        preparing.removeAll()
    }

    private func finishPreparing(_ spec: InstanceSpec, failure: (any Error)?) async {
        guard preparing.removeValue(forKey: spec.id) != nil, !Task.isCancelled, launching else { return }
        let status: InstanceStatus
        if let failure {
            logger.warning("could not prepare \(spec.id): \(failure)")
            status = InstanceStatus(id: spec.id, state: .failed, driver: spec.definition.driver, message: "\(failure)", updatedAt: Timestamp.format(Date()))
        } else if let driver = driver(for: spec), let started = await start(spec, driver: driver) {
            status = started
        } else {
            return
        }
        do { try await write([status]) } catch { logger.error("could not record the start of \(spec.id): \(error)") }
    }

    private func start(_ spec: InstanceSpec, driver: any InstanceDriver) async -> InstanceStatus? {
        // One start per instance: a sync that runs while a finished preparation's start is still
        // inside the driver sees the instance staged and unprepared, and must not start it again.
        guard starting.insert(spec.id).inserted else { return nil }
        startsInFlight += 1
        defer {
            startsInFlight -= 1
            starting.remove(spec.id)
            cancelledStarts.remove(spec.id)
        }
        let now = Timestamp.format(Date())
        do {
            var context = LaunchContext(sandbox: sandbox(of: spec.id), logs: logs(of: spec.id), agentEnvironment: agentEnvironment)
            context.secrets = try await readSecrets(of: spec)
            if let workloadTokens {
                do {
                    context.extraEnvironment["FLOTILLA_TOKEN"] = try await workloadTokens.token(for: spec)
                } catch {
                    throw AgentError.launch("cannot make the instance's token: \(error)")
                }
            }
            try FileManager.default.createDirectory(atPath: context.sandbox, withIntermediateDirectories: true)
            guard launching else { return nil }
            let process = try await driver.start(spec, context: context)
            // The driver starts off the actor: the agent may have begun stopping meanwhile, or the
            // scheduler stopped (or removed) the instance. Either way the start is undone.
            let unwanted = cancelledStarts.remove(spec.id) != nil || (assignedLoaded && assigned[spec.id]?.goal != .run)
            guard launching, !unwanted else {
                // The agent began stopping, or the scheduler stopped the instance, while the
                // driver started it: undo the start; then the instance is killed.
                driver.signal(process, instanceID: spec.id, SIGKILL)
                await driver.cleanUp(instanceID: spec.id, process: process, state: process.state)
                if process.signalFD >= 0 { close(process.signalFD) }
                await workloadTokens?.revoke(instances: [spec.id])
                guard launching else { return nil }
                let reason = assigned[spec.id]?.stopReason ?? spec.stopReason ?? "killed"
                let killed = InstanceStatus(id: spec.id, state: .killed, driver: driver.name, message: reason, updatedAt: Timestamp.format(Date()))
                written[spec.id] = killed
                return killed
            }
            processes[spec.id] = process
            // The descriptor signals go through is the one watched: one per instance.
            watcher.watch(pidfd: process.signalFD, key: spec.id, closesWhenDone: false)
            logger.info("started \(spec.id) with \(driver.name) (pid \(process.pid))")
            var status = InstanceStatus(
                id: spec.id, state: .running, driver: driver.name, driverState: process.state, startedAt: now, updatedAt: now,
                health: spec.definition.healthChecks.map { _ in HealthResult() })
            if let readiness = spec.definition.readinessChecks.first {
                status.readiness = ReadinessResult(name: readiness.name, ready: false)
            }
            written[spec.id] = status
            startHealthChecks(spec, startedAt: Date())
            if let readiness = spec.definition.readinessChecks.first { startReadinessCheck(readiness, spec: spec) }
            return status
        } catch {
            logger.warning("could not start \(spec.id): \(error)")
            await workloadTokens?.revoke(instances: [spec.id])
            return InstanceStatus(id: spec.id, state: .failed, driver: driver.name, message: "\(error)", updatedAt: now)
        }
    }

    /// The values of the secrets the instance's app uses, read now so a changed secret reaches the
    /// next instance. A secret that cannot be read fails the start with its name and source.
    private func readSecrets(of spec: InstanceSpec) async throws -> [String: String] {
        let names = SecretSource.names(usedBy: spec.definition)
        guard !names.isEmpty else { return [:] }
        guard let secretValues else {
            throw AgentError.launch("the app uses secrets, and this node has no secrets key (start the agent with --secrets-key-file)")
        }
        var values: [String: String] = [:]
        for name in names.sorted() {
            guard let source = spec.definition.secrets[name] else { throw AgentError.launch("the secret '\(name)' is not declared in the app's secrets") }
            do {
                values[name] = try await secretValues.value(of: source)
            } catch {
                throw AgentError.launch("cannot read the secret '\(name)' (\(source.source)): \(error)")
            }
        }
        return values
    }

    /// Stops an instance the Flotilla way: out of discovery first (draining) for `drainSeconds`,
    /// then SIGTERM to its group, then SIGKILL after its grace period.
    private func beginStop(_ spec: InstanceSpec, reason: String, drainSeconds: Double) {
        guard processes[spec.id] != nil else { return }
        stopping[spec.id] = reason
        stopHealthChecks(spec.id)
        let grace = spec.definition.killGracePeriod
        let id = spec.id
        Task {
            if drainSeconds > 0 {
                try? await Task.sleep(for: .milliseconds(Int64(drainSeconds * 1000)))
            }
            await self.terminate(id, grace: grace)
        }
    }

    private func terminate(_ id: String, grace: Double) async {
        guard let process = processes[id] else { return }
        driver(named: written[id]?.driver).signal(process, instanceID: id, SIGTERM)
        try? await Task.sleep(for: .milliseconds(Int64(grace * 1000)))
        escalate(id)
    }

    private func escalate(_ id: String) {
        guard let process = processes[id] else { return }
        logger.info("\(id) outlived its grace period; sending SIGKILL")
        driver(named: written[id]?.driver).signal(process, instanceID: id, SIGKILL)
    }

    // MARK: - Health

    private func startHealthChecks(_ spec: InstanceSpec, startedAt: Date) {
        guard !spec.definition.healthChecks.isEmpty, !healthChecked.contains(spec.id), let httpClient else { return }
        let probe = HealthProbe(httpClient: httpClient, commands: commands)
        let sandbox = sandbox(of: spec.id)
        let environment = InstanceEnvironment.build(for: spec, sandbox: sandbox, agentEnvironment: agentEnvironment)
        let driver = driver(for: spec) ?? driver(named: nil)
        let id = spec.id
        let shell: @Sendable (String) -> [String] = { driver.commandArguments(for: $0, instanceID: id) }
        healthChecked.insert(id)
        let scheduler = healthScheduler
        Task {
            for (index, check) in spec.definition.healthChecks.enumerated() {
                // Spread the first checks of many instances so they do not land together.
                let jitter = Double.random(in: 0...min(1.0, check.intervalSeconds * 0.1))
                await scheduler.schedule(instance: id, firstAfter: .milliseconds(Int64(jitter * 1000)), interval: .milliseconds(Int64(check.intervalSeconds * 1000))) {
                    let outcome = await probe.run(check, for: spec, environment: environment, sandbox: sandbox, shell: shell)
                    return await self.record(outcome, check: check, index: index, spec: spec, startedAt: startedAt)
                }
            }
        }
    }

    /// The cancel reaches the scheduler in a task of its own, so it may overtake a schedule still
    /// on its way: such a check runs once more, finds the instance gone (`record` and
    /// `recordReadiness` say stop) and is not run again.
    private func stopHealthChecks(_ id: String) {
        let checked = healthChecked.remove(id) != nil
        let waitingForReady = readinessChecked.remove(id) != nil
        guard checked || waitingForReady else { return }
        let scheduler = healthScheduler
        Task { await scheduler.cancel(instance: id) }
    }

    /// Asks the readiness check every interval until the first ready answer, then stops.
    private func startReadinessCheck(_ check: ReadinessCheck, spec: InstanceSpec) {
        guard !readinessChecked.contains(spec.id), let httpClient else { return }
        let probe = HealthProbe(httpClient: httpClient, commands: commands)
        readinessChecked.insert(spec.id)
        let scheduler = healthScheduler
        Task {
            await scheduler.schedule(instance: spec.id, firstAfter: .zero, interval: .milliseconds(Int64(check.intervalSeconds * 1000))) {
                let answer = await probe.readiness(check, for: spec)
                return await !self.recordReadiness(answer, check: check, spec: spec)
            }
        }
    }

    /// Writes a readiness answer when it changes what others see. Returns true once ready.
    private func recordReadiness(_ answer: Result<ReadinessResult.Response, ProbeFailure>, check: ReadinessCheck, spec: InstanceSpec) async -> Bool {
        guard processes[spec.id] != nil, stopping[spec.id] == nil, var status = written[spec.id] else { return true }
        var result = ReadinessResult(name: check.name, ready: false)
        switch answer {
        case .success(let response):
            result.ready = check.httpStatusCodesForReady.contains(response.status)
            if check.preserveLastResponse { result.lastResponse = response }
            if !result.ready { status.message = "readiness check \(check.name): answered \(response.status), not one of \(check.httpStatusCodesForReady)" }
        case .failure(let failure):
            status.message = "readiness check \(check.name): \(failure.cause)"
        }
        if result.ready { status.message = nil }
        let changed = status.readiness != result
        status.readiness = result
        written[spec.id] = status
        if changed {
            status.updatedAt = Timestamp.format(Date())
            do { try await write([status]) } catch { logger.error("could not record the readiness of \(spec.id): \(error)") }
        }
        if result.ready { readinessChecked.remove(spec.id) }
        return result.ready
    }

    private func stopAllHealthChecks() async {
        healthChecked.removeAll()
        readinessChecked.removeAll()
        await healthScheduler.shutdown()
    }

    /// Folds one check result into the instance's status; writes it when health changed or a
    /// check failed, and kills the instance after `maxConsecutiveFailures` failures past its grace.
    /// Returns whether to go on checking (not once the instance is stopping or gone).
    private func record(_ outcome: ProbeOutcome, check: HealthCheck, index: Int, spec: InstanceSpec, startedAt: Date) async -> Bool {
        guard processes[spec.id] != nil, stopping[spec.id] == nil, var status = written[spec.id] else { return false }
        while status.health.count < spec.definition.healthChecks.count { status.health.append(HealthResult()) }
        var result = status.health[index]
        let before = result
        let now = Date()
        let nowText = Timestamp.format(now)
        if outcome.passed {
            result.alive = true
            result.consecutiveFailures = 0
            result.firstSuccess = result.firstSuccess ?? nowText
            result.lastSuccess = nowText
        } else {
            result.lastFailure = nowText
            result.lastFailureCause = outcome.cause
            let forgiven = result.firstSuccess == nil && now.timeIntervalSince(startedAt) < check.gracePeriodSeconds
            if !forgiven {
                result.alive = false
                result.consecutiveFailures += 1
            }
        }
        status.health[index] = result
        // Successes after a success change nothing others need to know: they are not written.
        let significant = before.alive != result.alive || result.consecutiveFailures != before.consecutiveFailures
            || (!outcome.passed && before.lastFailureCause != result.lastFailureCause)
        written[spec.id] = status
        let shouldKill = !outcome.passed && check.maxConsecutiveFailures > 0 && result.consecutiveFailures >= check.maxConsecutiveFailures
        if shouldKill {
            let cause = "unhealthy: \(result.consecutiveFailures) consecutive failed \(check.protocol.rawValue) checks; last: \(outcome.cause ?? "failed")"
            logger.warning("killing \(spec.id): \(cause)")
            status.killedUnhealthy = true
            status.message = cause
            status.state = .killing
            written[spec.id] = status
            beginStop(spec, reason: cause, drainSeconds: 0)
        }
        if !outcome.passed && significant {
            // What an operator needs at 3 a.m.: the check's verdict and what the instance said last.
            let tail = InstanceLogs.tail(of: logs(of: spec.id).stderrPath, lines: 3)
            let message = "health check failed: \(outcome.cause ?? "failed")" + (tail.isEmpty ? "" : "; stderr: \(tail.suffix(400))")
            if !shouldKill { status.message = message } else { status.message = (status.message ?? "") + (tail.isEmpty ? "" : "; stderr: \(tail.suffix(400))") }
        } else if outcome.passed && before.alive != true {
            status.message = nil
        }
        written[spec.id] = status
        if significant || shouldKill {
            status.updatedAt = nowText
            do { try await write([status]) } catch { logger.error("could not record the health of \(spec.id): \(error)") }
        }
        return !shouldKill
    }

    // MARK: - Exits

    /// Exits are handled side by side: their clean-ups (cgroups, mounts) run off the actor and
    /// their statuses go out together.
    private func consumeExits() async {
        await withDiscardingTaskGroup { group in
            for await (id, exit) in watcher.exits {
                group.addTask {
                    do {
                        try await self.handleExit(of: id, exit)
                    } catch {
                        self.logger.error("could not record the exit of \(id): \(error)")
                    }
                }
            }
        }
    }

    private func handleExit(of id: String, _ exit: ProcessExit) async throws {
        guard let process = processes.removeValue(forKey: id) else { return }
        // Until its clean-up (unmounts, runtime records, the bridge) is done, the agent does not exit.
        exitsInFlight += 1
        defer { exitsInFlight -= 1 }
        let stopReason = stopping.removeValue(forKey: id)
        stopHealthChecks(id)
        // The last lines are dated now, not at the next round (which skips instances that ended).
        let files = logs(of: id)
        _ = files.recordTimes(since: sampledLogSizes.removeValue(forKey: id))
        files.markEnded()
        let oomKilled = cgroups.wasOOMKilled(instanceID: id)
        var status = written[id] ?? InstanceStatus(id: id, state: .running, driverState: process.state, updatedAt: "")
        await driver(named: status.driver).cleanUp(instanceID: id, process: process, state: status.driverState)
        if process.signalFD >= 0 { close(process.signalFD) }
        status.updatedAt = Timestamp.format(Date())
        status.exitCode = exit.code
        status.signal = exit.signal
        status.oomKilled = oomKilled
        status.draining = false
        if let stopReason {
            status.state = .killed
            status.message = stopReason
        } else if oomKilled {
            status.state = .failed
            let limit = (assigned[id] ?? queuedSpecs[id]).map { " of \(Int($0.definition.mem)) MiB" } ?? ""
            status.message = "OOM killed: the instance exceeded its memory limit\(limit)"
        } else if exit.isUnknown {
            status.state = .failed
            status.message = "exited; its status is unknown because the agent restarted while it ran"
        } else if exit.code == 0 {
            status.state = .finished
            status.message = "Command exited with status 0"
        } else {
            status.state = .failed
            if let code = exit.code {
                status.message = "Command exited with status \(code)"
            } else {
                status.message = "Command terminated by signal \(Self.signalName(exit.signal ?? 0))"
            }
            let tail = InstanceLogs.tail(of: logs(of: id).stderrPath, lines: 3)
            if !tail.isEmpty { status.message! += "; stderr: " + String(tail.suffix(400)) }
        }
        logger.info("\(id) ended: \(status.state.rawValue) \(status.message ?? "")")
        await workloadTokens?.revoke(instances: [id])
        try await write([status])
    }

    static func signalName(_ signal: Int32) -> String {
        let names: [Int32: String] = [
            SIGKILL: "SIGKILL", SIGTERM: "SIGTERM", SIGSEGV: "SIGSEGV", SIGABRT: "SIGABRT", SIGINT: "SIGINT",
            SIGHUP: "SIGHUP", SIGBUS: "SIGBUS", SIGFPE: "SIGFPE", SIGILL: "SIGILL", SIGPIPE: "SIGPIPE",
        ]
        return names[signal] ?? "\(signal)"
    }

    /// Writes statuses. Several writers (launch, exits, health, readiness) update one instance's
    /// status; each records its newest version first, and commits go one at a time taking the
    /// newest, so a write that waited for the store never puts an older status back.
    private func write(_ statuses: [InstanceStatus]) async throws {
        guard !statuses.isEmpty else { return }
        enqueue(statuses)
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
            flushWaiters.append(continuation)
        }
    }

    /// Like `write`, without waiting for the commit: the statuses are the newest at once, and a
    /// failed commit is logged.
    private func writeLater(_ statuses: [InstanceStatus]) {
        enqueue(statuses)
    }

    private func enqueue(_ statuses: [InstanceStatus]) {
        for status in statuses {
            written[status.id] = status
            if pendingStatusSet.insert(status.id).inserted { pendingStatusIDs.append(status.id) }
        }
        if !flushing {
            flushing = true
            Task { await self.flushStatuses() }
        }
    }

    /// Commits pending statuses (the newest of each, in transactions of `statusesPerCommit`) until
    /// none is left; each writer hears how the commit that carried its statuses went.
    private func flushStatuses() async {
        while !pendingStatusIDs.isEmpty {
            let ids = pendingStatusIDs
            pendingStatusIDs = []
            pendingStatusSet = []
            let waiters = flushWaiters
            flushWaiters = []
            var failure: (any Error)?
            do {
                for start in stride(from: 0, to: ids.count, by: Self.statusesPerCommit) {
                    let chunk = ids[start..<min(ids.count, start + Self.statusesPerCommit)]
                    let mutations = try chunk.compactMap { id in
                        try written[id].map { StoreMutation.put(StateKeys.status(id), try StateCodec.encode($0)) }
                    }
                    if !mutations.isEmpty { _ = try await store.commit(StoreTransaction(mutations: mutations)) }
                }
            } catch {
                failure = error
                logger.error("could not record the statuses of \(ids.count) instance(s), trying again: \(error)")
                // Kept: what a launch handed over without waiting is written once the store answers.
                for id in ids where pendingStatusSet.insert(id).inserted { pendingStatusIDs.append(id) }
            }
            for waiter in waiters {
                if let failure { waiter.resume(throwing: failure) } else { waiter.resume() }
            }
            if failure != nil {
                guard (try? await Task.sleep(for: .milliseconds(500))) != nil else { break }
            }
        }
        flushing = false
    }

    // MARK: - Recovery after a restart

    /// Adopts the processes that survived the agent, marks the rest lost, and kills any process that
    /// carries this agent's sandbox but belongs to no instance it should run.
    func recover() async throws {
        // All of `instances/`, not only this node's prefix: records an earlier version kept as
        // `instances/<id>` count too until the leader has moved them (else their processes would
        // look like orphans here).
        let specs = StateCodec.decodeAll(InstanceSpec.self, from: try await store.list(prefix: StateKeys.instances).entries)
            .filter { $0.node == configuration.node.name }
        let specsByID = Dictionary(specs.map { ($0.id, $0) }, uniquingKeysWith: { first, _ in first })
        let statuses = StateCodec.decodeAll(InstanceStatus.self, from: try await store.list(prefix: StateKeys.statuses).entries)
            .filter { specsByID[$0.id] != nil }
        for status in statuses { written[status.id] = status }

        // Session leaders started by this agent's data directory, whatever the store says.
        var leaders: [String: Int32] = [:]
        let sandboxPrefix = sandboxRoot + "/"
        for pid in ProcFS.allPIDs() where ProcFS.sessionID(of: pid) == pid && ProcFS.isAlive(pid) {
            guard let sandbox = ProcFS.environment(of: pid, variable: ProcessSpawner.sandboxVariable), sandbox.hasPrefix(sandboxPrefix) else { continue }
            leaders[String(sandbox.dropFirst(sandboxPrefix.count))] = pid
        }

        var updates: [InstanceStatus] = []
        var launches: [InstanceSpec] = []
        let now = Timestamp.format(Date())
        for spec in specs {
            let status = written[spec.id]
            if status?.state.isTerminal == true { continue }
            let leader = leaders.removeValue(forKey: spec.id)
            let recordedPID = status?.driverState["pid"].flatMap { Int32($0) }
            if let leader, let ticks = ProcFS.startTicks(of: leader), spec.goal == .run,
                recordedPID == nil || recordedPID == leader
            {
                var state = status?.driverState ?? [:]
                state["pid"] = String(leader)
                state["startTicks"] = String(ticks)
                adopt(id: spec.id, pid: leader, ticks: ticks, state: state)
                let started = status?.startedAt.flatMap(Timestamp.parse) ?? Date()
                startHealthChecks(spec, startedAt: started)
                if let readiness = spec.definition.readinessChecks.first, status?.readiness?.ready != true {
                    startReadinessCheck(readiness, spec: spec)
                }
                if status?.state != .running || recordedPID != leader {
                    var adopted = status ?? InstanceStatus(id: spec.id, state: .running, updatedAt: now)
                    adopted.state = .running
                    adopted.driver = adopted.driver ?? spec.definition.driver
                    adopted.driverState = state
                    adopted.startedAt = status?.startedAt ?? now
                    adopted.updatedAt = now
                    updates.append(adopted)
                }
                logger.info("adopted \(spec.id) (pid \(leader)) after restart")
            } else if let leader {
                // Meant to stop, or not the process we recorded: end it as a stop would.
                await killGroup(leader, instanceID: spec.id)
                updates.append(InstanceStatus(id: spec.id, state: .killed, message: spec.stopReason ?? "stopped during agent restart", updatedAt: now))
            } else if let status, recordedPID != nil || status.state != .staging {
                var lost = status
                lost.state = .lost
                lost.message = "the process was gone when the agent restarted"
                lost.updatedAt = now
                updates.append(lost)
            }
        }
        // Processes whose instance is unknown here: never leave an orphan.
        for (id, pid) in leaders {
            logger.warning("killing orphaned process \(pid) of unknown instance \(id)")
            await killGroup(pid, instanceID: id)
        }
        var leftovers = Set(cgroups.instanceIDs())
        for driver in drivers.values { leftovers.formUnion(driver.leftoverInstanceIDs()) }
        for id in leftovers.sorted() where processes[id] == nil {
            for driver in drivers.values { await driver.cleanUp(instanceID: id, process: nil, state: written[id]?.driverState ?? [:]) }
        }
        if !updates.isEmpty { try await write(updates) }
        // Tokens of instances that ended while no agent watched them.
        await workloadTokens?.revoke(allBut: Set(processes.keys), node: configuration.node.name)
    }

    private func adopt(id: String, pid: Int32, ticks: UInt64, state: [String: String]) {
        let pidfd = CFlotillaSpawnBridge.pidfd(for: pid)
        // The pid could have been reused between reading its start time and opening the pidfd.
        guard pidfd >= 0, ProcFS.startTicks(of: pid) == ticks else {
            if pidfd >= 0 { close(pidfd) }
            return
        }
        processes[id] = SupervisedProcess(pid: pid, startTicks: ticks, signalFD: pidfd, state: state)
        watcher.watch(pidfd: pidfd, key: id, closesWhenDone: false)
    }

    private func killGroup(_ pid: Int32, instanceID: String) async {
        kill(-pid, SIGKILL)
        let state = written[instanceID]?.driverState ?? [:]
        for driver in drivers.values {
            await driver.cleanUp(instanceID: instanceID, process: SupervisedProcess(pid: pid, startTicks: 0, signalFD: -1, state: state), state: state)
        }
    }

    /// Raises the agent's soft open-file limit to the hard one: each instance holds one descriptor
    /// (its pidfd) for as long as it runs. Says when the limit caps how many instances can run.
    public static func raiseOpenFileLimit(logger: Logger) {
        let limit = CFlotillaSpawnBridge.raiseOpenFileLimit()
        if limit >= 0 && limit < 65536 {
            logger.notice("open-file limit \(limit): at most about \(max(0, limit - 1000)) instances can run on this node; raise it (LimitNOFILE= in the unit, ulimit -Hn) for more")
        }
    }

    // MARK: - Housekeeping

    /// Dates and rotates running instances' logs about once a second (`InstanceLogs.recordTimes`),
    /// at most `logChecksPerRound` instances a round, taking them in turn: with ten thousand
    /// instances a log is looked at every 10 s, and the agent does not stat twenty thousand files
    /// a second.
    private func sampleLogsLoop() async {
        while !Task.isCancelled && !Task.isShuttingDownGracefully {
            sampleLogs()
            try? await cancelWhenGracefulShutdown { try await Task.sleep(for: .seconds(1)) }
        }
    }

    private func sampleLogs() {
        if logCheckOrder.isEmpty { logCheckOrder = Array(processes.keys) }
        var checked = 0
        while checked < Self.logChecksPerRound, let id = logCheckOrder.popLast() {
            guard processes[id] != nil else { continue }
            sampledLogSizes[id] = logs(of: id).recordTimes(since: sampledLogSizes[id])
            checked += 1
        }
    }

    static let logChecksPerRound = 1000
    /// The instances whose logs this round of checks has not looked at yet.
    private var logCheckOrder: [String] = []
    /// Each running instance's log sizes at its last sample.
    private var sampledLogSizes: [String: InstanceLogs.SampledSizes] = [:]

    /// How often `collectGarbage` runs: a minute, or a quarter of the retention age when shorter.
    private var collectionInterval: Double { min(60, max(1, (configuration.logRetention.age ?? 240) / 4)) }

    /// Applies `--log-retention` to every sandbox's logs (ended instances' too), and tidies the
    /// sandboxes of instances the store no longer knows: after an hour only their logs stay (so
    /// `flotilla logs` still reads an instance that failed), and once retention has taken those,
    /// the sandbox goes.
    private func collectGarbage(keeping live: Set<String>) {
        let now = Date()
        lastCollection = now
        written = written.filter { live.contains($0.key) }
        let manager = FileManager.default
        let entries = (try? manager.contentsOfDirectory(atPath: sandboxRoot)) ?? []
        var files: [LogRetentionPlan.File] = []
        for entry in entries {
            files += LogRetentionPlan.files(inSandbox: sandboxRoot + "/" + entry, running: processes[entry] != nil)
        }
        for path in LogRetentionPlan(retention: configuration.logRetention).expired(files, now: now) {
            try? manager.removeItem(atPath: path)
        }
        for entry in entries where !live.contains(entry) && processes[entry] == nil && !starting.contains(entry) && preparing[entry] == nil {
            let path = sandboxRoot + "/" + entry
            guard let modified = (try? manager.attributesOfItem(atPath: path))?[.modificationDate] as? Date else { continue }
            let names = (try? manager.contentsOfDirectory(atPath: path)) ?? []
            let logs = names.filter(LogRetentionPlan.isLogFile)
            if logs.isEmpty, now.timeIntervalSince(modified) > 60 {
                try? manager.removeItem(atPath: path)
            } else if !logs.isEmpty, logs.count < names.count, now.timeIntervalSince(modified) > 3600 {
                for name in names where !LogRetentionPlan.isLogFile(name) { try? manager.removeItem(atPath: path + "/" + name) }
            }
        }
    }
}

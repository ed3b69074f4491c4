import Foundation

/// Marathon's task states, as the API spells them.
public enum TaskState: String, Sendable, Hashable, Codable {
    case staging = "TASK_STAGING"
    case starting = "TASK_STARTING"
    case running = "TASK_RUNNING"
    case killing = "TASK_KILLING"
    case finished = "TASK_FINISHED"
    case failed = "TASK_FAILED"
    case killed = "TASK_KILLED"
    case lost = "TASK_LOST"
    case error = "TASK_ERROR"
    /// On a node that is down (its agent stopped renewing its record): not known to have ended.
    case unreachable = "TASK_UNREACHABLE"

    /// A state the instance never leaves.
    public var isTerminal: Bool {
        switch self {
        case .finished, .failed, .killed, .lost, .error: return true
        case .staging, .starting, .running, .killing, .unreachable: return false
        }
    }

    /// A terminal state that counts towards the app's crash backoff (kills do not).
    public var countsAsFailure: Bool {
        switch self {
        case .failed, .finished, .lost, .error: return true
        default: return false
        }
    }
}

/// What the scheduler wants of an instance. Written by the control loop; the node's agent reads it.
public struct InstanceSpec: Sendable, Hashable, Codable {
    public enum Goal: String, Sendable, Hashable, Codable {
        case run
        case stop
    }

    /// Marathon's task id: `shop_cart.<uuid>`.
    public var id: String {
        _read { yield storage.fields.id }
        _modify {
            makeUnique()
            yield &storage.fields.id
        }
    }
    public var appID: AppID {
        _read { yield storage.fields.appID }
        _modify {
            makeUnique()
            yield &storage.fields.appID
        }
    }
    /// The app version the instance was started from, and the config version it carries.
    public var version: String {
        _read { yield storage.fields.version }
        _modify {
            makeUnique()
            yield &storage.fields.version
        }
    }
    public var configVersion: String {
        _read { yield storage.fields.configVersion }
        _modify {
            makeUnique()
            yield &storage.fields.configVersion
        }
    }
    /// The definition to run, as it was at `version`. Kept in a box of its own too: the instances
    /// of one version share one, and changing an instance's other fields copies a pointer to it.
    public var definition: AppDefinition {
        _read { yield storage.fields.definition.value }
        _modify {
            makeUnique()
            if !isKnownUniquelyReferenced(&storage.fields.definition) {
                storage.fields.definition = DefinitionBox(storage.fields.definition.value)
            }
            yield &storage.fields.definition.value
        }
    }
    public var node: String {
        _read { yield storage.fields.node }
        _modify {
            makeUnique()
            yield &storage.fields.node
        }
    }
    public var host: String {
        _read { yield storage.fields.host }
        _modify {
            makeUnique()
            yield &storage.fields.host
        }
    }
    public var ports: [Int] {
        _read { yield storage.fields.ports }
        _modify {
            makeUnique()
            yield &storage.fields.ports
        }
    }
    public var goal: Goal {
        _read { yield storage.fields.goal }
        _modify {
            makeUnique()
            yield &storage.fields.goal
        }
    }
    /// Why the instance was asked to stop ("scaled down", "replaced by a new version", "killed through the API").
    public var stopReason: String? {
        _read { yield storage.fields.stopReason }
        _modify {
            makeUnique()
            yield &storage.fields.stopReason
        }
    }
    public var stagedAt: String {
        _read { yield storage.fields.stagedAt }
        _modify {
            makeUnique()
            yield &storage.fields.stagedAt
        }
    }
    /// Running but out of service: a blue-green set that is not (or no longer) live. It gets no
    /// traffic and is not in discovery; switching it in is instant.
    public var standby: Bool {
        _read { yield storage.fields.standby }
        _modify {
            makeUnique()
            yield &storage.fields.standby
        }
    }
    /// For an old blue-green set kept warm after a switch: when it is stopped.
    public var standbyUntil: String? {
        _read { yield storage.fields.standbyUntil }
        _modify {
            makeUnique()
            yield &storage.fields.standbyUntil
        }
    }

    // Every field in one shared box (copy on write): the scheduler copies specs out of its maps
    // for every instance it plans, and a copy then costs one retain.
    private struct Fields: Hashable {
        var id: String
        var appID: AppID
        var version: String
        var configVersion: String
        var definition: DefinitionBox
        var node: String
        var host: String
        var ports: [Int]
        var goal: Goal
        var stopReason: String?
        var stagedAt: String
        var standby: Bool
        var standbyUntil: String?
    }

    // Mutated only after `makeUnique`.
    private final class Storage: @unchecked Sendable {
        var fields: Fields
        init(_ fields: Fields) { self.fields = fields }
    }

    private var storage: Storage

    private mutating func makeUnique() {
        if !isKnownUniquelyReferenced(&storage) { storage = Storage(storage.fields) }
    }

    public static func == (lhs: InstanceSpec, rhs: InstanceSpec) -> Bool {
        lhs.storage === rhs.storage || lhs.storage.fields == rhs.storage.fields
    }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(storage.fields)
    }

    public init(
        id: String, appID: AppID, version: String, configVersion: String, definition: AppDefinition, node: String,
        host: String, ports: [Int], goal: Goal = .run, stopReason: String? = nil, stagedAt: String, standby: Bool = false,
        standbyUntil: String? = nil
    ) {
        storage = Storage(
            Fields(
                id: id, appID: appID, version: version, configVersion: configVersion, definition: DefinitionBox(definition), node: node,
                host: host, ports: ports, goal: goal, stopReason: stopReason, stagedAt: stagedAt, standby: standby,
                standbyUntil: standbyUntil))
    }

    enum CodingKeys: String, CodingKey {
        case id, appID, version, configVersion, definition, node, host, ports, goal, stopReason, stagedAt, standby, standbyUntil
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        storage = Storage(
            Fields(
                id: try container.decode(String.self, forKey: .id),
                appID: try container.decode(AppID.self, forKey: .appID),
                version: try container.decode(String.self, forKey: .version),
                configVersion: try container.decode(String.self, forKey: .configVersion),
                definition: DefinitionBox(try container.decode(AppDefinition.self, forKey: .definition)),
                node: try container.decode(String.self, forKey: .node),
                host: try container.decode(String.self, forKey: .host),
                ports: try container.decode([Int].self, forKey: .ports),
                goal: try container.decode(Goal.self, forKey: .goal),
                stopReason: try container.decodeIfPresent(String.self, forKey: .stopReason),
                stagedAt: try container.decode(String.self, forKey: .stagedAt),
                standby: try container.decodeIfPresent(Bool.self, forKey: .standby) ?? false,
                standbyUntil: try container.decodeIfPresent(String.self, forKey: .standbyUntil)))
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(id, forKey: .id)
        try container.encode(appID, forKey: .appID)
        try container.encode(version, forKey: .version)
        try container.encode(configVersion, forKey: .configVersion)
        try container.encode(definition, forKey: .definition)
        try container.encode(node, forKey: .node)
        try container.encode(host, forKey: .host)
        try container.encode(ports, forKey: .ports)
        try container.encode(goal, forKey: .goal)
        try container.encodeIfPresent(stopReason, forKey: .stopReason)
        try container.encode(stagedAt, forKey: .stagedAt)
        try container.encode(standby, forKey: .standby)
        try container.encodeIfPresent(standbyUntil, forKey: .standbyUntil)
    }

    /// A fresh instance id for an app: the app path with `/` as `_`, a dot, a UUID.
    public static func newID(for app: AppID) -> String {
        "\(app.flatName).\(UUID().uuidString.lowercased())"
    }

    /// The app an instance id belongs to, read back from the id itself.
    public static func appFlatName(ofInstanceID id: String) -> Substring? {
        guard let dot = id.lastIndex(of: ".") else { return nil }
        return id[..<dot]
    }
}

/// An instance's definition, shared between copies until one of them changes it.
private final class DefinitionBox: Hashable, @unchecked Sendable {
    // Mutated only through `InstanceSpec.definition`'s `_modify`, after making the box unique.
    var value: AppDefinition

    init(_ value: AppDefinition) {
        self.value = value
    }

    static func == (lhs: DefinitionBox, rhs: DefinitionBox) -> Bool {
        lhs === rhs || lhs.value == rhs.value
    }

    func hash(into hasher: inout Hasher) {
        hasher.combine(value)
    }
}

/// What the node's agent observed of an instance. Written only by the agent that runs it.
public struct InstanceStatus: Sendable, Hashable, Codable {
    public var id: String
    public var state: TaskState
    /// The driver that runs it (`exec`, `oci`); nil before one started it.
    public var driver: String?
    /// The driver's own notes about the instance (a process id and its start time, a container id):
    /// only that driver reads them, to find the instance again after an agent restart.
    public var driverState: [String: String]
    public var startedAt: String?
    public var exitCode: Int32?
    public var signal: Int32?
    public var oomKilled: Bool
    public var message: String?
    public var updatedAt: String
    /// The latest health of each of the app's checks, in the order of `healthChecks`.
    public var health: [HealthResult]
    /// Out of discovery and routing, waiting out `drainSeconds` before SIGTERM.
    public var draining: Bool
    /// Set when the agent killed the instance for failing its health checks.
    public var killedUnhealthy: Bool
    /// The app's readiness check, while it is checked and once it passed; nil for apps without one.
    public var readiness: ReadinessResult?

    public init(
        id: String, state: TaskState, driver: String? = nil, driverState: [String: String] = [:], startedAt: String? = nil,
        exitCode: Int32? = nil, signal: Int32? = nil, oomKilled: Bool = false, message: String? = nil, updatedAt: String,
        health: [HealthResult] = [], draining: Bool = false, killedUnhealthy: Bool = false
    ) {
        self.id = id
        self.state = state
        self.driver = driver
        self.driverState = driverState
        self.startedAt = startedAt
        self.exitCode = exitCode
        self.signal = signal
        self.oomKilled = oomKilled
        self.message = message
        self.updatedAt = updatedAt
        self.health = health
        self.draining = draining
        self.killedUnhealthy = killedUnhealthy
    }

    enum CodingKeys: String, CodingKey {
        case id, state, driver, driverState, startedAt, exitCode, signal, oomKilled, message, updatedAt, health, draining, killedUnhealthy
        case readiness
        // Written before drivers had their own state: an exec instance's process.
        case pid, processStartTicks
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(id, forKey: .id)
        try container.encode(state, forKey: .state)
        try container.encodeIfPresent(driver, forKey: .driver)
        if !driverState.isEmpty { try container.encode(driverState, forKey: .driverState) }
        try container.encodeIfPresent(startedAt, forKey: .startedAt)
        try container.encodeIfPresent(exitCode, forKey: .exitCode)
        try container.encodeIfPresent(signal, forKey: .signal)
        try container.encode(oomKilled, forKey: .oomKilled)
        try container.encodeIfPresent(message, forKey: .message)
        try container.encode(updatedAt, forKey: .updatedAt)
        try container.encode(health, forKey: .health)
        try container.encode(draining, forKey: .draining)
        try container.encode(killedUnhealthy, forKey: .killedUnhealthy)
        try container.encodeIfPresent(readiness, forKey: .readiness)
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        id = try container.decode(String.self, forKey: .id)
        state = try container.decode(TaskState.self, forKey: .state)
        driver = try container.decodeIfPresent(String.self, forKey: .driver)
        driverState = try container.decodeIfPresent([String: String].self, forKey: .driverState) ?? [:]
        if let pid = try container.decodeIfPresent(Int32.self, forKey: .pid) {
            driver = driver ?? "exec"
            driverState["pid"] = String(pid)
            if let ticks = try container.decodeIfPresent(UInt64.self, forKey: .processStartTicks) { driverState["startTicks"] = String(ticks) }
        }
        startedAt = try container.decodeIfPresent(String.self, forKey: .startedAt)
        exitCode = try container.decodeIfPresent(Int32.self, forKey: .exitCode)
        signal = try container.decodeIfPresent(Int32.self, forKey: .signal)
        oomKilled = try container.decodeIfPresent(Bool.self, forKey: .oomKilled) ?? false
        message = try container.decodeIfPresent(String.self, forKey: .message)
        updatedAt = try container.decode(String.self, forKey: .updatedAt)
        health = try container.decodeIfPresent([HealthResult].self, forKey: .health) ?? []
        draining = try container.decodeIfPresent(Bool.self, forKey: .draining) ?? false
        killedUnhealthy = try container.decodeIfPresent(Bool.self, forKey: .killedUnhealthy) ?? false
        readiness = try container.decodeIfPresent(ReadinessResult.self, forKey: .readiness)
    }

    /// Healthy when every check has passed since its last failure; nil while a check has no result yet.
    public var isHealthy: Bool? {
        if health.isEmpty { return nil }
        if health.contains(where: { $0.alive == false }) { return false }
        if health.contains(where: { $0.alive == nil }) { return nil }
        return true
    }
}

/// Marathon's `healthCheckResults` entry: how one check of one instance is doing.
public struct HealthResult: Sendable, Hashable, Codable {
    /// nil until the first result (or while failures are forgiven in the grace period).
    public var alive: Bool?
    public var consecutiveFailures: Int
    public var firstSuccess: String?
    public var lastSuccess: String?
    public var lastFailure: String?
    public var lastFailureCause: String?

    public init(
        alive: Bool? = nil, consecutiveFailures: Int = 0, firstSuccess: String? = nil, lastSuccess: String? = nil,
        lastFailure: String? = nil, lastFailureCause: String? = nil
    ) {
        self.alive = alive
        self.consecutiveFailures = consecutiveFailures
        self.firstSuccess = firstSuccess
        self.lastSuccess = lastSuccess
        self.lastFailure = lastFailure
        self.lastFailureCause = lastFailureCause
    }
}

/// An instance as the API shows it: the scheduler's spec joined with the agent's latest status.
///
/// Held in one shared box (copy on write): the scheduler gathers, filters and sorts thousands of
/// these on every pass, and a copy then costs one retain, an array of them eight bytes each.
public struct Instance: Sendable, Hashable {
    public var spec: InstanceSpec {
        _read { yield storage.spec }
        _modify {
            makeUnique()
            yield &storage.spec
        }
    }

    public var status: InstanceStatus? {
        _read { yield storage.status }
        _modify {
            makeUnique()
            yield &storage.status
        }
    }

    private var storage: Storage

    public init(spec: InstanceSpec, status: InstanceStatus?) {
        storage = Storage(spec: spec, status: status)
    }

    private mutating func makeUnique() {
        if !isKnownUniquelyReferenced(&storage) { storage = Storage(spec: storage.spec, status: storage.status) }
    }

    public static func == (lhs: Instance, rhs: Instance) -> Bool {
        lhs.storage === rhs.storage || (lhs.storage.spec == rhs.storage.spec && lhs.storage.status == rhs.storage.status)
    }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(storage.spec)
        hasher.combine(storage.status)
    }

    // Mutated only after `makeUnique`.
    private final class Storage: @unchecked Sendable {
        var spec: InstanceSpec
        var status: InstanceStatus?

        init(spec: InstanceSpec, status: InstanceStatus?) {
            self.spec = spec
            self.status = status
        }
    }

    public var id: String { spec.id }
    public var state: TaskState { status?.state ?? .staging }

    /// Running, healthy where the app has checks, and not on its way out: it can take traffic if
    /// it is in service (see `isInService`).
    public var isReady: Bool {
        guard state == .running, spec.goal == .run, status?.draining != true else { return false }
        if !spec.definition.readinessChecks.isEmpty && status?.readiness?.ready != true { return false }
        if spec.definition.healthChecks.isEmpty { return true }
        return status?.isHealthy == true
    }

    /// Ready and live: what discovery and the load balancer may send traffic to.
    public var isInService: Bool { isReady && !spec.standby }

    /// Unreachable past its app's `inactiveAfterSeconds` and replaced: it no longer counts for its
    /// app (nor holds a place in its over-capacity), though it is shown until it is expunged.
    public var isWrittenOff: Bool { state == .unreachable && spec.goal == .stop }
}

public import Foundation

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

    /// A state the instance never leaves.
    public var isTerminal: Bool {
        switch self {
        case .finished, .failed, .killed, .lost, .error: return true
        case .staging, .starting, .running, .killing: return false
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
    public var id: String
    public var appID: AppID
    /// The app version the instance was started from, and the config version it carries.
    public var version: String
    public var configVersion: String
    /// The definition to run, as it was at `version`.
    public var definition: AppDefinition
    public var node: String
    public var host: String
    public var ports: [Int]
    public var goal: Goal
    /// Why the instance was asked to stop ("scaled down", "replaced by a new version", "killed through the API").
    public var stopReason: String?
    public var stagedAt: String

    public init(
        id: String, appID: AppID, version: String, configVersion: String, definition: AppDefinition, node: String,
        host: String, ports: [Int], goal: Goal = .run, stopReason: String? = nil, stagedAt: String
    ) {
        self.id = id
        self.appID = appID
        self.version = version
        self.configVersion = configVersion
        self.definition = definition
        self.node = node
        self.host = host
        self.ports = ports
        self.goal = goal
        self.stopReason = stopReason
        self.stagedAt = stagedAt
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

/// What the node's agent observed of an instance. Written only by the agent that runs it.
public struct InstanceStatus: Sendable, Hashable, Codable {
    public var id: String
    public var state: TaskState
    public var pid: Int32?
    /// The process start time in clock ticks since boot (`/proc/<pid>/stat` field 22): with the pid it
    /// names one process for good, so a restarted agent never adopts a stranger that reused the pid.
    public var processStartTicks: UInt64?
    public var startedAt: String?
    public var exitCode: Int32?
    public var signal: Int32?
    public var oomKilled: Bool
    public var message: String?
    public var updatedAt: String

    public init(
        id: String, state: TaskState, pid: Int32? = nil, processStartTicks: UInt64? = nil, startedAt: String? = nil,
        exitCode: Int32? = nil, signal: Int32? = nil, oomKilled: Bool = false, message: String? = nil, updatedAt: String
    ) {
        self.id = id
        self.state = state
        self.pid = pid
        self.processStartTicks = processStartTicks
        self.startedAt = startedAt
        self.exitCode = exitCode
        self.signal = signal
        self.oomKilled = oomKilled
        self.message = message
        self.updatedAt = updatedAt
    }
}

/// An instance as the API shows it: the scheduler's spec joined with the agent's latest status.
public struct Instance: Sendable, Hashable {
    public var spec: InstanceSpec
    public var status: InstanceStatus?

    public init(spec: InstanceSpec, status: InstanceStatus?) {
        self.spec = spec
        self.status = status
    }

    public var id: String { spec.id }
    public var state: TaskState { status?.state ?? .staging }
}

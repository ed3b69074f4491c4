import Foundation

/// One immutable version of an app: the definition as it was, and when it was made.
public struct AppRecord: Sendable, Hashable, Codable {
    public var definition: AppDefinition
    /// Marathon's `version`: the timestamp of this change.
    public var version: String
    /// When the app last changed in anything but scale, and when it last scaled.
    public var versionInfo: VersionInfo

    public init(definition: AppDefinition, version: String, versionInfo: VersionInfo) {
        self.definition = definition
        self.version = version
        self.versionInfo = versionInfo
    }

    public var id: AppID { definition.id }

    /// The version that instances are measured against: an instance started from an earlier config
    /// must be replaced; one started before a mere scaling need not.
    public var configVersion: String { versionInfo.lastConfigChangeAt }
}

public struct VersionInfo: Sendable, Hashable, Codable {
    public var lastScalingAt: String
    public var lastConfigChangeAt: String

    public init(lastScalingAt: String, lastConfigChangeAt: String) {
        self.lastScalingAt = lastScalingAt
        self.lastConfigChangeAt = lastConfigChangeAt
    }
}

/// Marathon's `lastTaskFailure`: the most recent instance of an app that failed, and why.
public struct TaskFailure: Sendable, Hashable, Codable {
    public var appID: AppID
    public var taskID: String
    public var host: String
    /// The node that ran it (Marathon's `slaveId`).
    public var node: String?
    public var state: TaskState
    public var message: String
    public var timestamp: String
    public var version: String

    public init(
        appID: AppID, taskID: String, host: String, node: String?, state: TaskState, message: String, timestamp: String, version: String
    ) {
        self.appID = appID
        self.taskID = taskID
        self.host = host
        self.node = node
        self.state = state
        self.message = message
        self.timestamp = timestamp
        self.version = version
    }
}

/// The steps that move apps from one version or scale to another. One deployment per app at a time.
public struct Deployment: Sendable, Hashable, Codable {
    public enum ActionKind: String, Sendable, Hashable, Codable {
        case startApplication = "StartApplication"
        case scaleApplication = "ScaleApplication"
        case restartApplication = "RestartApplication"
        case stopApplication = "StopApplication"
    }

    public struct Action: Sendable, Hashable, Codable {
        public var action: ActionKind
        public var app: AppID
        public init(action: ActionKind, app: AppID) {
            self.action = action
            self.app = app
        }
    }

    /// Where one app should end up: a version of it, or gone (`targetVersion` nil).
    public struct Target: Sendable, Hashable, Codable {
        public var app: AppID
        public var targetVersion: String?
        /// The version before the change, for a reverting deployment; nil when the app is new.
        public var previousVersion: String?
        public init(app: AppID, targetVersion: String?, previousVersion: String?) {
            self.app = app
            self.targetVersion = targetVersion
            self.previousVersion = previousVersion
        }
    }

    public var id: String
    /// The timestamp of the change that started it (the target app version).
    public var version: String
    public var targets: [Target]
    public var steps: [[Action]]
    /// 1-based, as Marathon reports it.
    public var currentStep: Int
    public var startedAt: String
    /// New instances of a target version that ended in a row, and the last such end, for the
    /// failure rule and its report.
    public var consecutiveCrashes: Int
    public var lastProblem: String?
    /// The config versions this deployment brings, per app: its "new instances".
    public var targetConfigVersions: [String: String]

    public init(
        id: String, version: String, targets: [Target], steps: [[Action]], currentStep: Int = 1, startedAt: String,
        targetConfigVersions: [String: String] = [:]
    ) {
        self.id = id
        self.version = version
        self.targets = targets
        self.steps = steps
        self.currentStep = currentStep
        self.startedAt = startedAt
        self.consecutiveCrashes = 0
        self.lastProblem = nil
        self.targetConfigVersions = targetConfigVersions
    }

    enum CodingKeys: String, CodingKey {
        case id, version, targets, steps, currentStep, startedAt, consecutiveCrashes, lastProblem, targetConfigVersions
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        id = try container.decode(String.self, forKey: .id)
        version = try container.decode(String.self, forKey: .version)
        targets = try container.decode([Target].self, forKey: .targets)
        steps = try container.decode([[Action]].self, forKey: .steps)
        currentStep = try container.decode(Int.self, forKey: .currentStep)
        startedAt = try container.decode(String.self, forKey: .startedAt)
        consecutiveCrashes = try container.decodeIfPresent(Int.self, forKey: .consecutiveCrashes) ?? 0
        lastProblem = try container.decodeIfPresent(String.self, forKey: .lastProblem)
        targetConfigVersions = try container.decodeIfPresent([String: String].self, forKey: .targetConfigVersions) ?? [:]
    }

    /// Whether an instance is one of the new instances this deployment brings.
    public func tracks(_ spec: InstanceSpec) -> Bool {
        targetConfigVersions[spec.appID.path] == spec.configVersion
    }

    public var affectedApps: [AppID] { targets.map(\.app) }
    public var totalSteps: Int { steps.count }
    public var currentActions: [Action] {
        steps.isEmpty ? [] : steps[min(max(currentStep, 1), steps.count) - 1]
    }
}

/// How a deployment ended, kept for a while so `flotilla deploy` and operators can ask.
public struct DeploymentResult: Sendable, Hashable, Codable {
    public enum Status: String, Sendable, Hashable, Codable {
        case succeeded, failed, cancelled
    }

    public var id: String
    public var version: String
    public var affectedApps: [AppID]
    public var status: Status
    public var reason: String?
    public var finishedAt: String
    /// With auto-rollback: the deployment that restores the previous version, and that version.
    public var rollbackDeploymentID: String?
    public var rolledBackTo: String?

    public init(deployment: Deployment, status: Status, reason: String?, finishedAt: String) {
        self.id = deployment.id
        self.version = deployment.version
        self.affectedApps = deployment.affectedApps
        self.status = status
        self.reason = reason
        self.finishedAt = finishedAt
    }
}

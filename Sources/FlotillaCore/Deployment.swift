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

    public init(id: String, version: String, targets: [Target], steps: [[Action]], currentStep: Int = 1, startedAt: String) {
        self.id = id
        self.version = version
        self.targets = targets
        self.steps = steps
        self.currentStep = currentStep
        self.startedAt = startedAt
    }

    public var affectedApps: [AppID] { targets.map(\.app) }
    public var totalSteps: Int { steps.count }
    public var currentActions: [Action] {
        steps.isEmpty ? [] : steps[min(max(currentStep, 1), steps.count) - 1]
    }
}

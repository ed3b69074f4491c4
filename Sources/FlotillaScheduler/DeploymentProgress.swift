public import FlotillaCore
public import Foundation

/// Where one deployment stands after a look at what runs: Marathon's deployment state machine,
/// pure. The control plane asks on every pass, commits what the answer changes, and only then
/// shows it (memory, events).
public enum DeploymentProgress: Sendable, Equatable {
    /// Every target has arrived: the deployment is done.
    case succeeded
    /// It can no longer succeed; the reason is what operators read.
    case failed(reason: String)
    /// Finished steps were passed: the deployment is now at `currentStep`.
    case advanced(currentStep: Int, finished: [Int])
    /// Nothing to say yet.
    case waiting

    /// - Parameters:
    ///   - apps: the apps as they should be now.
    ///   - instances: an app's instances (ended ones excluded or not; ended ones never count).
    ///   - isComplete: `Reconciler.isComplete` of an app (nil: it is to be gone) and its
    ///     instances; a caller that knows which apps did not change since may answer from memory.
    public static func evaluate(
        _ deployment: Deployment, apps: [AppID: AppRecord], now: Date, instances: (AppID) -> [Instance],
        isComplete: ((AppRecord?, AppID) -> Bool)? = nil
    ) -> DeploymentProgress {
        func complete(_ app: AppRecord?, _ id: AppID) -> Bool {
            if let isComplete { return isComplete(app, id) }
            return Reconciler.isComplete(app: app, instances: instances(id))
        }
        let arrived = deployment.targets.allSatisfy { target in
            let app = target.targetVersion == nil ? nil : apps[target.app]
            // An app the deployment brought that was removed since has nothing left to wait for.
            if target.targetVersion != nil && app == nil { return true }
            return complete(app, target.app)
        }
        if arrived { return .succeeded }
        if let reason = failureReason(of: deployment, apps: apps, now: now, instances: instances) { return .failed(reason: reason) }
        let progress = DeploymentSteps.advance(deployment) { action in
            switch action.action {
            case .startApplication: return true
            case .stopApplication: return instances(action.app).allSatisfy(\.state.isTerminal)
            case .scaleApplication, .restartApplication: return complete(apps[action.app], action.app)
            }
        }
        if progress.currentStep != deployment.currentStep { return .advanced(currentStep: progress.currentStep, finished: progress.finished) }
        return .waiting
    }

    /// Why a deployment has failed, or nil while it may still succeed: its new instances crashed
    /// `maxConsecutiveCrashes` times in a row, or they were not all ready by the progress deadline.
    public static func failureReason(
        of deployment: Deployment, apps: [AppID: AppRecord], now: Date, instances: (AppID) -> [Instance]
    ) -> String? {
        for target in deployment.targets {
            guard target.targetVersion != nil, let app = apps[target.app] else { continue }
            let strategy = app.definition.upgradeStrategy
            if deployment.consecutiveCrashes >= strategy.maxConsecutiveCrashes {
                return "new instances of \(target.app) failed \(deployment.consecutiveCrashes) times in a row; last: \(deployment.lastProblem ?? "unknown")"
            }
            guard let started = Timestamp.parse(deployment.startedAt), now.timeIntervalSince(started) > strategy.progressDeadlineSeconds else { continue }
            let waiting = instances(target.app).filter { $0.spec.configVersion == app.configVersion && !$0.isReady }
            let detail = waiting.first.map { instance -> String in
                // The agent's message carries the failing check's cause and the last lines of stderr.
                let why = instance.status?.message ?? instance.status?.health.compactMap(\.lastFailureCause).first.map { "health check: \($0)" }
                return "\(instance.id) is \(instance.state.rawValue)" + (why.map { "; \($0)" } ?? "")
            }
            return "\(target.app) was not ready within the progress deadline of \(Int(strategy.progressDeadlineSeconds)) s"
                + (detail.map { ": \($0)" } ?? (deployment.lastProblem.map { "; last failure: \($0)" } ?? ""))
        }
        return nil
    }

    /// The deployment after one of its new instances ended without being asked to: one more
    /// crash in a row, and what it was.
    public static func recordingCrash(_ deployment: Deployment, of spec: InstanceSpec, status: InstanceStatus) -> Deployment? {
        guard deployment.tracks(spec) else { return nil }
        var counted = deployment
        counted.consecutiveCrashes += 1
        let how = status.killedUnhealthy ? "was killed as unhealthy" : "ended with \(status.state.rawValue)"
        counted.lastProblem = "\(spec.id) \(how): \(status.message ?? "")"
        return counted
    }

    /// Whether a failed deployment goes back to the previous versions: some target had one and
    /// its app asks for `autoRollback`.
    public static func rollsBack(_ deployment: Deployment, apps: [AppID: AppRecord]) -> Bool {
        deployment.targets.contains { target in
            target.previousVersion != nil && apps[target.app]?.definition.upgradeStrategy.autoRollback == true
        }
    }
}

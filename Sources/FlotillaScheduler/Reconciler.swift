public import FlotillaCore

/// What to do about one app right now.
public struct AppPlan: Sendable, Equatable {
    /// New instances to start from the app's current version.
    public var launch: Int
    /// Instances to stop, each with the reason people will read.
    public var stop: [Stop]

    public struct Stop: Sendable, Equatable {
        public var instanceID: String
        public var reason: String
    }

    public init(launch: Int = 0, stop: [Stop] = []) {
        self.launch = launch
        self.stop = stop
    }

    public var isEmpty: Bool { launch == 0 && stop.isEmpty }
}

/// Compares what an app should be with what runs, and says what to start and stop next. Called
/// again on every change, so each answer is only the next safe move: a rolling replacement is a
/// series of small plans, each honouring `upgradeStrategy`.
public enum Reconciler {
    /// - Parameters:
    ///   - app: the app as it should be, or nil when it is being removed.
    ///   - instances: the app's instances that have not ended.
    ///   - isReady: whether an instance serves (running, and healthy where it has checks).
    public static func plan(app: AppRecord?, instances: [Instance], isReady: (Instance) -> Bool) -> AppPlan {
        let active = instances.filter { $0.spec.goal == .run && !$0.state.isTerminal }
        guard let app else {
            return AppPlan(stop: active.map { .init(instanceID: $0.id, reason: "app deleted") })
        }
        let target = app.definition.instances
        let current = active.filter { $0.spec.configVersion == app.configVersion }
        let old = active.filter { $0.spec.configVersion != app.configVersion }
        var plan = AppPlan()

        // Too many of the current version: scale down, choosing as `killSelection` says.
        if current.count > target {
            let excess = ordered(current, by: app.definition.killSelection).prefix(current.count - target)
            plan.stop += excess.map { .init(instanceID: $0.id, reason: "scaled down") }
        }
        let keptCurrent = current.filter { instance in !plan.stop.contains { $0.instanceID == instance.id } }

        // Old versions go as fast as the minimum health capacity allows; those not serving go at once.
        if !old.isEmpty {
            let minimumHealthy = Int((Double(target) * app.definition.upgradeStrategy.minimumHealthCapacity).rounded(.up))
            let readyCurrent = keptCurrent.filter(isReady).count
            let readyOld = old.filter(isReady)
            var stoppable = max(0, readyCurrent + readyOld.count - minimumHealthy)
            for instance in ordered(old, by: .oldestFirst) {
                if !isReady(instance) {
                    plan.stop.append(.init(instanceID: instance.id, reason: "replaced by version \(app.version)"))
                } else if stoppable > 0 {
                    stoppable -= 1
                    plan.stop.append(.init(instanceID: instance.id, reason: "replaced by version \(app.version)"))
                }
            }
        }

        // Start what is missing, within the over-capacity allowance.
        let missing = target - keptCurrent.count
        if missing > 0 {
            let maximumTotal = target + Int((Double(target) * app.definition.upgradeStrategy.maximumOverCapacity).rounded(.down))
            let remaining = active.count - plan.stop.count
            plan.launch = max(0, min(missing, maximumTotal - remaining))
        }
        return plan
    }

    /// Whether the app has arrived: exactly `instances` of the current version, all ready, nothing
    /// older still running or stopping.
    public static func isComplete(app: AppRecord?, instances: [Instance], isReady: (Instance) -> Bool) -> Bool {
        let live = instances.filter { !$0.state.isTerminal }
        guard let app else { return live.isEmpty }
        guard live.allSatisfy({ $0.spec.goal == .run && $0.spec.configVersion == app.configVersion }) else { return false }
        return live.count == app.definition.instances && live.allSatisfy(isReady)
    }

    /// Instances in the order they should be stopped: those not yet running first, then by age.
    static func ordered(_ instances: [Instance], by selection: KillSelection) -> [Instance] {
        instances.sorted { lhs, rhs in
            let lhsRunning = lhs.state == .running, rhsRunning = rhs.state == .running
            if lhsRunning != rhsRunning { return !lhsRunning }
            if lhs.spec.stagedAt != rhs.spec.stagedAt {
                return selection == .youngestFirst ? lhs.spec.stagedAt > rhs.spec.stagedAt : lhs.spec.stagedAt < rhs.spec.stagedAt
            }
            return lhs.id < rhs.id
        }
    }
}

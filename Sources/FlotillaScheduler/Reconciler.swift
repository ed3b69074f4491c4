public import FlotillaCore
public import Foundation

/// What to do about one app right now.
public struct AppPlan: Sendable, Equatable {
    /// New instances to start from the app's current version.
    public var launch: Int
    /// Whether the new instances start out of service (a blue-green set waiting for its switch).
    public var launchStandby: Bool
    /// Instances to stop, each with the reason people will read.
    public var stop: [Stop]
    /// Instances to put in service now (a blue-green switch).
    public var activate: [String]
    /// Instances to take out of service but keep warm until the given time.
    public var standby: [Standby]

    public struct Stop: Sendable, Equatable {
        public var instanceID: String
        public var reason: String
    }

    public struct Standby: Sendable, Equatable {
        public var instanceID: String
        public var until: Date
    }

    public init(launch: Int = 0, launchStandby: Bool = false, stop: [Stop] = [], activate: [String] = [], standby: [Standby] = []) {
        self.launch = launch
        self.launchStandby = launchStandby
        self.stop = stop
        self.activate = activate
        self.standby = standby
    }

    public var isEmpty: Bool { launch == 0 && stop.isEmpty && activate.isEmpty && standby.isEmpty }
}

/// Compares what an app should be with what runs, and says what to start, stop or switch next.
/// Called again on every change, so each answer is only the next safe move: a rolling replacement
/// is a series of small plans, each honouring `upgradeStrategy`.
public enum Reconciler {
    /// - Parameters:
    ///   - app: the app as it should be, or nil when it is being removed.
    ///   - instances: the app's instances that have not ended.
    ///   - now: the time, for warm sets whose keep-alive ran out.
    public static func plan(app: AppRecord?, instances: [Instance], now: Date = Date()) -> AppPlan {
        let instances = instances.filter { !$0.isWrittenOff }
        let active = instances.filter { $0.spec.goal == .run && !$0.state.isTerminal }
        guard let app else {
            return AppPlan(stop: active.map { .init(instanceID: $0.id, reason: "app deleted") })
        }
        switch app.definition.upgradeStrategy.type {
        case .rolling: return rolling(app, active, live: instances.filter { !$0.state.isTerminal })
        case .blueGreen: return blueGreen(app, active, now: now)
        }
    }

    static func rolling(_ app: AppRecord, _ active: [Instance], live: [Instance]) -> AppPlan {
        let target = app.definition.instances
        let current = active.filter { $0.spec.configVersion == app.configVersion }
        let old = active.filter { $0.spec.configVersion != app.configVersion }
        var plan = AppPlan()
        // A current instance left out of service (a rollback onto a warm blue-green set) goes back in.
        plan.activate = current.filter(\.spec.standby).map(\.id)

        // Too many of the current version: scale down, choosing as `killSelection` says.
        if current.count > target {
            let excess = ordered(current, by: app.definition.killSelection).prefix(current.count - target)
            plan.stop += excess.map { .init(instanceID: $0.id, reason: "scaled down") }
        }
        let keptCurrent = current.filter { instance in !plan.stop.contains { $0.instanceID == instance.id } }

        // Old versions go as fast as the minimum health capacity allows; those not serving go at once.
        if !old.isEmpty {
            let minimumHealthy = Int((Double(target) * app.definition.upgradeStrategy.minimumHealthCapacity).rounded(.up))
            let readyCurrent = keptCurrent.filter(\.isReady).count
            let readyOld = old.filter(\.isInService).count
            var stoppable = max(0, readyCurrent + readyOld - minimumHealthy)
            for instance in ordered(old, by: .oldestFirst) {
                if !instance.isInService {
                    plan.stop.append(.init(instanceID: instance.id, reason: "replaced by version \(app.version)"))
                } else if stoppable > 0 {
                    stoppable -= 1
                    plan.stop.append(.init(instanceID: instance.id, reason: "replaced by version \(app.version)"))
                }
            }
        }

        // Start what is missing, within the over-capacity allowance. An instance on its way out
        // still counts until it has ended (as in Marathon): it still holds its resources.
        let missing = target - keptCurrent.count
        if missing > 0 {
            let maximumTotal = target + Int((Double(target) * app.definition.upgradeStrategy.maximumOverCapacity).rounded(.down))
            plan.launch = max(0, min(missing, maximumTotal - live.count))
        }
        return plan
    }

    /// Blue-green: the whole new set starts beside the old, out of service; once all of it is
    /// ready, it goes in service and the old set out, at once; the old set stays warm for
    /// `keepOldSeconds` (a rollback switches straight back to it), then stops.
    static func blueGreen(_ app: AppRecord, _ active: [Instance], now: Date) -> AppPlan {
        let target = app.definition.instances
        let current = active.filter { $0.spec.configVersion == app.configVersion }
        let others = active.filter { $0.spec.configVersion != app.configVersion }
        var plan = AppPlan()
        if current.count > target {
            let excess = ordered(current, by: app.definition.killSelection).prefix(current.count - target)
            plan.stop += excess.map { .init(instanceID: $0.id, reason: "scaled down") }
        }
        let kept = current.filter { instance in !plan.stop.contains { $0.instanceID == instance.id } }
        let liveOthers = others.filter { !$0.spec.standby }
        if kept.count < target {
            plan.launch = target - kept.count
            // Without a live set to protect (first deploy, or everything crashed) new instances go live at once.
            plan.launchStandby = !liveOthers.isEmpty
        }
        let switched = kept.count == target && kept.allSatisfy(\.isReady)
        if switched || liveOthers.isEmpty {
            plan.activate = kept.filter { $0.spec.standby && $0.isReady }.map(\.id)
        }
        if switched {
            let until = now.addingTimeInterval(app.definition.upgradeStrategy.keepOldSeconds)
            plan.standby = liveOthers.map { .init(instanceID: $0.id, until: until) }
        }
        // Warm sets whose time ran out, and old instances that do not even serve, stop.
        for instance in others where instance.spec.standby || !instance.isReady {
            let expired = instance.spec.standbyUntil.flatMap(Timestamp.parse).map { $0 <= now } ?? false
            let unready = !instance.isReady && (switched || instance.spec.standby)
            if expired || unready {
                plan.stop.append(.init(instanceID: instance.id, reason: expired ? "blue-green: old set retired" : "replaced by version \(app.version)"))
            }
        }
        return plan
    }

    /// Whether the app has arrived: exactly `instances` of the current version in service and
    /// ready, nothing older still serving. Warm blue-green sets do not hold a deployment open.
    public static func isComplete(app: AppRecord?, instances: [Instance]) -> Bool {
        let live = instances.filter { !$0.state.isTerminal && !$0.isWrittenOff }
        guard let app else { return live.isEmpty }
        let current = live.filter { $0.spec.goal == .run && $0.spec.configVersion == app.configVersion }
        let others = live.filter { !($0.spec.goal == .run && $0.spec.configVersion == app.configVersion) }
        switch app.definition.upgradeStrategy.type {
        case .rolling:
            guard others.isEmpty else { return false }
        case .blueGreen:
            guard others.allSatisfy({ $0.spec.standby || $0.spec.goal == .stop }) else { return false }
        }
        return current.count == app.definition.instances && current.allSatisfy(\.isInService)
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

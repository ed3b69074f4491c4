import FlotillaCore
import FlotillaScheduler
import Foundation
import Testing

@Suite struct ReconcilerTests {
    func record(instances: Int, config: String = "v2", minimumHealth: Double = 1, maximumOver: Double = 1, kill: KillSelection = .youngestFirst) throws -> AppRecord {
        var definition = AppDefinition(id: try AppID("/web"), cmd: "serve", instances: instances)
        definition.upgradeStrategy = UpgradeStrategy(minimumHealthCapacity: minimumHealth, maximumOverCapacity: maximumOver)
        definition.killSelection = kill
        return AppRecord(definition: definition, version: config, versionInfo: VersionInfo(lastScalingAt: config, lastConfigChangeAt: config))
    }

    func instance(_ name: String, config: String, state: TaskState = .running, stagedAt: String = "2026-01-01T00:00:00.000Z") throws -> Instance {
        let definition = AppDefinition(id: try AppID("/web"), cmd: "serve")
        let spec = InstanceSpec(
            id: name, appID: definition.id, version: config, configVersion: config, definition: definition, node: "n", host: "n",
            ports: [], stagedAt: stagedAt)
        return Instance(spec: spec, status: InstanceStatus(id: name, state: state, updatedAt: stagedAt))
    }

    @Test func launchesWhatIsMissing() throws {
        let plan = Reconciler.plan(app: try record(instances: 3), instances: [try instance("a", config: "v2")])
        #expect(plan == AppPlan(launch: 2))
    }

    @Test func scalesDownYoungestFirst() throws {
        let instances = try [
            instance("old", config: "v2", stagedAt: "2026-01-01T00:00:00.000Z"),
            instance("new", config: "v2", stagedAt: "2026-01-02T00:00:00.000Z"),
            instance("staging", config: "v2", state: .staging, stagedAt: "2026-01-01T00:00:00.000Z"),
        ]
        let plan = Reconciler.plan(app: try record(instances: 1), instances: instances)
        // Not yet running goes first, then the youngest.
        #expect(plan.stop.map(\.instanceID) == ["staging", "new"])
        let oldest = Reconciler.plan(app: try record(instances: 2, kill: .oldestFirst), instances: instances)
        #expect(oldest.stop.map(\.instanceID) == ["staging"])
    }

    @Test func rollingUpgradeKeepsFullCapacityByDefault() throws {
        // minimumHealthCapacity 1, maximumOverCapacity 1: start all new, stop old as new ones serve.
        let app = try record(instances: 2)
        var instances = try [instance("o1", config: "v1"), instance("o2", config: "v1")]
        var plan = Reconciler.plan(app: app, instances: instances)
        #expect(plan == AppPlan(launch: 2))
        instances += try [instance("n1", config: "v2", state: .staging), instance("n2", config: "v2", state: .staging)]
        plan = Reconciler.plan(app: app, instances: instances)
        #expect(plan.isEmpty)
        instances[2].status?.state = .running
        plan = Reconciler.plan(app: app, instances: instances)
        #expect(plan.stop.count == 1)
        #expect(plan.launch == 0)
    }

    @Test func rollingUpgradeWithoutHeadroomStopsFirst() throws {
        // minimumHealthCapacity 0.5, maximumOverCapacity 0: replace half at a time, never above 4.
        let app = try record(instances: 4, minimumHealth: 0.5, maximumOver: 0)
        let instances = try (1...4).map { try instance("o\($0)", config: "v1") }
        let plan = Reconciler.plan(app: app, instances: instances)
        #expect(plan.stop.count == 2)
        #expect(plan.launch == 2)
    }

    @Test func oldInstancesThatDoNotServeGoAtOnce() throws {
        let app = try record(instances: 2)
        let instances = try [instance("o1", config: "v1", state: .staging), instance("o2", config: "v1")]
        let plan = Reconciler.plan(app: app, instances: instances)
        #expect(plan.stop.map(\.instanceID) == ["o1"])
    }

    @Test func deletedAppStopsEverything() throws {
        let plan = Reconciler.plan(app: nil, instances: try [instance("a", config: "v1"), instance("b", config: "v1")])
        #expect(plan.stop.count == 2 && plan.launch == 0)
    }

    @Test func completeOnlyWhenExactlyTheTargetServes() throws {
        let app = try record(instances: 2)
        #expect(Reconciler.isComplete(app: app, instances: try [instance("a", config: "v2"), instance("b", config: "v2")]))
        #expect(!Reconciler.isComplete(app: app, instances: try [instance("a", config: "v2")]))
        #expect(!Reconciler.isComplete(app: app, instances: try [instance("a", config: "v2"), instance("b", config: "v1")]))
        #expect(Reconciler.isComplete(app: nil, instances: []))
    }

    @Test func backoffGrowsByTheFactorUpToTheMaximum() throws {
        var definition = AppDefinition(id: try AppID("/web"), cmd: "x")
        definition.backoffSeconds = 1
        definition.backoffFactor = 2
        definition.maxLaunchDelaySeconds = 5
        #expect(Backoff.delay(afterFailures: 0, for: definition) == 0)
        #expect(Backoff.delay(afterFailures: 1, for: definition) == 1)
        #expect(Backoff.delay(afterFailures: 3, for: definition) == 4)
        #expect(Backoff.delay(afterFailures: 10, for: definition) == 5)
        var backoff = Backoff()
        let now = Date(timeIntervalSince1970: 1000)
        backoff.recordFailure(of: definition, at: now)
        backoff.recordFailure(of: definition, at: now)
        #expect(backoff.secondsLeft(at: now) == 2)
        #expect(backoff.secondsLeft(at: now.addingTimeInterval(3)) == 0)
        backoff.reset()
        #expect(backoff.consecutiveFailures == 0)
    }
}

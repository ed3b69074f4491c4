import FlotillaCore
import FlotillaScheduler
import Foundation
import Testing

@Suite struct ReconcilerTests {
    func record(
        instances: Int, config: String = "v2", minimumHealth: Double = 1, maximumOver: Double = 1, kill: KillSelection = .youngestFirst,
        type: UpgradeStrategy.Kind = .rolling, keepOld: Double = 60
    ) throws -> AppRecord {
        var definition = AppDefinition(id: try AppID("/web"), cmd: "serve", instances: instances)
        definition.upgradeStrategy = UpgradeStrategy(
            minimumHealthCapacity: minimumHealth, maximumOverCapacity: maximumOver, type: type, keepOldSeconds: keepOld)
        definition.killSelection = kill
        return AppRecord(definition: definition, version: config, versionInfo: VersionInfo(lastScalingAt: config, lastConfigChangeAt: config))
    }

    func instance(
        _ name: String, config: String, state: TaskState = .running, stagedAt: String = "2026-01-01T00:00:00.000Z",
        standby: Bool = false, standbyUntil: String? = nil, healthy: Bool? = nil
    ) throws -> Instance {
        var definition = AppDefinition(id: try AppID("/web"), cmd: "serve")
        if healthy != nil {
            definition.portDefinitions = [PortDefinition(port: 0)]
            definition.healthChecks = [try JSONDecoder().decode(HealthCheck.self, from: Data(#"{"protocol": "TCP"}"#.utf8))]
        }
        let spec = InstanceSpec(
            id: name, appID: definition.id, version: config, configVersion: config, definition: definition, node: "n", host: "n",
            ports: [], stagedAt: stagedAt, standby: standby, standbyUntil: standbyUntil)
        let health = healthy.map { [HealthResult(alive: $0)] } ?? []
        return Instance(spec: spec, status: InstanceStatus(id: name, state: state, updatedAt: stagedAt, health: health))
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
        // minimumHealthCapacity 0.5, maximumOverCapacity 0: replace half at a time, never above 4
        // live instances, counting those still stopping.
        let app = try record(instances: 4, minimumHealth: 0.5, maximumOver: 0)
        var instances = try (1...4).map { try instance("o\($0)", config: "v1") }
        let plan = Reconciler.plan(app: app, instances: instances)
        #expect(plan.stop.count == 2)
        #expect(plan.launch == 0)
        // The two stopped ones are still on their way out: nothing starts yet.
        for stop in plan.stop {
            let index = instances.firstIndex { $0.id == stop.instanceID }!
            instances[index].spec.goal = .stop
            instances[index].status?.state = .killing
        }
        #expect(Reconciler.plan(app: app, instances: instances).launch == 0)
        // Once they have ended, two new ones start.
        instances.removeAll { $0.spec.goal == .stop }
        #expect(Reconciler.plan(app: app, instances: instances).launch == 2)
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

    @Test func unhealthyNewInstancesHoldOldOnesInService() throws {
        let app = try record(instances: 2)
        let instances = try [
            instance("o1", config: "v1"), instance("o2", config: "v1"),
            instance("n1", config: "v2", healthy: false), instance("n2", config: "v2", state: .staging),
        ]
        #expect(Reconciler.plan(app: app, instances: instances).isEmpty)
        #expect(!Reconciler.isComplete(app: app, instances: instances))
    }

    @Test func drainingInstancesAreNotReady() throws {
        var draining = try instance("a", config: "v2")
        draining.status?.draining = true
        #expect(!draining.isReady)
        #expect(try instance("b", config: "v2").isInService)
        #expect(try !instance("c", config: "v2", standby: true).isInService)
    }

    @Test func blueGreenStartsTheNewSetOutOfService() throws {
        let app = try record(instances: 2, type: .blueGreen)
        let plan = Reconciler.plan(app: app, instances: try [instance("o1", config: "v1"), instance("o2", config: "v1")])
        #expect(plan.launch == 2)
        #expect(plan.launchStandby)
        #expect(plan.stop.isEmpty && plan.standby.isEmpty)
    }

    @Test func blueGreenSwitchesOnlyWhenTheWholeNewSetIsReady() throws {
        let app = try record(instances: 2, type: .blueGreen, keepOld: 30)
        let now = Date(timeIntervalSince1970: 1_000_000)
        var instances = try [
            instance("o1", config: "v1"), instance("o2", config: "v1"),
            instance("n1", config: "v2", standby: true), instance("n2", config: "v2", state: .staging, standby: true),
        ]
        #expect(Reconciler.plan(app: app, instances: instances, now: now).isEmpty)
        instances[3].status?.state = .running
        let plan = Reconciler.plan(app: app, instances: instances, now: now)
        #expect(Set(plan.activate) == ["n1", "n2"])
        #expect(Set(plan.standby.map(\.instanceID)) == ["o1", "o2"])
        #expect(plan.standby.allSatisfy { $0.until == now.addingTimeInterval(30) })
        #expect(plan.stop.isEmpty)
    }

    @Test func blueGreenRetiresTheWarmSetWhenItsTimeRunsOut() throws {
        let app = try record(instances: 1, type: .blueGreen)
        let until = Date(timeIntervalSince1970: 1_000_000)
        let instances = try [
            instance("n1", config: "v2"),
            instance("o1", config: "v1", standby: true, standbyUntil: Timestamp.format(until)),
        ]
        #expect(Reconciler.plan(app: app, instances: instances, now: until.addingTimeInterval(-1)).isEmpty)
        #expect(Reconciler.plan(app: app, instances: instances, now: until.addingTimeInterval(1)).stop.map(\.instanceID) == ["o1"])
        #expect(Reconciler.isComplete(app: app, instances: instances))
    }

    @Test func rollbackOntoAWarmSetSwitchesStraightBack() throws {
        // The app is back at v1's configuration while v1's set is still warm.
        let app = try record(instances: 2, config: "v1", type: .blueGreen)
        let now = Date(timeIntervalSince1970: 1_000_000)
        let instances = try [
            instance("o1", config: "v1", standby: true, standbyUntil: Timestamp.format(now.addingTimeInterval(20))),
            instance("o2", config: "v1", standby: true, standbyUntil: Timestamp.format(now.addingTimeInterval(20))),
            instance("n1", config: "v2"), instance("n2", config: "v2"),
        ]
        let plan = Reconciler.plan(app: app, instances: instances, now: now)
        #expect(plan.launch == 0)
        #expect(Set(plan.activate) == ["o1", "o2"])
        #expect(Set(plan.standby.map(\.instanceID)) == ["n1", "n2"])
    }
}

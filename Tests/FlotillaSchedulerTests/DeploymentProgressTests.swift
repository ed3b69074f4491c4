import FlotillaCore
import FlotillaScheduler
import Foundation
import Testing

/// The deployment state machine, on its own: arrival, steps, the two failure rules, crash counting.
@Suite struct DeploymentProgressTests {
    let started = Date(timeIntervalSince1970: 1_800_000_000)

    func record(_ id: String, instances: Int, config: String = "v2", crashes: Int = 3, deadline: Double = 60, autoRollback: Bool = true) throws -> AppRecord {
        var definition = AppDefinition(id: try AppID(id), cmd: "serve", instances: instances)
        definition.upgradeStrategy.maxConsecutiveCrashes = crashes
        definition.upgradeStrategy.progressDeadlineSeconds = deadline
        definition.upgradeStrategy.autoRollback = autoRollback
        return AppRecord(definition: definition, version: config, versionInfo: VersionInfo(lastScalingAt: config, lastConfigChangeAt: config))
    }

    func instance(_ name: String, of app: String, config: String = "v2", state: TaskState = .running, goal: InstanceSpec.Goal = .run) throws -> Instance {
        let definition = AppDefinition(id: try AppID(app), cmd: "serve")
        var spec = InstanceSpec(
            id: name, appID: definition.id, version: config, configVersion: config, definition: definition, node: "n", host: "n",
            ports: [], stagedAt: "2026-01-01T00:00:00.000Z")
        spec.goal = goal
        return Instance(spec: spec, status: InstanceStatus(id: name, state: state, updatedAt: "2026-01-01T00:00:00.000Z"))
    }

    func deployment(_ steps: [[Deployment.Action]], targets: [Deployment.Target], currentStep: Int = 1) -> Deployment {
        Deployment(
            id: "d1", version: "v2", targets: targets, steps: steps, currentStep: currentStep, startedAt: Timestamp.format(started),
            targetConfigVersions: Dictionary(uniqueKeysWithValues: targets.map { ($0.app.path, "v2") }))
    }

    @Test func arrivesWhenEveryTargetRunsItsNewVersion() throws {
        let web = try record("/web", instances: 2)
        let plan = deployment([[.init(action: .scaleApplication, app: web.id)]], targets: [.init(app: web.id, targetVersion: "v2", previousVersion: "v1")])
        var instances = try [instance("a", of: "/web"), instance("b", of: "/web", state: .staging)]
        let apps = [web.id: web]
        #expect(DeploymentProgress.evaluate(plan, apps: apps, now: started, instances: { _ in instances }) == .waiting)
        instances[1].status?.state = .running
        #expect(DeploymentProgress.evaluate(plan, apps: apps, now: started, instances: { _ in instances }) == .succeeded)
        // An old instance still serving holds a rolling deployment open.
        instances.append(try instance("old", of: "/web", config: "v1"))
        #expect(DeploymentProgress.evaluate(plan, apps: apps, now: started, instances: { _ in instances }) == .waiting)
    }

    @Test func passesAStepOnceEveryActionInItIsDone() throws {
        let db = try record("/db", instances: 1)
        let web = try record("/web", instances: 1)
        let plan = deployment(
            [[.init(action: .startApplication, app: db.id), .init(action: .startApplication, app: web.id)],
             [.init(action: .scaleApplication, app: db.id)], [.init(action: .scaleApplication, app: web.id)]],
            targets: [.init(app: db.id, targetVersion: "v2", previousVersion: nil), .init(app: web.id, targetVersion: "v2", previousVersion: nil)])
        let apps = [db.id: db, web.id: web]
        var running: [AppID: [Instance]] = [:]
        // Starting is done at once; scaling the database waits for it.
        #expect(DeploymentProgress.evaluate(plan, apps: apps, now: started, instances: { running[$0] ?? [] }) == .advanced(currentStep: 2, finished: [1]))
        running[db.id] = [try instance("db1", of: "/db")]
        var atTwo = plan
        atTwo.currentStep = 2
        #expect(DeploymentProgress.evaluate(atTwo, apps: apps, now: started, instances: { running[$0] ?? [] }) == .advanced(currentStep: 3, finished: [2]))
    }

    @Test func aStoppedAppsStepWaitsForAllItsInstancesToEnd() throws {
        let gone = try AppID("/gone")
        let plan = deployment([[.init(action: .stopApplication, app: gone)]], targets: [.init(app: gone, targetVersion: nil, previousVersion: "v1")])
        var instances = [try instance("g1", of: "/gone", config: "v1", state: .killing, goal: .stop)]
        #expect(DeploymentProgress.evaluate(plan, apps: [:], now: started, instances: { _ in instances }) == .waiting)
        instances[0].status?.state = .killed
        #expect(DeploymentProgress.evaluate(plan, apps: [:], now: started, instances: { _ in instances }) == .succeeded)
    }

    @Test func failsAfterConsecutiveCrashesNamingTheLast() throws {
        let web = try record("/web", instances: 1, crashes: 2)
        var plan = deployment([[.init(action: .scaleApplication, app: web.id)]], targets: [.init(app: web.id, targetVersion: "v2", previousVersion: "v1")])
        let crashed = try instance("c1", of: "/web", state: .failed)
        for _ in 0..<2 {
            plan = try #require(DeploymentProgress.recordingCrash(plan, of: crashed.spec, status: crashed.status!))
        }
        #expect(plan.consecutiveCrashes == 2)
        guard case .failed(let reason) = DeploymentProgress.evaluate(plan, apps: [web.id: web], now: started, instances: { _ in [] }) else {
            Issue.record("two crashes in a row with maxConsecutiveCrashes 2 should fail the deployment")
            return
        }
        #expect(reason.contains("failed 2 times in a row"))
        #expect(reason.contains("c1 ended with TASK_FAILED"))
        // An instance of another version is not this deployment's to count.
        let other = try instance("o1", of: "/web", config: "v1", state: .failed)
        #expect(DeploymentProgress.recordingCrash(plan, of: other.spec, status: other.status!) == nil)
    }

    @Test func failsAtTheProgressDeadlineSayingWhoWasNotReady() throws {
        let web = try record("/web", instances: 1, deadline: 30)
        let plan = deployment([[.init(action: .scaleApplication, app: web.id)]], targets: [.init(app: web.id, targetVersion: "v2", previousVersion: "v1")])
        var waiting = try instance("w1", of: "/web", state: .staging)
        waiting.status?.message = "pulling image"
        let apps = [web.id: web]
        #expect(DeploymentProgress.evaluate(plan, apps: apps, now: started.addingTimeInterval(29), instances: { _ in [waiting] }) == .waiting)
        let late = DeploymentProgress.evaluate(plan, apps: apps, now: started.addingTimeInterval(31), instances: { _ in [waiting] })
        #expect(late == .failed(reason: "/web was not ready within the progress deadline of 30 s: w1 is TASK_STAGING; pulling image"))
    }

    @Test func rollsBackOnlyWhereThereIsAPreviousVersionAndTheAppAsks() throws {
        let web = try record("/web", instances: 1)
        let fresh = deployment([[]], targets: [.init(app: web.id, targetVersion: "v2", previousVersion: nil)])
        let changed = deployment([[]], targets: [.init(app: web.id, targetVersion: "v2", previousVersion: "v1")])
        #expect(!DeploymentProgress.rollsBack(fresh, apps: [web.id: web]))
        #expect(DeploymentProgress.rollsBack(changed, apps: [web.id: web]))
        let manual = try record("/web", instances: 1, autoRollback: false)
        #expect(!DeploymentProgress.rollsBack(changed, apps: [web.id: manual]))
    }

    @Test func aWrittenOffInstanceNeitherCountsNorHoldsADeploymentOpen() throws {
        // Unreachable and replaced (asked to stop while its node is down): the app needs a new
        // one even with no over-capacity allowed, and arrives without waiting for the lost one.
        var web = try record("/web", instances: 1)
        web.definition.upgradeStrategy.maximumOverCapacity = 0
        let lost = try instance("lost", of: "/web", state: .unreachable, goal: .stop)
        #expect(Reconciler.plan(app: web, instances: [lost]).launch == 1)
        let replacement = try instance("new", of: "/web")
        #expect(Reconciler.isComplete(app: web, instances: [lost, replacement]))
        // Unreachable but not yet written off: it still counts, and it is not ready.
        let waiting = try instance("waiting", of: "/web", state: .unreachable)
        #expect(Reconciler.plan(app: web, instances: [waiting]).launch == 0)
        #expect(!Reconciler.isComplete(app: web, instances: [waiting]))
    }
}

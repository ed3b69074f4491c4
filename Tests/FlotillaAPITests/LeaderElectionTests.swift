import FlotillaControl
import FlotillaCore
import FlotillaStore
import Foundation
import Logging
import Synchronization
import Testing

/// Candidates on one store: exactly one leads; when it goes, another takes over; a deposed
/// leader's control plane can write nothing. (The Python cluster tests run the same on etcd.)
@Suite struct LeaderElectionTests {
    final class Roles: Sendable {
        let roles = Mutex<[String: LeaderElection.Role]>([:])
        func set(_ name: String, _ role: LeaderElection.Role) { roles.withLock { $0[name] = role } }
        var leaders: [String] {
            roles.withLock { roles in
                roles.compactMap { name, role in
                    if case .leader = role { return name }
                    return nil
                }.sorted()
            }
        }
    }

    func waitFor(_ condition: () async -> Bool, seconds: Double = 30) async -> Bool {
        let deadline = ContinuousClock.now + .seconds(seconds)
        while ContinuousClock.now < deadline {
            if await condition() { return true }
            try? await Task.sleep(for: .milliseconds(20))
        }
        return await condition()
    }

    @Test func oneLeadsAndAnotherTakesOverWhenItResigns() async throws {
        let store = InMemoryStateStore()
        let roles = Roles()
        var tasks: [String: Task<Void, any Error>] = [:]
        for name in ["a", "b", "c"] {
            let election = LeaderElection(
                store: store, candidate: LeaderRecord(name: name, api: "http://\(name):1"), ttl: 1, logger: Logger(label: name)
            ) { role in roles.set(name, role) }
            tasks[name] = Task { try await election.run() }
        }
        #expect(await waitFor { roles.leaders.count == 1 })
        let first = try #require(roles.leaders.first)
        // Everyone else names it.
        #expect(await waitFor {
            roles.roles.withLock { all in
                all.filter { $0.key != first }.allSatisfy { if case .follower(let leader) = $0.value { return leader?.name == first }; return false }
            }
        })
        let record = try #require(try await store.get(LeaderElection.key))
        #expect(try JSONDecoder().decode(LeaderRecord.self, from: record.value).name == first)

        // The leader stops: another leads within the lease, and never two at once.
        tasks[first]?.cancel()
        #expect(await waitFor { roles.leaders.count == 1 && roles.leaders.first != first })
        #expect(roles.leaders.count == 1)
        for task in tasks.values { task.cancel() }
    }

    @Test func aDeposedLeaderWritesNothing() async throws {
        let store = InMemoryStateStore()
        let node = NodeInfo(name: "n1", host: "127.0.0.1", cpus: 4, mem: 4096, disk: 0, portRangeStart: 31000, portRangeEnd: 31100, attributes: [:])
        try await store.put(StateKeys.node(node.name), try JSONEncoder().encode(node))
        let control = ControlPlane(store: store, events: EventBus(), logger: Logger(label: "test"), tickInterval: .seconds(3600))
        try await control.load()
        // It leads under a guard that holds…
        let held = try await store.put(LeaderElection.key, Data("{}".utf8))
        await control.setRole(.leader(guardCondition: .modifyIndex(LeaderElection.key, equals: held)))
        _ = try await control.create(AppDefinition(id: try AppID("/lead/one"), cmd: "sleep 100", instances: 1))
        #expect(try await store.get(StateKeys.app(try AppID("/lead/one"))) != nil)
        // …until another candidate's write replaces the key: the next commit fails whole.
        try await store.put(LeaderElection.key, Data("{\"other\":1}".utf8))
        await #expect(throws: FlotillaError.self) {
            _ = try await control.create(AppDefinition(id: try AppID("/lead/two"), cmd: "sleep 100", instances: 1))
        }
        #expect(try await store.get(StateKeys.app(try AppID("/lead/two"))) == nil)
        #expect(await control.leading == false)
        // A follower refuses writes outright.
        await #expect(throws: FlotillaError.self) {
            _ = try await control.create(AppDefinition(id: try AppID("/lead/three"), cmd: "sleep 100", instances: 1))
        }
    }
}

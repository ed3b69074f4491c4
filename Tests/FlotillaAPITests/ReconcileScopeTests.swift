import FlotillaControl
import FlotillaCore
import FlotillaStore
import Foundation
import Logging
import Synchronization
import Testing

/// A reconcile pass plans the apps whose inputs changed, not all of them: with a thousand apps
/// settled, a status from one instance costs a pass over that app alone.
@Suite struct ReconcileScopeTests {
    final class Passes: Sendable {
        let seen = Mutex<[ControlPlane.PassReport]>([])
        func record(_ report: ControlPlane.PassReport) { seen.withLock { $0.append(report) } }
        func since(_ count: Int) -> [ControlPlane.PassReport] { seen.withLock { Array($0.dropFirst(count)) } }
        var count: Int { seen.withLock { $0.count } }
    }

    @Test func aPassPlansTheAppsThatChangedOnly() async throws {
        let store = InMemoryStateStore()
        let node = NodeInfo(name: "n1", host: "127.0.0.1", cpus: 8, mem: 8192, disk: 0, portRangeStart: 31000, portRangeEnd: 31100, attributes: [:])
        try await store.put(StateKeys.node(node.name), try JSONEncoder().encode(node))
        let control = ControlPlane(store: store, events: EventBus(), logger: Logger(label: "test"), tickInterval: .milliseconds(50))
        let passes = Passes()
        await control.observePasses { passes.record($0) }
        try await control.load()
        let loop = Task { try await control.run() }
        defer { loop.cancel() }
        for name in ["a", "b", "c"] {
            var definition = AppDefinition(id: try AppID("/scope/\(name)"), cmd: "sleep 100", instances: 1)
            definition.portDefinitions = []
            _ = try await control.create(definition)
        }
        let deadline = ContinuousClock.now + .seconds(20)
        while ContinuousClock.now < deadline, await control.snapshot().instances.count < 3 {
            try await Task.sleep(for: .milliseconds(20))
        }
        // The instances run (as a node would report): the deployments end.
        for instance in await control.snapshot().instances.values {
            try await store.put(
                StateKeys.status(instance.id),
                try StateCodec.encode(InstanceStatus(id: instance.id, state: .running, updatedAt: Timestamp.format(Date()))))
        }
        while ContinuousClock.now < deadline, await !control.snapshot().deployments.isEmpty {
            try await Task.sleep(for: .milliseconds(20))
        }
        #expect(await control.snapshot().deployments.isEmpty)
        // Settled: the ticks' passes plan nothing.
        try await Task.sleep(for: .milliseconds(300))
        let settled = passes.count
        try await Task.sleep(for: .milliseconds(300))
        let idle = passes.since(settled)
        #expect(!idle.isEmpty, "the ticks ran no pass")
        #expect(idle.allSatisfy { $0.planned.isEmpty && !$0.full }, "\(idle.map(\.planned))")

        // One instance of b ends: the next passes plan b (and its replacement), never a or c.
        let before = passes.count
        let victim = try #require(await control.snapshot().instances.values.first { $0.spec.appID.path == "/scope/b" })
        try await store.put(
            StateKeys.status(victim.id),
            try StateCodec.encode(InstanceStatus(id: victim.id, state: .failed, updatedAt: Timestamp.format(Date()))))
        let replaced = ContinuousClock.now + .seconds(10)
        while ContinuousClock.now < replaced, await control.snapshot().instances[victim.id] != nil {
            try await Task.sleep(for: .milliseconds(20))
        }
        #expect(await control.snapshot().instances[victim.id] == nil, "the ended instance was not retired")
        // Relaunched after its crash backoff (a second).
        func bInstances() async -> [Instance] { await control.snapshot().instances.values.filter { $0.spec.appID.path == "/scope/b" } }
        while ContinuousClock.now < replaced, await bInstances().isEmpty {
            try await Task.sleep(for: .milliseconds(20))
        }
        try await Task.sleep(for: .milliseconds(200))
        let after = passes.since(before)
        let planned = after.reduce(into: Set<String>()) { $0.formUnion($1.planned) }
        #expect(planned == ["scope_b"], "\(after.map(\.planned))")
        #expect(after.allSatisfy { !$0.full })
        let b = await bInstances()
        #expect(b.count == 1 && b.first?.id != victim.id, "b was not relaunched")

        // The snapshot, brought up to date app by app since the last one, is what the store holds.
        try await Task.sleep(for: .milliseconds(200))
        let storedSpecs = StateCodec.decodeAll(InstanceSpec.self, from: try await store.list(prefix: StateKeys.instances).entries)
        let storedStatuses = StateCodec.decodeAll(InstanceStatus.self, from: try await store.list(prefix: StateKeys.statuses).entries)
        let snapshot = await control.snapshot().instances
        #expect(Set(snapshot.keys) == Set(storedSpecs.map(\.id)))
        for spec in storedSpecs {
            #expect(snapshot[spec.id]?.spec == spec)
            #expect(snapshot[spec.id]?.status == storedStatuses.first { $0.id == spec.id })
        }
    }
}

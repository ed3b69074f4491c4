import FlotillaControl
import FlotillaCore
import FlotillaStore
import Foundation
import Logging
import Testing

/// The control plane acts on a change when it happens, not at its next periodic pass: with the
/// tick an hour apart, a new app's instances are still placed at once.
@Suite struct ControlPlaneWakeupTests {
    /// A control plane over `store` with `nodes` registered, its periodic pass an hour apart,
    /// past its first pass (so only changes prompt the next ones).
    func start(on store: InMemoryStateStore, nodes: Int, cpus: Double, mem: Double) async throws -> (ControlPlane, Task<Void, any Error>) {
        for number in 1...nodes {
            let node = NodeInfo(
                name: "n\(number)", host: "127.0.0.\(number)", cpus: cpus, mem: mem, disk: 0, portRangeStart: 31000, portRangeEnd: 31100,
                attributes: [:])
            try await store.put(StateKeys.node(node.name), try JSONEncoder().encode(node))
        }
        let control = ControlPlane(store: store, events: EventBus(), logger: Logger(label: "test"), tickInterval: .seconds(3600))
        try await control.load()
        let loop = Task { try await control.run() }
        try await Task.sleep(for: .milliseconds(300))
        return (control, loop)
    }

    @Test func aNewAppIsPlacedWithoutWaitingForTheTick() async throws {
        let store = InMemoryStateStore()
        let (control, loop) = try await start(on: store, nodes: 1, cpus: 4, mem: 4096)
        defer { loop.cancel() }
        // A new app's deployment has two steps (start the app, then scale it): placing its
        // instances needs the pass after the one that finishes the first step.
        _ = try await control.create(AppDefinition(id: try AppID("/wake/web"), cmd: "sleep 100", instances: 2))
        var placed = 0
        let deadline = ContinuousClock.now + .seconds(30)
        while placed < 2 && ContinuousClock.now < deadline {
            placed = try await store.list(prefix: StateKeys.instances).entries.count
            try await Task.sleep(for: .milliseconds(20))
        }
        #expect(placed == 2, "the instances waited for the periodic pass")
    }

    /// A scale-up larger than one store transaction (etcd takes 128 operations) is placed over
    /// several passes, each commit within the limit, one after the other without waiting for the tick.
    @Test func aScaleUpLargerThanOneTransactionIsPlacedOverSeveralPasses() async throws {
        let store = InMemoryStateStore(limits: StoreLimits(maxOperations: 128, maxBytes: 1_500_000))
        let (control, loop) = try await start(on: store, nodes: 3, cpus: 64, mem: 65536)
        defer { loop.cancel() }
        var definition = AppDefinition(id: try AppID("/wake/many"), cmd: "sleep 100", instances: 300)
        definition.cpus = 0.1
        definition.mem = 16
        definition.portDefinitions = []
        _ = try await control.create(definition)
        var placed = 0
        let deadline = ContinuousClock.now + .seconds(30)
        while placed < 300 && ContinuousClock.now < deadline {
            placed = try await store.list(prefix: StateKeys.instances).entries.count
            try await Task.sleep(for: .milliseconds(20))
        }
        #expect(placed == 300, "only \(placed) of 300 instances were placed")
    }

    /// Instance records an earlier version kept at `instances/<id>` move under their node's prefix,
    /// where the node's agent watches: nothing else changes about them.
    @Test func legacyInstanceKeysMoveUnderTheirNode() async throws {
        let store = InMemoryStateStore()
        let definition = AppDefinition(id: try AppID("/old/web"), cmd: "sleep 100", instances: 1)
        let app = AppRecord(definition: definition, version: "v1", versionInfo: VersionInfo(lastScalingAt: "v1", lastConfigChangeAt: "v1"))
        try await store.put(StateKeys.app(definition.id), try StateCodec.encode(app))
        let spec = InstanceSpec(
            id: InstanceSpec.newID(for: definition.id), appID: definition.id, version: "v1", configVersion: "v1", definition: definition,
            node: "n1", host: "127.0.0.1", ports: [], stagedAt: "2026-01-01T00:00:00.000Z")
        try await store.put(StateKeys.instances + spec.id, try StateCodec.encode(spec))
        let (_, loop) = try await start(on: store, nodes: 1, cpus: 4, mem: 4096)
        defer { loop.cancel() }
        let deadline = ContinuousClock.now + .seconds(10)
        var keys: [String] = []
        while ContinuousClock.now < deadline {
            keys = try await store.list(prefix: StateKeys.instances).entries.map(\.key)
            if keys == [StateKeys.instance(spec)] { break }
            try await Task.sleep(for: .milliseconds(20))
        }
        #expect(keys == ["instances/n1/" + spec.id])
        let moved = try #require(try await store.get(StateKeys.instance(spec)))
        #expect(try StateCodec.decode(InstanceSpec.self, from: moved.value) == spec)
    }
}

import FlotillaControl
import FlotillaCore
import FlotillaStore
import Foundation
import Logging
import Testing

/// The control plane acts on a change when it happens, not at its next periodic pass: with the
/// tick an hour apart, a new app's instances are still placed at once.
@Suite struct ControlPlaneWakeupTests {
    @Test func aNewAppIsPlacedWithoutWaitingForTheTick() async throws {
        let store = InMemoryStateStore()
        let node = NodeInfo(name: "n1", host: "127.0.0.1", cpus: 4, mem: 4096, disk: 0, portRangeStart: 31000, portRangeEnd: 31100, attributes: [:])
        try await store.put(StateKeys.node(node.name), try JSONEncoder().encode(node))
        let control = ControlPlane(store: store, events: EventBus(), logger: Logger(label: "test"), tickInterval: .seconds(3600))
        try await control.load()
        let loop = Task { try await control.run() }
        defer { loop.cancel() }
        // Let the first pass (run's own) end, so only the change can prompt the next ones.
        try await Task.sleep(for: .milliseconds(300))
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
}

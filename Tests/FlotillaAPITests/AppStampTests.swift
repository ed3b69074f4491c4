import FlotillaControl
import FlotillaCore
import FlotillaStore
import Foundation
import Logging
import Testing

/// `/v2/apps` re-renders only the apps a change touched: each app's stamp moves when its record,
/// its instances (specs or statuses), its deployments or its last failure change, and not when
/// another app's do.
@Suite struct AppStampTests {
    func stamps(_ control: ControlPlane) async -> [String: UInt64] {
        let listing = await control.appListing()
        return Dictionary(uniqueKeysWithValues: zip(listing.apps.map(\.id.path), listing.stamps))
    }

    @Test func aChangeMovesTheStampOfTheAppItTouchesOnly() async throws {
        let store = InMemoryStateStore()
        let node = NodeInfo(name: "n1", host: "127.0.0.1", cpus: 8, mem: 8192, disk: 0, portRangeStart: 31000, portRangeEnd: 31100, attributes: [:])
        try await store.put(StateKeys.node(node.name), try JSONEncoder().encode(node))
        let control = ControlPlane(store: store, events: EventBus(), logger: Logger(label: "test"), tickInterval: .seconds(3600))
        try await control.load()
        let loop = Task { try await control.run() }
        defer { loop.cancel() }
        for name in ["a", "b", "c"] {
            var definition = AppDefinition(id: try AppID("/stamps/\(name)"), cmd: "sleep 100", instances: 1)
            definition.portDefinitions = []
            _ = try await control.create(definition)
        }
        // Settled: the instances placed (no node runs them, so the deployments wait for them).
        let deadline = ContinuousClock.now + .seconds(20)
        while ContinuousClock.now < deadline, await control.snapshot().instances.count < 3 {
            try await Task.sleep(for: .milliseconds(20))
        }
        try await Task.sleep(for: .milliseconds(300))
        let before = await stamps(control)
        #expect(await stamps(control) == before, "reading moved a stamp")

        // An instance's status (what a node reports) touches its app alone.
        let instance = try #require(await control.snapshot().instances.values.first { $0.spec.appID.path == "/stamps/b" })
        try await store.put(
            StateKeys.status(instance.id),
            try StateCodec.encode(InstanceStatus(id: instance.id, state: .running, updatedAt: Timestamp.format(Date()))))
        var after = before
        let waited = ContinuousClock.now + .seconds(10)
        while ContinuousClock.now < waited {
            after = await stamps(control)
            if after["/stamps/b"] != before["/stamps/b"] { break }
            try await Task.sleep(for: .milliseconds(20))
        }
        #expect(after["/stamps/b"]! > before["/stamps/b"]!)
        #expect(after["/stamps/a"] == before["/stamps/a"] && after["/stamps/c"] == before["/stamps/c"])
        let detail = try #require(await control.appDetails([try AppID("/stamps/b")])[try AppID("/stamps/b")])
        #expect(detail.instances.map(\.id) == [instance.id] && detail.instances.first?.status?.state == .running)
        #expect(detail.stamp == after["/stamps/b"])

        // A change to an app's definition touches that app.
        _ = try await control.update(try AppID("/stamps/c"), fields: ["labels": ["x": "1"]], partial: true, force: true)
        let changed = await stamps(control)
        #expect(changed["/stamps/c"]! > after["/stamps/c"]! && changed["/stamps/a"] == before["/stamps/a"])
    }
}

public import FlotillaControl
import FlotillaCore
import Foundation
public import Hummingbird

/// Flotilla's own read API, for what Marathon's shapes cannot carry (strict Marathon clients reject
/// unknown keys): how a deployment ended, and each instance's service state.
public struct FlotillaRoutes: Sendable {
    let control: ControlPlane
    /// Who leads, in a cluster (nil for a lone agent, which is its own scheduler).
    let cluster: ClusterView?
    let localNode: String

    public init(control: ControlPlane, cluster: ClusterView? = nil, localNode: String = "") {
        self.control = control
        self.cluster = cluster
        self.localNode = localNode
    }

    public func add<Context: RequestContext>(to router: Router<Context>) {
        router.get("/flotilla/v1/deployments/:id") { _, context in
            await Self.handle { try await self.deployment(context.parameters.get("id") ?? "") }
        }
        router.get("/flotilla/v1/instances") { request, _ in
            await Self.handle { await self.instances(app: request.uri.queryParameters["app"].map(String.init)) }
        }
        router.get("/flotilla/v1/nodes") { _, _ in await Self.handle { await self.nodes() } }
        router.delete("/flotilla/v1/nodes/:name") { _, context in
            await Self.handle {
                let name = context.parameters.get("name") ?? ""
                try await control.forgetNode(name)
                return APIResponse.json(.object(["forgotten": .string(name)]))
            }
        }
    }

    /// Every node: up (`ready`) or `down`, the leader marked, what it offers and how many
    /// instances it holds.
    private func nodes() async -> Response {
        let snapshot = await control.snapshot()
        let leaderName = cluster.map { $0.leader?.name } ?? localNode
        var counts: [String: Int] = [:]
        for instance in snapshot.instances.values where !instance.state.isTerminal && !instance.isWrittenOff { counts[instance.spec.node, default: 0] += 1 }
        let all = snapshot.nodes.values.map { ($0, "ready") } + snapshot.downNodes.values.filter { snapshot.nodes[$0.name] == nil }.map { ($0, "down") }
        let items = all.sorted { $0.0.name < $1.0.name }.map { node, status -> JSONValue in
            .object([
                "name": .string(node.name), "address": .string(node.host), "status": .string(status),
                "leader": .bool(node.name == leaderName), "cpus": .number(node.cpus), "mem": .number(node.mem), "disk": .number(node.disk),
                "ports": .string("\(node.portRangeStart)-\(node.portRangeEnd)"),
                "attributes": .object(node.attributes.mapValues(JSONValue.string)), "drivers": .array(node.drivers.map(JSONValue.string)),
                "instances": .number(Double(counts[node.name] ?? 0)),
            ])
        }
        return APIResponse.json(.array(items))
    }

    static func handle(_ body: () async throws -> Response) async -> Response {
        do { return try await body() } catch { return APIResponse.marathonError(error) }
    }

    /// `{"id", "status": "running" | "succeeded" | "failed" | "cancelled", "reason", …}`.
    private func deployment(_ id: String) async throws -> Response {
        let (active, result) = try await control.deploymentStatus(id)
        if let active {
            var object = MarathonJSON.deployment(active).objectValue ?? [:]
            object["status"] = .string("running")
            object["startedAt"] = .string(active.startedAt)
            object["consecutiveCrashes"] = .number(Double(active.consecutiveCrashes))
            if let problem = active.lastProblem { object["lastProblem"] = .string(problem) }
            return APIResponse.json(.object(object))
        }
        guard let result else { throw FlotillaError.notFound("no deployment \(id)") }
        var object: [String: JSONValue] = [
            "id": .string(result.id), "version": .string(result.version), "status": .string(result.status.rawValue),
            "affectedApps": .array(result.affectedApps.map { .string($0.path) }), "finishedAt": .string(result.finishedAt),
        ]
        if let reason = result.reason { object["reason"] = .string(reason) }
        if let rollback = result.rollbackDeploymentID { object["rollbackDeploymentId"] = .string(rollback) }
        if let version = result.rolledBackTo { object["rolledBackTo"] = .string(version) }
        return APIResponse.json(.object(object))
    }

    /// Every live instance with what Flotilla knows beyond Marathon's task: in service or not,
    /// draining, standby (a warm blue-green set), health.
    private func instances(app: String?) async -> Response {
        let snapshot = await control.snapshot()
        let filter = app.flatMap { try? AppID($0) }
        let items = snapshot.instances.values
            .filter { !$0.state.isTerminal && (filter == nil || $0.spec.appID == filter) }
            .sorted { ($0.spec.appID, $0.spec.stagedAt) < ($1.spec.appID, $1.spec.stagedAt) }
            .map { instance -> JSONValue in
                var object = MarathonJSON.task(instance).objectValue ?? [:]
                object["inService"] = .bool(instance.isInService)
                object["ready"] = .bool(instance.isReady)
                object["draining"] = .bool(instance.status?.draining == true)
                object["standby"] = .bool(instance.spec.standby)
                if let until = instance.spec.standbyUntil { object["standbyUntil"] = .string(until) }
                object["goal"] = .string(instance.spec.goal.rawValue)
                if let reason = instance.spec.stopReason { object["stopReason"] = .string(reason) }
                if let healthy = instance.status?.isHealthy { object["healthy"] = .bool(healthy) }
                if let message = instance.status?.message { object["message"] = .string(message) }
                // Which driver runs it and what it made (a container id, an image, an address);
                // process ids stay the agent's business.
                object["driver"] = .string(instance.status?.driver ?? instance.spec.definition.driver)
                let shown = (instance.status?.driverState ?? [:]).filter { ["container", "image", "address", "rootfs"].contains($0.key) }
                if !shown.isEmpty { object["driverState"] = .object(shown.mapValues(JSONValue.string)) }
                return .object(object)
            }
        return APIResponse.json(.object(["instances": .array(items)]))
    }
}

public import AsyncHTTPClient
public import FlotillaControl
public import FlotillaCore
import Foundation
public import Hummingbird
import NIOCore
import NIOHTTP1

/// What nodes and instances use, for people and dashboards (Prometheus scrapes `/metrics`):
///
/// - `GET /flotilla/v1/stats[?app=ID][&local=true]`: every node of the cluster (or this one with
///   `local=true`), its instances and their sums by app.
/// - `GET /flotilla/v1/apps/{id}/stats`: one app's instances wherever they run, and their sum.
///
/// In a cluster the agent asks each other node's agent for its part (`local=true`, 2 s each, side
/// by side); a node that does not answer is listed under `unreachable`, its instances missing.
public struct StatsRoutes: Sendable {
    /// What this node measured: of one app, or of all.
    public typealias LocalStats = @Sendable (AppID?) async -> NodeStats

    let control: ControlPlane
    let localNode: String
    let local: LocalStats
    let client: HTTPClient?

    public init(control: ControlPlane, localNode: String, local: @escaping LocalStats, client: HTTPClient?) {
        self.control = control
        self.localNode = localNode
        self.local = local
        self.client = client
    }

    struct Unreachable: Codable, Sendable {
        var node: String
        var error: String
    }

    struct ClusterStats: Codable, Sendable {
        var nodes: [NodeUsageReport]
        var apps: [AppUsageSummary]
        var instances: [InstanceUsageReport]
        var unreachable: [Unreachable]
    }

    struct AppStats: Codable, Sendable {
        var app: String
        var summary: AppUsageSummary
        var instances: [InstanceUsageReport]
        var unreachable: [Unreachable]
    }

    public func add<Context: RequestContext>(to router: Router<Context>) {
        router.get("/flotilla/v1/stats") { request, _ in
            await FlotillaRoutes.handle {
                let app = try request.uri.queryParameters["app"].map { try Self.appID(String($0)) }
                let stats = try await self.gather(request, app: app, localOnly: try request.flag("local"))
                return try APIResponse.encoded(stats)
            }
        }
        router.get("/flotilla/v1/apps/**") { request, _ in
            await FlotillaRoutes.handle {
                let path = request.uri.path.dropFirst("/flotilla/v1/apps".count)
                guard path.hasSuffix("/stats") else { throw FlotillaError.notFound("no such resource: \(request.uri.path) (see /flotilla/v1/apps/{id}/stats)") }
                let app = try Self.appID(String(path.dropLast("/stats".count)))
                guard await control.snapshot().apps[app] != nil else { throw FlotillaError.notFound("App '\(app.path)' does not exist") }
                let stats = try await self.gather(request, app: app, localOnly: false)
                var summary = stats.apps.first ?? AppUsageSummary(app: app.path, instances: [])
                summary.app = app.path
                return try APIResponse.encoded(AppStats(app: app.path, summary: summary, instances: stats.instances, unreachable: stats.unreachable))
            }
        }
    }

    static func appID(_ text: String) throws -> AppID {
        do {
            return try AppID(text)
        } catch {
            throw FlotillaError.badRequest("'\(text)' is not an app id: \(error)")
        }
    }

    private func gather(_ request: Request, app: AppID?, localOnly: Bool) async throws -> ClusterStats {
        var parts = [await local(app)]
        var unreachable: [Unreachable] = []
        if !localOnly, !NodeRelay.isRelayed(request), let client {
            let others = await control.snapshot().nodes.values.filter { $0.name != localNode }
            await withTaskGroup(of: Result<NodeStats, NodeFailure>.self) { group in
                for node in others {
                    group.addTask { await self.ask(node, request: request, app: app, client: client) }
                }
                for await result in group {
                    switch result {
                    case .success(let stats): parts.append(stats)
                    case .failure(let failure): unreachable.append(Unreachable(node: failure.node, error: failure.message))
                    }
                }
            }
        }
        let instances = parts.flatMap(\.instances).sorted { ($0.app, $0.id) < ($1.app, $1.id) }
        let windows = AppUsageSummary.requestsByApp(parts.compactMap(\.requests))
        let apps = AppUsageSummary.byApp(instances, requests: windows, including: app.map { [$0.path] } ?? [])
        return ClusterStats(
            nodes: parts.compactMap(\.node).sorted { $0.node < $1.node }, apps: apps, instances: instances,
            unreachable: unreachable.sorted { $0.node < $1.node })
    }

    struct NodeFailure: Error {
        var node: String
        var message: String
    }

    private func ask(_ node: NodeInfo, request: Request, app: AppID?, client: HTTPClient) async -> Result<NodeStats, NodeFailure> {
        guard let api = node.api else { return .failure(NodeFailure(node: node.name, message: "the node's agent does not advertise its API")) }
        var query = "local=true"
        if let app { query += "&app=" + (app.path.addingPercentEncoding(withAllowedCharacters: .urlQueryAllowed) ?? app.path) }
        var outgoing = HTTPClientRequest(url: api + "/flotilla/v1/stats?" + query)
        for field in request.headers where !NodeRelay.hopByHop.contains(field.name.canonicalName) {
            outgoing.headers.add(name: field.name.rawName, value: field.value)
        }
        outgoing.headers.add(name: NodeRelay.relayedHeader.rawName, value: localNode)
        do {
            let answer = try await client.execute(outgoing, timeout: .seconds(2))
            let body = try await answer.body.collect(upTo: 64 << 20)
            guard answer.status == .ok else {
                return .failure(NodeFailure(node: node.name, message: "answered \(answer.status.code): \(String(buffer: body).prefix(200))"))
            }
            let stats = try JSONDecoder().decode(ClusterStats.self, from: Data(body.readableBytesView))
            return .success(NodeStats(node: stats.nodes.first, instances: stats.instances))
        } catch {
            return .failure(NodeFailure(node: node.name, message: "did not answer at \(api): \(error)"))
        }
    }
}

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
    let control: ControlPlane
    let gatherer: StatsGatherer

    public init(control: ControlPlane, gatherer: StatsGatherer) {
        self.control = control
        self.gatherer = gatherer
    }

    struct AppStats: Codable, Sendable {
        var app: String
        var summary: AppUsageSummary
        var instances: [InstanceUsageReport]
        var unreachable: [ClusterStats.Unreachable]
    }

    public func add<Context: RequestContext>(to router: Router<Context>) {
        router.get("/flotilla/v1/stats") { request, _ in
            await FlotillaRoutes.handle {
                let app = try request.uri.queryParameters["app"].map { try Self.appID(String($0)) }
                let localOnly = try request.flag("local") || NodeRelay.isRelayed(request)
                var stats = try await gatherer.gather(app: app, localOnly: localOnly, headers: request.headers)
                // Another agent adding nodes up needs the raw counts, not the rates.
                if !localOnly { stats.requests = nil }
                return try APIResponse.encoded(stats)
            }
        }
        router.get("/flotilla/v1/apps/**") { request, _ in
            await FlotillaRoutes.handle {
                let path = request.uri.path.dropFirst("/flotilla/v1/apps".count)
                guard path.hasSuffix("/stats") else { throw FlotillaError.notFound("no such resource: \(request.uri.path) (see /flotilla/v1/apps/{id}/stats)") }
                let app = try Self.appID(String(path.dropLast("/stats".count)))
                guard await control.snapshot().apps[app] != nil else { throw FlotillaError.notFound("App '\(app.path)' does not exist") }
                let stats = try await gatherer.gather(app: app, localOnly: false, headers: request.headers)
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
}

/// What every node of the cluster measured, as `GET /flotilla/v1/stats` answers it.
public struct ClusterStats: Codable, Sendable {
    public struct Unreachable: Codable, Sendable {
        public var node: String
        public var error: String
    }

    public var nodes: [NodeUsageReport]
    public var apps: [AppUsageSummary]
    public var instances: [InstanceUsageReport]
    public var unreachable: [Unreachable]
    /// The nodes' request windows added up by app; sent only with `local=true`.
    public var requests: [String: RequestWindow]?
}

/// Gathers this node's measurements and, in a cluster, every other node's (`local=true`, 2 s
/// each, side by side); a node that does not answer is listed under `unreachable`.
public struct StatsGatherer: Sendable {
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

    /// `headers` go along to the other agents (the caller's token); hop-by-hop ones are left out.
    public func gather(app: AppID?, localOnly: Bool, headers: HTTPFields) async -> ClusterStats {
        var parts = [await local(app)]
        var unreachable: [ClusterStats.Unreachable] = []
        if !localOnly, let client {
            let others = await control.snapshot().nodes.values.filter { $0.name != localNode }
            await withTaskGroup(of: Result<NodeStats, NodeFailure>.self) { group in
                for node in others {
                    group.addTask { await self.ask(node, headers: headers, app: app, client: client) }
                }
                for await result in group {
                    switch result {
                    case .success(let stats): parts.append(stats)
                    case .failure(let failure): unreachable.append(.init(node: failure.node, error: failure.message))
                    }
                }
            }
        }
        let instances = parts.flatMap(\.instances).sorted { ($0.app, $0.id) < ($1.app, $1.id) }
        let windows = AppUsageSummary.requestsByApp(parts.compactMap(\.requests))
        let apps = AppUsageSummary.byApp(instances, requests: windows, including: app.map { [$0.path] } ?? [])
        return ClusterStats(
            nodes: parts.compactMap(\.node).sorted { $0.node < $1.node }, apps: apps, instances: instances,
            unreachable: unreachable.sorted { $0.node < $1.node }, requests: windows)
    }

    struct NodeFailure: Error {
        var node: String
        var message: String
    }

    private func ask(_ node: NodeInfo, headers: HTTPFields, app: AppID?, client: HTTPClient) async -> Result<NodeStats, NodeFailure> {
        guard let api = node.api else { return .failure(NodeFailure(node: node.name, message: "the node's agent does not advertise its API")) }
        var query = "local=true"
        if let app { query += "&app=" + (app.path.addingPercentEncoding(withAllowedCharacters: .urlQueryAllowed) ?? app.path) }
        var outgoing = HTTPClientRequest(url: api + "/flotilla/v1/stats?" + query)
        for field in headers where !NodeRelay.hopByHop.contains(field.name.canonicalName) {
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
            return .success(NodeStats(node: stats.nodes.first, instances: stats.instances, requests: stats.requests))
        } catch {
            return .failure(NodeFailure(node: node.name, message: "did not answer at \(api): \(error)"))
        }
    }
}

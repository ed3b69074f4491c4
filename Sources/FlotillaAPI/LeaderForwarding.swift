public import AsyncHTTPClient
public import FlotillaControl
import FlotillaCore
import Foundation
public import HTTPTypes
public import Hummingbird
import NIOCore
import NIOHTTP1
import Synchronization

/// Who leads the cluster, as the API needs to know it: `/v2/leader`, `/v1/status/leader`,
/// `X-Consul-KnownLeader`, and where a follower sends the writes it cannot apply. The leader
/// election updates it; readers never wait.
public final class ClusterView: Sendable {
    private struct State {
        var leader: LeaderRecord?
        var isLeader: Bool
    }

    private let state: Mutex<State>

    public init(leader: LeaderRecord?, isLeader: Bool) {
        state = Mutex(State(leader: leader, isLeader: isLeader))
    }

    public func update(leader: LeaderRecord?, isLeader: Bool) {
        state.withLock { $0 = State(leader: leader, isLeader: isLeader) }
    }

    public var leader: LeaderRecord? { state.withLock { $0.leader } }
    public var isLeader: Bool { state.withLock { $0.isLeader } }

    /// `host:port` of the leader's API (Marathon's `/v2/leader` shape), or nil while none is elected.
    var leaderAddress: String? { leader.map { Self.hostPort(of: $0.api) } }

    static func hostPort(of url: String) -> String {
        var text = Substring(url)
        if let scheme = text.range(of: "://") { text = text[scheme.upperBound...] }
        return String(text.prefix { $0 != "/" })
    }
}

/// On a follower, Marathon writes (`/v2/…` other than GET and HEAD) and changes to the node list
/// (`/flotilla/v1/nodes/…`) go to the leader, which alone schedules; the answer comes back
/// unchanged, as Marathon's standby masters proxy to the leader. Reads are served where they
/// arrive, but for `/flotilla/v1/alerts`: only the leader evaluates alerts.
public struct LeaderForwardingMiddleware<Context: RequestContext>: RouterMiddleware {
    let role: ClusterView
    let client: HTTPClient
    let control: ControlPlane
    static var forwardedHeader: HTTPField.Name { HTTPField.Name("X-Flotilla-Forwarded-By")! }
    /// The leader's store index after a forwarded write: the follower answers once it shows it.
    static var indexHeader: HTTPField.Name { HTTPField.Name("X-Flotilla-Index")! }
    /// The largest body forwarded (Marathon's own limit for app definitions is far below).
    static var maximumBody: Int { 16 << 20 }

    public init(role: ClusterView, client: HTTPClient, control: ControlPlane) {
        self.role = role
        self.client = client
        self.control = control
    }

    public func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        // Alerts are evaluated by the leader alone: it answers for them.
        let leaderReads = request.uri.path == "/flotilla/v1/alerts"
        guard leaderReads || request.method != .get && request.method != .head
            && (request.uri.path.hasPrefix("/v2/") || request.uri.path.hasPrefix("/flotilla/v1/nodes/"))
        else {
            return try await next(request, context)
        }
        if role.isLeader {
            var response = try await next(request, context)
            if request.headers[Self.forwardedHeader] != nil {
                response.headers[Self.indexHeader] = String(await control.memoryIndex())
            }
            return response
        }
        guard let leader = role.leader else {
            return APIResponse.json(
                .object(["message": .string("no leader is elected yet (the cluster's servers are campaigning): retry in a few seconds")]),
                status: .serviceUnavailable)
        }
        if request.headers[Self.forwardedHeader] != nil {
            // A forwarded write reached another follower: the leader moved meanwhile.
            return APIResponse.json(
                .object(["message": .string("this agent does not lead the cluster any more: retry, and the write goes to the new leader")]),
                status: .serviceUnavailable)
        }
        var outgoing = HTTPClientRequest(url: leader.api + request.uri.description)
        outgoing.method = HTTPMethod(rawValue: request.method.rawValue)
        for field in request.headers where !NodeRelay.hopByHop.contains(field.name.canonicalName) {
            outgoing.headers.add(name: field.name.rawName, value: field.value)
        }
        outgoing.headers.add(name: Self.forwardedHeader.rawName, value: "follower")
        let body = try await request.body.collect(upTo: Self.maximumBody)
        outgoing.body = .bytes(body)
        let answer: HTTPClientResponse
        do {
            answer = try await client.execute(outgoing, timeout: .seconds(60))
        } catch {
            return APIResponse.json(
                .object(["message": .string("the leader \(leader.name) at \(leader.api) did not answer the forwarded write (\(error)): retry")]),
                status: .serviceUnavailable)
        }
        var headers = HTTPFields()
        for (name, value) in answer.headers where !NodeRelay.hopByHop.contains(name.lowercased()) {
            if let field = HTTPField.Name(name) { headers.append(HTTPField(name: field, value: value)) }
        }
        let bytes = try await answer.body.collect(upTo: Self.maximumBody)
        if let index = answer.headers.first(name: Self.indexHeader.rawName).flatMap(UInt64.init) {
            await control.waitForIndex(index, timeout: .seconds(3))
        }
        return Response(status: .init(code: Int(answer.status.code)), headers: headers, body: ResponseBody(byteBuffer: bytes))
    }
}

public import AsyncHTTPClient
import FlotillaCore
import Foundation
public import HTTPTypes
public import Hummingbird
import NIOCore
import NIOHTTP1

/// Relays a read to another agent of the cluster and streams its answer back as it comes: an
/// instance's logs from the node that runs it, Marathon's event stream from the leader. The
/// caller's headers go along (its token is checked there too); a relayed request is never relayed
/// again, so two agents that disagree about who holds what cannot bounce it between them.
public struct NodeRelay: Sendable {
    let client: HTTPClient

    public init(client: HTTPClient) {
        self.client = client
    }

    static var relayedHeader: HTTPField.Name { HTTPField.Name("X-Flotilla-Relayed-By")! }

    static var hopByHop: Set<String> {
        ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer", "host", "content-length"]
    }

    /// Whether this request came from another agent's relay.
    static func isRelayed(_ request: Request) -> Bool { request.headers[relayedHeader] != nil }

    /// `GET base + the request's path and query` on the other agent; its status, headers and body
    /// (streamed, for as long as both ends keep the connection) come back unchanged.
    func get(_ request: Request, to base: String, by node: String, what: String) async -> Response {
        do {
            // No overall deadline: a followed log or an event stream lasts as long as the client wants it.
            let answer = try await open(request, uri: request.uri.description, to: base, by: node, deadline: .distantFuture)
            var headers = HTTPFields()
            for (name, value) in answer.headers where !Self.hopByHop.contains(name.lowercased()) {
                if let field = HTTPField.Name(name) { headers.append(HTTPField(name: field, value: value)) }
            }
            return Response(status: .init(code: Int(answer.status.code)), headers: headers, body: ResponseBody(asyncSequence: answer.body))
        } catch {
            return APIResponse.json(
                .object(["message": .string("\(what) is at \(base), which did not answer (\(error)): retry, or ask that agent directly")]),
                status: .badGateway)
        }
    }

    /// `GET base + uri` on the other agent with the caller's headers (its token), marked relayed:
    /// for a caller that reads the answer itself (the logs of an app, merged from every node).
    func open(_ request: Request, uri: String, to base: String, by node: String, deadline: NIODeadline) async throws -> HTTPClientResponse {
        var outgoing = HTTPClientRequest(url: base + uri)
        outgoing.method = .GET
        for field in request.headers where !Self.hopByHop.contains(field.name.canonicalName) {
            outgoing.headers.add(name: field.name.rawName, value: field.value)
        }
        outgoing.headers.add(name: Self.relayedHeader.rawName, value: node)
        return try await client.execute(outgoing, deadline: deadline)
    }
}

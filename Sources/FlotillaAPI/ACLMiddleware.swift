import FlotillaCore
public import FlotillaSecrets
import Foundation
import HTTPTypes
public import Hummingbird
import NIOCore

/// Access control for every route: with `--acl default-deny`, each request needs a token whose
/// policies grant what `ACLRequirement` says it needs; without it the API is open (as before),
/// and tokens and policies can be set up ahead of turning it on.
public struct ACLMiddleware<Context: RequestContext>: RouterMiddleware {
    let tokens: TokenStore
    let enforcing: Bool
    let audit: AuditLog?

    public init(tokens: TokenStore, enforcing: Bool, audit: AuditLog? = nil) {
        self.tokens = tokens
        self.enforcing = enforcing
        self.audit = audit
    }

    public func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        let writes = request.method != .get && request.method != .head
        guard enforcing || (writes && audit != nil) else { return try await next(request, context) }
        var request = request
        let secret = Self.token(in: request)
        // A request spends one of a token's uses only where access control checks it.
        var token = secret.flatMap { tokens.cachedToken(secret: $0, consume: enforcing) }
        if token == nil, let secret { token = try await tokens.lookup(secret: secret, consume: enforcing) }
        func recorded(_ response: Response, _ decision: String) -> Response {
            if decision == "denied" || writes {
                audit?.record(
                    AuditEntry(
                        time: Timestamp.format(Date()), accessor: token?.accessor ?? (secret == nil ? "anonymous" : "unknown"),
                        tokenName: token?.displayName, client: context.remoteAddressText, method: request.method.rawValue,
                        path: AuditLog.loggedPath(request.uri.path), status: Int(response.status.code), decision: decision))
            }
            return response
        }
        guard enforcing else { return recorded(try await next(request, context), "allowed") }
        let requirement = ACLRequirement.of(method: request.method, path: request.uri.path, query: request.uri.query)
        if requirement == .none { return recorded(try await next(request, context), "allowed") }
        guard let token else { return recorded(Self.denied(request, known: false, anonymous: secret == nil), "denied") }
        let policies: PolicySet
        if let cached = tokens.cachedPolicySet(for: token) { policies = cached } else { policies = try await tokens.policySet(for: token) }
        let allowed: Bool
        switch requirement {
        case .none, .anyToken:
            allowed = true
        case .capability(let path, let needed):
            allowed = policies.allows(path, anyOf: needed)
        case .marathonCreate(let kind):
            // The new app's (or group's) id is in the body; the route reads the body again.
            let buffer = try await request.collectBody(upTo: MarathonRoutes.maximumBodyBytes)
            let ids = Self.ids(in: buffer)
            allowed = !ids.isEmpty && ids.allSatisfy { policies.allows("marathon/\(kind)/" + $0, anyOf: [.create, .update]) }
        }
        guard allowed else { return recorded(Self.denied(request, known: true, anonymous: false), "denied") }
        return recorded(try await next(request, context), "allowed")
    }

    /// A token as each client sends it: Vault's `X-Vault-Token`, Consul's `X-Consul-Token` and
    /// `?token=`, `Authorization: Bearer T`, and `Authorization: token=T` (DC/OS, marathon-python).
    public static func token(in request: Request) -> String? {
        for name in ["X-Vault-Token", "X-Consul-Token"] {
            if let value = request.headers[HTTPField.Name(name)!], !value.isEmpty { return value }
        }
        if let authorization = request.headers[.authorization] {
            let trimmed = authorization.trimmingCharacters(in: .whitespaces)
            if trimmed.lowercased().hasPrefix("bearer ") { return String(trimmed.dropFirst(7)).trimmingCharacters(in: .whitespaces) }
            if trimmed.lowercased().hasPrefix("token=") { return String(trimmed.dropFirst(6)) }
        }
        if let token = request.uri.queryParameters["token"], !token.isEmpty { return String(token) }
        return nil
    }

    static func ids(in buffer: ByteBuffer) -> [String] {
        guard let json = try? JSONValue.parse(Data(buffer.readableBytesView)) else { return [] }
        func id(_ value: JSONValue) -> String? {
            guard let raw = value["id"]?.stringValue else { return nil }
            let trimmed = raw.split(separator: "/").joined(separator: "/")
            return trimmed.isEmpty ? nil : trimmed
        }
        switch json {
        case .object: return id(json).map { [$0] } ?? []
        case .array(let items):
            let found = items.compactMap(id)
            return found.count == items.count ? found : []
        default: return []
        }
    }

    /// A refusal in the shape of the surface asked: Vault's, Consul's or Marathon's.
    static func denied(_ request: Request, known: Bool, anonymous: Bool) -> Response {
        let path = request.uri.path
        if path.hasPrefix("/v1/secret") || path.hasPrefix("/v1/sys") || path.hasPrefix("/v1/auth") {
            return response(.forbidden, json: ["errors": ["permission denied"]])
        }
        if path.hasPrefix("/v1/") {
            let text = !known && !anonymous ? "ACL not found" : "Permission denied: the token lacks the permission \(path) needs"
            return Response(
                status: .forbidden, headers: [.contentType: "text/plain; charset=utf-8"], body: ResponseBody(byteBuffer: ByteBuffer(string: text + "\n")))
        }
        if anonymous || !known {
            return response(.unauthorized, json: ["message": "Not Authenticated! Send a token (Authorization: Bearer …, or token=… as DC/OS clients do)"])
        }
        return response(.forbidden, json: ["message": "Not Authorized to perform this action!"])
    }

    static func response(_ status: HTTPResponse.Status, json: JSONValue) -> Response {
        Response(status: status, headers: [.contentType: "application/json"], body: ResponseBody(byteBuffer: ByteBuffer(bytes: json.serialized())))
    }
}

import FlotillaCore
public import FlotillaSecrets
import Foundation
import HTTPTypes
public import Hummingbird
import NIOCore

/// Tokens and policies in Vault's shapes (`/v1/auth/token/…`, `/v1/sys/policies/acl/…` and the
/// older `/v1/sys/policy/…`), and Consul's one-time `PUT /v1/acl/bootstrap`.
public struct AuthRoutes: Sendable {
    let tokens: TokenStore

    public init(tokens: TokenStore) {
        self.tokens = tokens
    }

    public func add<Context: RequestContext>(to router: Router<Context>) {
        router.put("/v1/acl/bootstrap") { _, _ in await handle { try await bootstrap() } }
        for verb in [HTTPRequest.Method.post, .put] {
            router.on("/v1/auth/token/create", method: verb) { request, _ in await handle { try await create(request, orphan: false) } }
            router.on("/v1/auth/token/create-orphan", method: verb) { request, _ in await handle { try await create(request, orphan: true) } }
            router.on("/v1/auth/token/renew-self", method: verb) { request, _ in await handle { try await renewSelf(request) } }
            router.on("/v1/auth/token/revoke-self", method: verb) { request, _ in await handle { try await revokeSelf(request) } }
            router.on("/v1/auth/token/revoke", method: verb) { request, _ in await handle { try await revoke(request) } }
            router.on("/v1/auth/token/lookup", method: verb) { request, _ in await handle { try await lookup(request) } }
            router.on("/v1/auth/token/lookup-self", method: verb) { request, _ in await handle { try await lookupSelf(request) } }
            router.on("/v1/auth/token/lookup-accessor", method: verb) { request, _ in await handle { try await lookupAccessor(request) } }
            router.on("/v1/auth/token/revoke-accessor", method: verb) { request, _ in await handle { try await revokeAccessor(request) } }
            router.on("/v1/sys/policies/acl/**", method: verb) { request, _ in await handle { try await putPolicy(request, prefix: "/v1/sys/policies/acl/") } }
            router.on("/v1/sys/policy/**", method: verb) { request, _ in await handle { try await putPolicy(request, prefix: "/v1/sys/policy/") } }
        }
        router.get("/v1/auth/token/lookup-self") { request, _ in await handle { try await lookupSelf(request) } }
        router.get("/v1/auth/token/accessors") { request, _ in
            await handle {
                guard request.uri.queryParameters["list"] == "true" else { throw AuthError(status: 405, message: "list the accessors with LIST (or GET ?list=true)") }
                return try Self.envelope(["keys": .array(try await tokens.accessors().map(JSONValue.string))])
            }
        }
        router.get("/v1/sys/policies/acl") { _, _ in await handle { try Self.envelope(["keys": .array(try await tokens.policyNames().map(JSONValue.string))]) } }
        router.get("/v1/sys/policy") { _, _ in
            await handle {
                let names = try await tokens.policyNames().map(JSONValue.string)
                return Self.json(.ok, ["policies": .array(names), "keys": .array(names), "data": ["keys": .array(names)]])
            }
        }
        router.get("/v1/sys/policies/acl/**") { request, _ in await handle { try await readPolicy(request, prefix: "/v1/sys/policies/acl/", legacy: false) } }
        router.get("/v1/sys/policy/**") { request, _ in await handle { try await readPolicy(request, prefix: "/v1/sys/policy/", legacy: true) } }
        router.delete("/v1/sys/policies/acl/**") { request, _ in await handle { try await deletePolicy(request, prefix: "/v1/sys/policies/acl/") } }
        router.delete("/v1/sys/policy/**") { request, _ in await handle { try await deletePolicy(request, prefix: "/v1/sys/policy/") } }
    }

    // MARK: - Tokens

    private func bootstrap() async throws -> Response {
        let (secret, info) = try await tokens.bootstrap()
        return Self.json(.ok, [
            "AccessorID": .string(info.accessor), "SecretID": .string(secret), "Description": "Bootstrap Token (Global Management)",
            "Policies": [["ID": "00000000-0000-0000-0000-000000000001", "Name": "global-management"]],
            "Local": false, "CreateTime": .string(Timestamp.format(info.createdAt)),
        ])
    }

    private func caller(_ request: Request) async throws -> (secret: String, info: TokenInfo) {
        // The access control in front of this route has spent the request's use already.
        guard let secret = ACLMiddleware<BasicRequestContext>.token(in: request), let info = try await tokens.lookup(secret: secret, consume: false) else {
            throw AuthError(status: 403, message: "permission denied")
        }
        return (secret, info)
    }

    private func create(_ request: Request, orphan: Bool) async throws -> Response {
        let parent = try await caller(request).info
        let body = try await VaultRoutes.body(request)
        var policies: [String] = []
        switch body["policies"] {
        case .array(let items)?: policies = items.compactMap(\.stringValue)
        case .string(let list)?: policies = list.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
        default: break
        }
        if policies.isEmpty { policies = parent.policies }
        // As in Vault: a child's policies are a subset of its parent's, unless the parent is root.
        if !parent.policies.contains("root"), let extra = policies.first(where: { !parent.policies.contains($0) }) {
            throw AuthError(status: 400, message: "child policies must be subset of parent policies: '\(extra)' is not among \(parent.policies)")
        }
        let ttl = try Self.seconds(body["ttl"]) ?? 0
        let uses = try VaultRoutes.integer(body["num_uses"], "num_uses") ?? 0
        var meta: [String: String] = [:]
        if case .object(let fields)? = body["meta"] { for (key, value) in fields { meta[key] = value.stringValue ?? "" } }
        let askedNoParent = try VaultRoutes.bool(body["no_parent"], "no_parent") ?? false
        let noParent = orphan || askedNoParent
        let (secret, info) = try await tokens.create(
            policies: policies, displayName: "token" + (body["display_name"]?.stringValue.map { "-" + $0 } ?? ""), ttlSeconds: ttl,
            renewable: try VaultRoutes.bool(body["renewable"], "renewable") ?? true, uses: uses, parent: noParent ? nil : parent, meta: meta)
        // As Vault does, parameters it does not act on are named in the answer's warnings.
        // There is no `default` policy here, so `no_default_policy` holds whatever it says.
        let known: Set<String> = ["policies", "ttl", "num_uses", "meta", "no_parent", "display_name", "renewable", "no_default_policy"]
        let ignored = body.keys.filter { !known.contains($0) }.sorted()
        let warning = ignored.isEmpty ? nil : "Endpoint ignored these unrecognized parameters: [\(ignored.joined(separator: " "))]"
        return Self.auth(secret: secret, info, warning: warning)
    }

    private func lookupSelf(_ request: Request) async throws -> Response {
        let (secret, info) = try await caller(request)
        return try Self.envelope(Self.lookupData(info, id: secret))
    }

    private func lookup(_ request: Request) async throws -> Response {
        let body = try await VaultRoutes.body(request)
        guard let secret = body["token"]?.stringValue, let info = try await tokens.lookup(secret: secret, consume: false) else {
            throw AuthError(status: 403, message: "bad token")
        }
        return try Self.envelope(Self.lookupData(info, id: secret))
    }

    /// A token's properties by its accessor; the answer never holds the token itself.
    private func lookupAccessor(_ request: Request) async throws -> Response {
        let body = try await VaultRoutes.body(request)
        guard let accessor = body["accessor"]?.stringValue else { throw AuthError(status: 400, message: "missing accessor") }
        guard let info = try await tokens.lookup(accessor: accessor) else { throw AuthError(status: 400, message: "invalid accessor") }
        return try Self.envelope(Self.lookupData(info, id: ""))
    }

    private func revokeAccessor(_ request: Request) async throws -> Response {
        let body = try await VaultRoutes.body(request)
        guard let accessor = body["accessor"]?.stringValue else { throw AuthError(status: 400, message: "missing accessor") }
        guard try await tokens.lookup(accessor: accessor) != nil else { throw AuthError(status: 400, message: "invalid accessor") }
        try await tokens.revoke(accessor: accessor)
        return Response(status: .noContent)
    }

    private func renewSelf(_ request: Request) async throws -> Response {
        let (secret, info) = try await caller(request)
        let body = try await VaultRoutes.body(request)
        let renewed = try await tokens.renew(accessor: info.accessor, incrementSeconds: try Self.seconds(body["increment"]))
        return Self.auth(secret: secret, renewed)
    }

    private func revokeSelf(_ request: Request) async throws -> Response {
        try await tokens.revoke(accessor: try await caller(request).info.accessor)
        return Response(status: .noContent)
    }

    private func revoke(_ request: Request) async throws -> Response {
        let body = try await VaultRoutes.body(request)
        guard let secret = body["token"]?.stringValue else { throw AuthError(status: 400, message: "missing token") }
        try await tokens.revoke(secret: secret)
        return Response(status: .noContent)
    }

    // MARK: - Policies

    private func putPolicy(_ request: Request, prefix: String) async throws -> Response {
        let name = String(request.uri.path.dropFirst(prefix.count))
        let body = try await VaultRoutes.body(request)
        guard let text = body["policy"]?.stringValue ?? body["rules"]?.stringValue else {
            throw AuthError(status: 400, message: "'policy' parameter not supplied or empty")
        }
        let policy: Policy
        do { policy = try Policy(name: name, text: text) } catch { throw AuthError(status: 400, message: "failed to parse policy: \(error.message)") }
        try await tokens.putPolicy(policy)
        return Response(status: .noContent)
    }

    private func readPolicy(_ request: Request, prefix: String, legacy: Bool) async throws -> Response {
        let name = String(request.uri.path.dropFirst(prefix.count))
        guard let policy = try await tokens.policy(named: name) else { throw AuthError(status: 404, message: "") }
        if legacy { return Self.json(.ok, ["name": .string(name), "rules": .string(policy.text), "data": ["name": .string(name), "rules": .string(policy.text)]]) }
        return try Self.envelope(["name": .string(name), "policy": .string(policy.text)])
    }

    private func deletePolicy(_ request: Request, prefix: String) async throws -> Response {
        try await tokens.deletePolicy(named: String(request.uri.path.dropFirst(prefix.count)))
        return Response(status: .noContent)
    }

    // MARK: - Shapes

    struct AuthError: Error {
        var status: Int
        var message: String
    }

    static func seconds(_ value: JSONValue?) throws -> Int? {
        switch value {
        case nil, .null?: return nil
        case .number(let seconds)?: return Int(seconds)
        case .string(let text)?:
            if let plain = Int(text) { return plain }
            guard let seconds = GoDuration.seconds(text), seconds >= 0 else { throw AuthError(status: 400, message: "'\(text)' is not a duration such as 30m or 1h") }
            return Int(seconds)
        default: throw AuthError(status: 400, message: "a duration is a string such as 1h or a number of seconds")
        }
    }

    static func lookupData(_ info: TokenInfo, id: String) -> JSONValue {
        let remaining = info.expiresAt.map { max(0, Int($0.timeIntervalSinceNow)) } ?? 0
        return [
            "accessor": .string(info.accessor), "creation_time": .number(info.createdAt.timeIntervalSince1970.rounded(.down)),
            "creation_ttl": .number(Double(info.ttlSeconds)), "display_name": .string(info.displayName),
            "expire_time": info.expiresAt.map { .string(Timestamp.format($0)) } ?? .null, "explicit_max_ttl": 0, "id": .string(id),
            "meta": .object(info.meta.mapValues(JSONValue.string)), "num_uses": .number(Double(max(0, info.usesLeft))), "orphan": .bool(info.parent == nil),
            "path": "auth/token/create", "policies": .array(info.policies.map(JSONValue.string)), "renewable": .bool(info.renewable),
            "ttl": .number(Double(remaining)), "type": "service",
        ]
    }

    static func auth(secret: String, _ info: TokenInfo, warning: String? = nil) -> Response {
        let lease = info.expiresAt.map { max(0, Int($0.timeIntervalSinceNow.rounded())) } ?? 0
        return json(.ok, [
            "request_id": .string(UUID().uuidString.lowercased()), "lease_id": "", "renewable": false, "lease_duration": 0, "data": .null,
            "wrap_info": .null, "warnings": warning.map { .array([.string($0)]) } ?? .null,
            "auth": [
                "client_token": .string(secret), "accessor": .string(info.accessor), "policies": .array(info.policies.map(JSONValue.string)),
                "token_policies": .array(info.policies.map(JSONValue.string)), "metadata": .object(info.meta.mapValues(JSONValue.string)),
                "lease_duration": .number(Double(lease)), "renewable": .bool(info.renewable), "entity_id": "", "token_type": "service",
                "orphan": .bool(info.parent == nil), "num_uses": .number(Double(max(0, info.usesLeft))),
            ],
        ])
    }

    static func envelope(_ data: JSONValue) throws -> Response {
        json(.ok, [
            "request_id": .string(UUID().uuidString.lowercased()), "lease_id": "", "renewable": false, "lease_duration": 0, "data": data,
            "wrap_info": .null, "warnings": .null, "auth": .null,
        ])
    }

    static func json(_ status: HTTPResponse.Status, _ value: JSONValue) -> Response {
        VaultRoutes.json(value, status: status)
    }

    private func handle(_ body: () async throws -> Response) async -> Response {
        do {
            return try await body()
        } catch let error as AuthError {
            return Self.json(HTTPResponse.Status(code: error.status), ["errors": .array(error.message.isEmpty ? [] : [.string(error.message)])])
        } catch let error as SecretKVError {
            return Self.json(HTTPResponse.Status(code: error.status), ["errors": .array(error.description.isEmpty ? [] : [.string(error.description)])])
        } catch let error as FlotillaError {
            let status: HTTPResponse.Status
            switch error {
            case .conflict: status = .forbidden  // Consul answers a second bootstrap 403
            case .notFound: status = .notFound
            default: status = .badRequest
            }
            return Self.json(status, ["errors": .array([.string(error.message)])])
        } catch {
            return Self.json(.internalServerError, ["errors": .array([.string("internal error: \(type(of: error))")])])
        }
    }
}

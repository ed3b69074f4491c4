public import FlotillaSecrets
import Foundation
public import HTTPTypes

/// What a request needs from its token: every surface is mapped onto one path space, so one
/// policy language decides for all of them:
///
/// | surface | path | e.g. |
/// |---|---|---|
/// | Vault KV v2 | `secret/<data\|metadata\|delete\|undelete\|destroy\|config>/<path>` | `secret/data/shop/db` |
/// | Vault tokens, policies | `auth/token/<create\|lookup\|revoke>`, `sys/policies/acl/<name>` | |
/// | Consul KV, services, nodes | `consul/kv/<key>`, `consul/service/<name>`, `consul/node/<name>`, `consul/session/`, `consul/event/`, `consul/agent` | Consul's `key_prefix`, `service_prefix`, `node_prefix` rules |
/// | Marathon | `marathon/apps/<app id>`, `marathon/groups/<id>`, `marathon/deployments/<id>`, `marathon/<tasks\|queue\|info\|events\|…>` | `marathon/apps/shop/cart` |
/// | Flotilla's own | `flotilla/<logs\|instances\|nodes\|images\|…>/…`, `sys/metrics` | |
///
/// Reads need `read` (listings `list` or `read`), writes `create` or `update`, `PATCH` `patch` or
/// `update`, deletes `delete`.
public enum ACLRequirement: Sendable, Equatable {
    /// Needs no token: `/ping`, the one-time bootstrap.
    case none
    /// Any valid token (a token's own lookup, renewal and revocation).
    case anyToken
    case capability(path: String, anyOf: Set<Capability>)
    /// `POST /v2/apps` and `POST /v2/groups`: the app's id comes from the body.
    case marathonCreate(kind: String)

    public static func of(method: HTTPRequest.Method, path rawPath: String, query: String?) -> ACLRequirement {
        let path = rawPath.removingPercentEncoding ?? rawPath
        let queryItems = Set((query ?? "").split(separator: "&").map { String($0.split(separator: "=", maxSplits: 1).first ?? "") })
        let listing = queryItems.contains("list") || queryItems.contains("recurse") || queryItems.contains("keys")
        func needs(_ target: String) -> ACLRequirement {
            let capabilities: Set<Capability>
            switch method {
            case .get, .head: capabilities = listing ? [.list, .read] : [.read]
            case .post, .put: capabilities = [.create, .update]
            case .patch: capabilities = [.patch, .update]
            case .delete: capabilities = [.delete]
            default: capabilities = [.update]
            }
            return .capability(path: target, anyOf: capabilities)
        }
        func rest(after prefix: String) -> String { String(path.dropFirst(prefix.count)) }

        switch path {
        case "/ping", "/v1/acl/bootstrap": return .none
        case "/v1/auth/token/lookup-self", "/v1/auth/token/renew-self", "/v1/auth/token/revoke-self", "/v1/sys/internal/ui/mounts/secret",
             "/v1/status/leader", "/v1/status/peers":
            return .anyToken
        case "/v1/auth/token/create", "/v1/auth/token/create-orphan": return .capability(path: "auth/token/create", anyOf: [.create, .update])
        case "/v1/auth/token/accessors": return .capability(path: "auth/token/accessors", anyOf: [.sudo])
        case "/v1/auth/token/lookup", "/v1/auth/token/revoke", "/v1/auth/token/renew", "/v1/auth/token/lookup-accessor", "/v1/auth/token/revoke-accessor":
            return .capability(path: "auth/token/" + rest(after: "/v1/auth/token/"), anyOf: [.update])
        case "/v1/sys/policies/acl", "/v1/sys/policy": return .capability(path: "sys/policies/acl/", anyOf: [.list, .read])
        case "/v2/apps" where method == .post: return .marathonCreate(kind: "apps")
        case "/v2/groups" where method == .post: return .marathonCreate(kind: "groups")
        case "/metrics": return .capability(path: "sys/metrics", anyOf: [.read])
        default: break
        }
        if path.hasPrefix("/v1/sys/policies/acl/") { return needs("sys/policies/acl/" + rest(after: "/v1/sys/policies/acl/")) }
        if path.hasPrefix("/v1/sys/policy/") { return needs("sys/policies/acl/" + rest(after: "/v1/sys/policy/")) }
        if path.hasPrefix("/v1/secret/") { return needs("secret/" + rest(after: "/v1/secret/")) }
        if path == "/v1/secret" { return needs("secret/") }
        // Consul.
        if path == "/v1/kv" || path.hasPrefix("/v1/kv/") { return needs("consul/kv/" + rest(after: "/v1/kv/")) }
        for prefix in ["/v1/catalog/service/", "/v1/health/service/", "/v1/health/checks/", "/v1/agent/service/maintenance/"] where path.hasPrefix(prefix) {
            return needs("consul/service/" + rest(after: prefix))
        }
        for prefix in ["/v1/catalog/node/", "/v1/health/node/", "/v1/session/node/"] where path.hasPrefix(prefix) {
            return needs("consul/node/" + rest(after: prefix))
        }
        if ["/v1/catalog/services", "/v1/agent/services", "/v1/health/state"].contains(where: { path.hasPrefix($0) }) {
            return .capability(path: "consul/service/", anyOf: [.list, .read])
        }
        if ["/v1/catalog/nodes", "/v1/agent/members", "/v1/agent/self", "/v1/catalog/datacenters"].contains(where: { path.hasPrefix($0) }) {
            return .capability(path: "consul/node/", anyOf: [.list, .read])
        }
        // Registering a service names it in the body: the token needs write on every service.
        if path.hasPrefix("/v1/agent/service/") || path.hasPrefix("/v1/agent/check/") || path.hasPrefix("/v1/agent/checks") {
            return method == .get ? .capability(path: "consul/service/", anyOf: [.list, .read]) : .capability(path: "consul/service/", anyOf: [.update])
        }
        if path.hasPrefix("/v1/session/") { return needs("consul/session/" + rest(after: "/v1/session/")) }
        if path.hasPrefix("/v1/event/") { return needs("consul/event/" + rest(after: "/v1/event/")) }
        if path == "/v1/txn" { return .capability(path: "consul/kv/", anyOf: [.update]) }
        if path.hasPrefix("/v1/") { return needs("consul/" + rest(after: "/v1/")) }
        // Marathon and Flotilla's own.
        if path.hasPrefix("/v2/") {
            var target = rest(after: "/v2/")
            // `/v2/apps/shop/cart/tasks/…` concerns the app `/shop/cart`: keep the id, drop the action.
            if target.hasPrefix("apps/") {
                let segments = target.split(separator: "/").dropFirst()
                let actions: Set<Substring> = ["tasks", "versions", "restart"]
                let id = segments.prefix { !actions.contains($0) }
                let action = segments.dropFirst(id.count).first
                target = "apps/" + id.joined(separator: "/")
                if action != nil && method != .get { return .capability(path: "marathon/" + target, anyOf: [.update]) }
            }
            return needs("marathon/" + target)
        }
        // An app's stats are read with the app's own read permission.
        if path.hasPrefix("/flotilla/v1/apps/"), path.hasSuffix("/stats") {
            let id = rest(after: "/flotilla/v1/apps/").dropLast("/stats".count)
            return needs("marathon/apps/" + id.trimmingCharacters(in: CharacterSet(charactersIn: "/")))
        }
        // An app's merged logs too (`/flotilla/v1/logs?app=/shop/cart`); one instance's stay `flotilla/logs/<id>`.
        if path == "/flotilla/v1/logs", let app = FormQuery.parameters(query)["app"] {
            return needs("marathon/apps/" + app.trimmingCharacters(in: CharacterSet(charactersIn: "/")))
        }
        if path.hasPrefix("/flotilla/v1/") { return needs("flotilla/" + rest(after: "/flotilla/v1/")) }
        return needs(String(path.drop { $0 == "/" }))
    }
}

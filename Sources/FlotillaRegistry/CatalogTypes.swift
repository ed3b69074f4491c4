public import FlotillaCore
import Foundation

/// Consul's check states, worst last.
public enum CheckStatus: String, Sendable, Hashable, Codable, Comparable {
    case passing, warning, critical

    public static func < (lhs: CheckStatus, rhs: CheckStatus) -> Bool {
        let order: [CheckStatus] = [.passing, .warning, .critical]
        return order.firstIndex(of: lhs)! < order.firstIndex(of: rhs)!
    }
}

/// A node as the catalog shows it.
public struct CatalogNode: Sendable, Hashable {
    public var name: String
    public var address: String
    public var meta: [String: String]
    /// False for a node that is down (its agent stopped renewing its record).
    public var alive: Bool
    /// A node with a Flotilla agent (not one registered through `/v1/catalog/register`).
    public var isAgent: Bool

    public init(name: String, address: String, meta: [String: String], alive: Bool = true, isAgent: Bool = false) {
        self.name = name
        self.address = address
        self.meta = meta
        self.alive = alive
        self.isAgent = isAgent
    }
}

/// One health check in Consul's shape, on a node or a service instance.
public struct CatalogCheck: Sendable, Hashable {
    public var node: String
    public var checkID: String
    public var name: String
    public var status: CheckStatus
    public var notes: String
    public var output: String
    public var serviceID: String
    public var serviceName: String
    public var serviceTags: [String]
    public var type: String
    public var createIndex: UInt64
    public var modifyIndex: UInt64
}

/// One registered service instance: an instance's port, or a service registered through the agent API.
public struct CatalogService: Sendable, Hashable {
    public var id: String
    public var name: String
    public var tags: [String]
    public var address: String
    public var port: Int
    public var meta: [String: String]
    public var node: String
    public var checks: [CatalogCheck]
    public var createIndex: UInt64
    public var modifyIndex: UInt64

    /// The worst of its checks (and its node's).
    public var status: CheckStatus { checks.map(\.status).max() ?? .passing }
}

/// A service registered from outside through `/v1/agent/service/register`, kept in the store.
public struct ExternalService: Sendable, Hashable, Codable {
    public var id: String
    public var name: String
    public var tags: [String]
    public var address: String
    public var port: Int
    public var meta: [String: String]
    public var node: String
    public var checks: [ExternalCheck]
    public var registeredAt: String
}

/// A check of an external service or of the node: TTL (updated through the API), HTTP, TCP or a
/// command (`Args`, run by the agent), or none of them (a status set by `/v1/catalog/register`).
public struct ExternalCheck: Sendable, Hashable, Codable {
    public var id: String
    public var name: String
    public var ttlSeconds: Double?
    public var http: String?
    public var tcp: String?
    /// A command check: the program and its arguments (Consul's `Args`; `Script` is `sh -c`).
    public var args: [String]?
    /// HTTP checks: `Method` (GET), `Header`, `Body`, `TLSSkipVerify` (false: certificates are verified).
    public var method: String?
    public var header: [String: [String]]?
    public var body: String?
    public var tlsSkipVerify: Bool?
    public var intervalSeconds: Double
    public var timeoutSeconds: Double
    public var deregisterCriticalServiceAfterSeconds: Double?
    public var notes: String
    /// The state as last set: by a TTL update, a run of the check, or the registration's `Status`.
    public var status: CheckStatus
    public var output: String
    /// When `status` was last set (a TTL check goes critical `ttlSeconds` after this).
    public var updatedAt: String
    /// When the check last turned critical, for `DeregisterCriticalServiceAfter`.
    public var criticalSince: String?

    public var type: String {
        if ttlSeconds != nil { return "ttl" }
        if http != nil { return "http" }
        if tcp != nil { return "tcp" }
        if args != nil { return "script" }
        return ""
    }

    /// Whether the agent runs it (HTTP, TCP and command checks) rather than being told its state.
    public var isProbed: Bool { http != nil || tcp != nil || args != nil }

    /// A check whose status is what its registration says (`/v1/catalog/register`): nobody runs it.
    public static func reported(id: String, name: String, status: CheckStatus, notes: String, output: String) -> ExternalCheck {
        let now = Timestamp.format(Date())
        return ExternalCheck(
            id: id, name: name, ttlSeconds: nil, http: nil, tcp: nil, intervalSeconds: 0, timeoutSeconds: 0,
            deregisterCriticalServiceAfterSeconds: nil, notes: notes, status: status, output: output, updatedAt: now,
            criticalSince: status == .critical ? now : nil)
    }
}

/// A check registered on the node itself (`/v1/agent/check/register` without a `ServiceID`).
public struct NodeCheckRecord: Sendable, Hashable, Codable {
    public var node: String
    public var check: ExternalCheck
}

/// A node registered through `/v1/catalog/register` (an external node: no agent runs on it).
public struct ExternalNode: Sendable, Hashable, Codable {
    public var name: String
    public var address: String
    public var meta: [String: String]

    public init(name: String, address: String, meta: [String: String]) {
        self.name = name
        self.address = address
        self.meta = meta
    }
}

/// Maintenance mode of a service or of the node, with its reason.
public struct MaintenanceRecord: Sendable, Hashable, Codable {
    /// The service id, or nil for the node.
    public var serviceID: String?
    public var reason: String
}

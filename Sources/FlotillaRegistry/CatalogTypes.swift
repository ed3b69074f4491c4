public import FlotillaCore

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

    public init(name: String, address: String, meta: [String: String]) {
        self.name = name
        self.address = address
        self.meta = meta
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

/// A check of an external service: TTL (updated through the API), HTTP or TCP (run by the agent).
public struct ExternalCheck: Sendable, Hashable, Codable {
    public var id: String
    public var name: String
    public var ttlSeconds: Double?
    public var http: String?
    public var tcp: String?
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
        return ""
    }
}

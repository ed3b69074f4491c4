import Foundation

/// One instance's resource use as `GET /flotilla/v1/apps/{id}/stats` and `flotilla top` show it:
/// cumulative figures from its cgroup and rates over the last collection interval. A figure the
/// node cannot measure (no cgroups; network for an instance in the host's namespace) is absent.
public struct InstanceUsageReport: Sendable, Codable, Equatable {
    public var id: String
    public var app: String
    public var node: String
    /// When it was measured (RFC 3339).
    public var sampledAt: String
    /// CPU cores in use, averaged over the last interval (1.5 = one and a half cores).
    public var cpuCores: Double?
    public var cpuSeconds: Double?
    public var cpuThrottledSeconds: Double?
    public var cpuThrottledPeriods: UInt64?
    public var memoryBytes: UInt64?
    public var memoryRSSBytes: UInt64?
    public var memoryCacheBytes: UInt64?
    public var memoryLimitBytes: UInt64?
    public var oomKills: UInt64?
    public var processes: UInt64?
    public var networkReceiveBytes: UInt64?
    public var networkTransmitBytes: UInt64?
    public var networkReceiveBytesPerSecond: Double?
    public var networkTransmitBytesPerSecond: Double?
    public var diskReadBytes: UInt64?
    public var diskWriteBytes: UInt64?

    public init(id: String, app: String, node: String, sampledAt: String) {
        self.id = id
        self.app = app
        self.node = node
        self.sampledAt = sampledAt
    }
}

/// A node's own use, as `GET /flotilla/v1/stats` shows it.
public struct NodeUsageReport: Sendable, Codable, Equatable {
    public var node: String
    public var sampledAt: String
    public var cpus: Int
    /// Cores busy (all modes but idle and iowait) over the last interval.
    public var cpuCoresUsed: Double?
    public var memoryTotalBytes: UInt64
    public var memoryAvailableBytes: UInt64
    public var load1: Double
    public var load5: Double
    public var load15: Double
    public var diskTotalBytes: UInt64
    public var diskFreeBytes: UInt64
    /// Instances this node's agent supervises.
    public var instances: Int
    /// How long the last collection round took, in seconds, and the interval it runs at.
    public var collectionSeconds: Double
    public var intervalSeconds: Double

    public init(
        node: String, sampledAt: String, cpus: Int, cpuCoresUsed: Double?, memoryTotalBytes: UInt64, memoryAvailableBytes: UInt64,
        load1: Double, load5: Double, load15: Double, diskTotalBytes: UInt64, diskFreeBytes: UInt64, instances: Int,
        collectionSeconds: Double, intervalSeconds: Double
    ) {
        self.node = node
        self.sampledAt = sampledAt
        self.cpus = cpus
        self.cpuCoresUsed = cpuCoresUsed
        self.memoryTotalBytes = memoryTotalBytes
        self.memoryAvailableBytes = memoryAvailableBytes
        self.load1 = load1
        self.load5 = load5
        self.load15 = load15
        self.diskTotalBytes = diskTotalBytes
        self.diskFreeBytes = diskFreeBytes
        self.instances = instances
        self.collectionSeconds = collectionSeconds
        self.intervalSeconds = intervalSeconds
    }
}

/// What one node's agent measured: itself and its instances (`GET /flotilla/v1/stats?local=true`).
public struct NodeStats: Sendable, Codable, Equatable {
    public var node: NodeUsageReport?
    public var instances: [InstanceUsageReport]

    public init(node: NodeUsageReport?, instances: [InstanceUsageReport]) {
        self.node = node
        self.instances = instances
    }
}

/// An app's instances added up (`flotilla top`'s rows).
public struct AppUsageSummary: Sendable, Codable, Equatable {
    public var app: String
    public var instances: Int
    public var cpuCores: Double
    public var memoryBytes: UInt64
    /// The sum of the instances' limits; nil when any has none.
    public var memoryLimitBytes: UInt64?
    public var oomKills: UInt64
    public var cpuThrottledSeconds: Double
    /// Requests per second through the proxy to the app's routes, and their p99 upstream latency
    /// (seconds) over the last interval; nil when the app has no route or no traffic was measured.
    public var requestsPerSecond: Double?
    public var errorRate: Double?
    public var p99Seconds: Double?

    public init(app: String, instances: [InstanceUsageReport]) {
        self.app = app
        self.instances = instances.count
        cpuCores = instances.reduce(0) { $0 + ($1.cpuCores ?? 0) }
        memoryBytes = instances.reduce(0) { $0 + ($1.memoryBytes ?? 0) }
        memoryLimitBytes = instances.allSatisfy { $0.memoryLimitBytes != nil } && !instances.isEmpty
            ? instances.reduce(0) { $0 + ($1.memoryLimitBytes ?? 0) } : nil
        oomKills = instances.reduce(0) { $0 + ($1.oomKills ?? 0) }
        cpuThrottledSeconds = instances.reduce(0) { $0 + ($1.cpuThrottledSeconds ?? 0) }
    }

    /// Summaries by app, sorted by app id.
    public static func byApp(_ instances: [InstanceUsageReport]) -> [AppUsageSummary] {
        Dictionary(grouping: instances, by: \.app).map { AppUsageSummary(app: $0.key, instances: $0.value) }.sorted { $0.app < $1.app }
    }
}

/// Requests through the proxy to an app's routes over the last interval.
public struct RequestFigures: Sendable, Codable, Equatable {
    public var requestsPerSecond: Double
    /// The share of 5xx answers (the proxy's own 502/503/504 included); nil without requests.
    public var errorRate: Double?
    /// The 99th percentile of upstream latency in seconds, from the histogram's buckets; nil without requests.
    public var p99Seconds: Double?

    public init(requestsPerSecond: Double, errorRate: Double?, p99Seconds: Double?) {
        self.requestsPerSecond = requestsPerSecond
        self.errorRate = errorRate
        self.p99Seconds = p99Seconds
    }
}

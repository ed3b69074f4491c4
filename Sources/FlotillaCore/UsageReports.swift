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
    /// Requests through this node's proxy over the last interval, by app id (absent: none measured).
    public var requests: [String: RequestWindow]?

    public init(node: NodeUsageReport?, instances: [InstanceUsageReport], requests: [String: RequestWindow]? = nil) {
        self.node = node
        self.instances = instances
        self.requests = requests
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

    /// The request figures of a window (rates, error share, p99).
    public mutating func apply(_ window: RequestWindow) {
        let figures = window.figures
        requestsPerSecond = figures.requestsPerSecond
        errorRate = figures.errorRate
        p99Seconds = figures.p99Seconds
    }

    /// Summaries by app, sorted by app id: every app with an instance, with requests through a
    /// proxy, or named in `including`.
    public static func byApp(
        _ instances: [InstanceUsageReport], requests: [String: RequestWindow] = [:], including: [String] = []
    ) -> [AppUsageSummary] {
        let grouped = Dictionary(grouping: instances, by: \.app)
        let apps = Set(grouped.keys).union(requests.keys).union(including)
        return apps.sorted().map { app in
            var summary = AppUsageSummary(app: app, instances: grouped[app] ?? [])
            if let window = requests[app] { summary.apply(window) }
            return summary
        }
    }

    /// Nodes' request windows added up by app (each node's proxy counts what went through it).
    public static func requestsByApp(_ nodes: [[String: RequestWindow]]) -> [String: RequestWindow] {
        var total: [String: RequestWindow] = [:]
        for node in nodes {
            for (app, window) in node { total[app] = total[app].map { $0.adding(window) } ?? window }
        }
        return total
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

/// Requests through one node's proxy to one app over a window: what an agent reports of itself
/// (`NodeStats.requests`) so that another can add nodes up before working out rates and p99.
public struct RequestWindow: Sendable, Codable, Equatable {
    /// Upper bounds (seconds) of the upstream-latency buckets; one more bucket past the last (+Inf).
    public static let latencyBounds: [Double] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]

    public var seconds: Double
    public var requests: UInt64
    /// Answers with a 5xx status, the proxy's own 502/503/504 included.
    public var errors: UInt64
    /// Requests that got a response head from an instance, by latency bucket (not cumulative;
    /// `latencyBounds.count + 1` of them).
    public var latency: [UInt64]

    public init(seconds: Double, requests: UInt64, errors: UInt64, latency: [UInt64]) {
        self.seconds = seconds
        self.requests = requests
        self.errors = errors
        self.latency = latency
    }

    /// Two nodes' windows of one app: counts add up; the window is the longer of the two.
    public func adding(_ other: RequestWindow) -> RequestWindow {
        let width = max(latency.count, other.latency.count)
        let buckets = (0..<width).map { (latency.indices.contains($0) ? latency[$0] : 0) &+ (other.latency.indices.contains($0) ? other.latency[$0] : 0) }
        return RequestWindow(seconds: max(seconds, other.seconds), requests: requests &+ other.requests, errors: errors &+ other.errors, latency: buckets)
    }

    public var figures: RequestFigures {
        RequestFigures(
            requestsPerSecond: seconds > 0 ? Double(requests) / seconds : 0,
            errorRate: requests > 0 ? Double(errors) / Double(requests) : nil,
            p99Seconds: Self.quantile(0.99, of: latency))
    }

    /// A quantile from bucket counts, as Prometheus' `histogram_quantile` works it out: linear
    /// within the bucket it falls in; the last finite bound when it falls in +Inf; nil without counts.
    public static func quantile(_ q: Double, of buckets: [UInt64]) -> Double? {
        let total = buckets.reduce(0, &+)
        guard total > 0 else { return nil }
        let rank = q * Double(total)
        var below: UInt64 = 0
        for (index, count) in buckets.enumerated() {
            if count > 0, Double(below &+ count) >= rank {
                guard index < latencyBounds.count else { return latencyBounds.last }
                let lower = index == 0 ? 0 : latencyBounds[index - 1]
                let upper = latencyBounds[index]
                return lower + (upper - lower) * max(0, rank - Double(below)) / Double(count)
            }
            below &+= count
        }
        return latencyBounds.last
    }
}

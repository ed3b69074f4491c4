public import FlotillaCore
import Foundation
import Synchronization

/// Counters that each event loop writes on its own and anyone adds up: one row of atomics per
/// shard (an event loop), rows at least a cache line apart, so the request path touches only its
/// loop's lines and takes no lock. A reader sums the rows; with relaxed loads each figure is exact
/// for what it has seen, and figures read together are at most a few requests apart.
final class ShardedCounters: @unchecked Sendable {
    // @unchecked: the cells are atomics, allocated once and freed with the object.
    let width: Int
    let shards: Int
    private let stride: Int
    private let cells: UnsafeMutablePointer<Atomic<UInt64>>

    init(width: Int, shards: Int) {
        self.width = width
        self.shards = max(1, shards)
        // Rounded up to whole 64-byte lines, plus one line, so no two rows share a line.
        stride = (width + 7) / 8 * 8 + 8
        let count = self.shards * stride
        cells = .allocate(capacity: count)
        for index in 0..<count { (cells + index).initialize(to: Atomic(0)) }
    }

    deinit {
        cells.deinitialize(count: shards * stride)
        cells.deallocate()
    }

    @inline(__always)
    func add(_ value: UInt64, at index: Int, shard: Int) {
        (cells + (shard % shards) * stride + index).pointee.wrappingAdd(value, ordering: .relaxed)
    }

    func sum(at index: Int) -> UInt64 {
        var total: UInt64 = 0
        for shard in 0..<shards { total &+= (cells + shard * stride + index).pointee.load(ordering: .relaxed) }
        return total
    }

    func sums() -> [UInt64] { (0..<width).map(sum(at:)) }
}

/// Requests by status class and upstream latency (to the response head), for one route or one
/// app. Latency buckets are kept apart (not cumulative) and summed into Prometheus' cumulative
/// form when rendered.
final class RequestCounters: Sendable {
    static let bucketBase = 5
    static let bucketCount = RequestWindow.latencyBounds.count + 1
    static let sumIndex = bucketBase + bucketCount
    static let width = sumIndex + 1
    static let boundsNanoseconds: [UInt64] = RequestWindow.latencyBounds.map { UInt64(($0 * 1e9).rounded()) }

    private let counters: ShardedCounters

    init(shards: Int) {
        counters = ShardedCounters(width: Self.width, shards: shards)
    }

    /// One answer: its status class (1…5) and, when an instance sent a response head, how long
    /// that took from the request's arrival.
    func record(statusClass: Int, latencyNanoseconds: UInt64?, shard: Int) {
        if (1...5).contains(statusClass) { counters.add(1, at: statusClass - 1, shard: shard) }
        guard let latency = latencyNanoseconds else { return }
        var bucket = Self.boundsNanoseconds.count
        for (index, bound) in Self.boundsNanoseconds.enumerated() where latency <= bound {
            bucket = index
            break
        }
        counters.add(1, at: Self.bucketBase + bucket, shard: shard)
        counters.add(latency, at: Self.sumIndex, shard: shard)
    }

    struct Snapshot: Equatable {
        var byClass: [UInt64]
        var buckets: [UInt64]
        var sumNanoseconds: UInt64

        var requests: UInt64 { byClass.reduce(0, &+) }
        var observations: UInt64 { buckets.reduce(0, &+) }

        /// What happened between `earlier` and this (a counter that went back counts from zero).
        func since(_ earlier: Snapshot?) -> Snapshot {
            guard let earlier else { return self }
            func minus(_ now: [UInt64], _ then: [UInt64]) -> [UInt64] { zip(now, then).map { $0 >= $1 ? $0 - $1 : $0 } }
            return Snapshot(
                byClass: minus(byClass, earlier.byClass), buckets: minus(buckets, earlier.buckets),
                sumNanoseconds: sumNanoseconds >= earlier.sumNanoseconds ? sumNanoseconds - earlier.sumNanoseconds : sumNanoseconds)
        }
    }

    func snapshot() -> Snapshot {
        let all = counters.sums()
        return Snapshot(
            byClass: Array(all[0..<Self.bucketBase]), buckets: Array(all[Self.bucketBase..<Self.sumIndex]), sumNanoseconds: all[Self.sumIndex])
    }
}

/// The proxy's metrics: requests by route and by app (status class, upstream latency), retries and
/// open client connections. Each event loop writes its own shard of every counter (see
/// `ShardedCounters`); `/metrics` renders their sums in Prometheus' text format.
///
/// A route's or an app's series go when it leaves the route table (a returning one starts from
/// zero, which Prometheus reads as a counter reset), so app churn does not grow `/metrics`.
public final class ProxyMetrics: Sendable {
    let shards: Int
    private let routes = Mutex<[String: RequestCounters]>([:])
    private let apps = Mutex<[String: RequestCounters]>([:])
    /// Retries (index 0); client connections opened (1) and closed (2).
    private let connectionCounters: ShardedCounters
    private let windows = Mutex<Windows>(Windows())

    struct Windows {
        var previous: (time: Double, snapshots: [String: RequestCounters.Snapshot])?
        var latest: (time: Double, snapshots: [String: RequestCounters.Snapshot])?
    }

    /// `shards`: how many event loops write (one shard each).
    public init(shards: Int) {
        self.shards = max(1, shards)
        connectionCounters = ShardedCounters(width: 3, shards: shards)
    }

    /// The counters of a route (by its label, `host/path` or `:port`; "" for requests no route
    /// matched), made on first use.
    func forRoute(_ route: String) -> RequestCounters {
        routes.withLock { routes in
            if let existing = routes[route] { return existing }
            let created = RequestCounters(shards: shards)
            routes[route] = created
            return created
        }
    }

    /// The counters of an app (by its id), made on first use.
    func forApp(_ app: String) -> RequestCounters {
        apps.withLock { apps in
            if let existing = apps[app] { return existing }
            let created = RequestCounters(shards: shards)
            apps[app] = created
            return created
        }
    }

    /// Keeps only the routes and apps of the table being installed (and the no-route counters).
    func retain(routes liveRoutes: Set<String>, apps liveApps: Set<String>) {
        routes.withLock { routes in routes = routes.filter { $0.key.isEmpty || liveRoutes.contains($0.key) } }
        apps.withLock { apps in apps = apps.filter { liveApps.contains($0.key) } }
    }

    func retried(shard: Int) { connectionCounters.add(1, at: 0, shard: shard) }
    func connectionOpened(shard: Int) { connectionCounters.add(1, at: 1, shard: shard) }
    func connectionClosed(shard: Int) { connectionCounters.add(1, at: 2, shard: shard) }

    var retries: UInt64 { connectionCounters.sum(at: 0) }
    var openConnections: Int64 {
        // Closed is read first: a connection counted closed is always counted opened.
        let closed = connectionCounters.sum(at: 2)
        return Int64(bitPattern: connectionCounters.sum(at: 1) &- closed)
    }

    // MARK: - Windows for people (stats, top, alerts)

    /// Takes the apps' figures now; `windows()` reports what happened between the last two.
    public func sample(at time: Double) {
        let snapshots = apps.withLock { $0 }.mapValues { $0.snapshot() }
        windows.withLock { windows in
            windows.previous = windows.latest
            windows.latest = (time, snapshots)
        }
    }

    /// Each app's requests between the last two samples.
    public func requestWindows() -> [String: RequestWindow] {
        windows.withLock { windows -> [String: RequestWindow] in
            guard let latest = windows.latest, let previous = windows.previous, latest.time > previous.time else { return [:] }
            var result: [String: RequestWindow] = [:]
            for (app, snapshot) in latest.snapshots {
                let delta = snapshot.since(previous.snapshots[app])
                result[app] = RequestWindow(
                    seconds: latest.time - previous.time, requests: delta.requests, errors: delta.byClass[4], latency: delta.buckets)
            }
            return result
        }
    }

    // MARK: - Prometheus text

    public func render(into buffer: inout [UInt8]) {
        var text = ""
        let routes = self.routes.withLock { $0 }.map { (label: $0.key.isEmpty ? "(none)" : $0.key, snapshot: $0.value.snapshot()) }
            .sorted { $0.label < $1.label }
        let apps = self.apps.withLock { $0 }.map { (label: $0.key, snapshot: $0.value.snapshot()) }.sorted { $0.label < $1.label }
        Self.requests(
            "flotilla_proxy_requests_total", label: "route", routes, help: "Requests through the proxy by route and status class", into: &text)
        Self.latency(
            "flotilla_proxy_upstream_latency_seconds", label: "route", routes,
            help: "Time from receiving a request to the upstream's response head, by route", into: &text)
        Self.requests(
            "flotilla_app_requests_total", label: "app", apps,
            help: "Requests through the proxy to an app's instances by status class (503s of a route with no healthy instance included)",
            into: &text)
        Self.latency(
            "flotilla_app_upstream_latency_seconds", label: "app", apps,
            help: "Time from receiving a request to the response head of the app's instance", into: &text)
        text += "# HELP flotilla_proxy_retries_total Requests sent again to another instance\n"
        text += "# TYPE flotilla_proxy_retries_total counter\n"
        text += "flotilla_proxy_retries_total \(retries)\n"
        text += "# HELP flotilla_proxy_open_connections Client connections to HTTP routes open now\n"
        text += "# TYPE flotilla_proxy_open_connections gauge\n"
        text += "flotilla_proxy_open_connections \(max(0, openConnections))\n"
        buffer.append(contentsOf: text.utf8)
    }

    private static func requests(
        _ name: String, label: String, _ rows: [(label: String, snapshot: RequestCounters.Snapshot)], help: String, into text: inout String
    ) {
        guard !rows.isEmpty else { return }
        text += "# HELP \(name) \(help)\n# TYPE \(name) counter\n"
        for row in rows {
            let value = escape(row.label)
            for (index, count) in row.snapshot.byClass.enumerated() {
                text += "\(name){\(label)=\"\(value)\",code=\"\(index + 1)xx\"} \(count)\n"
            }
        }
    }

    private static func latency(
        _ name: String, label: String, _ rows: [(label: String, snapshot: RequestCounters.Snapshot)], help: String, into text: inout String
    ) {
        guard !rows.isEmpty else { return }
        text += "# HELP \(name) \(help)\n# TYPE \(name) histogram\n"
        for row in rows {
            let value = escape(row.label)
            var cumulative: UInt64 = 0
            for (index, count) in row.snapshot.buckets.enumerated() {
                cumulative &+= count
                let bound = index < RequestWindow.latencyBounds.count ? number(RequestWindow.latencyBounds[index]) : "+Inf"
                text += "\(name)_bucket{\(label)=\"\(value)\",le=\"\(bound)\"} \(cumulative)\n"
            }
            text += "\(name)_sum{\(label)=\"\(value)\"} \(number(Double(row.snapshot.sumNanoseconds) / 1e9))\n"
            text += "\(name)_count{\(label)=\"\(value)\"} \(cumulative)\n"
        }
    }

    /// A label value in the text format: backslash, quote and newline escaped.
    static func escape(_ value: String) -> String {
        guard value.contains(where: { $0 == "\\" || $0 == "\"" || $0 == "\n" }) else { return value }
        return value.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
            .replacingOccurrences(of: "\n", with: "\\n")
    }

    static func number(_ value: Double) -> String {
        if value == value.rounded(), abs(value) < 1e15 { return String(Int64(value)) }
        return String(value)
    }
}

public import Prometheus
import Synchronization

/// A route's metrics, made once when the route appears and then only incremented.
final class RouteMetrics: @unchecked Sendable {
    // Prometheus' metric types are thread-safe (atomics); they are not marked Sendable.
    let byClass: [Counter]
    let latency: DurationHistogram

    init(byClass: [Counter], latency: DurationHistogram) {
        self.byClass = byClass
        self.latency = latency
    }

    func record(statusClass: Int, latency duration: Duration?) {
        if (1...5).contains(statusClass) { byClass[statusClass - 1].increment() }
        if let duration { latency.record(duration) }
    }
}

/// Per-route request counts by status class and upstream latency, on the Prometheus registry the
/// agent exposes at `/metrics`.
public final class ProxyMetrics: Sendable {
    private let registry: PrometheusCollectorRegistry
    private let routes = Mutex<[String: RouteMetrics]>([:])
    private let retries: Counter

    static let buckets: [Duration] = [
        .microseconds(500), .milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10), .milliseconds(25),
        .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500), .seconds(1), .seconds(2.5), .seconds(5), .seconds(10),
    ]

    public init(registry: PrometheusCollectorRegistry) {
        self.registry = registry
        retries = registry.makeCounter(name: "flotilla_proxy_retries_total", help: "Requests sent again to another instance")
    }

    /// The metrics of a route (by its label, `host/path` or `:port`), made on first use.
    func forRoute(_ route: String) -> RouteMetrics {
        routes.withLock { routes in
            if let existing = routes[route] { return existing }
            let label = route.isEmpty ? "(none)" : route
            let created = RouteMetrics(
                byClass: (1...5).map { statusClass in
                    registry.makeCounter(
                        name: "flotilla_proxy_requests_total", labels: [("route", label), ("code", "\(statusClass)xx")],
                        help: "Requests through the proxy by route and status class")
                },
                latency: registry.makeDurationHistogram(
                    name: "flotilla_proxy_upstream_latency_seconds", labels: [("route", label)], buckets: Self.buckets,
                    help: "Time from receiving a request to the upstream's response head"))
            routes[route] = created
            return created
        }
    }

    func retried() { retries.increment() }
}

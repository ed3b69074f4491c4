import FlotillaCore
import NIOCore
import Synchronization

/// One upstream as the proxy tracks it across route-table changes: its address, the requests in
/// flight to it (least-connections) and its passive health (consecutive connection failures,
/// ejection). Everything on the request path is an atomic; nothing takes a lock.
final class TargetState: Sendable {
    let host: String
    let port: Int
    let security: UpstreamSecurity
    /// `host:port`, with the scheme for TLS (`https://` or `https+insecure://`): pooled
    /// connections are per key.
    let key: String
    private let inFlightCount = Atomic<Int>(0)
    private let failures = Atomic<Int>(0)
    /// Uptime nanoseconds until which the target is left out; 0 when it is not ejected.
    private let ejectedUntil = Atomic<UInt64>(0)

    init(host: String, port: Int, security: UpstreamSecurity = .plaintext) {
        self.host = host
        self.port = port
        self.security = security
        key = Self.key(host: host, port: port, security: security)
    }

    static func key(host: String, port: Int, security: UpstreamSecurity) -> String {
        switch security {
        case .plaintext: "\(host):\(port)"
        case .tls(verify: true): "https://\(host):\(port)"
        case .tls(verify: false): "https+insecure://\(host):\(port)"
        }
    }

    var inFlight: Int { inFlightCount.load(ordering: .relaxed) }
    func started() { inFlightCount.wrappingAdd(1, ordering: .relaxed) }
    func finished() { inFlightCount.wrappingSubtract(1, ordering: .relaxed) }

    func isEjected(now: UInt64 = TargetState.uptimeNanoseconds()) -> Bool {
        let until = ejectedUntil.load(ordering: .relaxed)
        return until != 0 && now < until
    }

    /// A failed connect; after `limit` in a row the target is ejected for `coolDown`.
    func connectFailed(limit: Int, coolDown: Duration) {
        let count = failures.wrappingAdd(1, ordering: .relaxed).newValue
        if count >= limit {
            failures.store(0, ordering: .relaxed)
            let nanoseconds = UInt64(coolDown.components.seconds) * 1_000_000_000 + UInt64(coolDown.components.attoseconds / 1_000_000_000)
            ejectedUntil.store(Self.uptimeNanoseconds() + nanoseconds, ordering: .relaxed)
        }
    }

    func succeeded() {
        if failures.load(ordering: .relaxed) != 0 { failures.store(0, ordering: .relaxed) }
        if ejectedUntil.load(ordering: .relaxed) != 0 { ejectedUntil.store(0, ordering: .relaxed) }
    }

    static func uptimeNanoseconds() -> UInt64 {
        NIODeadline.now().uptimeNanoseconds
    }
}

/// A route ready to serve: its targets with their state and share, and its metrics made once.
final class RouteRuntime: Sendable {
    struct Target: Sendable {
        let state: TargetState
        let weight: Double
        let service: String
        /// The counters of the target's app; nil for a service registered from outside.
        let app: RequestCounters?
    }

    let route: Route
    let label: String
    let targets: [Target]
    let weighted: Bool
    let services: String
    let metrics: RequestCounters
    /// Where answers that reach no instance (403, 503, a redirect) are counted: the route's app,
    /// when exactly one app declares it.
    let soleApp: RequestCounters?
    /// Read per request, so worked out once: whether the path changes on the way, and the
    /// route's own timeouts.
    let rewritesPath: Bool
    let connectTimeout: TimeAmount?
    let readTimeout: TimeAmount?

    init(route: Route, states: (RouteTarget) -> TargetState, metrics: RequestCounters, apps: (String) -> RequestCounters) {
        self.route = route
        label = route.rule.host + route.rule.path
        targets = route.targets.map { Target(state: states($0), weight: $0.weight, service: $0.service, app: $0.app.map(apps)) }
        soleApp = route.apps.count == 1 ? apps(route.apps[0]) : nil
        weighted = Set(route.targets.map(\.weight)).count > 1
        services = route.services.joined(separator: ", ")
        self.metrics = metrics
        rewritesPath = route.rule.strip != nil || route.rule.prepend != nil
        connectTimeout = route.rule.connectTimeout.map { TimeAmount($0) }
        readTimeout = route.rule.readTimeout.map { TimeAmount($0) }
    }
}

/// The proxy's form of a route table: the table for matching, one runtime per route.
final class ProxyTable: Sendable {
    let table: RouteTable
    let http: [RouteRuntime]
    let tcp: [Int: RouteRuntime]

    init(table: RouteTable, http: [RouteRuntime], tcp: [Int: RouteRuntime]) {
        self.table = table
        self.http = http
        self.tcp = tcp
    }

    static let empty = ProxyTable(table: .empty, http: [], tcp: [:])

    func match(host: String, path: String) -> RouteRuntime? {
        table.matchIndex(host: host, path: path).map { http[$0] }
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
public import FlotillaCore
public import Logging
public import NIOCore
public import ServiceLifecycle
import NIOPosix
import Synchronization

/// Flotilla's load balancer: an HTTP/1.1 proxy on one port, plus a TCP listener for every
/// `urlprefix-:PORT proto=tcp` route, all fed by route-table snapshots. It never imports the
/// registry: it only reads `routes`.
public final class ProxyServer: Service {
    public struct Configuration: Sendable {
        public var host: String
        public var port: Int
        public var strategy: BalancingStrategy
        public var connectTimeout: TimeAmount
        public var readTimeout: TimeAmount
        /// A client connection with nothing in flight that sends nothing for this long is closed.
        public var idleTimeout: TimeAmount
        /// Request bodies up to this size are held so a failed attempt can be sent again.
        public var retryBufferLimit: Int
        /// Where the access log goes (`-`: standard output); nil for none.
        public var accessLogPath: String?
        /// On shutdown, how long requests under way have to be answered.
        public var drainTimeout: Duration
        /// The HTTPS listener's port (0: any free one), or nil for none; it needs `certificateDirectory`.
        public var httpsPort: Int?
        /// Where the HTTPS listener's certificates are (see `CertificateDirectory`).
        public var certificateDirectory: String?
        /// More trust roots (a PEM file) for `proto=https` instances, beside the system's.
        public var upstreamCAFile: String?

        public init(
            host: String, port: Int, strategy: BalancingStrategy = .roundRobin, connectTimeout: TimeAmount = .seconds(1),
            readTimeout: TimeAmount = .seconds(60), idleTimeout: TimeAmount = .seconds(75), drainTimeout: Duration = .seconds(5),
            retryBufferLimit: Int = 64 * 1024, accessLogPath: String? = nil
        ) {
            self.drainTimeout = drainTimeout
            self.idleTimeout = idleTimeout
            self.accessLogPath = accessLogPath
            self.host = host
            self.port = port
            self.strategy = strategy
            self.connectTimeout = connectTimeout
            self.readTimeout = readTimeout
            self.retryBufferLimit = retryBufferLimit
        }
    }

    private let routes = ProxyTableBox()
    /// Target state outlives route-table changes, so ejections and in-flight counts carry over.
    private let targetStates = Mutex<[String: TargetState]>([:])
    private let metricsByRoute: ProxyMetrics
    private let configuration: Configuration
    private let shared: ProxyContext
    private let logger: Logger
    /// The proxy's loops, one per core: HTTP and TCP routes alike.
    private let loops: [IOLoop]
    /// TCP route listening sockets by port.
    private let tcpListeners = Mutex<[Int: Int32]>([:])
    private let running = Mutex(false)
    private let certificates: CertificateDirectory?
    private let https: HTTPSListener?
    private let nextLoop = Atomic<Int>(0)
    private let httpsListeningPort = Mutex<Int?>(nil)
    /// The HTTPS listener's port once it listens.
    public var httpsPort: Int? { httpsListeningPort.withLock { $0 } }
    private let reconciling = AsyncLock()
    private let accessLog: AccessLog?

    /// Throws when the access log cannot be opened.
    public init(configuration: Configuration, logger: Logger) throws {
        self.configuration = configuration
        self.logger = logger
        loops = try (0..<max(1, System.coreCount)).map { try IOLoop(index: $0, logger: logger) }
        let metrics = ProxyMetrics(shards: loops.count)
        metricsByRoute = metrics
        accessLog = try configuration.accessLogPath.map { try AccessLog(path: $0) }
        let group = MultiThreadedEventLoopGroup.singleton
        let upstreamTLS: UpstreamTLS
        do {
            upstreamTLS = try UpstreamTLS(caFile: configuration.upstreamCAFile, group: group, logger: logger)
        } catch {
            throw CertificateError("cannot use --proxy-upstream-ca \(configuration.upstreamCAFile ?? ""): \(error)")
        }
        if configuration.httpsPort != nil {
            guard let directory = configuration.certificateDirectory else {
                throw CertificateError("the HTTPS listener needs certificates: give --proxy-cert-dir DIR (NAME.pem + NAME.key per host)")
            }
            let certificates = try CertificateDirectory(path: directory)
            self.certificates = certificates
            https = try HTTPSListener(certificates: certificates, group: group, logger: logger)
        } else {
            certificates = nil
            https = nil
        }
        shared = ProxyContext(
            routes: routes, picker: Picker(strategy: configuration.strategy),
            connectTimeout: configuration.connectTimeout, readTimeout: configuration.readTimeout, idleTimeout: configuration.idleTimeout,
            retryBufferLimit: configuration.retryBufferLimit, metrics: metrics, accessLog: accessLog, upstreamTLS: upstreamTLS, logger: logger)
    }

    /// The proxy's counters: rendered on `/metrics`, sampled for stats.
    public var metrics: ProxyMetrics { metricsByRoute }

    /// The table the proxy serves now, for `/api/routes`.
    public var currentRoutes: RouteTable { routes.current.table }

    /// Installs a new route table: HTTP requests use it at once; TCP listeners open and close to match.
    public func install(_ table: RouteTable) {
        let previous = routes.current
        guard previous.table != table else { return }
        let (http, tcp, live) = targetStates.withLock { states -> ([RouteRuntime], [Int: RouteRuntime], Set<String>) in
            var live: Set<String> = []
            func state(_ target: RouteTarget, _ security: UpstreamSecurity) -> TargetState {
                let key = TargetState.key(host: target.host, port: target.port, security: security)
                live.insert(key)
                if let existing = states[key] { return existing }
                let created = TargetState(host: target.host, port: target.port, security: security)
                states[key] = created
                return created
            }
            let metrics = metricsByRoute
            let http = table.http.map { route in
                RouteRuntime(
                    route: route, states: { state($0, Self.security(of: route.rule)) }, metrics: metrics.forRoute(route.rule.host + route.rule.path),
                    apps: metrics.forApp)
            }
            let tcp = table.tcp.mapValues { route in
                RouteRuntime(route: route, states: { state($0, .plaintext) }, metrics: metrics.forRoute(":\(route.rule.tcpPort ?? 0)"), apps: metrics.forApp)
            }
            let routeApps = table.http.flatMap { $0.apps + $0.targets.compactMap(\.app) } + table.tcp.values.flatMap { $0.apps + $0.targets.compactMap(\.app) }
            metrics.retain(
                routes: Set(table.http.map { $0.rule.host + $0.rule.path } + table.tcp.values.map { ":\($0.rule.tcpPort ?? 0)" }), apps: Set(routeApps))
            states = states.filter { live.contains($0.key) }
            return (http, tcp, live)
        }
        routes.update(ProxyTable(table: table, http: http, tcp: tcp))
        if previous.table.tcp.keys.sorted() != table.tcp.keys.sorted() {
            Task { await self.reconcileTCPListeners() }
        }
        for loop in loops {
            loop.execute { loop.pool.prune(keeping: live, idleLimit: .seconds(60)) }
        }
    }

    public func run() async throws {
        let shared = self.shared
        let listening = try Listener.bind(host: configuration.host, port: configuration.port)
        for loop in loops { loop.start() }
        do {
            try await listen(on: listening.fd) { loop, client, address in
                _ = ProxyHandler(shared: shared, loop: loop, client: client, clientAddress: address)
            }
        } catch {
            for loop in loops { loop.stop() }
            close(listening.fd)
            throw error
        }
        logger.info("proxy listening on \(configuration.host):\(listening.port) (\(configuration.strategy.rawValue))")
        var certificateWatch: Task<Void, Never>?
        if let https, let certificates, let httpsPort = configuration.httpsPort {
            do {
                let port = try await https.start(host: configuration.host, port: httpsPort) { [self] fd, client in adopt(fd, client: client) }
                httpsListeningPort.withLock { $0 = port }
                logger.info("proxy HTTPS listening on \(configuration.host):\(port), certificates from \(certificates.path): \(certificates.summary)")
            } catch {
                for fd in [listening.fd] { await stopListening(on: fd) }
                for loop in loops { loop.stop() }
                throw CertificateError("the proxy cannot listen for HTTPS on \(configuration.host):\(httpsPort): \(error)")
            }
            certificateWatch = Task { [logger] in await Self.watch(certificates, logger: logger) }
        }
        running.withLock { $0 = true }
        await reconcileTCPListeners()
        try? await gracefulShutdown()
        certificateWatch?.cancel()
        await https?.stop()
        // No reconciliation is under way while the listeners close, and none opens one after.
        await reconciling.acquire()
        defer { reconciling.release() }
        running.withLock { $0 = false }
        // Stop accepting, then end the loops (and the connections still open on them).
        let tcp = tcpListeners.withLock { listeners in
            defer { listeners.removeAll() }
            return Array(listeners.values)
        }
        for fd in tcp + [listening.fd] { await stopListening(on: fd) }
        await drain()
        for loop in loops { loop.stop() }
        accessLog?.close()
    }

    /// Which connections a route's instances take: `proto=https` is TLS, verified unless `tlsskipverify=true`.
    static func security(of rule: RouteRule) -> UpstreamSecurity {
        rule.proto == .https ? .tls(verify: !rule.tlsSkipVerify) : .plaintext
    }

    /// Gives the plaintext end of an HTTPS connection to a loop, as a client from `client`.
    private func adopt(_ fd: Int32, client: String) {
        let loop = loops[nextLoop.wrappingAdd(1, ordering: .relaxed).oldValue % loops.count]
        let shared = self.shared
        loop.execute {
            guard let stream = try? Stream.accepted(fd: fd, loop: loop) else { return }
            _ = ProxyHandler(shared: shared, loop: loop, client: stream, clientAddress: client, secure: true)
        }
    }

    /// Serves renewed certificates: the directory is looked at every 2 s.
    private static func watch(_ certificates: CertificateDirectory, logger: Logger) async {
        while !Task.isCancelled {
            try? await Task.sleep(for: .seconds(2))
            do {
                if try certificates.reloadIfChanged() { logger.info("proxy certificates reloaded from \(certificates.path): \(certificates.summary)") }
            } catch {
                logger.error("proxy certificates in \(certificates.path) not reloaded (the ones loaded before stay): \(error)")
            }
        }
    }

    /// Lets requests under way finish (their responses say `Connection: close`) and closes idle
    /// connections, for up to the drain timeout; what is still open then is closed by `stop`.
    private func drain() async {
        for loop in loops { loop.execute { loop.drain() } }
        let clock = ContinuousClock()
        let deadline = clock.now + configuration.drainTimeout
        while true {
            var open = 0
            for loop in loops { open += (try? await loop.submit { loop.openStreams }) ?? 0 }
            if open == 0 { return }
            if clock.now >= deadline || Task.isCancelled {
                logger.info("proxy shutdown: closing \(open) connection(s) still open after \(configuration.drainTimeout)")
                return
            }
            try? await Task.sleep(for: .milliseconds(50))
        }
    }

    /// Accepts from the listening socket `fd` on every loop.
    private func listen(on fd: Int32, _ onAccept: @escaping @Sendable (IOLoop, Stream, String) -> Void) async throws {
        for loop in loops {
            try await loop.submit { try loop.listen(on: fd) { client, address in onAccept(loop, client, address) } }
        }
    }

    /// Stops every loop accepting from `fd`, then closes it (only then: a loop still polling a
    /// closed descriptor number could meet its reuse).
    private func stopListening(on fd: Int32) async {
        for loop in loops { _ = try? await loop.submit { loop.stopListening(on: fd) } }
        close(fd)
    }

    /// Opens and closes TCP route listeners to match the route table. One reconciliation at a time.
    private func reconcileTCPListeners() async {
        await reconciling.acquire()
        defer { reconciling.release() }
        let wanted = running.withLock { $0 } ? Set(routes.current.table.tcp.keys) : []
        let current = tcpListeners.withLock { Set($0.keys) }
        for port in current.subtracting(wanted) {
            guard let fd = tcpListeners.withLock({ $0.removeValue(forKey: port) }) else { continue }
            await stopListening(on: fd)
            logger.info("TCP route on :\(port) closed")
        }
        for port in wanted.subtracting(current) {
            do {
                let fd = try Listener.bind(host: configuration.host, port: port).fd
                do {
                    try await listen(on: fd, tcpAcceptor(port: port))
                } catch {
                    await stopListening(on: fd)
                    throw error
                }
                tcpListeners.withLock { $0[port] = fd }
                logger.info("TCP route listening on \(configuration.host):\(port)")
            } catch {
                logger.error("cannot listen for the TCP route on :\(port): \(error)")
            }
        }
    }

    /// What a TCP route's listener does with a new client: relay it to one of the route's targets.
    private func tcpAcceptor(port: Int) -> @Sendable (IOLoop, Stream, String) -> Void {
        let routes = self.routes
        let picker = shared.picker
        let shared = self.shared
        return { loop, client, _ in
            guard let route = routes.current.tcp[port], let target = picker.pick(from: route)?.state else {
                client.close()
                return
            }
            let timeout = route.connectTimeout ?? shared.connectTimeout
            TCPRelay.start(client: client, target: target, loop: loop, timeout: timeout, ejectAfter: shared.ejectAfter, coolDown: shared.coolDown)
        }
    }
}

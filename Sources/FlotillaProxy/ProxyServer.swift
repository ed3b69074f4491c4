#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
public import FlotillaCore
public import Logging
public import NIOCore
import NIOPosix
public import Prometheus
public import ServiceLifecycle
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

        public init(
            host: String, port: Int, strategy: BalancingStrategy = .roundRobin, connectTimeout: TimeAmount = .seconds(1),
            readTimeout: TimeAmount = .seconds(60), idleTimeout: TimeAmount = .seconds(75), retryBufferLimit: Int = 64 * 1024,
            accessLogPath: String? = nil
        ) {
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
    /// The HTTP proxy's loops, one per core; TCP routes run on NIO's.
    private let loops: [IOLoop]
    private let group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton
    private let tcpListeners = Mutex<[Int: any Channel]>([:])
    private let accessLog: AccessLog?

    /// Throws when the access log cannot be opened.
    public init(configuration: Configuration, metrics registry: PrometheusCollectorRegistry, logger: Logger) throws {
        self.configuration = configuration
        self.logger = logger
        let metrics = ProxyMetrics(registry: registry)
        metricsByRoute = metrics
        accessLog = try configuration.accessLogPath.map { try AccessLog(path: $0) }
        loops = try (0..<max(1, System.coreCount)).map { try IOLoop(index: $0) }
        shared = ProxyContext(
            routes: routes, picker: Picker(strategy: configuration.strategy),
            connectTimeout: configuration.connectTimeout, readTimeout: configuration.readTimeout, idleTimeout: configuration.idleTimeout,
            retryBufferLimit: configuration.retryBufferLimit, metrics: metrics, accessLog: accessLog, logger: logger)
    }

    /// The table the proxy serves now, for `/api/routes`.
    public var currentRoutes: RouteTable { routes.current.table }

    /// Installs a new route table: HTTP requests use it at once; TCP listeners open and close to match.
    public func install(_ table: RouteTable) {
        let previous = routes.current
        guard previous.table != table else { return }
        let (http, tcp, live) = targetStates.withLock { states -> ([RouteRuntime], [Int: RouteRuntime], Set<String>) in
            var live: Set<String> = []
            func state(_ target: RouteTarget) -> TargetState {
                let key = "\(target.host):\(target.port)"
                live.insert(key)
                if let existing = states[key] { return existing }
                let created = TargetState(host: target.host, port: target.port)
                states[key] = created
                return created
            }
            let http = table.http.map { RouteRuntime(route: $0, states: state, metrics: metricsByRoute.forRoute($0.rule.host + $0.rule.path)) }
            let tcp = table.tcp.mapValues { RouteRuntime(route: $0, states: state, metrics: metricsByRoute.forRoute(":\($0.rule.tcpPort ?? 0)")) }
            states = states.filter { live.contains($0.key) }
            return (http, tcp, live)
        }
        routes.update(ProxyTable(table: table, http: http, tcp: tcp))
        if previous.table.tcp.keys.sorted() != table.tcp.keys.sorted() {
            Task { await self.reconcileTCPListeners(Set(table.tcp.keys)) }
        }
        for loop in loops {
            loop.execute { loop.pool.prune(keeping: live, idleLimit: .seconds(60)) }
        }
    }

    public func run() async throws {
        let shared = self.shared
        let listening = try Listener.bind(host: configuration.host, port: configuration.port)
        for loop in loops {
            loop.start()
            loop.execute {
                loop.listen(on: listening.fd) { client, address in
                    _ = ProxyHandler(shared: shared, loop: loop, client: client, clientAddress: address)
                }
            }
        }
        logger.info("proxy listening on \(configuration.host):\(listening.port) (\(configuration.strategy.rawValue))")
        await reconcileTCPListeners(Set(routes.current.table.tcp.keys))
        try? await gracefulShutdown()
        // Stop accepting, then end the loops (and the connections still open on them).
        for loop in loops { loop.execute { loop.stopListening() } }
        for loop in loops { loop.stop() }
        close(listening.fd)
        let listeners = tcpListeners.withLock { listeners in
            defer { listeners.removeAll() }
            return Array(listeners.values)
        }
        for listener in listeners { try? await listener.close() }
        accessLog?.close()
    }

    private func reconcileTCPListeners(_ wanted: Set<Int>) async {
        let current = tcpListeners.withLock { Set($0.keys) }
        for port in current.subtracting(wanted) {
            let listener = tcpListeners.withLock { $0.removeValue(forKey: port) }
            try? await listener?.close()
            logger.info("TCP route on :\(port) closed")
        }
        for port in wanted.subtracting(current) {
            do {
                let listener = try await bindTCP(port: port)
                tcpListeners.withLock { $0[port] = listener }
                logger.info("TCP route listening on \(configuration.host):\(port)")
            } catch {
                logger.error("cannot listen for the TCP route on :\(port): \(error)")
            }
        }
    }

    private func bindTCP(port: Int) async throws -> any Channel {
        let routes = self.routes
        let picker = shared.picker
        let shared = self.shared
        let connectTimeout = configuration.connectTimeout
        return try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelOption(.autoRead, value: false)
            .childChannelInitializer { client in
                let clientHandler = TCPRelayHandler()
                return client.pipeline.addHandler(clientHandler).flatMap {
                    guard let target = routes.current.tcp[port].flatMap({ picker.pick(from: $0) })?.state else {
                        return client.close()
                    }
                    let upstreamHandler = TCPRelayHandler()
                    let timeout = routes.current.tcp[port]?.route.rule.connectTimeout.map { TimeAmount($0) } ?? connectTimeout
                    return ClientBootstrap(group: client.eventLoop)
                        .connectTimeout(timeout)
                        .channelOption(.socketOption(.tcp_nodelay), value: 1)
                        .channelInitializer { $0.pipeline.addHandler(upstreamHandler) }
                        .connect(host: target.host, port: target.port)
                        .map { _ in
                            target.succeeded()
                            TCPRelayHandler.join(clientHandler, upstreamHandler)
                            client.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in }
                        }
                        .flatMapError { _ in
                            target.connectFailed(limit: shared.ejectAfter, coolDown: shared.coolDown)
                            return client.close()
                        }
                }
            }
            .bind(host: configuration.host, port: port).get()
    }
}

import AsyncHTTPClient
public import FlotillaAgent
import FlotillaWatch
import FlotillaAPI
import FlotillaImage
import FlotillaControl
public import FlotillaProxy
public import FlotillaSecrets
import FlotillaRegistry
import NIOCore
import Prometheus
public import FlotillaCore
public import FlotillaStore
public import FlotillaEtcd
import Foundation
import Hummingbird
import HummingbirdCore
import HummingbirdTLS
import NIOSSL
public import Logging
import ServiceLifecycle
import Synchronization
import UnixSignals

/// The composition root: one process, one `ServiceGroup` (store → control plane → agent → API),
/// shut down in reverse order on SIGTERM or SIGINT.
public struct FlotillaServer {
    public struct Configuration: Sendable {
        public var dataDirectory: String
        public var bindAddress: String
        public var apiPort: Int
        public var node: NodeInfo
        public var stopInstancesOnExit: Bool
        public var logMaxBytes: Int64
        /// `--log-retention`: how long and how much of instances' logs the node keeps.
        public var logRetention: LogRetention = .default
        public var version: String
        public var dnsPort: Int
        public var dnsDomain: String
        public var dnsTTL: UInt32
        public var datacenter: String
        public var proxyPort: Int
        public var proxyStrategy: BalancingStrategy
        public var proxyConnectTimeout: Duration = .seconds(1)
        public var proxyReadTimeout: Duration = .seconds(60)
        public var proxyIdleTimeout: Duration = .seconds(75)
        /// How long a shutdown waits for the proxy's requests under way.
        public var proxyDrainTimeout: Duration = .seconds(5)
        /// The proxy's access log (`-`: standard output); nil for none.
        public var proxyAccessLog: String?
        /// The audit log rotates past this size, keeping this many older files.
        public var auditLogMaxBytes: Int64 = 64 << 20
        public var auditLogKeep = 5
        /// How often instances and the node are measured for `/metrics` and the stats API; nil: never.
        public var metricsInterval: Duration? = .seconds(5)
        /// Where alert level changes are POSTed (JSON), and the Alertmanagers firing alerts go to.
        public var alertWebhooks: [String] = []
        public var alertmanagers: [String] = []
        /// Node and cluster alert rules (`--alert-rules`).
        public var alertRules: [ClusterAlertRule] = []
        /// `--log-forward`: syslog collectors every instance line goes to, and what each may hold unsent.
        public var logForwardTargets: [LogForwardTarget] = []
        public var logForwardBufferBytes: UInt64 = 64 << 20
        /// The proxy's HTTPS listener and its certificate directory; nil for none.
        public var proxyHTTPSPort: Int?
        public var proxyCertificateDirectory: String?
        /// Extra trust roots for `proto=https` instances.
        public var proxyUpstreamCA: String?
        /// Where apps' port-0 service ports come from.
        public var servicePortRange: ClosedRange<Int> = 10_000...20_000
        /// Route every app's service ports as TCP routes, not only those labelled
        /// `FLOTILLA_SERVICE_PORT_ROUTE=true`.
        public var routeServicePorts = false
        /// The OCI runtime for container apps (`--oci-runtime`).
        public var ociRuntime = "runc"
        /// How containers get their root filesystems (`--container-rootfs`).
        public var containerRootfs = ContainerRootfsMode.auto
        /// Registries spoken to over plain HTTP (`--insecure-registry`).
        public var insecureRegistries: [String] = []
        /// Docker `config.json` credentials (`--registry-auth-file`).
        public var registryAuthFile: String?
        /// The bridge for `container/bridge` networking (`--bridge-name`, `--bridge-cidr`).
        public var bridgeName = "flotilla0"
        public var bridgeCIDR = "172.31.0.0/16"
        /// Prune unused images when their filesystem is fuller than this (percent); nil: only by hand.
        public var imageGCThresholdPercent: Double? = 85
        /// The key secrets are sealed under (`--secrets-key-file`, or `FLOTILLA_SECRETS_KEY`); nil:
        /// the secrets engine is off.
        public var secretsKey: SecretsMasterKey?
        /// Serve the API over HTTPS (`--tls-cert`, `--tls-key`, `--tls-client-ca`); nil: plain HTTP.
        public var tls: TLSFiles?
        /// `--acl default-deny`: every request but `/ping` needs a token that allows it.
        public var aclDefaultDeny = false
        /// Where state lives (`--store`): SQLite in the data directory, or an etcd cluster.
        public var store = StoreLocation.sqlite(path: nil)
        /// In a cluster, whether this agent is a scheduler candidate (`--server`).
        public var server = false
        /// Seconds a leader's lead and a node's record outlive their last heartbeat.
        public var leaderLeaseTTL: Int64 = 5
        public var nodeLeaseTTL: Int64 = 10

        public init(
            dataDirectory: String, bindAddress: String, apiPort: Int, node: NodeInfo, stopInstancesOnExit: Bool,
            logMaxBytes: Int64, version: String, dnsPort: Int = 7653, dnsDomain: String = "flotilla", dnsTTL: UInt32 = 0,
            datacenter: String = "dc1", proxyPort: Int = 7680, proxyStrategy: BalancingStrategy = .roundRobin
        ) {
            self.proxyPort = proxyPort
            self.proxyStrategy = proxyStrategy
            self.dnsPort = dnsPort
            self.dnsDomain = dnsDomain
            self.dnsTTL = dnsTTL
            self.datacenter = datacenter
            self.dataDirectory = dataDirectory
            self.bindAddress = bindAddress
            self.apiPort = apiPort
            self.node = node
            self.stopInstancesOnExit = stopInstancesOnExit
            self.logMaxBytes = logMaxBytes
            self.version = version
        }
    }

    public static func run(_ configuration: Configuration, logger: Logger) async throws {
        NodeAgent.raiseOpenFileLimit(logger: logger)
        // Bad TLS files stop the start before anything is opened (HTTP clients must be shut down).
        let server: HTTPServerBuilder
        if let tls = configuration.tls {
            server = try .tls(.http1WithList(), tlsConfiguration: try tls.serverConfiguration())
        } else {
            server = .http1WithList()
        }
        let peerTLS = try configuration.tls?.peerClientConfiguration()
        // The proxy's files (access log, certificates) are checked here too, for the same reason.
        let metrics = PrometheusCollectorRegistry()
        let proxy: ProxyServer
        do {
            var proxyConfiguration = ProxyServer.Configuration(
                host: configuration.bindAddress, port: configuration.proxyPort, strategy: configuration.proxyStrategy,
                connectTimeout: TimeAmount(configuration.proxyConnectTimeout), readTimeout: TimeAmount(configuration.proxyReadTimeout),
                idleTimeout: TimeAmount(configuration.proxyIdleTimeout), drainTimeout: configuration.proxyDrainTimeout,
                accessLogPath: configuration.proxyAccessLog)
            proxyConfiguration.httpsPort = configuration.proxyHTTPSPort
            proxyConfiguration.certificateDirectory = configuration.proxyCertificateDirectory
            proxyConfiguration.upstreamCAFile = configuration.proxyUpstreamCA
            proxy = try ProxyServer(configuration: proxyConfiguration, logger: logger)
        } catch let error as CertificateError {
            throw ServerError(error.description)
        } catch {
            throw ServerError(error.localizedDescription)
        }
        try FileManager.default.createDirectory(atPath: configuration.dataDirectory, withIntermediateDirectories: true)
        let backend = try await configuration.store.open(dataDirectory: configuration.dataDirectory, logger: logger)
        defer { (backend as? EtcdStateStore)?.close() }
        let store: any StateStore = MeasuredStateStore(backend, registry: metrics)
        let databasePath = store.displayName
        logger.info("state store: \(store.displayName)")
        let events = EventBus()
        let tokens = TokenStore(store: store)
        let audit: AuditLog
        do {
            audit = try AuditLog(path: configuration.dataDirectory + "/audit.log", maxBytes: configuration.auditLogMaxBytes, keep: configuration.auditLogKeep)
        } catch {
            throw ServerError("\(error)")
        }
        var secrets: SecretKV?
        if let key = configuration.secretsKey {
            do {
                secrets = SecretKV(store: store, cipher: try await SecretsCipher.open(store: store, master: key))
            } catch {
                throw ServerError("cannot open the secrets in \(databasePath): \(error)")
            }
        } else {
            logger.notice("secrets are off: start with --secrets-key-file to keep secrets (make a key with 'flotilla secrets keygen')")
        }
        let control = ControlPlane(
            store: store, events: events, logger: logger, servicePortRange: configuration.servicePortRange, secretsEnabled: secrets != nil)
        func passes(_ scope: String) -> DurationHistogram {
            metrics.makeDurationHistogram(
                name: "flotilla_reconcile_seconds", labels: [("scope", scope)],
                buckets: [.microseconds(100), .microseconds(250), .microseconds(500), .milliseconds(1), .milliseconds(2), .milliseconds(5),
                          .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100), .milliseconds(250), .seconds(1)],
                help: "How long the control plane's reconcile passes take, their commit included: scope=changed plans the apps that changed, scope=all every app")
        }
        let changedPasses = passes("changed"), fullPasses = passes("all")
        await control.observePasses { ($0.full ? fullPasses : changedPasses).record($0.duration) }
        // In a cluster one elected server schedules; every agent follows the store until it leads.
        let scheme = configuration.tls == nil ? "http" : "https"
        let apiHost = configuration.bindAddress == "0.0.0.0" || configuration.bindAddress == "::" ? configuration.node.host : configuration.bindAddress
        let me = LeaderRecord(name: configuration.node.name, api: "\(scheme)://\(apiHost.contains(":") ? "[\(apiHost)]" : apiHost):\(configuration.apiPort)")
        var cluster: ClusterView?
        var election: LeaderElection?
        if case .etcd = configuration.store {
            let view = ClusterView(leader: nil, isLeader: false)
            cluster = view
            await control.setRole(.follower(leader: nil))
            await control.setNodeLossGrace(.seconds(configuration.nodeLeaseTTL + 2))
            election = LeaderElection(
                store: store, candidate: me, campaigns: configuration.server, ttl: configuration.leaderLeaseTTL, logger: logger
            ) { role in
                switch role {
                case .leader: view.update(leader: me, isLeader: true)
                case .follower(let leader): view.update(leader: leader, isLeader: false)
                }
                await control.setRole(role)
            }
            if !configuration.server {
                logger.notice("this agent runs instances but never schedules (no --server): the cluster needs at least one --server agent")
            }
        }
        // Instance cgroups live under a name derived from the data directory, so two agents on one
        // host (tests, or a second node for experiments) never touch each other's instances.
        let digest = String(fnv1a(configuration.dataDirectory), radix: 16)
        let cgroups = Cgroups.detect(namespace: "flotilla-\(digest)", logger: logger)
        var credentials = RegistryCredentials()
        if let path = configuration.registryAuthFile {
            do {
                credentials = try RegistryCredentials(contentsOfFile: path)
            } catch {
                throw ServerError("cannot read the registry credentials \(path): \(error)")
            }
        }
        let registryHTTP = HTTPClient(eventLoopGroupProvider: .singleton, configuration: RegistryClient.httpClientConfiguration())
        let images: ImageStore
        do {
            images = try ImageStore(
                root: configuration.dataDirectory + "/images",
                client: RegistryClient(
                    httpClient: registryHTTP, insecureRegistries: Set(configuration.insecureRegistries), credentials: credentials, logger: logger),
                logger: logger)
        } catch {
            try? await registryHTTP.shutdown()
            throw ServerError("cannot open the image store: \(error)")
        }
        // Other nodes reach this agent's API here (to relay an instance's logs).
        var advertised = configuration.node
        advertised.api = me.api
        var agentConfiguration = NodeAgent.Configuration(
            node: advertised, dataDirectory: configuration.dataDirectory, logMaxBytes: configuration.logMaxBytes,
            stopInstancesOnExit: configuration.stopInstancesOnExit)
        agentConfiguration.logRetention = configuration.logRetention
        if cluster != nil { agentConfiguration.nodeLeaseTTL = configuration.nodeLeaseTTL }
        let agent = NodeAgent(
            configuration: agentConfiguration,
            store: store, cgroups: cgroups, images: images,
            containers: .init(
                runtime: configuration.ociRuntime,
                bridge: .init(name: configuration.bridgeName, cidr: configuration.bridgeCIDR, namePrefix: "flt\(digest.prefix(8))"),
                rootfs: configuration.containerRootfs),
            secrets: secrets,
            workloadTokens: configuration.aclDefaultDeny ? InstanceTokens(tokens: tokens) : nil,
            logger: logger)

        let usage = configuration.metricsInterval.map { interval in
            UsageCollector(
                agent: agent, cgroups: cgroups, registry: metrics, node: configuration.node.name, dataDirectory: configuration.dataDirectory,
                interval: interval, logger: logger, afterRound: { [proxyMetrics = proxy.metrics] time in proxyMetrics.sample(at: time) })
        }

        let checkDirectory = configuration.dataDirectory + "/checks"
        try FileManager.default.createDirectory(atPath: checkDirectory, withIntermediateDirectories: true)
        let networkProbe = NetworkProbe(directory: checkDirectory)
        let registry = Registry(
            store: store, source: ControlPlaneSource(control: control), prober: RegistryProber(probe: networkProbe),
            datacenter: configuration.datacenter, localNode: configuration.node.name, localAddress: configuration.node.host, logger: logger,
            routeServicePorts: configuration.routeServicePorts, onViewChange: { view in proxy.install(RouteTableBuilder.build(from: view, index: view.index(of: .checks))) })
        let keyValues = KeyValueStore(store: store)
        try await keyValues.start()
        let sessions = SessionStore(store: store, kv: keyValues, registry: registry, logger: logger)
        let dns = DNSServer(
            host: configuration.bindAddress, port: configuration.dnsPort,
            resolver: DNSResolver(domain: configuration.dnsDomain, ttl: configuration.dnsTTL, view: registry.viewBox), logger: logger)

        let router = Router(context: FlotillaRequestContext.self)
        // First: the middleware covers only the routes added after it.
        router.add(middleware: ACLMiddleware<FlotillaRequestContext>(tokens: tokens, enforcing: configuration.aclDefaultDeny, audit: audit))
        let forwardHTTP = HTTPClient(eventLoopGroupProvider: .singleton, configuration: .init(tlsConfiguration: peerTLS))
        if let cluster { router.add(middleware: LeaderForwardingMiddleware<FlotillaRequestContext>(role: cluster, client: forwardHTTP, control: control)) }
        if !configuration.aclDefaultDeny {
            logger.notice("ACLs are off: the API is open to whoever reaches it (--acl default-deny turns them on; 'flotilla acl bootstrap' makes the first token)")
        }
        let subscriptions = EventSubscriptions(store: store, events: events, logger: logger)
        let leader = "\(configuration.bindAddress == "0.0.0.0" ? configuration.node.host : configuration.bindAddress):\(configuration.apiPort)"
        MarathonRoutes(
            control: control, events: events,
            info: .init(
                version: configuration.version, leader: leader, nodeName: configuration.node.name, httpPort: configuration.apiPort,
                servicePortRange: configuration.servicePortRange),
            subscriptions: subscriptions, cluster: cluster, relay: cluster == nil ? nil : NodeRelay(client: forwardHTTP)
        ).add(to: router)
        LogRoutes(
            control: control, sandboxRoot: agent.sandboxRoot, localNode: configuration.node.name,
            relay: cluster == nil ? nil : NodeRelay(client: forwardHTTP)
        ).add(to: router)
        FlotillaRoutes(control: control, cluster: cluster, localNode: configuration.node.name).add(to: router)
        ImageRoutes(control: control, images: images, uploadDirectory: configuration.dataDirectory + "/images/tmp").add(to: router)
        ConsulRoutes(registry: registry, kv: keyValues, sessions: sessions, serverAddress: "\(configuration.node.host):8300", version: configuration.version,
            cluster: cluster)
            .add(to: router)
        VaultRoutes(kv: secrets).add(to: router)
        AuthRoutes(tokens: tokens).add(to: router)
        AuditRoutes(audit: audit).add(to: router)
        let nodeName = configuration.node.name
        /// `/metrics`: the registry's series, then those kept apart (the proxy's shards, DNS's counters).
        let renderMetrics: @Sendable () -> [UInt8] = { [dnsCounters = dns.counters] in
            var buffer: [UInt8] = []
            metrics.emit(into: &buffer)
            proxy.metrics.render(into: &buffer)
            ControlMetrics.render(dns: dnsCounters, into: &buffer)
            return buffer
        }
        let gatherer = StatsGatherer(
            control: control, localNode: nodeName,
            local: { app in
                let windows = proxy.metrics.requestWindows().filter { app == nil || $0.key == app!.path }
                guard let usage else { return NodeStats(node: nil, instances: [], requests: windows) }
                return NodeStats(node: await usage.nodeReport(), instances: await usage.reports(app: app), requests: windows)
            },
            client: cluster == nil ? nil : forwardHTTP)
        StatsRoutes(control: control, gatherer: gatherer).add(to: router)

        let watchEngine = Self.watchEngine(
            configuration: configuration, control: control, gatherer: gatherer, cluster: cluster, tokens: tokens, events: events,
            client: forwardHTTP, metricsText: { String(decoding: renderMetrics(), as: UTF8.self) }, logger: logger)
        AlertRoutes(control: control, statuses: { app in await watchEngine.statuses(app: app) }).add(to: router)
        OperationsRoutes(
            routes: { proxy.currentRoutes },
            metrics: renderMetrics
        ).add(to: router)
        let listening = configuration.tls == nil ? "http" : (configuration.tls?.clientCA == nil ? "https" : "https, client certificates required")
        let application = Application(
            router: router,
            server: server,
            configuration: .init(address: .hostname(configuration.bindAddress, port: configuration.apiPort), serverName: "flotilla"),
            onServerRunning: { channel in
                logger.info("API listening on \(channel.localAddress?.description ?? "?") (\(listening))")
            },
            logger: logger)

        typealias Entry = ServiceGroupConfiguration.ServiceConfiguration
        var services: [Entry] = [Entry(service: control)]
        if let election { services.append(Entry(service: election)) }
        services += [
            Entry(service: registry),
            Entry(service: sessions),
            Entry(service: dns),
            Entry(service: proxy),
            Entry(service: agent),
        ]
        if let usage { services.append(Entry(service: usage)) }
        for target in configuration.logForwardTargets {
            let forwarding = LogForwarder.Configuration(
                target: target, bufferBytes: configuration.logForwardBufferBytes, node: configuration.node.name, sandboxRoot: agent.sandboxRoot,
                dataDirectory: configuration.dataDirectory)
            services.append(Entry(service: LogForwarder(configuration: forwarding, registry: metrics, logger: logger)))
        }
        services.append(Entry(service: watchEngine))
        services.append(Entry(service: ControlMetrics(control: control, events: events, registry: registry, metrics: metrics)))
        services += [
            Entry(
                service: ImageCollector(
                    control: control, images: images, thresholdPercent: configuration.imageGCThresholdPercent, interval: .seconds(300),
                    logger: logger)),
            Entry(service: subscriptions),
        ]
        if let secrets { services.append(Entry(service: SecretChangeWatcher(kv: secrets, control: control, logger: logger))) }
        services += [
            Entry(service: application),
            // Shut down first (the group stops services in reverse): open event streams
            // must end before the HTTP server can drain its connections.
            Entry(service: EventStreamCloser(events: events)),
        ]
        let group = ServiceGroup(
            configuration: .init(
                services: services,
                gracefulShutdownSignals: [.sigterm, .sigint],
                logger: logger))
        // Everything the API serves is loaded before it listens: `/ping` answering means ready.
        try await control.load()
        try await registry.load()
        try await sessions.load()
        try await subscriptions.load()
        do {
            try await group.run()
        } catch {
            await networkProbe.shutdown()
            try? await registryHTTP.shutdown()
            try? await forwardHTTP.shutdown()
            throw error
        }
        await networkProbe.shutdown()
        try? await registryHTTP.shutdown()
        try? await forwardHTTP.shutdown()
    }
}

/// Where an agent keeps its state.
public enum StoreLocation: Sendable {
    /// SQLite at `path` (nil: `state.db` in the data directory).
    case sqlite(path: String?)
    case etcd(EtcdConfiguration)

    /// Parses `--store`: `sqlite:PATH`, `sqlite` (the data directory's), or `etcd://host:port[,…]`.
    public static func parse(_ text: String, etcdPrefix: String, caFile: String?, certFile: String?, keyFile: String?) throws -> StoreLocation {
        if text == "sqlite" { return .sqlite(path: nil) }
        if text.hasPrefix("sqlite:") {
            let path = String(text.dropFirst("sqlite:".count))
            return .sqlite(path: path.isEmpty ? nil : path)
        }
        if text.hasPrefix("etcd://") {
            return .etcd(try EtcdConfiguration(url: text, prefix: etcdPrefix, caFile: caFile, certFile: certFile, keyFile: keyFile))
        }
        throw ServerError("--store must be sqlite:PATH or etcd://HOST:PORT[,HOST:PORT…], got '\(text)'")
    }

    /// Opens the store; an etcd cluster must answer now (an agent that cannot read its state does
    /// not start half-way).
    public func open(dataDirectory: String, logger: Logger) async throws -> any StateStore {
        switch self {
        case .sqlite(let path):
            let path = path ?? dataDirectory + "/state.db"
            do {
                return try SQLiteStateStore(path: path)
            } catch {
                throw ServerError("cannot open the state database \(path): \(error)")
            }
        case .etcd(let configuration):
            do {
                return try await EtcdStateStore.connect(configuration, logger: logger)
            } catch {
                throw ServerError(
                    "cannot reach etcd at \(configuration.endpoints.map(\.description).joined(separator: ",")): \(error) — is it running, and are --store and the --etcd-ca/--etcd-cert/--etcd-key files right?")
            }
        }
    }

    /// Opens the store for `body` and closes it after (an offline tool's use).
    public func withStore<T: Sendable>(dataDirectory: String, logger: Logger, _ body: (any StateStore) async throws -> T) async throws -> T {
        let store = try await open(dataDirectory: dataDirectory, logger: logger)
        defer { (store as? EtcdStateStore)?.close() }
        return try await body(store)
    }
}

/// The control plane as the registry's source of nodes and instances.
struct ControlPlaneSource: RegistrySource {
    let control: ControlPlane

    func registryInput() async -> RegistryInput {
        let snapshot = await control.snapshot()
        var input = RegistryInput(
            nodes: Array(snapshot.nodes.values), instances: Array(snapshot.instances.values),
            apps: snapshot.apps.values.map(\.definition), index: snapshot.index, generation: snapshot.generation)
        input.downNodes = Array(snapshot.downNodes.values)
        return input
    }

    func waitForChange(after generation: UInt64) async -> UInt64 {
        await control.waitForChange(after: generation)
    }
}

/// The agent's network probes, for the checks of services registered through the agent API.
struct RegistryProber: CheckProber {
    let probe: NetworkProbe

    func probeHTTP(_ request: HTTPCheckRequest, timeoutSeconds: Double) async -> (passed: Bool, output: String) {
        await probe.http(
            url: request.url, method: request.method, headers: request.headers, body: request.body, verifyCertificate: !request.tlsSkipVerify,
            timeoutSeconds: timeoutSeconds)
    }

    func probeCommand(_ arguments: [String], timeoutSeconds: Double) async -> (passed: Bool, output: String) {
        await probe.command(arguments, timeoutSeconds: timeoutSeconds)
    }

    func probeTCP(host: String, port: Int, timeoutSeconds: Double) async -> (passed: Bool, output: String) {
        await probe.tcp(host: host, port: port, timeoutSeconds: timeoutSeconds)
    }
}

/// Ends open `/v2/events` streams when shutdown begins, so the HTTP server can finish.
struct EventStreamCloser: Service {
    let events: EventBus

    func run() async throws {
        try? await gracefulShutdown()
        events.finishAll()
    }
}

/// The API's certificate, key and (for mutual TLS) the CA its clients' certificates must come from.
public struct TLSFiles: Sendable {
    public var certificate: String
    public var key: String
    public var clientCA: String?
    /// What signed the other agents' certificates, for the requests agents send each other
    /// (forwarded writes, relayed logs and events); nil: `clientCA`, else the system's roots.
    public var peerCA: String?

    public init(certificate: String, key: String, clientCA: String? = nil, peerCA: String? = nil) {
        self.certificate = certificate
        self.key = key
        self.clientCA = clientCA
        self.peerCA = peerCA
    }

    /// For requests to other agents: their certificate verified (for the address they advertise)
    /// against `peerCA` (or `clientCA`) and the system's roots; this agent's own certificate
    /// presented, for peers that require one.
    func peerClientConfiguration() throws -> TLSConfiguration {
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.minimumTLSVersion = .tlsv12
        if let authority = peerCA ?? clientCA {
            guard (try? NIOSSLCertificate.fromPEMFile(authority))?.isEmpty == false else {
                throw ServerError("cannot read the peer CA \(authority) (PEM certificates)")
            }
            configuration.additionalTrustRoots = [.file(authority)]
        }
        configuration.certificateChain = try NIOSSLCertificate.fromPEMFile(certificate).map { .certificate($0) }
        configuration.privateKey = .privateKey(try NIOSSLPrivateKey(file: key, format: .pem))
        return configuration
    }

    /// TLS 1.2 or later; with `clientCA`, a client without a certificate from it is refused.
    func serverConfiguration() throws -> TLSConfiguration {
        let chain: [NIOSSLCertificate]
        let privateKey: NIOSSLPrivateKey
        do {
            chain = try NIOSSLCertificate.fromPEMFile(certificate)
        } catch {
            throw ServerError("cannot read the TLS certificate \(certificate) (PEM, the server's certificate first): \(error)")
        }
        guard !chain.isEmpty else { throw ServerError("\(certificate) holds no PEM certificate") }
        do {
            privateKey = try NIOSSLPrivateKey(file: key, format: .pem)
        } catch {
            throw ServerError("cannot read the TLS key \(key) (a PEM private key): \(error)")
        }
        var configuration = TLSConfiguration.makeServerConfiguration(
            certificateChain: chain.map { .certificate($0) }, privateKey: .privateKey(privateKey))
        configuration.minimumTLSVersion = .tlsv12
        if let clientCA {
            guard FileManager.default.isReadableFile(atPath: clientCA), (try? NIOSSLCertificate.fromPEMFile(clientCA))?.isEmpty == false else {
                throw ServerError("cannot read the client CA \(clientCA) (PEM certificates)")
            }
            configuration.trustRoots = .file(clientCA)
            configuration.certificateVerification = .noHostnameVerification
        }
        return configuration
    }
}

extension FlotillaServer {
    /// The watch engine: every interval the leader (or the only node) reads every app's figures
    /// across the cluster and the `/metrics` series its rules and policy name, evaluates their
    /// alert rules and scales those with `autoscale`.
    static func watchEngine(
        configuration: Configuration, control: ControlPlane, gatherer: StatsGatherer, cluster: ClusterView?, tokens: TokenStore,
        events: EventBus, client: HTTPClient, metricsText: @escaping @Sendable () -> String, logger: Logger
    ) -> WatchEngine {
        let interval = configuration.metricsInterval ?? .seconds(5)
        let scheme = configuration.tls == nil ? "http" : "https"
        let host = configuration.bindAddress == "0.0.0.0" ? configuration.node.host : configuration.bindAddress
        let notifier = AlertNotifier(
            configuration: .init(
                webhooks: configuration.alertWebhooks, alertmanagers: configuration.alertmanagers,
                apiBase: "\(scheme)://\(host):\(configuration.apiPort)", node: configuration.node.name),
            client: client, logger: logger)
        // With ACLs, the leader asks the other agents for their figures with a token of its own
        // that may read stats and nothing else.
        let node = configuration.node.name
        let credentials = InternalCredential(enabled: configuration.aclDefaultDeny && cluster != nil) {
            try? await tokens.revoke(meta: "alert-evaluation", in: [node])
            return try await tokens.create(
                policies: [], displayName: "alert-evaluation-" + node, ttlSeconds: 0, renewable: false, uses: 0, parent: nil,
                meta: ["alert-evaluation": node], inlinePolicy: "path \"flotilla/stats\" { capabilities = [\"read\"] }"
            ).secret
        }
        return WatchEngine(
            interval: interval,
            inputs: {
                if let cluster, !cluster.isLeader { return nil }
                let snapshot = await control.snapshot()
                let records = snapshot.apps.values.filter { !$0.definition.alerts.isEmpty || $0.definition.autoscale != nil }
                guard !records.isEmpty || !configuration.alertRules.isEmpty else { return AlertInputs(apps: [], series: MetricSums()) }
                var headers = HTTPFields()
                if let token = await credentials.value(logger: logger) { headers[.authorization] = "Bearer " + token }
                let stats = await gatherer.gather(app: nil, localOnly: false, headers: headers)
                if !stats.unreachable.isEmpty {
                    logger.debug("alerts: no figures from \(stats.unreachable.map(\.node).joined(separator: ", "))")
                }
                let instances = Dictionary(grouping: stats.instances, by: \.app)
                let figures = Dictionary(stats.apps.map { ($0.app, $0) }, uniquingKeysWith: { first, _ in first })
                let ruleSeries = configuration.alertRules.map(\.metric).filter { !ClusterAlertRule.nodeMetrics.contains($0) && $0 != "nodesDown" }
                let names = AlertInputs.seriesNames(records.flatMap { $0.definition.alerts.map(\.metric) + [$0.definition.autoscale?.metric].compactMap { $0 } })
                    .union(ruleSeries)
                let series = names.isEmpty ? MetricSums() : MetricSums.parse(metricsText(), names: names)
                let apps = records.map { record in
                    let id = record.definition.id.path
                    let summary = figures[id]
                    let requests = summary?.requestsPerSecond.map {
                        RequestFigures(requestsPerSecond: $0, errorRate: summary?.errorRate, p99Seconds: summary?.p99Seconds)
                    }
                    return AlertInputs.App(
                        id: id, memMiB: record.definition.mem, rules: record.definition.alerts, instances: instances[id] ?? [], requests: requests,
                        instancesWanted: record.definition.instances, autoscale: record.definition.autoscale,
                        deploying: !snapshot.deployments(of: record.definition.id).isEmpty)
                }
                return AlertInputs(apps: apps, series: series, nodes: stats.nodes, nodesDown: snapshot.downNodes.count)
            },
            scale: { app, count in
                // A normal deployment: health gating and rollback apply; a user's deployment is never overridden.
                let change = try await control.update(try AppID(app), fields: ["instances": .number(Double(count))], partial: true, force: false)
                return change.deploymentID
            },
            clusterRules: configuration.alertRules, events: events, notifier: notifier.isEnabledNow ? notifier : nil, logger: logger)
    }
}

/// A secret made once, on first use (and again after a failure).
final class InternalCredential: Sendable {
    private let enabled: Bool
    private let make: @Sendable () async throws -> String
    private let made = Mutex<String?>(nil)

    init(enabled: Bool, make: @escaping @Sendable () async throws -> String) {
        self.enabled = enabled
        self.make = make
    }

    func value(logger: Logger) async -> String? {
        guard enabled else { return nil }
        if let secret = made.withLock({ $0 }) { return secret }
        do {
            let secret = try await make()
            made.withLock { $0 = secret }
            return secret
        } catch {
            logger.warning("alerts: cannot make the token to read other nodes' figures: \(error)")
            return nil
        }
    }
}

/// Each instance's token: read access to what its own app uses and nothing else — the secrets its
/// `secrets` names, Consul KV under its app's id, its own app's definition.
struct InstanceTokens: WorkloadTokens {
    let tokens: TokenStore

    static func policy(for spec: InstanceSpec) -> String {
        func quoted(_ text: String) -> String {
            "\"" + text.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"") + "\""
        }
        let app = spec.appID.path.split(separator: "/").joined(separator: "/")
        var lines = [
            "path \(quoted("marathon/apps/" + app)) { capabilities = [\"read\"] }",
            "path \(quoted("consul/kv/" + app + "/*")) { capabilities = [\"read\", \"list\"] }",
        ]
        for source in spec.definition.secrets.values.sorted(by: { $0.source < $1.source }) {
            if let path = source.path?.path { lines.append("path \(quoted("secret/data/" + path)) { capabilities = [\"read\"] }") }
        }
        return lines.joined(separator: "\n")
    }

    func token(for spec: InstanceSpec) async throws -> String {
        try await tokens.create(
            policies: [], displayName: "instance-" + spec.id, ttlSeconds: 0, renewable: false, uses: 0, parent: nil,
            meta: ["instance": spec.id, "node": spec.node, "app": spec.appID.path], inlinePolicy: Self.policy(for: spec)
        ).secret
    }

    func revoke(instances: Set<String>) async {
        try? await tokens.revoke(meta: "instance", in: instances)
    }

    func revoke(allBut live: Set<String>, node: String) async {
        // Only this node's instances: other nodes' agents look after theirs.
        guard let all = try? await tokens.tokens(withMeta: "node", equal: node) else { return }
        let ended = Set(all.compactMap { $0.meta["instance"] }).subtracting(live)
        if !ended.isEmpty { try? await tokens.revoke(meta: "instance", in: ended) }
    }
}

/// Instances read their secrets from the node's secrets engine.
extension SecretKV: SecretValues {}

public struct ServerError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// FNV-1a, 64 bits: a stable short name for a path (not for security).
func fnv1a(_ text: String) -> UInt64 {
    var hash: UInt64 = 0xcbf2_9ce4_8422_2325
    for byte in text.utf8 {
        hash ^= UInt64(byte)
        hash = hash &* 0x100_0000_01b3
    }
    return hash
}

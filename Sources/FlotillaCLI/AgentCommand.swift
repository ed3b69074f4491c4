import ArgumentParser
import FlotillaAgent
import FlotillaSecrets
import FlotillaCore
import FlotillaProxy
import FlotillaServer
import Foundation
import Logging
import Yams

struct AgentCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "agent", abstract: "Start an agent: the API, the scheduler and this node's instances.")

    @Option(help: "Where state, logs and sandboxes live.")
    var dataDir: String = AgentCommand.defaultDataDirectory()

    @Option(help: "The address the API listens on.")
    var bind: String = "127.0.0.1"

    @Option(help: "The API and UI port.")
    var apiPort: Int = 7600

    @Option(help: "This node's name (default: the host name).")
    var nodeName: String?

    @Option(help: "The address instances are reachable at (HOST); default: the bind address, or the host name when binding all interfaces.")
    var advertise: String?

    @Option(help: "The DNS port (UDP and TCP) for <service>.service.<domain> lookups.")
    var dnsPort: Int = 7653

    @Option(help: "The DNS domain the registry answers for.")
    var dnsDomain: String = "flotilla"

    @Option(help: "The TTL of DNS answers, in seconds.")
    var dnsTtl: UInt32 = 0

    @Option(help: "The load balancer's HTTP port (routes from urlprefix- tags).")
    var proxyPort: Int = 7680

    @Option(help: "How the load balancer picks an instance: rr (round-robin), random, leastconn.")
    var proxyStrategy: String = "rr"

    @Option(help: "How long the load balancer waits for a connection to an instance (a duration: 500ms, 2s); a route's connecttimeout= overrides it.")
    var proxyConnectTimeout: String = "1s"

    @Option(help: "How long the load balancer waits for an instance's response head (a duration: 30s, 2m); a route's readtimeout= overrides it.")
    var proxyReadTimeout: String = "60s"

    @Option(help: "Close a load-balancer client connection that sends nothing for this long between requests (a duration: 75s, 5m); a client that sends only part of a request head for that long gets 408.")
    var proxyIdleTimeout: String = "75s"

    @Option(help: "On shutdown, how long the load balancer waits for the requests under way to be answered before it closes their connections (a duration: 5s, 1m; 0s closes them at once).")
    var proxyDrainTimeout: String = "5s"

    @Option(help: "Write the load balancer's access log to this file (- for standard output).")
    var proxyAccessLog: String?

    @Option(help: "The load balancer's HTTPS port: TLS is terminated there with a certificate picked by SNI from --proxy-cert-dir, and requests follow the same routes.")
    var proxyHttpsPort: Int?

    @Option(help: "The HTTPS listener's certificates: NAME.pem (or NAME.crt) with its key in NAME.key per host; served for the certificate's DNS names, default.pem when none matches; re-read when the files change.")
    var proxyCertDir: String?

    @Option(help: "More trust roots (a PEM file) for proto=https instances, beside the system's.")
    var proxyUpstreamCa: String?

    @Option(help: "The datacenter name the Consul API and DNS report.")
    var datacenter: String = "dc1"

    @Option(help: "CPUs to offer instances (default: all).")
    var cpus: Double?

    @Option(help: "Memory to offer instances, in MiB (default: 80% of physical memory).")
    var mem: Double?

    @Option(help: "Disk to offer instances, in MiB.")
    var disk: Double = 10_240

    @Option(help: "Host ports given to instances, FROM-TO.")
    var ports: String = "31000-32000"

    @Option(help: "Service ports given to port definitions with port 0, FROM-TO (Marathon's local_port_min-local_port_max).")
    var servicePorts: String = "10000-20000"

    @Flag(help: "Route every app's service ports through the load balancer as TCP routes (without it, only apps labelled FLOTILLA_SERVICE_PORT_ROUTE=true).")
    var routeServicePorts = false

    @Option(help: "The OCI runtime that runs container apps: runc, crun, or a path.")
    var ociRuntime: String = "runc"

    @Option(help: "Containers' root filesystems: overlay (overlayfs over the shared layers), copy (a copy per instance), or auto (overlay where it can be mounted).")
    var containerRootfs: String = "auto"

    @Option(help: "The bridge container/bridge apps attach to (made on first use; at most 15 characters).")
    var bridgeName: String = "flotilla0"

    @Option(help: "The bridge's IPv4 range (the first address is the bridge's own); it must not overlap a route the host has.")
    var bridgeCidr: String = "172.31.0.0/16"

    @Option(name: .customLong("insecure-registry"), help: "A registry (HOST:PORT) spoken to over plain HTTP; all others need HTTPS (repeatable).")
    var insecureRegistries: [String] = []

    @Option(help: "Remove images no app version uses when the image store's filesystem is fuller than this many percent (0 turns it off; 'flotilla image prune' does it by hand).")
    var imageGcThreshold: Double = 85

    @Option(help: "Registry credentials in Docker's config.json format ({\"auths\": {\"HOST:PORT\": {\"auth\": base64(user:password)}}}).")
    var registryAuthFile: String?

    @Option(help: "Access control: allow (the API is open, as Marathon's is by default) or default-deny (every request but /ping needs a token whose policies allow it; 'flotilla acl bootstrap' makes the first).")
    var acl: String = "allow"

    @Option(help: "Serve the API over HTTPS with this certificate (PEM; the server's certificate first, then any intermediates).")
    var tlsCert: String?

    @Option(help: "The private key of --tls-cert (PEM).")
    var tlsKey: String?

    @Option(help: "Require API clients to present a certificate signed by this CA (PEM): mutual TLS.")
    var tlsClientCa: String?

    @Option(help: "Rotate the audit log (<data-dir>/audit.log) when it would pass this many MiB; audit.log.1 … .N keep the older lines.")
    var auditLogMaxMib: Int = 64

    @Option(help: "How many rotated audit logs to keep.")
    var auditLogKeep: Int = 5

    @Option(help: "Measure instances (CPU, memory, I/O from their cgroups) and the node every this many seconds, for /metrics, the stats API and 'flotilla top'; 0 turns it off.")
    var metricsInterval: Double = 5

    @Option(help: "POST each alert level change (JSON) to this URL, in order, retried with backoff; repeatable.")
    var alertWebhook: [String] = []

    @Option(help: "Node and cluster alert rules: a YAML or JSON file of {rules: [{name, scope: node|cluster, metric, node, window, warning, critical, forSeconds}]} (see docs/api.md).")
    var alertRules: String?

    @Option(help: "Send firing alerts to this Alertmanager (its base URL, e.g. http://127.0.0.1:9093; POST /api/v2/alerts); repeatable.")
    var alertmanager: [String] = []

    @Option(help: "In a cluster over TLS: the CA (PEM) that signed the other agents' certificates, for the requests agents send each other (they present --tls-cert); default: --tls-client-ca, else the system's roots.")
    var tlsPeerCa: String?

    @Option(help: "The key secrets are sealed under (from 'flotilla secrets keygen'; mode 600); or the FLOTILLA_SECRETS_KEY environment variable. Without one, the secrets engine is off.")
    var secretsKeyFile: String?

    @Option(name: .customLong("attribute"), help: "A node attribute for constraints, key=value (repeatable).")
    var attributes: [String] = []

    @Option(help: "Rotate an instance's stdout/stderr once it passes this many MiB (checked every second, up to 1,000 instances a round).")
    var logMaxMib: Int = 10

    @Option(help: "Keep instances' logs (rotated ones, and those of instances that ended) this long and/or up to this much on the node, oldest removed first: 7d, 12h, 1GiB, 7d,1GiB.")
    var logRetention: String = "7d,1GiB"

    @Option(help: "What happens to instances when the agent exits: keep (the next agent adopts them) or stop.")
    var onExit: ExitPolicy = .keep

    @Option(help: "Log level: trace, debug, info, notice, warning, error.")
    var logLevel: String = "info"

    @Option(help: "The agent's own log lines: text, logfmt (time=… level=… label=… msg=\"…\" key=value) or json (one object a line).")
    var logFormat: String = "text"

    @Option(help: "Send every line instances write (stdout and stderr) to a syslog collector, RFC 5424 with the app, instance, node and stream as structured data: syslog+udp://HOST[:PORT] or syslog+tcp://HOST[:PORT] (octet counting; port 514 by default); repeatable.")
    var logForward: [String] = []

    @Option(help: "MiB of lines a --log-forward target may hold unsent while its collector is away (the log files are the buffer); past it the oldest are dropped, counted and reported.")
    var logForwardBuffer: Int = 64

    @Option(help: "Where state lives: sqlite:PATH (default: state.db in --data-dir) or etcd://HOST:PORT[,HOST:PORT…] (an etcd v3 cluster shared by every agent).")
    var store: String = "sqlite"

    @Flag(help: "With --store etcd://…: this agent is a scheduler candidate (one elected --server agent schedules for the cluster; the others take over within seconds when it is lost).")
    var server = false

    @Option(help: "The etcd key prefix Flotilla's keys live under (several clusters can share one etcd).")
    var etcdPrefix: String = "/flotilla"

    @Option(help: "The CA that signed the etcd members' certificates (PEM): talk to etcd over TLS.")
    var etcdCa: String?

    @Option(help: "A client certificate for etcd (PEM), when its members require one.")
    var etcdCert: String?

    @Option(help: "The private key of --etcd-cert (PEM).")
    var etcdKey: String?

    enum ExitPolicy: String, ExpressibleByArgument { case keep, stop }

    /// A validated Go-style duration.
    static func duration(_ text: String) -> Duration {
        .milliseconds(Int64(((GoDuration.seconds(text) ?? 1) * 1000).rounded(.up)))
    }

    func validate() throws {
        guard Self.portRange(servicePorts) != nil else {
            throw ValidationError("--service-ports must be FROM-TO with 1 <= FROM <= TO <= 65535, got '\(servicePorts)'")
        }
        guard parsedPorts != nil else { throw ValidationError("--ports must be FROM-TO with 1 <= FROM <= TO <= 65535, got '\(ports)'") }
        if let nodeName, nodeName.isEmpty || nodeName.contains("/") || nodeName.hasPrefix(".") {
            throw ValidationError("--node-name must be non-empty, without '/', and not start with '.' (it names the node's keys in the store), got '\(nodeName)'")
        }
        guard (0...65535).contains(apiPort) else { throw ValidationError("--api-port must be between 0 and 65535") }
        guard (1...65535).contains(dnsPort) else { throw ValidationError("--dns-port must be between 1 and 65535") }
        guard (1...65535).contains(proxyPort) else { throw ValidationError("--proxy-port must be between 1 and 65535") }
        if let proxyHttpsPort {
            guard (0...65535).contains(proxyHttpsPort) else { throw ValidationError("--proxy-https-port must be between 0 and 65535") }
            guard proxyCertDir != nil else { throw ValidationError("--proxy-https-port needs --proxy-cert-dir DIR (NAME.pem + NAME.key per host)") }
        } else if proxyCertDir != nil {
            throw ValidationError("--proxy-cert-dir is for the HTTPS listener: give --proxy-https-port too")
        }
        guard BalancingStrategy(rawValue: proxyStrategy) != nil else {
            throw ValidationError("--proxy-strategy must be one of \(BalancingStrategy.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        for (flag, value) in [
            ("--proxy-connect-timeout", proxyConnectTimeout), ("--proxy-read-timeout", proxyReadTimeout), ("--proxy-idle-timeout", proxyIdleTimeout),
        ] {
            guard let seconds = GoDuration.seconds(value), seconds > 0 else { throw ValidationError("\(flag) must be a duration such as 500ms, 5s or 2m, got '\(value)'") }
        }
        guard let drain = GoDuration.seconds(proxyDrainTimeout), drain >= 0 else {
            throw ValidationError("--proxy-drain-timeout must be a duration such as 0s, 5s or 1m, got '\(proxyDrainTimeout)'")
        }
        guard dnsDomain.split(separator: ".").allSatisfy({ !$0.isEmpty && $0.count <= 63 }), !dnsDomain.isEmpty else {
            throw ValidationError("--dns-domain must be a domain name such as flotilla or consul.example")
        }
        for attribute in attributes where !attribute.contains("=") {
            throw ValidationError("--attribute takes key=value, got '\(attribute)'")
        }
        if let cpus, cpus <= 0 { throw ValidationError("--cpus must be more than zero") }
        if let mem, mem <= 0 { throw ValidationError("--mem must be more than zero") }
        guard Logger.Level(rawValue: logLevel) != nil else { throw ValidationError("unknown --log-level '\(logLevel)'") }
        guard AgentLogFormat(rawValue: logFormat) != nil else { throw ValidationError("--log-format must be text, logfmt or json, got '\(logFormat)'") }
        for target in logForward {
            do { _ = try LogForwardTarget.parse(target) } catch { throw ValidationError("--log-forward: \(error.message)") }
        }
        guard logForwardBuffer >= 1 else { throw ValidationError("--log-forward-buffer must be at least 1 (MiB)") }
        guard ["allow", "default-deny"].contains(acl) else { throw ValidationError("--acl must be allow or default-deny, got '\(acl)'") }
        guard (tlsCert == nil) == (tlsKey == nil) else { throw ValidationError("--tls-cert and --tls-key go together") }
        if tlsClientCa != nil && tlsCert == nil { throw ValidationError("--tls-client-ca needs --tls-cert and --tls-key") }
        do { _ = try LogRetention.parse(logRetention) } catch { throw ValidationError("--log-retention: \(error)") }
        guard auditLogMaxMib >= 1, auditLogKeep >= 1 else { throw ValidationError("--audit-log-max-mib and --audit-log-keep must be at least 1") }
        guard metricsInterval == 0 || (metricsInterval >= 0.5 && metricsInterval <= 3600) else {
            throw ValidationError("--metrics-interval must be 0 (off) or between 0.5 and 3600 seconds, got \(metricsInterval)")
        }
        if let alertRules { _ = try Self.loadAlertRules(alertRules) }
        for (flag, urls) in [("--alert-webhook", alertWebhook), ("--alertmanager", alertmanager)] {
            for url in urls {
                guard let parsed = URL(string: url), ["http", "https"].contains(parsed.scheme?.lowercased() ?? ""), parsed.host?.isEmpty == false else {
                    throw ValidationError("\(flag) wants an http:// or https:// URL, got '\(url)'")
                }
            }
        }
        if tlsPeerCa != nil && tlsCert == nil { throw ValidationError("--tls-peer-ca needs --tls-cert and --tls-key") }
        do {
            _ = try StoreLocation.parse(store, etcdPrefix: etcdPrefix, caFile: etcdCa, certFile: etcdCert, keyFile: etcdKey)
        } catch {
            throw ValidationError("\(error)")
        }
        if !store.hasPrefix("etcd://") && (etcdCa != nil || etcdCert != nil || etcdKey != nil) {
            throw ValidationError("--etcd-ca, --etcd-cert and --etcd-key need --store etcd://…")
        }
        guard ContainerRootfsMode(rawValue: containerRootfs) != nil else {
            throw ValidationError("--container-rootfs must be one of \(ContainerRootfsMode.allCases.map(\.rawValue).joined(separator: ", ")), got '\(containerRootfs)'")
        }
    }

    var parsedPorts: ClosedRange<Int>? { Self.portRange(ports) }

    /// The rules file of `--alert-rules` (YAML or JSON), checked whole: an error names the file,
    /// the rule and the field.
    static func loadAlertRules(_ path: String) throws -> [ClusterAlertRule] {
        do {
            let text = try String(contentsOfFile: path, encoding: .utf8)
            guard let yaml = try Yams.load(yaml: text) else { return [] }
            let data = try JSONEncoder().encode(try JSONValue(yaml: yaml))
            let file = try JSONDecoder().decode(ClusterAlertRule.File.self, from: data)
            try ClusterAlertRule.File.validate(file.rules)
            return file.rules
        } catch FlotillaError.invalid(_, let problems) {
            throw ValidationError("--alert-rules \(path): " + problems.map { "\($0.path): \($0.errors.joined(separator: "; "))" }.joined(separator: ", "))
        } catch let error as DecodingError {
            throw ValidationError("--alert-rules \(path): \(Self.describe(error))")
        } catch {
            throw ValidationError("--alert-rules \(path): \(error)")
        }
    }

    private static func describe(_ error: DecodingError) -> String {
        switch error {
        case .keyNotFound(let key, let context):
            return "/" + (context.codingPath + [key]).map { $0.intValue.map(String.init) ?? $0.stringValue }.joined(separator: "/") + ": is missing"
        case .typeMismatch(_, let context), .valueNotFound(_, let context), .dataCorrupted(let context):
            return "/" + context.codingPath.map { $0.intValue.map(String.init) ?? $0.stringValue }.joined(separator: "/") + ": " + context.debugDescription
        @unknown default:
            return "\(error)"
        }
    }

    static func portRange(_ text: String) -> ClosedRange<Int>? {
        let parts = text.split(separator: "-").compactMap { Int($0) }
        guard parts.count == 2, parts[0] >= 1, parts[0] <= parts[1], parts[1] <= 65535 else { return nil }
        return parts[0]...parts[1]
    }

    func run() async throws {
        let level = Logger.Level(rawValue: logLevel) ?? .info
        let format = AgentLogFormat(rawValue: logFormat) ?? .text
        LoggingSystem.bootstrap { label in
            if format == .text {
                var handler = StreamLogHandler.standardError(label: label)
                handler.logLevel = level
                return handler
            }
            var handler = StructuredLogHandler(label: label, format: format)
            handler.logLevel = level
            return handler
        }
        var logger = Logger(label: "flotilla")
        logger.logLevel = level
        let hostName = ProcessInfo.processInfo.hostName
        let name = nodeName ?? hostName
        var nodeAttributes = ["hostname": name]
        for attribute in attributes {
            let parts = attribute.split(separator: "=", maxSplits: 1).map(String.init)
            nodeAttributes[parts[0]] = parts.count > 1 ? parts[1] : ""
        }
        let host = advertise ?? (bind == "0.0.0.0" || bind == "::" ? hostName : bind)
        let memory = mem ?? (Double(ProcessInfo.processInfo.physicalMemory) / 1_048_576 * 0.8).rounded(.down)
        let range = parsedPorts!
        let node = NodeInfo(
            name: name, host: host, cpus: cpus ?? Double(ProcessInfo.processInfo.activeProcessorCount), mem: memory, disk: disk,
            portRangeStart: range.lowerBound, portRangeEnd: range.upperBound, attributes: nodeAttributes)
        if let ephemeral = Self.ephemeralPortRange(), ephemeral.overlaps(range) {
            logger.warning(
                "--ports \(ports) overlaps the kernel's ephemeral port range \(ephemeral.lowerBound)-\(ephemeral.upperBound): an instance may find its port taken by an outgoing connection; choose a range below \(ephemeral.lowerBound) (the default 31000-32000 is)")
        }
        let directory = URL(fileURLWithPath: dataDir).standardizedFileURL.path
        logger.info(
            "starting flotilla \(Flotilla.version)",
            metadata: [
                "data-dir": "\(directory)", "api": "\(bind):\(apiPort)", "node": "\(name)", "cpus": "\(node.cpus)",
                "mem": "\(Int(node.mem))", "ports": "\(ports)", "dns": "\(bind):\(dnsPort)", "proxy": "\(bind):\(proxyPort)",
            ])
        if acl != "default-deny" && !(bind.hasPrefix("127.") || bind == "::1" || bind == "localhost") {
            logger.warning(
                "the API on \(bind):\(apiPort) is open: whoever reaches it can deploy commands, read secrets and stop apps; use --acl default-deny, or keep it on a trusted network")
        }
        do {
            var configuration = FlotillaServer.Configuration(
                dataDirectory: directory, bindAddress: bind, apiPort: apiPort, node: node, stopInstancesOnExit: onExit == .stop,
                logMaxBytes: Int64(logMaxMib) << 20, version: Flotilla.version, dnsPort: dnsPort, dnsDomain: dnsDomain,
                dnsTTL: dnsTtl, datacenter: datacenter, proxyPort: proxyPort, proxyStrategy: BalancingStrategy(rawValue: proxyStrategy)!)
            configuration.proxyConnectTimeout = Self.duration(proxyConnectTimeout)
            configuration.proxyReadTimeout = Self.duration(proxyReadTimeout)
            configuration.proxyIdleTimeout = Self.duration(proxyIdleTimeout)
            configuration.proxyDrainTimeout = Self.duration(proxyDrainTimeout)
            configuration.proxyAccessLog = proxyAccessLog
            configuration.auditLogMaxBytes = Int64(auditLogMaxMib) << 20
            configuration.auditLogKeep = auditLogKeep
            configuration.logRetention = try LogRetention.parse(logRetention)
            configuration.metricsInterval = metricsInterval == 0 ? nil : .milliseconds(Int64(metricsInterval * 1000))
            configuration.alertWebhooks = alertWebhook
            configuration.alertmanagers = alertmanager
            if let alertRules { configuration.alertRules = try Self.loadAlertRules(alertRules) }
            configuration.logForwardTargets = try logForward.map { try LogForwardTarget.parse($0) }
            configuration.logForwardBufferBytes = UInt64(logForwardBuffer) << 20
            configuration.proxyHTTPSPort = proxyHttpsPort
            configuration.proxyCertificateDirectory = proxyCertDir
            configuration.proxyUpstreamCA = proxyUpstreamCa
            configuration.servicePortRange = Self.portRange(servicePorts)!
            configuration.routeServicePorts = routeServicePorts
            configuration.ociRuntime = ociRuntime
            configuration.containerRootfs = ContainerRootfsMode(rawValue: containerRootfs)!
            configuration.insecureRegistries = insecureRegistries
            configuration.registryAuthFile = registryAuthFile
            configuration.bridgeName = bridgeName
            configuration.bridgeCIDR = bridgeCidr
            configuration.imageGCThresholdPercent = imageGcThreshold > 0 ? imageGcThreshold : nil
            configuration.aclDefaultDeny = acl == "default-deny"
            configuration.store = try StoreLocation.parse(store, etcdPrefix: etcdPrefix, caFile: etcdCa, certFile: etcdCert, keyFile: etcdKey)
            configuration.server = server
            if let tlsCert, let tlsKey {
                configuration.tls = TLSFiles(certificate: tlsCert, key: tlsKey, clientCA: tlsClientCa, peerCA: tlsPeerCa)
            }
            if let secretsKeyFile {
                configuration.secretsKey = try SecretsMasterKey(file: secretsKeyFile)
            } else if let text = ProcessInfo.processInfo.environment["FLOTILLA_SECRETS_KEY"] {
                configuration.secretsKey = try SecretsMasterKey(text: text, source: "FLOTILLA_SECRETS_KEY")
            }
            try await FlotillaServer.run(configuration, logger: logger)
        } catch {
            logger.critical("agent stopped: \(error)")
            throw ExitCode.failure
        }
    }

    /// The range the kernel picks local ports of outgoing connections from.
    static func ephemeralPortRange() -> ClosedRange<Int>? {
        guard let text = try? String(contentsOfFile: "/proc/sys/net/ipv4/ip_local_port_range", encoding: .utf8) else { return nil }
        let bounds = text.split(whereSeparator: \.isWhitespace).compactMap { Int($0) }
        guard bounds.count == 2, bounds[0] <= bounds[1] else { return nil }
        return bounds[0]...bounds[1]
    }

    static func defaultDataDirectory() -> String {
        let environment = ProcessInfo.processInfo.environment
        if let explicit = environment["FLOTILLA_DATA_DIR"] { return explicit }
        if getuid() == 0 { return "/var/lib/flotilla" }
        let base = environment["XDG_DATA_HOME"] ?? ((environment["HOME"] ?? ".") + "/.local/share")
        return base + "/flotilla"
    }
}

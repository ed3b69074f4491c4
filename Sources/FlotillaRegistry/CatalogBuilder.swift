public import FlotillaCore
public import Foundation

/// Turns instances and external registrations into catalog entries. Pure: the registry calls it on
/// every change and compares the result with the last one to decide which indexes move.
///
/// Naming follows Registrator, read from the app's labels first, then its env:
/// `SERVICE_NAME`, `SERVICE_TAGS` (comma-separated), `SERVICE_IGNORE`, and per port
/// `SERVICE_<port>_NAME` / `_TAGS` / `_IGNORE`, where `<port>` is the port definition's number
/// (when not 0), its index, or its name in capitals. Without a name an app's service is its id
/// with `/` as `-` (`/shop/cart` → `shop-cart`), and each port after the first of a multi-port app
/// is `<name>-<port index>`.
public enum CatalogBuilder {
    public static let nodeCheckID = "serfHealth"

    public static func nodes(_ nodes: [NodeInfo], alive: Bool = true) -> [CatalogNode] {
        nodes.map { CatalogNode(name: $0.name, address: $0.host, meta: $0.attributes, alive: alive, isAgent: true) }.sorted { $0.name < $1.name }
    }

    /// The services an app declares (name and tags per registered port), whether or not any
    /// instance runs: a route stays known while its app exists, so the proxy can answer 503.
    public static func declaredServices(of definition: AppDefinition, routeServicePorts: Bool = false) -> [(name: String, tags: [String])] {
        naming(of: definition, portCount: max(1, definition.ports.count), routeServicePorts: routeServicePorts).map { ($0.name, $0.tags) }
    }

    /// The label that asks for an app's service ports to be routed as TCP routes
    /// (`urlprefix-:SERVICEPORT proto=tcp`), as marathon-lb serves them.
    public static let servicePortRouteLabel = "FLOTILLA_SERVICE_PORT_ROUTE"

    /// The service meta key that names the instance's app.
    public static let appMetaKey = "flotilla-app"

    /// Name and tags of each port of an app that is registered (ignored ports are left out).
    static func naming(
        of definition: AppDefinition, portCount: Int, routeServicePorts: Bool = false
    ) -> [(index: Int, name: String, tags: [String], portName: String?)] {
        func setting(_ key: String) -> String? {
            if let label = definition.labels[key] { return label }
            if case .value(let value)? = definition.env[key] { return value }
            return nil
        }
        if let ignore = setting("SERVICE_IGNORE"), !ignore.isEmpty, ignore.lowercased() != "false" { return [] }
        let baseName = setting("SERVICE_NAME") ?? definition.id.serviceName
        let baseTags = tags(setting("SERVICE_TAGS"))
        let routed = routeServicePorts ? setting(servicePortRouteLabel)?.lowercased() != "false" : setting(servicePortRouteLabel)?.lowercased() == "true"
        var result: [(index: Int, name: String, tags: [String], portName: String?)] = []
        for index in 0..<portCount {
            let ports = definition.ports
            let port = ports.indices.contains(index) ? ports[index] : AppPort(hostPort: 0, servicePort: 0)
            var keys = ["\(index)"]
            if port.servicePort != 0 { keys.insert("\(port.servicePort)", at: 0) }
            if let name = port.name { keys.append(name.uppercased()) }
            func portSetting(_ suffix: String) -> String? { keys.lazy.compactMap { setting("SERVICE_\($0)_\(suffix)") }.first }
            if let ignore = portSetting("IGNORE"), !ignore.isEmpty, ignore.lowercased() != "false" { continue }
            let name = portSetting("NAME") ?? (index == 0 || portCount == 1 ? baseName : "\(baseName)-\(index)")
            var portTags = portSetting("TAGS").map(tags) ?? baseTags
            if routed, port.servicePort != 0, port.protocol.contains("tcp") {
                portTags.append("urlprefix-:\(port.servicePort) proto=tcp")
            }
            result.append((index, name, portTags, port.name))
        }
        return result
    }

    /// The catalog entries of one instance: one per registered port. None once it has ended.
    public static func services(of instance: Instance, routeServicePorts: Bool = false) -> [CatalogService] {
        let spec = instance.spec
        guard !instance.state.isTerminal, instance.state == .running || instance.state == .killing, !spec.ports.isEmpty else { return [] }
        var entries: [CatalogService] = []
        for port in naming(of: spec.definition, portCount: spec.ports.count, routeServicePorts: routeServicePorts) {
            let hostPort = spec.ports[port.index]
            let serviceID = "\(spec.id):\(hostPort)"
            var meta = [
                appMetaKey: spec.appID.path, "flotilla-instance": spec.id, "flotilla-version": spec.version,
            ]
            if let portName = port.portName { meta["flotilla-port-name"] = portName }
            entries.append(
                CatalogService(
                    id: serviceID, name: port.name, tags: port.tags, address: spec.host, port: hostPort, meta: meta, node: spec.node,
                    checks: checks(of: instance, serviceID: serviceID, serviceName: port.name, tags: port.tags), createIndex: 0, modifyIndex: 0))
        }
        return entries
    }

    /// An instance's checks in Consul's terms: one per app health check (or one for its state when
    /// it has none), plus maintenance mode while it drains or waits as a blue-green standby, which
    /// takes it out of every passing set (and out of Fabio's routes) before it gets SIGTERM.
    static func checks(of instance: Instance, serviceID: String, serviceName: String, tags: [String]) -> [CatalogCheck] {
        let spec = instance.spec
        func check(_ id: String, _ name: String, _ status: CheckStatus, output: String, notes: String = "", type: String = "") -> CatalogCheck {
            CatalogCheck(
                node: spec.node, checkID: id, name: name, status: status, notes: notes, output: output, serviceID: serviceID,
                serviceName: serviceName, serviceTags: tags, type: type, createIndex: 0, modifyIndex: 0)
        }
        var checks: [CatalogCheck] = []
        if spec.definition.healthChecks.isEmpty {
            let running = instance.state == .running
            checks.append(check("service:\(serviceID)", "Instance state", running ? .passing : .critical, output: instance.state.rawValue))
        } else {
            let results = instance.status?.health ?? []
            for (index, healthCheck) in spec.definition.healthChecks.enumerated() {
                let result = index < results.count ? results[index] : HealthResult()
                let status: CheckStatus
                switch result.alive {
                case true?: status = .passing
                case false?: status = .critical
                // No verdict yet: failures forgiven in the grace period show as a warning.
                case nil: status = result.lastFailure != nil ? .warning : .critical
                }
                let output = result.alive == true ? "passing since \(result.lastSuccess ?? "")" : (result.lastFailureCause ?? "no result yet")
                let suffix = spec.definition.healthChecks.count == 1 ? "" : ":\(index + 1)"
                checks.append(
                    check("service:\(serviceID)\(suffix)", "\(healthCheck.protocol.rawValue) health check", status, output: output,
                          type: healthCheck.protocol.rawValue.lowercased()))
            }
        }
        if let readiness = spec.definition.readinessChecks.first {
            // Until its readiness check passes, a new instance takes no traffic.
            let ready = instance.status?.readiness?.ready == true
            checks.append(
                check(
                    "readiness:\(serviceID)", "Readiness check \(readiness.name)", ready ? .passing : .critical,
                    output: ready ? "ready" : (instance.status?.message ?? "not ready yet"), type: "http"))
        }
        let draining = instance.status?.draining == true || spec.goal == .stop || instance.state == .killing
        if draining || spec.standby {
            let reason = draining ? "draining before stop" : "blue-green standby: not live"
            checks.append(
                check("_service_maintenance:\(serviceID)", "Service Maintenance Mode", .critical, output: reason, notes: reason, type: "maintenance"))
        }
        return checks
    }

    /// Catalog entries of services registered through the agent API, with TTLs applied at `now`.
    public static func services(of external: ExternalService, now: Date) -> CatalogService {
        let checks = external.checks.map { original -> CatalogCheck in
            let check = applyTTL(original, now: now)
            return CatalogCheck(
                node: external.node, checkID: check.id, name: check.name, status: check.status, notes: check.notes, output: check.output,
                serviceID: external.id, serviceName: external.name, serviceTags: external.tags, type: check.type, createIndex: 0,
                modifyIndex: 0)
        }
        return CatalogService(
            id: external.id, name: external.name, tags: external.tags, address: external.address, port: external.port, meta: external.meta,
            node: external.node, checks: checks, createIndex: 0, modifyIndex: 0)
    }

    /// A TTL check not updated within its TTL reads as critical.
    static func applyTTL(_ check: ExternalCheck, now: Date) -> ExternalCheck {
        guard let ttl = check.ttlSeconds, let updated = Timestamp.parse(check.updatedAt), now.timeIntervalSince(updated) > ttl else { return check }
        var expired = check
        expired.status = .critical
        expired.output = "TTL expired: no update for \(Int(ttl)) s"
        return expired
    }

    static func tags(_ text: String?) -> [String] {
        (text ?? "").split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
    }
}

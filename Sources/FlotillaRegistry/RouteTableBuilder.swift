public import FlotillaCore

/// Builds the proxy's route table from the catalog: every `urlprefix-` tag on a service makes a
/// route; its targets are the instances in service (all checks passing). A route whose instances
/// are all gone or failing stays in the table with no target, so the proxy answers 503, not 404.
public enum RouteTableBuilder {
    public static func build(from view: RegistryView, index: UInt64) -> RouteTable {
        struct Key: Hashable {
            var host: String
            var path: String
            var tcpPort: Int?
        }
        var rules: [Key: RouteRule] = [:]
        var members: [Key: [(CatalogService, Double?)]] = [:]
        var services: [Key: Set<String>] = [:]
        var apps: [Key: Set<String>] = [:]
        for entry in view.services {
            for tag in entry.tags {
                guard let rule = RouteRule.parse(tag) else { continue }
                let key = Key(host: rule.host, path: rule.path, tcpPort: rule.tcpPort)
                if rules[key] == nil { rules[key] = rule }
                services[key, default: []].insert(entry.name)
                if let app = entry.meta[CatalogBuilder.appMetaKey] { apps[key, default: []].insert(app) }
                if view.status(of: entry) == .passing { members[key, default: []].append((entry, rule.weight)) }
            }
        }
        // Routes an app declares while none of its instances is registered: known, with no target.
        for (service, tags) in view.declaredTags {
            for tag in tags {
                guard let rule = RouteRule.parse(tag) else { continue }
                let key = Key(host: rule.host, path: rule.path, tcpPort: rule.tcpPort)
                if rules[key] == nil { rules[key] = rule }
                services[key, default: []].insert(service)
                apps[key, default: []].formUnion(view.declaredApps[service] ?? [])
            }
        }
        var http: [Route] = []
        var tcp: [Int: Route] = [:]
        for (key, rule) in rules {
            var plain = rule
            plain.weight = nil
            let route = Route(
                rule: plain, targets: weighted(members[key] ?? []), services: services[key, default: []].sorted(), apps: apps[key, default: []].sorted())
            if let port = key.tcpPort { tcp[port] = route } else { http.append(route) }
        }
        return RouteTable(http: http, tcp: tcp, index: index)
    }

    /// Shares of traffic per target: tagged weights go to their instances, what is left is split
    /// among the instances without one; shares sum to 1.
    static func weighted(_ members: [(CatalogService, Double?)]) -> [RouteTarget] {
        guard !members.isEmpty else { return [] }
        let implicit = members.filter { $0.1 == nil }
        // A weight is the share of one tagged set (the instances of one service carrying that
        // tag), split among its instances; what is left goes to the untagged instances.
        struct TaggedSet: Hashable {
            var service: String
            var weight: Double
        }
        var setSizes: [TaggedSet: Int] = [:]
        for (entry, weight) in members {
            if let weight { setSizes[TaggedSet(service: entry.name, weight: weight), default: 0] += 1 }
        }
        let explicitTotal = setSizes.keys.reduce(0.0) { $0 + $1.weight }
        var shares: [Double] = []
        for (entry, weight) in members {
            if let weight {
                shares.append(weight / Double(setSizes[TaggedSet(service: entry.name, weight: weight)]!))
            } else {
                shares.append(max(0, 1 - explicitTotal) / Double(implicit.count))
            }
        }
        var total = shares.reduce(0, +)
        if total <= 0 {
            shares = members.map { _ in 1 }
            total = Double(members.count)
        }
        return zip(members, shares).map { member, share in
            RouteTarget(
                serviceID: member.0.id, service: member.0.name, host: member.0.address, port: member.0.port, weight: share / total,
                app: member.0.meta[CatalogBuilder.appMetaKey])
        }.sorted { $0.serviceID < $1.serviceID }
    }
}

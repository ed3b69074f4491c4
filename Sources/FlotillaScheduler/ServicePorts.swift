public import FlotillaCore

/// Marathon's service ports: every `portDefinitions[].port` of 0 is given a port from the service
/// port range (Marathon's `local_port_min`–`local_port_max`, 10000–20000 by default) that no other
/// app uses, and an app keeps the service ports it has across versions, so load balancers and
/// clients bound to them (marathon-lb, Flotilla's own service-port routes) keep working.
public enum ServicePorts {
    public static let defaultRange = 10_000...20_000

    /// The definition with every port 0 replaced by a service port.
    /// - Parameters:
    ///   - previous: the app's current definition, whose service ports are kept: a port definition
    ///     keeps the port of the previous one with the same name, or else at the same index.
    ///   - inUse: the service ports of every other app.
    /// - Throws: a field error when the range has no free port left.
    public static func assign(
        _ definition: AppDefinition, previous: AppDefinition?, inUse: Set<Int>, range: ClosedRange<Int> = defaultRange
    ) throws(FlotillaError) -> AppDefinition {
        var result = definition
        let ports = definition.ports
        var taken = inUse.union(ports.map(\.servicePort).filter { $0 != 0 })
        let earlier = previous?.ports ?? []
        var next = range.lowerBound
        for index in ports.indices where ports[index].servicePort == 0 {
            let name = ports[index].name
            let kept =
                (name.flatMap { name in earlier.first { $0.name == name } } ?? (earlier.indices.contains(index) ? earlier[index] : nil))?.servicePort
            if let kept, kept != 0, !taken.contains(kept) {
                result.setServicePort(kept, at: index)
                taken.insert(kept)
                continue
            }
            while next <= range.upperBound && taken.contains(next) { next += 1 }
            guard next <= range.upperBound else {
                throw .invalid([
                    FieldError(
                        definition.network == .bridge ? "/container/portMappings(\(index))/servicePort" : "/portDefinitions(\(index))/port",
                        "no service port is free in \(range.lowerBound)-\(range.upperBound); give the port explicitly or widen --service-ports")
                ])
            }
            result.setServicePort(next, at: index)
            taken.insert(next)
        }
        return result
    }
}

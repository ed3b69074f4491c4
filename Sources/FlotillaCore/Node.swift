/// A machine with an agent: what it offers and how constraints see it.
public struct NodeInfo: Sendable, Hashable, Codable {
    public var name: String
    /// The address instances are reachable at, given to them as `HOST`.
    public var host: String
    public var cpus: Double
    public var mem: Double
    public var disk: Double
    public var portRangeStart: Int
    public var portRangeEnd: Int
    /// `key=value` attributes given at start; `hostname` is always there.
    public var attributes: [String: String]

    public init(
        name: String, host: String, cpus: Double, mem: Double, disk: Double, portRangeStart: Int, portRangeEnd: Int,
        attributes: [String: String]
    ) {
        self.name = name
        self.host = host
        self.cpus = cpus
        self.mem = mem
        self.disk = disk
        self.portRangeStart = portRangeStart
        self.portRangeEnd = portRangeEnd
        self.attributes = attributes
    }

    public var portRange: ClosedRange<Int> { portRangeStart...portRangeEnd }

    /// The value a constraint on `field` reads: `hostname`, or an attribute.
    public func value(ofField field: String) -> String? {
        field == "hostname" ? attributes["hostname"] ?? name : attributes[field]
    }
}

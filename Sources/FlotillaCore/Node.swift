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
    /// The drivers this node's agent can run instances with (`exec`, `oci`); placement only sends
    /// an instance to a node that has its driver.
    public var drivers: [String]
    /// The base URL of this node's agent API (`http://10.0.0.3:7600`), for what other nodes relay
    /// to it (an instance's logs); nil in records from agents that did not advertise it.
    public var api: String?

    public init(
        name: String, host: String, cpus: Double, mem: Double, disk: Double, portRangeStart: Int, portRangeEnd: Int,
        attributes: [String: String], drivers: [String] = ["exec"]
    ) {
        self.drivers = drivers
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

    enum CodingKeys: String, CodingKey { case name, host, cpus, mem, disk, portRangeStart, portRangeEnd, attributes, drivers, api }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        name = try container.decode(String.self, forKey: .name)
        host = try container.decode(String.self, forKey: .host)
        cpus = try container.decode(Double.self, forKey: .cpus)
        mem = try container.decode(Double.self, forKey: .mem)
        disk = try container.decode(Double.self, forKey: .disk)
        portRangeStart = try container.decode(Int.self, forKey: .portRangeStart)
        portRangeEnd = try container.decode(Int.self, forKey: .portRangeEnd)
        attributes = try container.decodeIfPresent([String: String].self, forKey: .attributes) ?? [:]
        // Records written before drivers were advertised come from agents that had exec only.
        drivers = try container.decodeIfPresent([String].self, forKey: .drivers) ?? ["exec"]
        api = try container.decodeIfPresent(String.self, forKey: .api)
    }

    /// The value a constraint on `field` reads: `hostname`, or an attribute.
    public func value(ofField field: String) -> String? {
        field == "hostname" ? attributes["hostname"] ?? name : attributes[field]
    }
}

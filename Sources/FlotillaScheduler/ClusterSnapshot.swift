public import FlotillaCore

/// What the scheduler sees: the nodes and every instance not yet gone. Immutable; the scheduler
/// reads it and returns a plan, and never does I/O.
public struct ClusterSnapshot: Sendable {
    public var nodes: [NodeInfo]
    public var instances: [Instance]

    public init(nodes: [NodeInfo], instances: [Instance]) {
        self.nodes = nodes
        self.instances = instances
    }

    /// Instances that still hold resources on a node: anything not known to have ended.
    public var liveInstances: [Instance] { instances.filter { !$0.state.isTerminal } }
}

/// Resources a node has left, and the host ports in use on it.
struct NodeUsage {
    var cpus = 0.0
    var mem = 0.0
    var disk = 0.0
    var ports: Set<Int> = []

    mutating func add(_ definition: AppDefinition, ports: [Int]) {
        cpus += definition.cpus
        mem += definition.mem
        disk += definition.disk
        self.ports.formUnion(ports)
    }
}

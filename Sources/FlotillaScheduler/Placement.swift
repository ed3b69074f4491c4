public import FlotillaCore

/// Why an instance could not be placed on a node; the names are Marathon's offer-rejection reasons,
/// so tools that read `/v2/queue` see what they already know.
public enum PlacementRejection: String, Sendable, Hashable, CaseIterable {
    case insufficientCpus = "InsufficientCpus"
    case insufficientMemory = "InsufficientMemory"
    case insufficientDisk = "InsufficientDisk"
    case insufficientPorts = "InsufficientPorts"
    case unfulfilledConstraint = "UnfulfilledConstraint"
    case noNodes = "NoOffers"
}

/// Where one instance goes.
public struct Placement: Sendable, Hashable {
    public var node: NodeInfo
    public var ports: [Int]
}

/// The result of placing `requested` instances of one app.
public struct PlacementResult: Sendable {
    public var placements: [Placement]
    /// How many could not be placed, and per reason how many node evaluations failed on it.
    public var unplaced: Int
    public var rejections: [PlacementRejection: Int]
    /// A sentence for people: the first reason, with numbers.
    public var explanation: String?
}

/// Places instances on nodes: resources, host ports and constraints. Pure: the same snapshot and
/// random source give the same answer, so the cluster scheduler and the tests use it as it is.
public enum Placer {
    /// Places up to `count` new instances of `definition`, one at a time, each decision seeing the
    /// ones before it (so `UNIQUE` and `MAX_PER` hold within one batch too). For many apps over one
    /// snapshot, build a `PlacementState` once and place through it.
    public static func place<Generator: RandomNumberGenerator>(
        _ definition: AppDefinition, count: Int, in snapshot: ClusterSnapshot, using generator: inout Generator
    ) -> PlacementResult {
        var state = PlacementState(snapshot)
        return state.place(definition, count: count, using: &generator)
    }

    struct Rejection: Error {
        var reason: PlacementRejection
        var detail: String
        /// Whether the node may fit later in the same batch (a `GROUP_BY` that others catch up with).
        var mayClear = false
    }

    static func evaluate<Generator: RandomNumberGenerator>(
        _ definition: AppDefinition, on node: NodeInfo, usage: NodeUsage, context: ConstraintEvaluator.Context,
        using generator: inout Generator
    ) -> Result<[Int], Rejection> {        let epsilon = 1e-9
        if !node.drivers.contains(definition.driver) {
            // Marathon has no word for it; a node without the runtime is a constraint the app cannot meet there.
            return .failure(
                Rejection(
                    reason: .unfulfilledConstraint,
                    detail: "has no '\(definition.driver)' driver (it has \(node.drivers.joined(separator: ", ")))"))
        }
        if usage.cpus + definition.cpus > node.cpus + epsilon {
            return .failure(
                Rejection(
                    reason: .insufficientCpus,
                    detail: "needs \(definition.cpus) cpus, \(format(node.cpus - usage.cpus)) of \(format(node.cpus)) free"))
        }
        if usage.mem + definition.mem > node.mem + epsilon {
            return .failure(
                Rejection(
                    reason: .insufficientMemory,
                    detail: "needs \(format(definition.mem)) MiB of memory, \(format(node.mem - usage.mem)) of \(format(node.mem)) MiB free"))
        }
        if usage.disk + definition.disk > node.disk + epsilon {
            return .failure(
                Rejection(
                    reason: .insufficientDisk,
                    detail: "needs \(format(definition.disk)) MiB of disk, \(format(node.disk - usage.disk)) MiB free"))
        }
        if let problem = context.violation(on: node) {
            return .failure(Rejection(reason: .unfulfilledConstraint, detail: problem.detail, mayClear: problem.mayClear))
        }
        guard let ports = allocatePorts(for: definition, on: node, inUse: usage.ports, using: &generator) else {
            let wanted = definition.ports.contains(where: { $0.hostPort != 0 })
                ? "ports \(definition.ports.map { String($0.hostPort) }.joined(separator: ","))"
                : "\(definition.ports.count) port(s)"
            return .failure(
                Rejection(reason: .insufficientPorts, detail: "needs \(wanted) from \(node.portRangeStart)-\(node.portRangeEnd)"))
        }
        return .success(ports)
    }

    /// Host ports for each port definition: the exact port with `requirePorts`, otherwise free ports
    /// drawn at random from the node's range (random so a port just released is unlikely to be reused
    /// while clients still remember it).
    static func allocatePorts<Generator: RandomNumberGenerator>(
        for definition: AppDefinition, on node: NodeInfo, inUse: Set<Int>, using generator: inout Generator
    ) -> [Int]? {
        var taken = inUse
        var ports: [Int] = []
        let range = node.portRange
        for port in definition.ports {
            if port.hostPort != 0 {
                guard !taken.contains(port.hostPort) else { return nil }
                ports.append(port.hostPort)
                taken.insert(port.hostPort)
                continue
            }
            let free = range.count - taken.lazy.filter { range.contains($0) }.count
            guard free > 0 else { return nil }
            // Random probes first; fall back to a scan when the range is nearly full.
            var chosen: Int?
            for _ in 0..<16 {
                let candidate = Int.random(in: range, using: &generator)
                if !taken.contains(candidate) {
                    chosen = candidate
                    break
                }
            }
            if chosen == nil { chosen = range.first { !taken.contains($0) } }
            guard let port = chosen else { return nil }
            ports.append(port)
            taken.insert(port)
        }
        return ports
    }

    /// A binary min-heap of node positions. The order is read through `less`, which looks at the
    /// batch's current usage: only a node outside the heap changes, so the heap stays valid.
    struct NodeHeap {
        var items: [Int] = []

        init() {}

        /// A heap of `items` in O(n) (Floyd's construction).
        init(items: [Int], by less: (Int, Int) -> Bool) {
            self.items = items
            var parent = items.count / 2 - 1
            while parent >= 0 {
                siftDown(from: parent, by: less)
                parent -= 1
            }
        }

        private mutating func siftDown(from start: Int, by less: (Int, Int) -> Bool) {
            var parent = start
            while true {
                let left = 2 * parent + 1, right = left + 1
                var smallest = parent
                if left < items.count && less(items[left], items[smallest]) { smallest = left }
                if right < items.count && less(items[right], items[smallest]) { smallest = right }
                if smallest == parent { return }
                items.swapAt(parent, smallest)
                parent = smallest
            }
        }

        mutating func push(_ item: Int, by less: (Int, Int) -> Bool) {
            items.append(item)
            var child = items.count - 1
            while child > 0 {
                let parent = (child - 1) / 2
                guard less(items[child], items[parent]) else { break }
                items.swapAt(child, parent)
                child = parent
            }
        }

        mutating func pop(by less: (Int, Int) -> Bool) -> Int? {
            guard let first = items.first else { return nil }
            let last = items.removeLast()
            guard !items.isEmpty else { return first }
            items[0] = last
            siftDown(from: 0, by: less)
            return first
        }
    }

    /// `64`, `0.25`: resource amounts as people write them.
    static func format(_ value: Double) -> String {
        if value.rounded() == value { return "\(Int(value))" }
        return "\((value * 100).rounded() / 100)"
    }
}

/// A snapshot indexed for placement: each node's usage and each app's instances per node, built in
/// one pass and kept current as placements are made, so placing costs O(log n) per instance on n
/// nodes however many instances and apps the cluster holds.
public struct PlacementState {
    public let nodes: [NodeInfo]
    private var position: [String: Int] = [:]
    private var usage: [NodeUsage]
    /// Per app, how many of its instances meant to keep running sit on each node (by position).
    private var siblings: [AppID: [Int: Int]] = [:]
    /// Each node once (the first of a name), by position.
    private var distinct: [Int] = []
    /// The values nodes have for a field `GROUP_BY` reads, read once per snapshot.
    private var knownValues: [String: Set<String>] = [:]

    private mutating func fieldValues(_ definition: AppDefinition) -> [String: Set<String>] {
        var wanted: [String: Set<String>] = [:]
        for constraint in definition.constraints where constraint.op == .groupBy {
            if knownValues[constraint.field] == nil {
                knownValues[constraint.field] = Set(nodes.compactMap { $0.value(ofField: constraint.field) })
            }
            wanted[constraint.field] = knownValues[constraint.field]
        }
        return wanted
    }

    public init(_ snapshot: ClusterSnapshot) {
        nodes = snapshot.nodes
        usage = [NodeUsage](repeating: NodeUsage(), count: nodes.count)
        position.reserveCapacity(nodes.count)
        for (index, node) in nodes.enumerated() where position[node.name] == nil {
            position[node.name] = index
            distinct.append(index)
        }
        for instance in snapshot.instances where !instance.state.isTerminal {
            guard let index = position[instance.spec.node] else { continue }
            usage[index].add(instance.spec.definition, ports: instance.spec.ports)
            if instance.spec.goal == .run { siblings[instance.spec.appID, default: [:]][index, default: 0] += 1 }
        }
    }

    /// An instance was asked to stop: it still holds its resources until it ends, but no longer
    /// counts for its app's constraints and spreading.
    public mutating func stopping(_ spec: InstanceSpec) {
        guard let index = position[spec.node], let count = siblings[spec.appID]?[index], count > 0 else { return }
        siblings[spec.appID]![index] = count - 1
    }

    /// Nodes are tried in order — fewest of this app's instances first, then the most free memory,
    /// then by name — from a heap. A node rejected for a reason that can only get worse within the
    /// batch (resources, ports, drivers, every constraint but `GROUP_BY`) is not tried again; one
    /// rejected by `GROUP_BY` is tried again after the next placement.
    public mutating func place<Generator: RandomNumberGenerator>(
        _ definition: AppDefinition, count: Int, using generator: inout Generator
    ) -> PlacementResult {
        let nodes = self.nodes
        var appSiblings = [Int](repeating: 0, count: nodes.count)
        var context = ConstraintEvaluator.Context(constraints: definition.constraints, nodes: nodes, fieldValues: fieldValues(definition))
        for (index, number) in siblings[definition.id] ?? [:] where number > 0 {
            appSiblings[index] = number
            for _ in 0..<number { context.add(siblingOn: nodes[index]) }
        }
        func less(_ lhs: Int, _ rhs: Int) -> Bool {
            if appSiblings[lhs] != appSiblings[rhs] { return appSiblings[lhs] < appSiblings[rhs] }
            let lhsFree = nodes[lhs].mem - usage[lhs].mem
            let rhsFree = nodes[rhs].mem - usage[rhs].mem
            return lhsFree != rhsFree ? lhsFree > rhsFree : nodes[lhs].name < nodes[rhs].name
        }
        var candidates = Placer.NodeHeap(items: distinct, by: less)

        var placements: [Placement] = []
        var rejections: [PlacementRejection: Int] = [:]
        var explanation: String?
        if nodes.isEmpty && count > 0 {
            rejections[.noNodes, default: 0] += 1
            explanation = "no node is registered"
        }
        for _ in 0..<count {
            var chosen: (index: Int, ports: [Int])?
            var retryLater: [Int] = []
            while let index = candidates.pop(by: less) {
                switch Placer.evaluate(definition, on: nodes[index], usage: usage[index], context: context, using: &generator) {
                case .success(let ports):
                    chosen = (index, ports)
                case .failure(let rejection):
                    rejections[rejection.reason, default: 0] += 1
                    explanation = explanation ?? "node \(nodes[index].name): \(rejection.detail)"
                    if rejection.mayClear { retryLater.append(index) }
                }
                if chosen != nil { break }
            }
            guard let (index, ports) = chosen else { break }
            placements.append(Placement(node: nodes[index], ports: ports))
            usage[index].add(definition, ports: ports)
            appSiblings[index] += 1
            context.add(siblingOn: nodes[index])
            candidates.push(index, by: less)
            for waiting in retryLater { candidates.push(waiting, by: less) }
        }
        for placement in placements { siblings[definition.id, default: [:]][position[placement.node.name]!, default: 0] += 1 }
        let unplaced = count - placements.count
        return PlacementResult(
            placements: placements, unplaced: unplaced, rejections: unplaced > 0 ? rejections : [:],
            explanation: unplaced > 0 ? explanation : nil)
    }
}

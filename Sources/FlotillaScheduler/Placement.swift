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
    /// ones before it (so `UNIQUE` and `MAX_PER` hold within one batch too).
    public static func place<Generator: RandomNumberGenerator>(
        _ definition: AppDefinition, count: Int, in snapshot: ClusterSnapshot, using generator: inout Generator
    ) -> PlacementResult {
        var usage = Dictionary(uniqueKeysWithValues: snapshot.nodes.map { ($0.name, NodeUsage(node: $0, instances: snapshot.instances)) })
        // The app's instances that count for constraints: those meant to keep running.
        var siblingNodes: [String] = snapshot.liveInstances
            .filter { $0.spec.appID == definition.id && $0.spec.goal == .run }
            .map(\.spec.node)
        var placements: [Placement] = []
        var rejections: [PlacementRejection: Int] = [:]
        var explanation: String?

        for _ in 0..<count {
            var chosen: Placement?
            if snapshot.nodes.isEmpty {
                rejections[.noNodes, default: 0] += 1
                explanation = explanation ?? "no node is registered"
            }
            // Spread: try nodes with the fewest of this app's instances first, then the most free memory.
            let ordered = snapshot.nodes.sorted { lhs, rhs in
                let lhsCount = siblingNodes.filter { $0 == lhs.name }.count
                let rhsCount = siblingNodes.filter { $0 == rhs.name }.count
                if lhsCount != rhsCount { return lhsCount < rhsCount }
                let lhsFree = lhs.mem - (usage[lhs.name]?.mem ?? 0)
                let rhsFree = rhs.mem - (usage[rhs.name]?.mem ?? 0)
                return lhsFree != rhsFree ? lhsFree > rhsFree : lhs.name < rhs.name
            }
            for node in ordered {
                let used = usage[node.name]!
                switch evaluate(definition, on: node, usage: used, siblingNodes: siblingNodes, nodes: snapshot.nodes, using: &generator) {
                case .success(let ports):
                    chosen = Placement(node: node, ports: ports)
                case .failure(let rejection):
                    rejections[rejection.reason, default: 0] += 1
                    explanation = explanation ?? "node \(node.name): \(rejection.detail)"
                }
                if chosen != nil { break }
            }
            guard let placement = chosen else { break }
            placements.append(placement)
            usage[placement.node.name]!.add(definition, ports: placement.ports)
            siblingNodes.append(placement.node.name)
        }
        let unplaced = count - placements.count
        return PlacementResult(
            placements: placements, unplaced: unplaced, rejections: unplaced > 0 ? rejections : [:],
            explanation: unplaced > 0 ? explanation : nil)
    }

    struct Rejection: Error {
        var reason: PlacementRejection
        var detail: String
    }

    static func evaluate<Generator: RandomNumberGenerator>(
        _ definition: AppDefinition, on node: NodeInfo, usage: NodeUsage, siblingNodes: [String], nodes: [NodeInfo],
        using generator: inout Generator
    ) -> Result<[Int], Rejection> {
        let epsilon = 1e-9
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
        for constraint in definition.constraints {
            if let problem = ConstraintEvaluator.violation(of: constraint, on: node, siblingNodes: siblingNodes, nodes: nodes) {
                return .failure(Rejection(reason: .unfulfilledConstraint, detail: problem))
            }
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

    /// `64`, `0.25`: resource amounts as people write them.
    static func format(_ value: Double) -> String {
        if value.rounded() == value { return "\(Int(value))" }
        return "\((value * 100).rounded() / 100)"
    }
}

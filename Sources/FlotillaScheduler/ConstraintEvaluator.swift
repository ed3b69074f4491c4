public import FlotillaCore
import Foundation

/// Marathon's constraint operators over node fields and the app's other instances.
public enum ConstraintEvaluator {
    /// Why placing one more instance on `node` would break `constraint`, or nil when it would not.
    /// - Parameters:
    ///   - siblingNodes: the node name of each of the app's instances already placed (one entry each).
    ///   - nodes: every node, to read the field values of the siblings' nodes.
    public static func violation(of constraint: Constraint, on node: NodeInfo, siblingNodes: [String], nodes: [NodeInfo]) -> String? {
        var context = Context(constraints: [constraint], nodes: nodes)
        let byName = Dictionary(nodes.map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first })
        for sibling in siblingNodes {
            if let siblingNode = byName[sibling] { context.add(siblingOn: siblingNode) }
        }
        return context.violation(of: 0, on: node)?.detail
    }

    /// What the constraints of one app need to know about its instances, kept up to date as a batch
    /// places them, so each check costs O(1) whatever the number of nodes: per constrained field,
    /// how many of the app's instances sit on each value (and for `GROUP_BY`, the emptiest group's
    /// size, kept by a histogram of group sizes); the first value `CLUSTER` fixed; compiled patterns.
    public struct Context {
        let constraints: [Constraint]
        private var counts: [String: [String: Int]] = [:]
        private var firstValue: [String: String] = [:]
        /// GROUP_BY fields: how many groups have each size, and the smallest size.
        private var groupSizes: [String: [Int: Int]] = [:]
        private var groupMinimum: [String: Int] = [:]
        private let patterns: [Int: NSRegularExpression]

        /// - Parameter fieldValues: the values nodes have for each `GROUP_BY` field, when known
        ///   already (read from `nodes` otherwise).
        public init(constraints: [Constraint], nodes: [NodeInfo], fieldValues: [String: Set<String>] = [:]) {
            self.constraints = constraints
            var patterns: [Int: NSRegularExpression] = [:]
            for (index, constraint) in constraints.enumerated() where constraint.op == .like || constraint.op == .unlike {
                if let value = constraint.value, let expression = try? NSRegularExpression(pattern: "^(?:\(value))$") { patterns[index] = expression }
            }
            self.patterns = patterns
            for field in Set(constraints.filter { $0.op == .groupBy }.map(\.field)) {
                let known = fieldValues[field] ?? Set(nodes.compactMap { $0.value(ofField: field) })
                counts[field] = [:]  // a value not there has none yet
                groupSizes[field] = known.isEmpty ? [:] : [0: known.count]
                groupMinimum[field] = 0
            }
            for field in Set(constraints.filter { $0.op != .groupBy }.map(\.field)) where counts[field] == nil { counts[field] = [:] }
        }

        /// One more of the app's instances, on `node`.
        public mutating func add(siblingOn node: NodeInfo) {
            for field in counts.keys {
                guard let value = node.value(ofField: field) else { continue }
                let before = counts[field]?[value] ?? 0
                counts[field, default: [:]][value] = before + 1
                if firstValue[field] == nil { firstValue[field] = value }
                guard var sizes = groupSizes[field] else { continue }
                sizes[before, default: 0] -= 1
                if sizes[before] == 0 { sizes[before] = nil }
                sizes[before + 1, default: 0] += 1
                groupSizes[field] = sizes
                groupMinimum[field] = sizes.keys.min() ?? 0
            }
        }

        /// Whether a violation can go away later in the same batch (only `GROUP_BY`'s can: the
        /// other groups fill up); the others only get worse as instances are added.
        public struct Violation: Sendable {
            public var detail: String
            public var mayClear: Bool
        }

        /// The first constraint `node` breaks, or nil.
        public func violation(on node: NodeInfo) -> Violation? {
            for index in constraints.indices {
                if let problem = violation(of: index, on: node) { return problem }
            }
            return nil
        }

        func violation(of index: Int, on node: NodeInfo) -> Violation? {
            let constraint = constraints[index]
            let field = constraint.field
            let value = node.value(ofField: field)
            func fails(_ detail: String, mayClear: Bool = false) -> Violation { Violation(detail: detail, mayClear: mayClear) }
            switch constraint.op {
            case .unique:
                guard let value else { return fails("has no attribute '\(field)'") }
                return (counts[field]?[value] ?? 0) > 0 ? fails("\(field)=\(value) already runs an instance (UNIQUE)") : nil
            case .cluster:
                guard let value else { return fails("has no attribute '\(field)'") }
                if let wanted = constraint.value {
                    return value == wanted ? nil : fails("\(field) is '\(value)', not '\(wanted)' (CLUSTER)")
                }
                if let first = firstValue[field], first != value {
                    return fails("\(field) is '\(value)', the app runs on '\(first)' (CLUSTER)")
                }
                return nil
            case .groupBy:
                guard let value else { return fails("has no attribute '\(field)'") }
                // Even spread: a group may not get ahead of the emptiest group among the known values.
                return (counts[field]?[value] ?? 0) > (groupMinimum[field] ?? 0)
                    ? fails("\(field)=\(value) already has more instances than another group (GROUP_BY)", mayClear: true) : nil
            case .like:
                guard let value else { return fails("has no attribute '\(field)'") }
                return matches(index, value) ? nil : fails("\(field) '\(value)' does not match '\(constraint.value ?? "")' (LIKE)")
            case .unlike:
                guard let value else { return nil }
                return matches(index, value) ? fails("\(field) '\(value)' matches '\(constraint.value ?? "")' (UNLIKE)") : nil
            case .maxPer:
                guard let value else { return fails("has no attribute '\(field)'") }
                let limit = Int(constraint.value ?? "") ?? 0
                let count = counts[field]?[value] ?? 0
                return count >= limit ? fails("\(field)=\(value) already runs \(count) of at most \(limit) instances (MAX_PER)") : nil
            case .is:
                guard let value else { return fails("has no attribute '\(field)'") }
                return value == constraint.value ? nil : fails("\(field) is '\(value)', not '\(constraint.value ?? "")' (IS)")
            }
        }

        private func matches(_ index: Int, _ candidate: String) -> Bool {
            guard let expression = patterns[index] else { return false }
            return expression.firstMatch(in: candidate, range: NSRange(candidate.startIndex..., in: candidate)) != nil
        }
    }
}

public import FlotillaCore

/// Marathon's constraint operators over node fields and the app's other instances.
public enum ConstraintEvaluator {
    /// Why placing one more instance on `node` would break `constraint`, or nil when it would not.
    /// - Parameters:
    ///   - siblingNodes: the node name of each of the app's instances already placed (one entry each).
    ///   - nodes: every node, to read the field values of the siblings' nodes.
    public static func violation(of constraint: Constraint, on node: NodeInfo, siblingNodes: [String], nodes: [NodeInfo]) -> String? {
        let value = node.value(ofField: constraint.field)
        let nodesByName = Dictionary(nodes.map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first })
        let siblingValues = siblingNodes.map { nodesByName[$0]?.value(ofField: constraint.field) }
        let field = constraint.field
        switch constraint.op {
        case .unique:
            guard let value else { return "has no attribute '\(field)'" }
            return siblingValues.contains(value) ? "\(field)=\(value) already runs an instance (UNIQUE)" : nil
        case .cluster:
            guard let value else { return "has no attribute '\(field)'" }
            if let wanted = constraint.value {
                return value == wanted ? nil : "\(field) is '\(value)', not '\(wanted)' (CLUSTER)"
            }
            if let first = siblingValues.compactMap({ $0 }).first, first != value {
                return "\(field) is '\(value)', the app runs on '\(first)' (CLUSTER)"
            }
            return nil
        case .groupBy:
            guard let value else { return "has no attribute '\(field)'" }
            // Even spread: a group may not get ahead of the emptiest group among the known values.
            var counts: [String: Int] = [:]
            for node in nodes {
                if let nodeValue = node.value(ofField: field) { counts[nodeValue] = 0 }
            }
            for siblingValue in siblingValues.compactMap({ $0 }) { counts[siblingValue, default: 0] += 1 }
            let minimum = counts.values.min() ?? 0
            return (counts[value] ?? 0) > minimum ? "\(field)=\(value) already has more instances than another group (GROUP_BY)" : nil
        case .like:
            guard let value else { return "has no attribute '\(field)'" }
            return constraint.fullyMatches(value) ? nil : "\(field) '\(value)' does not match '\(constraint.value ?? "")' (LIKE)"
        case .unlike:
            guard let value else { return nil }
            return constraint.fullyMatches(value) ? "\(field) '\(value)' matches '\(constraint.value ?? "")' (UNLIKE)" : nil
        case .maxPer:
            guard let value else { return "has no attribute '\(field)'" }
            let limit = Int(constraint.value ?? "") ?? 0
            let count = siblingValues.filter { $0 == value }.count
            return count >= limit ? "\(field)=\(value) already runs \(count) of at most \(limit) instances (MAX_PER)" : nil
        case .is:
            guard let value else { return "has no attribute '\(field)'" }
            return value == constraint.value ? nil : "\(field) is '\(value)', not '\(constraint.value ?? "")' (IS)"
        }
    }
}

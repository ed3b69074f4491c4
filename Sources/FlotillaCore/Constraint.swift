import Foundation

/// A placement rule, Marathon's `[field, OPERATOR, value?]`.
public struct Constraint: Sendable, Hashable, Codable, CustomStringConvertible {
    public enum Operator: String, Sendable, Hashable, Codable, CaseIterable {
        case unique = "UNIQUE", cluster = "CLUSTER", groupBy = "GROUP_BY", like = "LIKE", unlike = "UNLIKE"
        case maxPer = "MAX_PER", `is` = "IS"
    }

    /// `hostname` or the name of a node attribute.
    public var field: String
    public var op: Operator
    public var value: String?

    public init(field: String, op: Operator, value: String? = nil) {
        self.field = field
        self.op = op
        self.value = value
    }

    public init(from decoder: any Decoder) throws {
        var container = try decoder.unkeyedContainer()
        let parts = try (0..<(container.count ?? 0)).map { _ in try container.decode(String.self) }
        guard parts.count == 2 || parts.count == 3 else {
            throw DecodingError.dataCorrupted(
                .init(codingPath: decoder.codingPath, debugDescription: "a constraint is [field, OPERATOR] or [field, OPERATOR, value]"))
        }
        guard let op = Operator(rawValue: parts[1].uppercased()) else {
            throw DecodingError.dataCorrupted(
                .init(
                    codingPath: decoder.codingPath,
                    debugDescription: "unknown operator '\(parts[1])'; use one of \(Operator.allCases.map(\.rawValue).joined(separator: ", "))"))
        }
        self.init(field: parts[0], op: op, value: parts.count == 3 ? parts[2] : nil)
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.unkeyedContainer()
        try container.encode(field)
        try container.encode(op.rawValue)
        if let value { try container.encode(value) }
    }

    public var description: String { "[\(field), \(op.rawValue)\(value.map { ", \($0)" } ?? "")]" }

    /// Why the constraint cannot be used, or nil when it can.
    public var problem: String? {
        if field.isEmpty { return "the field is empty" }
        switch op {
        case .unique:
            return value == nil ? nil : "UNIQUE does not accept a value"
        case .cluster, .groupBy:
            if op == .groupBy, let value, Int(value) == nil { return "GROUP_BY takes an optional number of groups" }
            return nil
        case .like, .unlike:
            guard let value else { return "\(op.rawValue) needs a regular expression" }
            do {
                _ = try NSRegularExpression(pattern: value)
                return nil
            } catch {
                return "'\(value)' is not a valid regular expression"
            }
        case .maxPer:
            guard let value, let count = Int(value), count > 0 else { return "MAX_PER needs a positive number" }
            return nil
        case .is:
            return value == nil ? "IS needs a value" : nil
        }
    }

    /// Whether `candidate` fully matches the regular expression in `value` (Marathon anchors LIKE and UNLIKE).
    public func fullyMatches(_ candidate: String) -> Bool {
        guard let value, let expression = try? NSRegularExpression(pattern: "^(?:\(value))$") else { return false }
        let range = NSRange(candidate.startIndex..., in: candidate)
        return expression.firstMatch(in: candidate, range: range) != nil
    }
}

public import FlotillaCore
import Foundation

/// What a rule allows on the paths it matches (Vault's capabilities).
public enum Capability: String, Sendable, Hashable, CaseIterable, Codable {
    case create, read, update, patch, delete, list, sudo, deny
}

/// One rule: a path pattern and its capabilities. Patterns are Vault's: a trailing `*` matches
/// any rest (a prefix), `+` matches exactly one path segment.
public struct PolicyRule: Sendable, Hashable {
    public let pattern: String
    public var capabilities: Set<Capability>
    let isPrefix: Bool
    /// The pattern's segments (without a trailing `*`), split once.
    let patternSegments: [Substring]

    public init(pattern: String, capabilities: Set<Capability>) {
        self.pattern = pattern
        self.capabilities = capabilities
        isPrefix = pattern.hasSuffix("*")
        patternSegments = (isPrefix ? pattern.dropLast() : Substring(pattern)).split(separator: "/", omittingEmptySubsequences: false)
    }

    var body: Substring { isPrefix ? pattern.dropLast() : Substring(pattern) }

    func matches(_ path: String) -> Bool {
        matches(segments: path.split(separator: "/", omittingEmptySubsequences: false))
    }

    func matches(segments pathSegments: [Substring]) -> Bool {
        if isPrefix {
            // Every segment but the last must match whole; the last is a prefix of the path's.
            guard pathSegments.count >= patternSegments.count else { return false }
            for (index, segment) in patternSegments.enumerated() {
                let candidate = pathSegments[index]
                if index == patternSegments.count - 1 {
                    if segment == "+" { continue }
                    // The rest of the path after this segment's start must begin with it.
                    let rest = pathSegments[index...].joined(separator: "/")
                    return rest.hasPrefix(segment)
                }
                if segment != "+" && segment != candidate { return false }
            }
            return true
        }
        guard patternSegments.count == pathSegments.count else { return false }
        return zip(patternSegments, pathSegments).allSatisfy { $0 == "+" || $0 == $1 }
    }

    /// Vault's priority between two matching patterns: true when `self` ranks lower than `other`.
    func ranksBelow(_ other: PolicyRule) -> Bool {
        func firstWildcard(_ text: String) -> Int {
            let plus = text.firstIndex(of: "+").map { text.distance(from: text.startIndex, to: $0) } ?? Int.max
            let star = text.hasSuffix("*") ? text.count - 1 : Int.max
            return min(plus, star)
        }
        let mine = firstWildcard(pattern), theirs = firstWildcard(other.pattern)
        if mine != theirs { return mine < theirs }
        if isPrefix != other.isPrefix { return isPrefix }
        let myPluses = pattern.filter { $0 == "+" }.count, theirPluses = other.pattern.filter { $0 == "+" }.count
        if myPluses != theirPluses { return myPluses > theirPluses }
        if pattern.count != other.pattern.count { return pattern.count < other.pattern.count }
        return pattern < other.pattern
    }
}

/// A named policy: the source text (Vault's HCL or JSON) and its rules.
public struct Policy: Sendable, Hashable {
    public var name: String
    public var text: String
    public var rules: [PolicyRule]

    /// Vault's `root`: everything.
    public static let root = Policy(name: "root", text: "", rules: [PolicyRule(pattern: "*", capabilities: [.create, .read, .update, .patch, .delete, .list, .sudo])])

    public init(name: String, text: String, rules: [PolicyRule]) {
        self.name = name
        self.text = text
        self.rules = rules
    }

    /// Parses Vault's policy syntax, in HCL or JSON:
    ///
    ///     path "secret/data/shop/*" { capabilities = ["read", "list"] }
    ///     path "marathon/apps/shop/*" { capabilities = ["read", "update"] }
    ///
    /// and Consul's rules beside them, mapped onto paths under `consul/`:
    ///
    ///     key_prefix "shop/" { policy = "read" }        # consul/kv/shop/*
    ///     service_prefix "" { policy = "write" }        # consul/service/*
    ///     node "n1" { policy = "read" }                 # consul/node/n1
    public init(name: String, text: String) throws(FlotillaError) {
        self.name = name
        self.text = text
        let blocks: [(kind: String, label: String, fields: [String: JSONValue])]
        let trimmed = text.trimmingCharacters(in: .whitespacesAndNewlines)
        if trimmed.hasPrefix("{") {
            blocks = try Self.jsonBlocks(trimmed)
        } else {
            blocks = try PolicyHCL.parse(text)
        }
        var rules: [PolicyRule] = []
        for block in blocks {
            rules.append(try Self.rule(kind: block.kind, label: block.label, fields: block.fields))
        }
        self.rules = rules
    }

    static let consulKinds: [String: (prefix: String, exact: Bool)] = [
        "key_prefix": ("consul/kv/", false), "key": ("consul/kv/", true),
        "service_prefix": ("consul/service/", false), "service": ("consul/service/", true),
        "node_prefix": ("consul/node/", false), "node": ("consul/node/", true),
        "session_prefix": ("consul/session/", false), "event_prefix": ("consul/event/", false),
    ]

    static func rule(kind: String, label: String, fields: [String: JSONValue]) throws(FlotillaError) -> PolicyRule {
        if kind == "path" {
            guard case .array(let values)? = fields["capabilities"] else {
                throw .badRequest("path \"\(label)\" needs capabilities = [...]")
            }
            var capabilities: Set<Capability> = []
            for value in values {
                guard let name = value.stringValue, let capability = Capability(rawValue: name.lowercased()) else {
                    throw .badRequest("path \"\(label)\": unknown capability \(value); use \(Capability.allCases.map(\.rawValue).joined(separator: ", "))")
                }
                capabilities.insert(capability)
            }
            let pattern = label.hasPrefix("/") ? String(label.dropFirst()) : label
            if pattern.dropLast().contains("*") { throw .badRequest("path \"\(label)\": '*' may only end a path") }
            return PolicyRule(pattern: pattern, capabilities: capabilities)
        }
        guard let (prefix, exact) = consulKinds[kind] else {
            throw .badRequest("unknown policy block '\(kind)'; use path, or Consul's key_prefix, key, service_prefix, service, node_prefix, node")
        }
        guard let level = fields["policy"]?.stringValue?.lowercased() else { throw .badRequest("\(kind) \"\(label)\" needs policy = \"read\"|\"write\"|\"list\"|\"deny\"") }
        let capabilities: Set<Capability>
        switch level {
        case "read": capabilities = [.read, .list]
        case "list": capabilities = [.list]
        case "write": capabilities = [.read, .list, .create, .update, .patch, .delete]
        case "deny": capabilities = [.deny]
        default: throw .badRequest("\(kind) \"\(label)\": policy must be read, write, list or deny, not '\(level)'")
        }
        return PolicyRule(pattern: prefix + label + (exact ? "" : "*"), capabilities: capabilities)
    }

    static func jsonBlocks(_ text: String) throws(FlotillaError) -> [(kind: String, label: String, fields: [String: JSONValue])] {
        guard case .object(let root)? = try? JSONValue.parse(Data(text.utf8)) else { throw .badRequest("the policy is not valid JSON") }
        var blocks: [(kind: String, label: String, fields: [String: JSONValue])] = []
        for (kind, value) in root.sorted(by: { $0.key < $1.key }) {
            guard case .object(let labelled) = value else { throw .badRequest("\(kind) must be an object of \"path\": {...}") }
            for (label, body) in labelled.sorted(by: { $0.key < $1.key }) {
                guard case .object(let fields) = body else { throw .badRequest("\(kind) \"\(label)\" must be an object") }
                blocks.append((kind, label, fields))
            }
        }
        return blocks
    }
}

/// The decision for a set of policies: Vault's rules (the highest-priority matching pattern
/// decides; the capabilities of one pattern in several policies add up; `deny` wins).
public struct PolicySet: Sendable {
    let rules: [PolicyRule]
    /// Rules by their pattern's first segment when it is literal and whole (`secret`, `consul`,
    /// `marathon`), so a request looks only at rules that can match it; the rest always apply.
    let byFirstSegment: [Substring: [PolicyRule]]
    let others: [PolicyRule]

    public init(_ policies: [Policy]) {
        var merged: [String: Set<Capability>] = [:]
        for policy in policies {
            for rule in policy.rules { merged[rule.pattern, default: []].formUnion(rule.capabilities) }
        }
        rules = merged.map { PolicyRule(pattern: $0.key, capabilities: $0.value) }
        var grouped: [Substring: [PolicyRule]] = [:]
        var others: [PolicyRule] = []
        for rule in rules {
            let segments = rule.body.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false)
            // A first segment is whole when a "/" follows it in the pattern.
            if segments.count == 2, let first = segments.first, first != "+" {
                grouped[first, default: []].append(rule)
            } else {
                others.append(rule)
            }
        }
        byFirstSegment = grouped
        self.others = others
    }

    /// The capabilities granted on `path`.
    public func capabilities(on path: String) -> Set<Capability> {
        let segments = path.split(separator: "/", omittingEmptySubsequences: false)
        let candidates = (byFirstSegment[segments.first ?? ""] ?? []) + others
        let matching = candidates.filter { $0.matches(segments: segments) }
        guard let best = matching.max(by: { $0.ranksBelow($1) }) else { return [] }
        return best.capabilities.contains(.deny) ? [.deny] : best.capabilities
    }

    /// Whether any of `needed` is granted on `path` (and nothing denies it).
    public func allows(_ path: String, anyOf needed: Set<Capability>) -> Bool {
        let granted = capabilities(on: path)
        return !granted.contains(.deny) && !granted.isDisjoint(with: needed)
    }
}

/// The HCL Vault and Consul policies are written in: blocks `kind "label" { key = value }` whose
/// values are strings, numbers, booleans or lists of them, with `#`, `//` and `/* */` comments.
enum PolicyHCL {
    static func parse(_ text: String) throws(FlotillaError) -> [(kind: String, label: String, fields: [String: JSONValue])] {
        var tokens = try tokenize(text)[...]
        var blocks: [(kind: String, label: String, fields: [String: JSONValue])] = []
        func next() throws(FlotillaError) -> Token {
            guard let token = tokens.popFirst() else { throw .badRequest("the policy ends in the middle of a block") }
            return token
        }
        while let first = tokens.popFirst() {
            guard case .word(let kind) = first else { throw .badRequest("expected a block such as path \"…\" { … }, found \(first)") }
            guard case .string(let label) = try next() else { throw .badRequest("\(kind) needs a quoted label") }
            guard case .symbol("{") = try next() else { throw .badRequest("\(kind) \"\(label)\" needs { … }") }
            var fields: [String: JSONValue] = [:]
            while true {
                let token = try next()
                if case .symbol("}") = token { break }
                guard case .word(let key) = token else { throw .badRequest("in \(kind) \"\(label)\": expected a field name, found \(token)") }
                guard case .symbol("=") = try next() else { throw .badRequest("in \(kind) \"\(label)\": expected = after \(key)") }
                fields[key] = try value(try next(), &tokens)
            }
            blocks.append((kind, label, fields))
        }
        return blocks
    }

    enum Token: CustomStringConvertible {
        case word(String), string(String), symbol(Character)

        var description: String {
            switch self {
            case .word(let word): return word
            case .string(let string): return "\"\(string)\""
            case .symbol(let symbol): return String(symbol)
            }
        }
    }

    static func value(_ token: Token, _ tokens: inout ArraySlice<Token>) throws(FlotillaError) -> JSONValue {
        switch token {
        case .string(let text): return .string(text)
        case .word("true"): return .bool(true)
        case .word("false"): return .bool(false)
        case .word(let word):
            guard let number = Double(word) else { throw .badRequest("'\(word)' is not a value") }
            return .number(number)
        case .symbol("["):
            // Lists hold plain values: no list inside a list (so hostile nesting cannot recurse).
            var items: [JSONValue] = []
            while let item = tokens.popFirst() {
                switch item {
                case .symbol("]"): return .array(items)
                case .symbol(","): continue
                case .symbol(let symbol): throw .badRequest("unexpected '\(symbol)' in a list")
                default: items.append(try value(item, &tokens))
                }
            }
            throw .badRequest("a list is not closed with ]")
        case .symbol(let symbol):
            throw .badRequest("unexpected '\(symbol)'")
        }
    }

    static func tokenize(_ text: String) throws(FlotillaError) -> [Token] {
        var tokens: [Token] = []
        let characters = Array(text)
        var index = 0
        while index < characters.count {
            let c = characters[index]
            if c.isWhitespace || c == ";" { index += 1; continue }
            if c == "#" || (c == "/" && index + 1 < characters.count && characters[index + 1] == "/") {
                while index < characters.count && characters[index] != "\n" { index += 1 }
                continue
            }
            if c == "/" && index + 1 < characters.count && characters[index + 1] == "*" {
                index += 2
                while index + 1 < characters.count && !(characters[index] == "*" && characters[index + 1] == "/") { index += 1 }
                guard index + 1 < characters.count else { throw .badRequest("a /* comment is not closed") }
                index += 2
                continue
            }
            if "{}[]=,".contains(c) { tokens.append(.symbol(c)); index += 1; continue }
            if c == "\"" {
                var value = ""
                index += 1
                while index < characters.count && characters[index] != "\"" {
                    if characters[index] == "\\" && index + 1 < characters.count {
                        index += 1
                        switch characters[index] {
                        case "n": value.append("\n")
                        case "t": value.append("\t")
                        default: value.append(characters[index])
                        }
                    } else {
                        if characters[index] == "\n" { throw .badRequest("a string runs past the end of its line") }
                        value.append(characters[index])
                    }
                    index += 1
                }
                guard index < characters.count else { throw .badRequest("a string is not closed") }
                index += 1
                tokens.append(.string(value))
                continue
            }
            var word = ""
            while index < characters.count, characters[index].isLetter || characters[index].isNumber || "_-.".contains(characters[index]) {
                word.append(characters[index])
                index += 1
            }
            guard !word.isEmpty else { throw .badRequest("unexpected character '\(c)' in the policy") }
            tokens.append(.word(word))
        }
        return tokens
    }
}

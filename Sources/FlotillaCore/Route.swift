#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Foundation

/// A proxy rule, written as a Fabio-style service tag:
/// `urlprefix-[host]/path [strip=/path] [prepend=/p] [weight=0.N] [proto=http|https|tcp]
/// [tlsskipverify=true] [allow=ip:CIDR,… | deny=ip:CIDR,…] [redirect=CODE,URL]
/// [connecttimeout=DURATION] [readtimeout=DURATION]`, or `urlprefix-:PORT proto=tcp` for a TCP
/// listener. Durations are Go's (`500ms`, `30s`, `2m`).
public struct RouteRule: Sendable, Hashable {
    public enum Proto: String, Sendable, Hashable {
        case http, https, tcp, grpc
    }

    /// Lowercased host without port; empty for routes that match any host.
    public var host: String
    /// The path prefix (`/` at least); empty for TCP routes.
    public var path: String
    public var proto: Proto
    public var strip: String?
    public var prepend: String?
    /// A share of the route's traffic for the instances carrying this tag (0…1), or nil for an
    /// equal share of what is left.
    public var weight: Double?
    /// The listening port of a TCP route.
    public var tcpPort: Int?
    /// How long a connection to an instance may take to open (nil: the proxy's default).
    public var connectTimeout: Duration?
    /// How long an instance may take to start its response once the request is sent (nil: the
    /// proxy's default). Streaming bodies are not cut by it.
    public var readTimeout: Duration?
    /// `proto=https` without checking the instance's certificate (`tlsskipverify=true`).
    public var tlsSkipVerify = false
    /// Who may use the route, by source address (`allow=` or `deny=`).
    public var access: RouteAccess?
    /// Answer every request with this redirect instead of proxying it (`redirect=301,https://…$path`).
    public var redirect: RouteRedirect?

    public init(
        host: String = "", path: String = "/", proto: Proto = .http, strip: String? = nil, prepend: String? = nil, weight: Double? = nil,
        tcpPort: Int? = nil, connectTimeout: Duration? = nil, readTimeout: Duration? = nil
    ) {
        self.host = host
        self.path = path
        self.proto = proto
        self.strip = strip
        self.prepend = prepend
        self.weight = weight
        self.tcpPort = tcpPort
        self.connectTimeout = connectTimeout
        self.readTimeout = readTimeout
    }

    public static let tagPrefix = "urlprefix-"

    /// Parses one tag; nil when the tag is not a route (or is one that cannot work).
    public static func parse(_ tag: String) -> RouteRule? {
        guard tag.hasPrefix(tagPrefix) else { return nil }
        var words = tag.dropFirst(tagPrefix.count).split(separator: " ", omittingEmptySubsequences: true).map(String.init)
        guard !words.isEmpty else { return nil }
        let target = words.removeFirst()
        var rule = RouteRule()
        for word in words {
            let parts = word.split(separator: "=", maxSplits: 1).map(String.init)
            guard parts.count == 2 else { continue }
            switch parts[0] {
            case "strip": rule.strip = parts[1].hasPrefix("/") ? parts[1] : "/" + parts[1]
            case "prepend": rule.prepend = parts[1].hasPrefix("/") ? parts[1] : "/" + parts[1]
            case "proto": guard let proto = Proto(rawValue: parts[1].lowercased()) else { return nil }; rule.proto = proto
            case "weight": guard let weight = Double(parts[1]), weight >= 0, weight <= 1 else { return nil }; rule.weight = weight
            case "host": rule.host = parts[1].lowercased()
            case "allow", "deny":
                // Fabio's rule: with both, allow wins.
                if parts[0] == "deny", rule.access?.mode == .allow { continue }
                rule.access = RouteAccess(mode: parts[0] == "allow" ? .allow : .deny, list: parts[1])
            case "redirect":
                guard let redirect = RouteRedirect(parts[1]) else { return nil }
                rule.redirect = redirect
            case "tlsskipverify":
                guard let skip = Bool(parts[1].lowercased()) else { return nil }
                rule.tlsSkipVerify = skip
            case "connecttimeout", "readtimeout":
                guard let seconds = GoDuration.seconds(parts[1]), seconds > 0, seconds <= 24 * 3600 else { return nil }
                let duration = Duration.milliseconds(Int64((seconds * 1000).rounded(.up)))
                if parts[0] == "connecttimeout" { rule.connectTimeout = duration } else { rule.readTimeout = duration }
            default: continue  // Fabio's other options (auth=, register=, …) are not acted on: see docs/api.md.
            }
        }
        if target.hasPrefix(":") {
            guard let port = Int(target.dropFirst()), (1...65535).contains(port) else { return nil }
            rule.tcpPort = port
            rule.path = ""
            rule.proto = .tcp
            return rule
        }
        guard let slash = target.firstIndex(of: "/") else { return nil }
        let host = target[..<slash].lowercased()
        if !host.isEmpty { rule.host = String(host.split(separator: ":").first ?? "") }
        rule.path = String(target[slash...])
        return rule
    }
}

/// Fabio's `allow=`/`deny=`: `ip:10.0.0.0/8,ip:192.168.1.7` (the `ip:` is optional). A request
/// passes when its connection's address and every address in its `X-Forwarded-For` pass (a
/// forged header can only narrow what a client may do). An entry that is no IP address or network
/// makes the route refuse everyone: a mistyped allow list fails closed.
public struct RouteAccess: Sendable, Hashable {
    public enum Mode: String, Sendable, Hashable { case allow, deny }
    public var mode: Mode
    public var networks: [IPNetwork]
    public var malformed: Bool

    public init(mode: Mode, list: String) {
        self.mode = mode
        var networks: [IPNetwork] = []
        var malformed = false
        for entry in list.split(separator: ",").map({ $0.trimmingCharacters(in: .whitespaces) }) where !entry.isEmpty {
            let text = entry.hasPrefix("ip:") ? String(entry.dropFirst(3)) : entry
            if let network = IPNetwork(text) { networks.append(network) } else { malformed = true }
        }
        self.networks = networks
        self.malformed = malformed || networks.isEmpty
    }

    /// Whether one address passes.
    public func permits(_ address: String) -> Bool {
        guard !malformed, let bytes = IPNetwork.bytes(of: address) else { return false }
        let listed = networks.contains { $0.contains(bytes) }
        return mode == .allow ? listed : !listed
    }
}

/// An IPv4 or IPv6 network (`10.0.0.0/8`, `fd00::/8`, or one address).
public struct IPNetwork: Sendable, Hashable, CustomStringConvertible {
    public let bytes: [UInt8]
    public let prefix: Int

    public init?(_ text: String) {
        let parts = text.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false)
        guard let bytes = Self.bytes(of: String(parts[0])) else { return nil }
        let width = bytes.count * 8
        if parts.count == 2 {
            guard let prefix = Int(parts[1]), (0...width).contains(prefix) else { return nil }
            self.prefix = prefix
        } else {
            prefix = width
        }
        self.bytes = bytes
    }

    public var description: String {
        (bytes.count == 4 ? bytes.map(String.init).joined(separator: ".") : "v6:" + bytes.map { String($0, radix: 16) }.joined(separator: ":")) + "/\(prefix)"
    }

    public func contains(_ address: [UInt8]) -> Bool {
        guard address.count == bytes.count else { return false }
        var remaining = prefix
        for index in bytes.indices where remaining > 0 {
            let bits = min(8, remaining)
            let mask: UInt8 = bits == 8 ? 0xFF : ~(0xFF >> UInt8(bits))
            if address[index] & mask != bytes[index] & mask { return false }
            remaining -= bits
        }
        return true
    }

    /// The 4 or 16 bytes of a textual address (an IPv4-mapped IPv6 address gives its IPv4 bytes).
    public static func bytes(of text: String) -> [UInt8]? {
        let text = text.hasPrefix("[") && text.hasSuffix("]") ? String(text.dropFirst().dropLast()) : text
        var v4 = in_addr()
        if inet_pton(AF_INET, text, &v4) == 1 {
            return withUnsafeBytes(of: &v4) { Array($0) }
        }
        var v6 = in6_addr()
        guard inet_pton(AF_INET6, text, &v6) == 1 else { return nil }
        let bytes = withUnsafeBytes(of: &v6) { Array($0) }
        if bytes[0..<10].allSatisfy({ $0 == 0 }) && bytes[10] == 0xFF && bytes[11] == 0xFF { return Array(bytes[12...]) }
        return bytes
    }
}

/// Fabio's `redirect=CODE,URL`: `$path` in URL becomes the request's path and query.
public struct RouteRedirect: Sendable, Hashable {
    public var status: Int
    public var location: String

    public init?(_ text: String) {
        let parts = text.split(separator: ",", maxSplits: 1).map { $0.trimmingCharacters(in: .whitespaces) }
        guard parts.count == 2, let status = Int(parts[0]), [301, 302, 303, 307, 308].contains(status), !parts[1].isEmpty,
            !parts[1].utf8.contains(where: { $0 < 0x21 || $0 == 0x7F })
        else { return nil }
        self.status = status
        location = parts[1]
    }

    public func location(for path: String) -> String {
        location.replacingOccurrences(of: "$path", with: path)
    }
}

/// One upstream an HTTP or TCP route sends to.
public struct RouteTarget: Sendable, Hashable {
    public var serviceID: String
    public var service: String
    public var host: String
    public var port: Int
    public var weight: Double
    /// The Flotilla app the instance belongs to (nil: a service registered from outside).
    public var app: String?

    public init(serviceID: String, service: String, host: String, port: Int, weight: Double, app: String? = nil) {
        self.serviceID = serviceID
        self.service = service
        self.host = host
        self.port = port
        self.weight = weight
        self.app = app
    }
}

/// A route with where it sends traffic now (empty: known route, nothing healthy — 503).
public struct Route: Sendable, Hashable {
    public var rule: RouteRule
    public var targets: [RouteTarget]
    public var services: [String]
    /// The Flotilla apps whose services declare the route, healthy or not.
    public var apps: [String]

    public init(rule: RouteRule, targets: [RouteTarget], services: [String], apps: [String] = []) {
        self.rule = rule
        self.targets = targets
        self.services = services
        self.apps = apps
    }
}

/// An immutable snapshot of every route, built on each registry change and swapped whole.
public struct RouteTable: Sendable, Hashable {
    public var http: [Route]
    public var tcp: [Int: Route]
    /// The registry index the table reflects.
    public var index: UInt64

    public init(http: [Route], tcp: [Int: Route], index: UInt64) {
        // Host routes first, then the longest path prefix: the first match wins.
        self.http = http.sorted { lhs, rhs in
            if lhs.rule.host.isEmpty != rhs.rule.host.isEmpty { return !lhs.rule.host.isEmpty }
            if lhs.rule.path.count != rhs.rule.path.count { return lhs.rule.path.count > rhs.rule.path.count }
            return (lhs.rule.host, lhs.rule.path) < (rhs.rule.host, rhs.rule.path)
        }
        self.tcp = tcp
        self.index = index
    }

    public static let empty = RouteTable(http: [], tcp: [:], index: 0)

    /// The route for a request, Fabio's way: routes for the request's host first, then routes for
    /// any host, each by longest path prefix.
    public func match(host: String, path: String) -> Route? {
        matchIndex(host: host, path: path).map { http[$0] }
    }

    /// The position in `http` of the route for a request. `path` may carry a query string.
    public func matchIndex(host: String, path: String) -> Int? {
        var bareHost = Substring(host)
        if let colon = bareHost.lastIndex(of: ":"), !bareHost.hasSuffix("]") { bareHost = bareHost[..<colon] }
        let needsLowercase = bareHost.utf8.contains { $0 >= UInt8(ascii: "A") && $0 <= UInt8(ascii: "Z") }
        let hostKey = needsLowercase ? Substring(bareHost.lowercased()) : bareHost
        let pathOnly = path.utf8.firstIndex(of: UInt8(ascii: "?")).map { path[..<$0] } ?? Substring(path)
        for (index, route) in http.enumerated() where route.rule.host.isEmpty || route.rule.host == hostKey {
            if route.rule.path == "/" || pathOnly.hasPrefix(route.rule.path) { return index }
        }
        return nil
    }

    static func pathMatches(_ path: String, prefix: String) -> Bool {
        prefix == "/" || path.hasPrefix(prefix)
    }

    /// The path sent upstream: `strip` removed, `prepend` added.
    public static func upstreamPath(_ path: String, rule: RouteRule) -> String {
        var result = path
        if let strip = rule.strip, result.hasPrefix(strip) {
            result = String(result.dropFirst(strip.count))
            if result.isEmpty || !result.hasPrefix("/") && !result.hasPrefix("?") { result = "/" + result }
            if result.hasPrefix("?") { result = "/" + result }
        }
        if let prepend = rule.prepend {
            result = prepend + (result == "/" ? "" : result)
            if result.isEmpty { result = "/" }
        }
        return result
    }
}

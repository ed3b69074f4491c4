/// A proxy rule, written as a Fabio-style service tag:
/// `urlprefix-[host]/path [strip=/path] [prepend=/p] [weight=0.N] [proto=http|https|tcp]
/// [tlsskipverify=true] [connecttimeout=DURATION] [readtimeout=DURATION]`, or `urlprefix-:PORT proto=tcp` for a TCP
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
            case "tlsskipverify":
                guard let skip = Bool(parts[1].lowercased()) else { return nil }
                rule.tlsSkipVerify = skip
            case "connecttimeout", "readtimeout":
                guard let seconds = GoDuration.seconds(parts[1]), seconds > 0, seconds <= 24 * 3600 else { return nil }
                let duration = Duration.milliseconds(Int64((seconds * 1000).rounded(.up)))
                if parts[0] == "connecttimeout" { rule.connectTimeout = duration } else { rule.readTimeout = duration }
            default: continue  // Options Flotilla does not act on yet (redirect, allow, deny): see docs/api.md.
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

/// One upstream an HTTP or TCP route sends to.
public struct RouteTarget: Sendable, Hashable {
    public var serviceID: String
    public var service: String
    public var host: String
    public var port: Int
    public var weight: Double

    public init(serviceID: String, service: String, host: String, port: Int, weight: Double) {
        self.serviceID = serviceID
        self.service = service
        self.host = host
        self.port = port
        self.weight = weight
    }
}

/// A route with where it sends traffic now (empty: known route, nothing healthy — 503).
public struct Route: Sendable, Hashable {
    public var rule: RouteRule
    public var targets: [RouteTarget]
    public var services: [String]

    public init(rule: RouteRule, targets: [RouteTarget], services: [String]) {
        self.rule = rule
        self.targets = targets
        self.services = services
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

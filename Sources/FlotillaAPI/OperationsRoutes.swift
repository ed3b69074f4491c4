public import FlotillaCore
import Foundation
public import Hummingbird
import NIOCore

/// What operators look at: the proxy's live routes (`/api/routes`, Fabio's path) and the
/// Prometheus metrics (`/metrics`).
public struct OperationsRoutes: Sendable {
    let routes: @Sendable () -> RouteTable
    let metrics: @Sendable () -> [UInt8]

    public init(routes: @escaping @Sendable () -> RouteTable, metrics: @escaping @Sendable () -> [UInt8]) {
        self.routes = routes
        self.metrics = metrics
    }

    public func add<Context: RequestContext>(to router: Router<Context>) {
        router.get("/api/routes") { _, _ in APIResponse.json(Self.render(self.routes())) }
        router.get("/metrics") { _, _ in
            Response(
                status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                body: ResponseBody(byteBuffer: ByteBuffer(bytes: self.metrics())))
        }
    }

    /// One entry per route and target, in the shape Fabio's `/api/routes` uses.
    static func render(_ table: RouteTable) -> JSONValue {
        func milliseconds(_ duration: Duration) -> Int64 {
            duration.components.seconds * 1000 + duration.components.attoseconds / 1_000_000_000_000_000
        }
        var entries: [JSONValue] = []
        func options(_ rule: RouteRule) -> String {
            var parts: [String] = []
            if let strip = rule.strip { parts.append("strip=\(strip)") }
            if let prepend = rule.prepend { parts.append("prepend=\(prepend)") }
            if rule.proto != .http { parts.append("proto=\(rule.proto.rawValue)") }
            if rule.tlsSkipVerify { parts.append("tlsskipverify=true") }
            if let access = rule.access {
                parts.append("\(access.mode.rawValue)=" + (access.malformed ? "invalid" : access.networks.map { "ip:\($0)" }.joined(separator: ",")))
            }
            if let redirect = rule.redirect { parts.append("redirect=\(redirect.status),\(redirect.location)") }
            if let timeout = rule.connectTimeout { parts.append("connecttimeout=\(milliseconds(timeout))ms") }
            if let timeout = rule.readTimeout { parts.append("readtimeout=\(milliseconds(timeout))ms") }
            return parts.joined(separator: " ")
        }
        let all = table.http.map { ($0, $0.rule.host + $0.rule.path) } + table.tcp.sorted { $0.key < $1.key }.map { ($0.value, ":\($0.key)") }
        for (route, source) in all {
            let base: [String: JSONValue] = [
                "service": .string(route.services.joined(separator: ",")), "host": .string(route.rule.host), "path": .string(route.rule.path),
                "src": .string(source), "opts": .string(options(route.rule)), "proto": .string(route.rule.proto.rawValue),
            ]
            if route.targets.isEmpty {
                var entry = base
                entry["dst"] = .null
                entry["weight"] = .number(0)
                entries.append(.object(entry))
            }
            for target in route.targets {
                var entry = base
                entry["service"] = .string(target.service)
                entry["dst"] = .string(route.rule.proto == .tcp ? "\(target.host):\(target.port)" : "\(route.rule.proto == .https ? "https" : "http")://\(target.host):\(target.port)/")
                entry["weight"] = .number(target.weight)
                entries.append(.object(entry))
            }
        }
        return .array(entries)
    }
}

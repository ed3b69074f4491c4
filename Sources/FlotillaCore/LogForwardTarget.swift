import Foundation

/// Where `--log-forward` sends instances' lines: `syslog+udp://HOST[:PORT]` (RFC 5426, one message
/// a datagram) or `syslog+tcp://HOST[:PORT]` (RFC 6587 octet counting); the port defaults to 514.
/// An IPv6 address goes in brackets: `syslog+tcp://[::1]:6514`.
public struct LogForwardTarget: Sendable, Hashable, CustomStringConvertible {
    public enum Transport: String, Sendable, Hashable {
        case udp, tcp
    }

    public var transport: Transport
    public var host: String
    public var port: Int

    public init(transport: Transport, host: String, port: Int = 514) {
        self.transport = transport
        self.host = host
        self.port = port
    }

    public static func parse(_ text: String) throws(FlotillaError) -> LogForwardTarget {
        let usage = "give syslog+udp://HOST[:PORT] or syslog+tcp://HOST[:PORT], got '\(text)'"
        guard let separator = text.range(of: "://") else { throw .badRequest(usage) }
        guard let transport = Self.transports[text[..<separator.lowerBound].lowercased()] else {
            throw .badRequest("unknown log forwarding scheme '\(text[..<separator.lowerBound])': \(usage)")
        }
        var rest = text[separator.upperBound...]
        if rest.hasSuffix("/") { rest = rest.dropLast() }
        guard !rest.isEmpty, !rest.contains("/"), !rest.contains("@"), !rest.contains("?") else { throw .badRequest(usage) }
        var host: Substring
        var portText: Substring?
        if rest.hasPrefix("[") {
            guard let close = rest.firstIndex(of: "]") else { throw .badRequest("an IPv6 address needs its closing ']': \(usage)") }
            host = rest[rest.index(after: rest.startIndex)..<close]
            let after = rest[rest.index(after: close)...]
            if !after.isEmpty {
                guard after.hasPrefix(":") else { throw .badRequest(usage) }
                portText = after.dropFirst()
            }
        } else if let colon = rest.lastIndex(of: ":") {
            host = rest[..<colon]
            portText = rest[rest.index(after: colon)...]
        } else {
            host = rest
        }
        guard !host.isEmpty else { throw .badRequest("no host: \(usage)") }
        var port = 514
        if let portText {
            guard let parsed = Int(portText), (1...65535).contains(parsed) else {
                throw .badRequest("the port must be between 1 and 65535, got '\(portText)': \(usage)")
            }
            port = parsed
        }
        return LogForwardTarget(transport: transport, host: String(host), port: port)
    }

    static let transports: [String: Transport] = ["syslog+udp": .udp, "syslog+tcp": .tcp]

    public var description: String {
        "syslog+\(transport.rawValue)://\(host.contains(":") ? "[\(host)]" : host):\(port)"
    }
}

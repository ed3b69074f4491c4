public import FlotillaCore
import Foundation

/// Reads the body of `PUT /v1/agent/service/register` as Consul does: field names in any case,
/// `Check` or `Checks`, TTL / HTTP / TCP checks with Go durations.
public enum ServiceRegistration {
    /// Fields of a registration beyond the ones read here: kept by Consul, accepted and ignored here
    /// (documented in docs/api.md).
    static let ignoredFields: Set<String> = [
        "enabletagoverride", "enable_tag_override", "weights", "taggedaddresses", "tagged_addresses", "namespace", "partition", "token",
        "locality",
    ]
    /// What a registration may hold: the service's own fields and the flat form of one check.
    static let serviceFields: Set<String> = [
        "name", "id", "tags", "address", "port", "meta", "check", "checks", "kind", "proxy", "connect", "socketpath",
        "ttl", "http", "tcp", "args", "script", "interval", "timeout", "notes", "status", "deregistercriticalserviceafter",
    ]

    public static func parse(_ body: [String: JSONValue], node: String, address defaultAddress: String) throws(FlotillaError) -> ExternalService {
        let fields = lowercased(body)
        if let unknown = fields.keys.sorted().first(where: { !serviceFields.contains($0) && !ignoredFields.contains($0) }) {
            throw .badRequest("Request decode failed: json: unknown field \"\(unknown)\"")
        }
        if let kind = fields["kind"]?.stringValue, !kind.isEmpty {
            throw .badRequest("Kind '\(kind)' is not supported: Connect proxies and gateways are not available here")
        }
        for connect in ["proxy", "connect", "socketpath"] where fields[connect] != nil && fields[connect] != .null {
            throw .badRequest("\(connect == "socketpath" ? "SocketPath" : connect == "proxy" ? "Proxy" : "Connect") is not supported here")
        }
        guard let name = fields["name"]?.stringValue, !name.isEmpty else { throw .badRequest("Missing service name") }
        guard isValidName(name) else { throw .badRequest("Invalid service name '\(name)': use letters, digits, '-' and '_' (DNS needs them)") }
        let id = fields["id"]?.stringValue.flatMap { $0.isEmpty ? nil : $0 } ?? name
        guard !id.contains("/") else { throw .badRequest("Invalid service ID '\(id)': it may not contain '/'") }
        let tags = try strings(fields["tags"], field: "Tags")
        let address = fields["address"]?.stringValue ?? ""
        var port = 0
        if let value = fields["port"] {
            guard case .number(let number) = value, number >= 0, number <= 65535, number.rounded() == number else {
                throw .badRequest("Port must be a number between 0 and 65535")
            }
            port = Int(number)
        }
        var meta: [String: String] = [:]
        if let value = fields["meta"], value != .null {
            guard case .object(let object) = value else { throw .badRequest("Meta must be an object of strings") }
            for (key, entry) in object {
                guard let text = entry.stringValue else { throw .badRequest("Meta '\(key)' must be a string") }
                meta[key] = text
            }
        }
        var checkBodies: [[String: JSONValue]] = []
        if let single = fields["check"], case .object(let object) = single { checkBodies.append(object) }
        if let many = fields["checks"], many != .null {
            guard case .array(let items) = many else { throw .badRequest("Checks must be a list") }
            for item in items {
                guard case .object(let object) = item else { throw .badRequest("each check must be an object") }
                checkBodies.append(object)
            }
        }
        // The older flat form: TTL, HTTP, Interval at the top level.
        if checkBodies.isEmpty, fields["ttl"] != nil || fields["http"] != nil || fields["tcp"] != nil || fields["args"] != nil {
            checkBodies.append(body)
        }
        let now = Timestamp.format(Date())
        var checks: [ExternalCheck] = []
        for (index, raw) in checkBodies.enumerated() {
            let defaultID = checkBodies.count == 1 ? "service:\(id)" : "service:\(id):\(index + 1)"
            checks.append(try parseCheck(raw, defaultID: defaultID, defaultName: "Service '\(name)' check"))
        }
        return ExternalService(
            id: id, name: name, tags: tags, address: address.isEmpty ? defaultAddress : address, port: port, meta: meta, node: node,
            checks: checks, registeredAt: now)
    }

    /// `PUT /v1/agent/check/register`: a check, and the service it belongs to (nil: the node).
    public static func parseCheckRegistration(_ body: [String: JSONValue]) throws(FlotillaError) -> (check: ExternalCheck, serviceID: String?) {
        let fields = lowercased(body)
        guard let name = fields["name"]?.stringValue, !name.isEmpty else { throw .badRequest("Missing check name") }
        let serviceID = (fields["serviceid"] ?? fields["service_id"])?.stringValue.flatMap { $0.isEmpty ? nil : $0 }
        return (try parseCheck(body, defaultID: name, defaultName: name), serviceID)
    }

    /// One check definition, as Consul reads it: exactly one of `TTL`, `HTTP`, `TCP`, `Args`
    /// (or the older `Script`), with `Interval` for the ones the agent runs.
    static func parseCheck(_ raw: [String: JSONValue], defaultID: String, defaultName: String) throws(FlotillaError) -> ExternalCheck {
        let check = lowercased(raw)
        let checkID = check["checkid"]?.stringValue ?? check["id"]?.stringValue ?? defaultID
        let ttl = try duration(check["ttl"], field: "TTL")
        let http = check["http"]?.stringValue
        let tcp = check["tcp"]?.stringValue
        var args = try strings(check["args"] ?? check["scriptargs"] ?? check["script_args"], field: "Args")
        if args.isEmpty, let script = check["script"]?.stringValue, !script.isEmpty { args = ["/bin/sh", "-c", script] }
        for unsupported in ["grpc", "h2ping", "udp", "dockercontainerid", "docker_container_id", "aliasnode", "aliasservice", "osservice"]
        where check[unsupported] != nil && check[unsupported] != .null {
            throw .badRequest("Invalid check: \(unsupported) checks are not supported here; use TTL, HTTP, TCP or Args")
        }
        let kinds = [ttl != nil, http != nil, tcp != nil, !args.isEmpty].filter { $0 }.count
        guard kinds <= 1 else { throw .badRequest("Invalid check: give only one of TTL, HTTP, TCP and Args") }
        guard kinds == 1 else { throw .badRequest("Invalid check: TTL must be > 0 for TTL checks") }
        let interval = try duration(check["interval"], field: "Interval")
        if ttl != nil && interval != nil { throw .badRequest("Invalid check: Interval and TTL cannot both be specified") }
        if ttl == nil && (interval ?? 0) <= 0 { throw .badRequest("Invalid check: Interval must be > 0 for Script, HTTP or TCP checks") }
        let timeout = try duration(check["timeout"], field: "Timeout") ?? 10
        if let tcp, Registry.hostPort(tcp).1 == 0 { throw .badRequest("TCP must be host:port, got '\(tcp)'") }
        if let http, URL(string: http)?.scheme == nil { throw .badRequest("HTTP must be a URL, got '\(http)'") }
        var header: [String: [String]]?
        if let value = check["header"], value != .null {
            guard case .object(let object) = value else { throw .badRequest("Header must be an object of lists of strings") }
            var parsed: [String: [String]] = [:]
            for (name, values) in object { parsed[name] = try strings(values, field: "Header \(name)") }
            header = parsed
        }
        var tlsSkipVerify: Bool?
        if let value = check["tlsskipverify"] ?? check["tls_skip_verify"], value != .null {
            guard case .bool(let flag) = value else { throw .badRequest("TLSSkipVerify must be true or false") }
            tlsSkipVerify = flag
        }
        let deregister = try duration(
            check["deregistercriticalserviceafter"] ?? check["deregister_critical_service_after"], field: "DeregisterCriticalServiceAfter")
        var status = CheckStatus.critical
        if let text = check["status"]?.stringValue, !text.isEmpty {
            guard let parsed = CheckStatus(rawValue: text) else { throw .badRequest("Bad check status") }
            status = parsed
        }
        let now = Timestamp.format(Date())
        var result = ExternalCheck(
            id: checkID, name: check["name"]?.stringValue ?? defaultName, ttlSeconds: ttl, http: http, tcp: tcp,
            intervalSeconds: interval ?? 10, timeoutSeconds: timeout, deregisterCriticalServiceAfterSeconds: deregister,
            notes: check["notes"]?.stringValue ?? "", status: status, output: "", updatedAt: now, criticalSince: status == .critical ? now : nil)
        result.args = args.isEmpty ? nil : args
        result.method = check["method"]?.stringValue.flatMap { $0.isEmpty ? nil : $0.uppercased() }
        result.header = header
        result.body = check["body"]?.stringValue
        result.tlsSkipVerify = tlsSkipVerify
        return result
    }

    static func lowercased(_ object: [String: JSONValue]) -> [String: JSONValue] {
        Dictionary(object.map { ($0.key.lowercased(), $0.value) }, uniquingKeysWith: { first, _ in first })
    }

    static func strings(_ value: JSONValue?, field: String) throws(FlotillaError) -> [String] {
        guard let value, value != .null else { return [] }
        guard case .array(let items) = value else { throw .badRequest("\(field) must be a list of strings") }
        var result: [String] = []
        for item in items {
            guard let text = item.stringValue else { throw .badRequest("\(field) must be a list of strings") }
            result.append(text)
        }
        return result
    }

    static func duration(_ value: JSONValue?, field: String) throws(FlotillaError) -> Double? {
        guard let value, value != .null else { return nil }
        if case .string(let text) = value {
            if text.isEmpty { return nil }
            guard let seconds = GoDuration.seconds(text) else { throw .badRequest("\(field) '\(text)' is not a duration such as 10s or 1m") }
            return seconds
        }
        // Consul's API also takes nanoseconds as a number.
        if case .number(let nanoseconds) = value, nanoseconds >= 0 { return nanoseconds / 1e9 }
        throw .badRequest("\(field) must be a duration such as 10s")
    }

    static func isValidName(_ name: String) -> Bool {
        name.utf8.count <= 255 && name.unicodeScalars.allSatisfy { CharacterSet.alphanumerics.contains($0) || $0 == "-" || $0 == "_" || $0 == "." }
    }
}

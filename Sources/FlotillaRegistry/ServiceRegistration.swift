public import FlotillaCore
import Foundation

/// Reads the body of `PUT /v1/agent/service/register` as Consul does: field names in any case,
/// `Check` or `Checks`, TTL / HTTP / TCP checks with Go durations.
public enum ServiceRegistration {
    public static func parse(_ body: [String: JSONValue], node: String, address defaultAddress: String) throws(FlotillaError) -> ExternalService {
        let fields = lowercased(body)
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
        if checkBodies.isEmpty, fields["ttl"] != nil || fields["http"] != nil || fields["tcp"] != nil {
            checkBodies.append(body)
        }
        let now = Timestamp.format(Date())
        var checks: [ExternalCheck] = []
        for (index, raw) in checkBodies.enumerated() {
            let check = lowercased(raw)
            let defaultID = checkBodies.count == 1 ? "service:\(id)" : "service:\(id):\(index + 1)"
            let checkID = check["checkid"]?.stringValue ?? check["id"]?.stringValue ?? defaultID
            let ttl = try duration(check["ttl"], field: "TTL")
            let http = check["http"]?.stringValue
            let tcp = check["tcp"]?.stringValue
            if check["args"] != nil || check["script"] != nil || check["grpc"] != nil || check["dockercontainerid"] != nil {
                throw .badRequest("only TTL, HTTP and TCP checks are supported")
            }
            guard [ttl != nil, http != nil, tcp != nil].filter({ $0 }).count == 1 else {
                throw .badRequest("a check needs exactly one of TTL, HTTP or TCP")
            }
            let interval = try duration(check["interval"], field: "Interval")
            if ttl == nil && (interval ?? 0) <= 0 { throw .badRequest("Interval is required for HTTP and TCP checks") }
            let timeout = try duration(check["timeout"], field: "Timeout") ?? 10
            if let tcp, Registry.hostPort(tcp).1 == 0 { throw .badRequest("TCP must be host:port, got '\(tcp)'") }
            if let http, URL(string: http)?.scheme == nil { throw .badRequest("HTTP must be a URL, got '\(http)'") }
            let deregister = try duration(check["deregistercriticalserviceafter"], field: "DeregisterCriticalServiceAfter")
            var status = CheckStatus.critical
            if let text = check["status"]?.stringValue {
                guard let parsed = CheckStatus(rawValue: text) else { throw .badRequest("Status must be passing, warning or critical") }
                status = parsed
            }
            checks.append(
                ExternalCheck(
                    id: checkID, name: check["name"]?.stringValue ?? "Service '\(name)' check", ttlSeconds: ttl, http: http, tcp: tcp,
                    intervalSeconds: interval ?? 10, timeoutSeconds: timeout, deregisterCriticalServiceAfterSeconds: deregister,
                    notes: check["notes"]?.stringValue ?? "", status: status, output: "", updatedAt: now,
                    criticalSince: status == .critical ? now : nil))
        }
        return ExternalService(
            id: id, name: name, tags: tags, address: address.isEmpty ? defaultAddress : address, port: port, meta: meta, node: node,
            checks: checks, registeredAt: now)
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

/// A Marathon health check. Kept, validated and returned now; run by the health checker.
public struct HealthCheck: Sendable, Hashable, Codable {
    public enum CheckProtocol: String, Sendable, Hashable, Codable, CaseInsensitiveEnum {
        case http = "HTTP", https = "HTTPS", tcp = "TCP", command = "COMMAND"
        case mesosHTTP = "MESOS_HTTP", mesosHTTPS = "MESOS_HTTPS", mesosTCP = "MESOS_TCP"

        public init(from decoder: any Decoder) throws { self = try Self.decodeIgnoringCase(from: decoder) }
    }

    public struct Command: Sendable, Hashable, Codable {
        public var value: String
        public init(value: String) { self.value = value }
    }

    public var `protocol`: CheckProtocol
    public var path: String?
    public var portIndex: Int?
    public var port: Int?
    public var command: Command?
    public var gracePeriodSeconds: Double
    public var intervalSeconds: Double
    public var timeoutSeconds: Double
    public var maxConsecutiveFailures: Int
    public var delaySeconds: Double
    public var ignoreHttp1xx: Bool

    enum CodingKeys: String, CodingKey {
        case `protocol`, path, portIndex, port, command, gracePeriodSeconds, intervalSeconds, timeoutSeconds
        case maxConsecutiveFailures, delaySeconds, ignoreHttp1xx
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        `protocol` = try container.decodeIfPresent(CheckProtocol.self, forKey: .protocol) ?? .http
        path = try container.decodeIfPresent(String.self, forKey: .path)
        portIndex = try container.decodeIfPresent(Int.self, forKey: .portIndex)
        port = try container.decodeIfPresent(Int.self, forKey: .port)
        if let text = try? container.decodeIfPresent(String.self, forKey: .command) {
            command = Command(value: text)
        } else {
            command = try container.decodeIfPresent(Command.self, forKey: .command)
        }
        gracePeriodSeconds = try container.decodeIfPresent(Double.self, forKey: .gracePeriodSeconds) ?? 300
        intervalSeconds = try container.decodeIfPresent(Double.self, forKey: .intervalSeconds) ?? 60
        timeoutSeconds = try container.decodeIfPresent(Double.self, forKey: .timeoutSeconds) ?? 20
        maxConsecutiveFailures = try container.decodeIfPresent(Int.self, forKey: .maxConsecutiveFailures) ?? 3
        delaySeconds = try container.decodeIfPresent(Double.self, forKey: .delaySeconds) ?? 15
        ignoreHttp1xx = try container.decodeIfPresent(Bool.self, forKey: .ignoreHttp1xx) ?? false
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(`protocol`, forKey: .protocol)
        try container.encodeIfPresent(path, forKey: .path)
        try container.encodeIfPresent(portIndex, forKey: .portIndex)
        try container.encodeIfPresent(port, forKey: .port)
        try container.encodeIfPresent(command, forKey: .command)
        try container.encode(gracePeriodSeconds, forKey: .gracePeriodSeconds)
        try container.encode(intervalSeconds, forKey: .intervalSeconds)
        try container.encode(timeoutSeconds, forKey: .timeoutSeconds)
        try container.encode(maxConsecutiveFailures, forKey: .maxConsecutiveFailures)
        try container.encode(delaySeconds, forKey: .delaySeconds)
        try container.encode(ignoreHttp1xx, forKey: .ignoreHttp1xx)
    }

    /// How long one probe may run: its timeout, but never past the next interval. Marathon accepts a
    /// timeout at or above the interval (published definitions use interval 10 with timeout 20); a
    /// probe that ran that long would overlap the next one, so it is cut when the interval ends.
    public var effectiveTimeoutSeconds: Double { min(timeoutSeconds, intervalSeconds) }

    func problems(portCount: Int) -> [FieldError] {
        var problems: [FieldError] = []
        switch `protocol` {
        case .command:
            if (command?.value ?? "").isEmpty {
                problems.append(FieldError("/command", "a COMMAND check needs a command"))
            }
        case .http, .https, .tcp, .mesosHTTP, .mesosHTTPS, .mesosTCP:
            if port == nil {
                let index = portIndex ?? 0
                if index < 0 || index >= portCount {
                    problems.append(
                        FieldError("/portIndex", "port index \(index) is out of range: the app has \(portCount) port(s)"))
                }
            }
        }
        if intervalSeconds <= 0 { problems.append(FieldError("/intervalSeconds", "must be more than zero")) }
        if timeoutSeconds <= 0 { problems.append(FieldError("/timeoutSeconds", "must be more than zero")) }
        if gracePeriodSeconds < 0 { problems.append(FieldError("/gracePeriodSeconds", "must be zero or more")) }
        if maxConsecutiveFailures < 0 { problems.append(FieldError("/maxConsecutiveFailures", "must be zero or more")) }
        return problems
    }
}

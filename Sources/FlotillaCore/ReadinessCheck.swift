/// Marathon's readiness check: an HTTP request a new instance must answer with one of
/// `httpStatusCodesForReady` before a deployment counts it, and before it takes traffic. Checked
/// from when the instance runs until its first ready answer, then no more.
public struct ReadinessCheck: Sendable, Hashable, Codable {
    public enum CheckProtocol: String, Sendable, Hashable, Codable, CaseInsensitiveEnum {
        case http = "HTTP", https = "HTTPS"

        public init(from decoder: any Decoder) throws { self = try Self.decodeIgnoringCase(from: decoder) }
    }

    public var name: String
    public var `protocol`: CheckProtocol
    public var path: String
    public var portName: String
    public var intervalSeconds: Double
    public var timeoutSeconds: Double
    public var httpStatusCodesForReady: [Int]
    /// Keep the last response (status, content type, body) in `readinessCheckResults`.
    public var preserveLastResponse: Bool

    enum CodingKeys: String, CodingKey {
        case name, `protocol`, path, portName, intervalSeconds, timeoutSeconds, httpStatusCodesForReady, preserveLastResponse
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        name = try container.decodeIfPresent(String.self, forKey: .name) ?? "readinessCheck"
        `protocol` = try container.decodeIfPresent(CheckProtocol.self, forKey: .protocol) ?? .http
        path = try container.decodeIfPresent(String.self, forKey: .path) ?? "/"
        portName = try container.decodeIfPresent(String.self, forKey: .portName) ?? "http-api"
        intervalSeconds = try container.decodeIfPresent(Double.self, forKey: .intervalSeconds) ?? 30
        timeoutSeconds = try container.decodeIfPresent(Double.self, forKey: .timeoutSeconds) ?? 10
        httpStatusCodesForReady = try container.decodeIfPresent([Int].self, forKey: .httpStatusCodesForReady) ?? [200]
        preserveLastResponse = try container.decodeIfPresent(Bool.self, forKey: .preserveLastResponse) ?? false
    }

    func problems(portNames: [String?]) -> [FieldError] {
        var problems: [FieldError] = []
        if !portNames.contains(portName) {
            let names = portNames.compactMap { $0 }
            problems.append(
                FieldError(
                    "/portName",
                    "no port definition is named '\(portName)'" + (names.isEmpty ? "; name one (portDefinitions[].name)" : "; the app's ports are named \(names.joined(separator: ", "))")))
        }
        if intervalSeconds <= 0 { problems.append(FieldError("/intervalSeconds", "must be more than zero")) }
        if timeoutSeconds <= 0 { problems.append(FieldError("/timeoutSeconds", "must be more than zero")) }
        if timeoutSeconds >= intervalSeconds {
            problems.append(FieldError("/timeoutSeconds", "got \(timeoutSeconds), expected less than \(intervalSeconds)"))
        }
        if httpStatusCodesForReady.isEmpty || httpStatusCodesForReady.contains(where: { !(100...599).contains($0) }) {
            problems.append(FieldError("/httpStatusCodesForReady", "must be one or more HTTP status codes (100-599)"))
        }
        if name.isEmpty { problems.append(FieldError("/name", "must not be empty")) }
        return problems
    }
}

/// How an instance's readiness check went: Marathon's `readinessCheckResults` entry.
public struct ReadinessResult: Sendable, Hashable, Codable {
    public struct Response: Sendable, Hashable, Codable {
        public var status: Int
        public var contentType: String
        public var body: String

        public init(status: Int, contentType: String, body: String) {
            self.status = status
            self.contentType = contentType
            self.body = body
        }
    }

    public var name: String
    public var ready: Bool
    public var lastResponse: Response?

    public init(name: String, ready: Bool, lastResponse: Response? = nil) {
        self.name = name
        self.ready = ready
        self.lastResponse = lastResponse
    }
}

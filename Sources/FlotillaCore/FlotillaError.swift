/// One field-level problem in a request, in Marathon's `details` shape.
public struct FieldError: Sendable, Hashable, Codable {
    /// A path into the submitted document, such as `/instances` or `/constraints(0)`.
    public var path: String
    public var errors: [String]

    public init(path: String, errors: [String]) {
        self.path = path
        self.errors = errors
    }

    public init(_ path: String, _ error: String) {
        self.init(path: path, errors: [error])
    }
}

/// The errors the domain raises; each surface maps them to its own status codes and body shapes.
public enum FlotillaError: Error, Sendable, Equatable {
    /// The body could not be parsed at all (HTTP 400).
    case malformed(String)
    /// The body parsed but describes something invalid (HTTP 422), with each offending field.
    case invalid(message: String, details: [FieldError])
    /// A named object does not exist (HTTP 404).
    case notFound(String)
    /// The object exists, or a deployment holds it (HTTP 409).
    case conflict(message: String, deploymentIDs: [String])
    /// A request parameter is wrong (HTTP 400).
    case badRequest(String)
    /// The store could not carry out the write (HTTP 503): nothing was applied.
    case unavailable(String)

    public static func invalid(_ details: [FieldError]) -> FlotillaError {
        .invalid(message: "Object is not valid", details: details)
    }

    public var message: String {
        switch self {
        case .malformed(let message), .notFound(let message), .badRequest(let message), .unavailable(let message):
            return message
        case .invalid(let message, _): return message
        case .conflict(let message, _): return message
        }
    }
}

extension FlotillaError: CustomStringConvertible {
    public var description: String {
        if case .invalid(let message, let details) = self, !details.isEmpty {
            let fields = details.map { "\($0.path): \($0.errors.joined(separator: "; "))" }
            return "\(message): " + fields.joined(separator: ", ")
        }
        return message
    }
}

/// Marathon's `resourceLimits`: how far an instance may go above what it asked for (`cpus`,
/// `mem`); a number, or `"unlimited"`. Enforced: memory as the cgroup's hard limit, CPU as a
/// CFS quota.
public struct ResourceLimits: Sendable, Hashable, Codable {
    public enum Limit: Sendable, Hashable, Codable {
        case amount(Double)
        case unlimited

        public init(from decoder: any Decoder) throws {
            let container = try decoder.singleValueContainer()
            if let number = try? container.decode(Double.self) {
                self = .amount(number)
            } else if let text = try? container.decode(String.self), text == "unlimited" {
                self = .unlimited
            } else {
                throw DecodingError.typeMismatch(
                    Double.self, .init(codingPath: decoder.codingPath, debugDescription: "a limit is a number or \"unlimited\""))
            }
        }

        public func encode(to encoder: any Encoder) throws {
            var container = encoder.singleValueContainer()
            switch self {
            case .amount(let number): try container.encode(number)
            case .unlimited: try container.encode("unlimited")
            }
        }
    }

    public var cpus: Limit?
    public var mem: Limit?
}

/// Marathon's `unreachableStrategy`: how long an instance on a node that stopped answering is
/// waited for (`inactiveAfterSeconds`) before it is replaced, and when it is given up for good
/// (`expungeAfterSeconds`); or `"disabled"`. A single node never loses itself: this applies once
/// agents share a cluster.
public enum UnreachableStrategy: Sendable, Hashable, Codable {
    case disabled
    case after(inactiveSeconds: Double, expungeSeconds: Double)

    public static let `default` = UnreachableStrategy.after(inactiveSeconds: 0, expungeSeconds: 0)

    enum CodingKeys: String, CodingKey { case inactiveAfterSeconds, expungeAfterSeconds }

    public init(from decoder: any Decoder) throws {
        if let text = try? decoder.singleValueContainer().decode(String.self) {
            guard text == "disabled" else {
                throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "an unreachableStrategy is an object or \"disabled\""))
            }
            self = .disabled
            return
        }
        let container = try decoder.container(keyedBy: CodingKeys.self)
        self = .after(
            inactiveSeconds: try container.decodeIfPresent(Double.self, forKey: .inactiveAfterSeconds) ?? 0,
            expungeSeconds: try container.decodeIfPresent(Double.self, forKey: .expungeAfterSeconds) ?? 0)
    }

    public func encode(to encoder: any Encoder) throws {
        switch self {
        case .disabled:
            var container = encoder.singleValueContainer()
            try container.encode("disabled")
        case .after(let inactive, let expunge):
            var container = encoder.container(keyedBy: CodingKeys.self)
            try container.encode(inactive, forKey: .inactiveAfterSeconds)
            try container.encode(expunge, forKey: .expungeAfterSeconds)
        }
    }
}

/// One artifact Marathon's `fetch` (or the older `uris`) names.
public struct FetchURI: Sendable, Hashable, Codable {
    public var uri: String
    public var extract: Bool
    public var executable: Bool
    public var cache: Bool
    /// Where in the sandbox to save it (Mesos' `output_file`); default: the URI's last path component.
    public var outputFile: String?
    public var destPath: String?

    public init(uri: String, extract: Bool = true, executable: Bool = false, cache: Bool = false, outputFile: String? = nil, destPath: String? = nil) {
        self.uri = uri
        self.extract = extract
        self.executable = executable
        self.cache = cache
        self.outputFile = outputFile
        self.destPath = destPath
    }

    enum CodingKeys: String, CodingKey { case uri, extract, executable, cache, outputFile, destPath }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        uri = try container.decode(String.self, forKey: .uri)
        extract = try container.decodeIfPresent(Bool.self, forKey: .extract) ?? true
        executable = try container.decodeIfPresent(Bool.self, forKey: .executable) ?? false
        cache = try container.decodeIfPresent(Bool.self, forKey: .cache) ?? false
        outputFile = try container.decodeIfPresent(String.self, forKey: .outputFile)
        destPath = try container.decodeIfPresent(String.self, forKey: .destPath)
    }
}

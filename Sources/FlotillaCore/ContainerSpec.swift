import Foundation

/// Marathon's `container`: an OCI image to run instead of a bare command. `DOCKER` and `MESOS` both
/// mean an OCI image here (run by runc); the fields keep Marathon's shapes, including the pre-1.5
/// spellings inside `docker` (`network`, `portMappings`), which are read and then answered in the
/// 1.5 shape, as Marathon does.
public struct ContainerSpec: Sendable, Hashable, Codable {
    public enum Kind: String, Sendable, Hashable, Codable, CaseInsensitiveEnum {
        case docker = "DOCKER"
        case mesos = "MESOS"

        public init(from decoder: any Decoder) throws { self = try Self.decodeIgnoringCase(from: decoder) }
    }

    public var type: Kind
    /// The image reference, as `docker pull` takes it (`registry:5000/shop/cart:1.4`, `busybox`, `…@sha256:…`).
    /// Nil only for a `MESOS` container without an image, which runs its command on the node, as
    /// Mesos' own containerizer does.
    public var image: String?
    /// Pull the image again before every start, even when the store has it.
    public var forcePullImage: Bool
    /// Docker's `--key value` options; only the ones with a meaning here are accepted.
    public var parameters: [DockerParameter]
    public var portMappings: [PortMapping]
    public var volumes: [ContainerVolume]
    /// `linuxInfo.seccomp.unconfined`: run without the default seccomp filter (as Docker's
    /// `--security-opt seccomp=unconfined`, which the parameters may say too).
    public var seccompUnconfinedField: Bool

    public init(
        type: Kind = .docker, image: String?, forcePullImage: Bool = false, parameters: [DockerParameter] = [], portMappings: [PortMapping] = [],
        volumes: [ContainerVolume] = [], seccompUnconfined: Bool = false
    ) {
        self.type = type
        self.image = image
        self.forcePullImage = forcePullImage
        self.parameters = parameters
        self.portMappings = portMappings
        self.volumes = volumes
        self.seccompUnconfinedField = seccompUnconfined
    }

    /// The `docker.parameters` keys Flotilla honours (Docker's option names, without `--`).
    public static let supportedParameters: Set<String> = ["user", "workdir", "env", "label", "read-only", "security-opt"]
    /// The `security-opt` values Flotilla honours: its containers always have no-new-privileges.
    public static let supportedSecurityOptions: Set<String> = ["seccomp=unconfined", "seccomp:unconfined", "no-new-privileges", "no-new-privileges=true", "no-new-privileges:true"]

    /// Whether the container runs without the default seccomp filter.
    public var seccompUnconfined: Bool {
        seccompUnconfinedField || parameters.contains { $0.key == "security-opt" && $0.value.hasPrefix("seccomp") }
    }

    /// What the parameters ask for, last value winning for single-valued keys, as Docker's CLI does.
    public var user: String? { parameters.last { $0.key == "user" }?.value }
    public var workingDirectory: String? { parameters.last { $0.key == "workdir" }?.value }
    public var readOnlyRootFilesystem: Bool {
        guard let value = parameters.last(where: { $0.key == "read-only" })?.value else { return false }
        return value.isEmpty || value.lowercased() == "true"
    }
    /// `env` parameters (`KEY=value`), in order.
    public var parameterEnvironment: [(String, String)] {
        parameters.filter { $0.key == "env" }.compactMap { parameter in
            guard let equals = parameter.value.firstIndex(of: "=") else { return nil }
            return (String(parameter.value[..<equals]), String(parameter.value[parameter.value.index(after: equals)...]))
        }
    }
    /// `label` parameters (`key=value`), in order.
    public var parameterLabels: [String: String] {
        var labels: [String: String] = [:]
        for parameter in parameters where parameter.key == "label" {
            let parts = parameter.value.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            labels[String(parts[0])] = parts.count > 1 ? String(parts[1]) : ""
        }
        return labels
    }

    /// `forcePullImage` here (beside `docker`) is how Marathon 0.x examples wrote it: honoured too.
    enum CodingKeys: String, CodingKey, CaseIterable { case type, docker, portMappings, volumes, linuxInfo, forcePullImage }

    /// `type` inside `docker` is a common slip that Marathon ignores; so does Flotilla.
    enum DockerKeys: String, CodingKey, CaseIterable {
        case image, forcePullImage, parameters, privileged, network, portMappings, pullConfig, credential, type
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        try Self.refuseUnknownKeys(in: decoder, known: CodingKeys.allCases.map(\.rawValue), path: "/container")
        type = try container.decodeIfPresent(Kind.self, forKey: .type) ?? .docker
        seccompUnconfinedField = try Self.decodeLinuxInfo(container.decodeIfPresent(JSONValue.self, forKey: .linuxInfo))
        let outerForcePull = try container.decodeIfPresent(Bool.self, forKey: .forcePullImage) ?? false
        guard container.contains(.docker) else {
            guard type == .mesos else {
                throw FlotillaError.invalid([FieldError("/container/docker/image", "a Docker container needs an image: {\"docker\": {\"image\": \"…\"}}")])
            }
            image = nil
            forcePullImage = outerForcePull
            parameters = []
            portMappings = try container.decodeIfPresent([PortMapping].self, forKey: .portMappings) ?? []
            volumes = try container.decodeIfPresent([ContainerVolume].self, forKey: .volumes) ?? []
            return
        }
        let docker = try container.nestedContainer(keyedBy: DockerKeys.self, forKey: .docker)
        try Self.refuseUnknownKeys(
            in: try container.superDecoder(forKey: .docker), known: DockerKeys.allCases.map(\.rawValue), path: "/container/docker")
        image = try docker.decode(String.self, forKey: .image)
        forcePullImage = try docker.decodeIfPresent(Bool.self, forKey: .forcePullImage) ?? outerForcePull
        parameters = try docker.decodeIfPresent([DockerParameter].self, forKey: .parameters) ?? []
        if try docker.decodeIfPresent(Bool.self, forKey: .privileged) == true {
            throw FlotillaError.invalid([
                FieldError("/container/docker/privileged", "privileged containers are not run here: they would own the node; grant what the app needs instead")
            ])
        }
        for key in [DockerKeys.pullConfig, .credential] {
            if let value = try docker.decodeIfPresent(JSONValue.self, forKey: key), value != .null {
                throw FlotillaError.invalid([
                    FieldError("/container/docker/\(key.rawValue)", "registry credentials come from the agent's --registry-auth-file, not from the app definition")
                ])
            }
        }
        let legacyMappings = try docker.decodeIfPresent([PortMapping].self, forKey: .portMappings)
        let mappings = try container.decodeIfPresent([PortMapping].self, forKey: .portMappings)
        if legacyMappings != nil && mappings != nil {
            throw FlotillaError.invalid([
                FieldError("/container/docker/portMappings", "give portMappings once: in container (Marathon 1.5+) or in container.docker (older), not both")
            ])
        }
        portMappings = mappings ?? legacyMappings ?? []
        volumes = try container.decodeIfPresent([ContainerVolume].self, forKey: .volumes) ?? []
    }

    /// `linuxInfo`: only `seccomp.unconfined` has a meaning here (true: no filter; false: the
    /// default filter, which every container gets). Named profiles (files on a Mesos agent) and
    /// IPC settings are refused rather than ignored.
    static func decodeLinuxInfo(_ linuxInfo: JSONValue?) throws -> Bool {
        guard let linuxInfo, linuxInfo != .null, linuxInfo != .object([:]) else { return false }
        let refusal = "only {\"seccomp\": {\"unconfined\": true|false}} is supported: every container gets the default seccomp filter unless unconfined; named profiles and IPC settings are not supported"
        guard case .object(let info) = linuxInfo, Set(info.keys).isSubset(of: ["seccomp"]) else {
            throw FlotillaError.invalid([FieldError("/container/linuxInfo", refusal)])
        }
        guard let seccomp = info["seccomp"], seccomp != .null else { return false }
        guard case .object(let fields) = seccomp, Set(fields.keys).isSubset(of: ["unconfined"]) else {
            throw FlotillaError.invalid([FieldError("/container/linuxInfo/seccomp", refusal)])
        }
        switch fields["unconfined"] {
        case nil, .null?: return false
        case .bool(let unconfined)?: return unconfined
        default: throw FlotillaError.invalid([FieldError("/container/linuxInfo/seccomp/unconfined", "must be true or false")])
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(type, forKey: .type)
        if seccompUnconfinedField {
            try container.encode(["seccomp": ["unconfined": true]] as JSONValue, forKey: .linuxInfo)
        }
        if let image {
            var docker = container.nestedContainer(keyedBy: DockerKeys.self, forKey: .docker)
            try docker.encode(image, forKey: .image)
            try docker.encode(forcePullImage, forKey: .forcePullImage)
            try docker.encode(false, forKey: .privileged)
            try docker.encode(parameters, forKey: .parameters)
        }
        try container.encode(portMappings, forKey: .portMappings)
        try container.encode(volumes, forKey: .volumes)
    }

    /// The legacy `container.docker.network`, when given: `BRIDGE`, `HOST` (`USER`/`NONE` are refused).
    static func legacyNetwork(from decoder: any Decoder) throws -> NetworkMode? {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        guard container.contains(.docker) else { return nil }
        let docker = try container.nestedContainer(keyedBy: DockerKeys.self, forKey: .docker)
        guard let network = try docker.decodeIfPresent(String.self, forKey: .network) else { return nil }
        switch network.uppercased() {
        case "BRIDGE": return .bridge
        case "HOST": return .host
        default:
            throw FlotillaError.invalid([
                FieldError("/container/docker/network", "'\(network)' networking is not available; use BRIDGE (container/bridge) or HOST")
            ])
        }
    }

    private static func refuseUnknownKeys(in decoder: any Decoder, known: [String], path: String) throws {
        guard let object = try? decoder.singleValueContainer().decode(JSONValue.self).objectValue else { return }
        let unknown = object.keys.filter { !known.contains($0) }.sorted()
        if !unknown.isEmpty {
            throw FlotillaError.invalid(unknown.map { FieldError("\(path)/\($0)", "unknown field; check its spelling against Marathon's container reference") })
        }
    }

    /// Rules that need the whole definition; paths are Marathon's.
    func problems(network: NetworkMode) -> [FieldError] {
        var problems: [FieldError] = []
        if let image, image.trimmingCharacters(in: .whitespaces).isEmpty {
            problems.append(FieldError("/container/docker/image", "must not be empty"))
        }
        if image == nil && (!portMappings.isEmpty || !volumes.isEmpty) {
            problems.append(FieldError("/container", "port mappings and volumes need an image (container.docker.image)"))
        }
        for (index, parameter) in parameters.enumerated() where !Self.supportedParameters.contains(parameter.key) {
            problems.append(
                FieldError(
                    "/container/docker/parameters(\(index))/key",
                    "the docker option '\(parameter.key)' is not supported here; supported: \(Self.supportedParameters.sorted().joined(separator: ", "))"))
        }
        for (index, parameter) in parameters.enumerated()
        where parameter.key == "security-opt" && !Self.supportedSecurityOptions.contains(parameter.value) {
            problems.append(
                FieldError(
                    "/container/docker/parameters(\(index))/value",
                    "the security option '\(parameter.value)' is not supported here; supported: seccomp=unconfined, no-new-privileges (always on)"))
        }
        for (index, parameter) in parameters.enumerated() where parameter.key == "env" && !parameter.value.contains("=") {
            problems.append(FieldError("/container/docker/parameters(\(index))/value", "an env parameter is KEY=value"))
        }
        if network == .host && !portMappings.isEmpty {
            problems.append(
                FieldError("/container/portMappings", "port mappings need container/bridge networking; with host networking use portDefinitions"))
        }
        var seenHostPorts: Set<Int> = []
        var seenNames: Set<String> = []
        for (index, mapping) in portMappings.enumerated() {
            let path = "/container/portMappings(\(index))"
            if !(0...65535).contains(mapping.containerPort) { problems.append(FieldError(path + "/containerPort", "must be between 0 and 65535")) }
            if !(0...65535).contains(mapping.hostPort) { problems.append(FieldError(path + "/hostPort", "must be between 0 and 65535")) }
            if !(0...65535).contains(mapping.servicePort) { problems.append(FieldError(path + "/servicePort", "must be between 0 and 65535")) }
            if mapping.hostPort != 0 && !seenHostPorts.insert(mapping.hostPort).inserted {
                problems.append(FieldError(path + "/hostPort", "host port \(mapping.hostPort) is mapped twice"))
            }
            if !["tcp", "udp", "udp,tcp", "tcp,udp"].contains(mapping.protocol) {
                problems.append(FieldError(path + "/protocol", "must be tcp, udp or udp,tcp"))
            }
            if let name = mapping.name, !seenNames.insert(name).inserted {
                problems.append(FieldError(path + "/name", "port name '\(name)' is used twice"))
            }
        }
        for (index, volume) in volumes.enumerated() {
            problems += volume.problems(path: "/container/volumes(\(index))")
        }
        return problems
    }
}

/// How an app's instances reach the network (Marathon's `networks[].mode`).
public enum NetworkMode: String, Sendable, Hashable, Codable {
    /// The node's own network: the instance binds the host ports it was given.
    case host
    /// Its own network namespace on the node's bridge; `portMappings` forward host ports to it.
    case bridge = "container/bridge"
}

/// One of Docker's `--key value` options (`{"key": "user", "value": "nobody"}`).
public struct DockerParameter: Sendable, Hashable, Codable {
    public var key: String
    public var value: String

    public init(key: String, value: String) {
        self.key = key
        self.value = value
    }
}

/// A host port forwarded to a port inside the container (`container/bridge` networking).
public struct PortMapping: Sendable, Hashable, Codable {
    /// The port the app listens on inside its container; 0 means the same number as the host port.
    public var containerPort: Int
    /// The node's port; 0 asks for a free port from the node's range.
    public var hostPort: Int
    /// The port load balancers know the app by (0: one from the service port range).
    public var servicePort: Int
    public var `protocol`: String
    public var name: String?
    public var labels: [String: String]

    public init(
        containerPort: Int, hostPort: Int = 0, servicePort: Int = 0, protocol: String = "tcp", name: String? = nil, labels: [String: String] = [:]
    ) {
        self.containerPort = containerPort
        self.hostPort = hostPort
        self.servicePort = servicePort
        self.protocol = `protocol`
        self.name = name
        self.labels = labels
    }

    enum CodingKeys: String, CodingKey, CaseIterable { case containerPort, hostPort, servicePort, `protocol`, name, labels, networkNames }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        containerPort = try container.decodeIfPresent(Int.self, forKey: .containerPort) ?? 0
        hostPort = try container.decodeIfPresent(Int.self, forKey: .hostPort) ?? 0
        servicePort = try container.decodeIfPresent(Int.self, forKey: .servicePort) ?? 0
        `protocol` = try container.decodeIfPresent(String.self, forKey: .protocol) ?? "tcp"
        name = try container.decodeIfPresent(String.self, forKey: .name)
        labels = try container.decodeIfPresent([String: String].self, forKey: .labels) ?? [:]
        if let networks = try container.decodeIfPresent([String].self, forKey: .networkNames), !networks.isEmpty {
            throw DecodingError.dataCorrupted(
                .init(codingPath: container.codingPath + [CodingKeys.networkNames], debugDescription: "named container networks are not available; leave networkNames out"))
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(containerPort, forKey: .containerPort)
        try container.encode(hostPort, forKey: .hostPort)
        try container.encode(servicePort, forKey: .servicePort)
        try container.encode(`protocol`, forKey: .protocol)
        try container.encodeIfPresent(name, forKey: .name)
        try container.encode(labels, forKey: .labels)
    }
}

/// A host directory bound into the container (Marathon's host volume), or a secret's value as a
/// read-only file (`{"containerPath": "/run/secrets/db", "secret": "db"}`). Persistent and
/// external volumes are refused when decoded: nothing here provides them yet.
public struct ContainerVolume: Sendable, Hashable, Codable {
    public enum Mode: String, Sendable, Hashable, Codable, CaseInsensitiveEnum {
        case readWrite = "RW"
        case readOnly = "RO"

        public init(from decoder: any Decoder) throws { self = try Self.decodeIgnoringCase(from: decoder) }
    }

    public var containerPath: String
    /// An absolute path on the node, or a path relative to the instance's sandbox (Marathon's rule).
    public var hostPath: String
    public var mode: Mode
    /// The name (in the app's `secrets`) whose value the file at `containerPath` holds; nil for a host volume.
    public var secret: String?

    public init(containerPath: String, hostPath: String, mode: Mode = .readWrite) {
        self.containerPath = containerPath
        self.hostPath = hostPath
        self.mode = mode
    }

    public init(containerPath: String, secret: String) {
        self.containerPath = containerPath
        self.hostPath = ""
        self.mode = .readOnly
        self.secret = secret
    }

    enum CodingKeys: String, CodingKey { case containerPath, hostPath, mode, persistent, external, secret }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        for key in [CodingKeys.persistent, .external] where container.contains(key) {
            throw DecodingError.dataCorrupted(
                .init(
                    codingPath: container.codingPath + [key],
                    debugDescription: "\(key.rawValue) volumes are not available here; use a hostPath or secret volume"))
        }
        containerPath = try container.decode(String.self, forKey: .containerPath)
        if let secret = try container.decodeIfPresent(String.self, forKey: .secret) {
            if container.contains(.hostPath) {
                throw DecodingError.dataCorrupted(
                    .init(codingPath: container.codingPath + [CodingKeys.hostPath], debugDescription: "a secret volume has no hostPath"))
            }
            self.secret = secret
            hostPath = ""
            mode = .readOnly
            return
        }
        hostPath = try container.decode(String.self, forKey: .hostPath)
        mode = try container.decodeIfPresent(Mode.self, forKey: .mode) ?? .readWrite
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(containerPath, forKey: .containerPath)
        if let secret {
            try container.encode(secret, forKey: .secret)
            return
        }
        try container.encode(hostPath, forKey: .hostPath)
        try container.encode(mode, forKey: .mode)
    }

    func problems(path: String) -> [FieldError] {
        var problems: [FieldError] = []
        if !containerPath.hasPrefix("/") { problems.append(FieldError(path + "/containerPath", "must be an absolute path inside the container")) }
        if containerPath.split(separator: "/").contains("..") || hostPath.split(separator: "/").contains("..") {
            problems.append(FieldError(path, "paths must not contain '..'"))
        }
        if hostPath.isEmpty && secret == nil { problems.append(FieldError(path + "/hostPath", "must not be empty")) }
        if containerPath == "/" { problems.append(FieldError(path + "/containerPath", "cannot replace the container's root")) }
        return problems
    }
}

/// One port of an app as every part of Flotilla sees it, whatever the networking: the host port the
/// node gives it, the port inside the container (bridge only), the service port, its name and labels.
public struct AppPort: Sendable, Hashable {
    /// The host port asked for; 0 means any free port from the node's range.
    public var hostPort: Int
    /// Inside the container, with bridge networking; nil with host networking.
    public var containerPort: Int?
    public var servicePort: Int
    public var `protocol`: String
    public var name: String?
    public var labels: [String: String]

    public init(
        hostPort: Int, containerPort: Int? = nil, servicePort: Int, protocol: String = "tcp", name: String? = nil, labels: [String: String] = [:]
    ) {
        self.hostPort = hostPort
        self.containerPort = containerPort
        self.servicePort = servicePort
        self.protocol = `protocol`
        self.name = name
        self.labels = labels
    }
}

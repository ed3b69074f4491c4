internal import Foundation

/// The image configuration blob (`application/vnd.oci.image.config.v1+json` or Docker's
/// `…container.image.v1+json`): the defaults a container of this image starts with, and the
/// uncompressed layer digests (`rootfs.diff_ids`) the unpacker verifies each layer against.
///
/// Only the fields Flotilla acts on are modelled; the rest (history, created, author) are ignored.
/// Decoding is lenient about absent or `null` fields (real images omit most) but strict about types
/// of the fields it keeps.
public struct ImageConfiguration: Hashable, Sendable, Codable {
    public var architecture: String
    public var os: String
    public var variant: String?
    public var config: ContainerConfig
    public var rootfs: RootFS

    /// Largest config Flotilla reads into memory (configs are usually a few KiB; long histories reach
    /// hundreds of KiB).
    public static let maximumSize = 8 * 1024 * 1024

    /// The `config` object: process defaults.
    public struct ContainerConfig: Hashable, Sendable, Codable {
        public var entrypoint: [String]?
        public var cmd: [String]?
        public var env: [String]?
        public var workingDir: String?
        public var user: String?
        /// Keys of `ExposedPorts` (`"80/tcp"`), sorted.
        public var exposedPorts: [String]
        public var labels: [String: String]
        public var stopSignal: String?

        enum CodingKeys: String, CodingKey {
            case entrypoint = "Entrypoint", cmd = "Cmd", env = "Env", workingDir = "WorkingDir", user = "User"
            case exposedPorts = "ExposedPorts", labels = "Labels", stopSignal = "StopSignal"
        }

        public init(
            entrypoint: [String]? = nil, cmd: [String]? = nil, env: [String]? = nil, workingDir: String? = nil,
            user: String? = nil, exposedPorts: [String] = [], labels: [String: String] = [:], stopSignal: String? = nil
        ) {
            self.entrypoint = entrypoint
            self.cmd = cmd
            self.env = env
            self.workingDir = workingDir
            self.user = user
            self.exposedPorts = exposedPorts
            self.labels = labels
            self.stopSignal = stopSignal
        }

        public init(from decoder: any Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            entrypoint = try c.decodeIfPresent([String].self, forKey: .entrypoint)
            cmd = try c.decodeIfPresent([String].self, forKey: .cmd)
            env = try c.decodeIfPresent([String].self, forKey: .env)
            workingDir = try c.decodeIfPresent(String.self, forKey: .workingDir).flatMap { $0.isEmpty ? nil : $0 }
            user = try c.decodeIfPresent(String.self, forKey: .user).flatMap { $0.isEmpty ? nil : $0 }
            exposedPorts = try c.decodeIfPresent([String: IgnoredJSONValue].self, forKey: .exposedPorts).map { $0.keys.sorted() } ?? []
            labels = try c.decodeIfPresent([String: String].self, forKey: .labels) ?? [:]
            stopSignal = try c.decodeIfPresent(String.self, forKey: .stopSignal).flatMap { $0.isEmpty ? nil : $0 }
        }

        public func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encodeIfPresent(entrypoint, forKey: .entrypoint)
            try c.encodeIfPresent(cmd, forKey: .cmd)
            try c.encodeIfPresent(env, forKey: .env)
            try c.encodeIfPresent(workingDir, forKey: .workingDir)
            try c.encodeIfPresent(user, forKey: .user)
            if !exposedPorts.isEmpty {
                try c.encode(Dictionary(uniqueKeysWithValues: exposedPorts.map { ($0, [String: String]()) }), forKey: .exposedPorts)
            }
            if !labels.isEmpty { try c.encode(labels, forKey: .labels) }
            try c.encodeIfPresent(stopSignal, forKey: .stopSignal)
        }
    }

    /// `rootfs`: the uncompressed digests of the layers, in order.
    public struct RootFS: Hashable, Sendable, Codable {
        public var type: String
        public var diffIDs: [ImageDigest]

        enum CodingKeys: String, CodingKey {
            case type
            case diffIDs = "diff_ids"
        }

        public init(type: String = "layers", diffIDs: [ImageDigest]) {
            self.type = type
            self.diffIDs = diffIDs
        }
    }

    enum CodingKeys: String, CodingKey {
        case architecture, os, variant, config, rootfs
    }

    public init(architecture: String, os: String, variant: String? = nil, config: ContainerConfig, rootfs: RootFS) {
        self.architecture = architecture
        self.os = os
        self.variant = variant
        self.config = config
        self.rootfs = rootfs
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        architecture = try c.decodeIfPresent(String.self, forKey: .architecture) ?? ""
        os = try c.decodeIfPresent(String.self, forKey: .os) ?? ""
        variant = try c.decodeIfPresent(String.self, forKey: .variant).flatMap { $0.isEmpty ? nil : $0 }
        config = try c.decodeIfPresent(ContainerConfig.self, forKey: .config) ?? ContainerConfig()
        rootfs = try c.decode(RootFS.self, forKey: .rootfs)
    }

    /// Decodes config bytes with a clear error naming the image.
    public static func decode(_ bytes: [UInt8], imageName: String) throws -> ImageConfiguration {
        guard bytes.count <= maximumSize else {
            throw RegistryError(.tooLarge, "image config of \(imageName) is \(bytes.count) bytes, over the \(maximumSize)-byte limit")
        }
        do {
            return try JSONDecoder().decode(ImageConfiguration.self, from: Data(bytes))
        } catch {
            throw RegistryError(.malformed, "image config of \(imageName) is malformed: \(ParsedManifest.describe(error))")
        }
    }
}

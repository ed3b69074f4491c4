internal import Foundation

/// Media types Flotilla recognises, named once so a typo cannot silently route a manifest wrongly.
public enum ImageMediaType {
    public static let dockerManifest = "application/vnd.docker.distribution.manifest.v2+json"
    public static let dockerManifestList = "application/vnd.docker.distribution.manifest.list.v2+json"
    public static let ociManifest = "application/vnd.oci.image.manifest.v1+json"
    public static let ociIndex = "application/vnd.oci.image.index.v1+json"
    public static let dockerSchema1 = "application/vnd.docker.distribution.manifest.v1+json"
    public static let dockerSchema1Signed = "application/vnd.docker.distribution.manifest.v1+prettyjws"
    public static let dockerConfig = "application/vnd.docker.container.image.v1+json"
    public static let ociConfig = "application/vnd.oci.image.config.v1+json"

    /// What the client sends in `Accept` for manifests: the four schema 2 / OCI types and nothing else,
    /// so a registry that still has a schema 2 or OCI form never down-converts to schema 1.
    public static let manifestAccept = [ociIndex, dockerManifestList, ociManifest, dockerManifest]

    static func isIndex(_ type: String) -> Bool { type == ociIndex || type == dockerManifestList }
    static func isImageManifest(_ type: String) -> Bool { type == ociManifest || type == dockerManifest }

    /// Foreign / non-distributable layers (Windows base layers) are by design not served by the registry.
    static func isForeignLayer(_ type: String) -> Bool {
        type.contains(".foreign.") || type.contains("nondistributable")
    }
}

/// A content descriptor: what a manifest or index says about a blob or a child manifest.
public struct ImageDescriptor: Hashable, Sendable, Codable {
    public var mediaType: String
    public var digest: ImageDigest
    /// Exact byte size; downloads are checked against it before the digest.
    public var size: Int64
    /// Only on index entries.
    public var platform: ImagePlatform?
    public var annotations: [String: String]?
    /// Alternative download locations (foreign layers only; Flotilla does not use them).
    public var urls: [String]?

    public init(
        mediaType: String,
        digest: ImageDigest,
        size: Int64,
        platform: ImagePlatform? = nil,
        annotations: [String: String]? = nil,
        urls: [String]? = nil
    ) {
        self.mediaType = mediaType
        self.digest = digest
        self.size = size
        self.platform = platform
        self.annotations = annotations
        self.urls = urls
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.mediaType = try c.decodeIfPresent(String.self, forKey: .mediaType) ?? ""
        self.digest = try c.decode(ImageDigest.self, forKey: .digest)
        self.size = try c.decode(Int64.self, forKey: .size)
        guard size >= 0 else {
            throw DecodingError.dataCorruptedError(forKey: .size, in: c, debugDescription: "negative size \(size) for \(digest)")
        }
        self.platform = try c.decodeIfPresent(ImagePlatform.self, forKey: .platform)
        // Annotations and urls are informational; a malformed one must not make the image unpullable.
        self.annotations = try? c.decodeIfPresent([String: String].self, forKey: .annotations)
        self.urls = try? c.decodeIfPresent([String].self, forKey: .urls)
    }

    enum CodingKeys: String, CodingKey {
        case mediaType, digest, size, platform, annotations, urls
    }
}

/// A single-platform image manifest: Docker v2 schema 2 or OCI image manifest (same JSON shape).
public struct ImageManifest: Hashable, Sendable, Codable {
    public var schemaVersion: Int
    /// Required for Docker schema 2, optional (but usually present) for OCI.
    public var mediaType: String?
    public var config: ImageDescriptor
    public var layers: [ImageDescriptor]
    public var annotations: [String: String]?

    public init(schemaVersion: Int = 2, mediaType: String?, config: ImageDescriptor, layers: [ImageDescriptor], annotations: [String: String]? = nil) {
        self.schemaVersion = schemaVersion
        self.mediaType = mediaType
        self.config = config
        self.layers = layers
        self.annotations = annotations
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.schemaVersion = try c.decode(Int.self, forKey: .schemaVersion)
        self.mediaType = try c.decodeIfPresent(String.self, forKey: .mediaType)
        self.config = try c.decode(ImageDescriptor.self, forKey: .config)
        self.layers = try c.decodeIfPresent([ImageDescriptor].self, forKey: .layers) ?? []
        self.annotations = try? c.decodeIfPresent([String: String].self, forKey: .annotations)
    }

    enum CodingKeys: String, CodingKey {
        case schemaVersion, mediaType, config, layers, annotations
    }
}

/// A multi-platform index: OCI image index or Docker manifest list (same JSON shape).
public struct ImageIndex: Hashable, Sendable, Codable {
    public var schemaVersion: Int
    public var mediaType: String?
    public var manifests: [ImageDescriptor]
    public var annotations: [String: String]?

    public init(schemaVersion: Int = 2, mediaType: String?, manifests: [ImageDescriptor], annotations: [String: String]? = nil) {
        self.schemaVersion = schemaVersion
        self.mediaType = mediaType
        self.manifests = manifests
        self.annotations = annotations
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.schemaVersion = try c.decode(Int.self, forKey: .schemaVersion)
        self.mediaType = try c.decodeIfPresent(String.self, forKey: .mediaType)
        self.manifests = try c.decode([ImageDescriptor].self, forKey: .manifests)
        self.annotations = try? c.decodeIfPresent([String: String].self, forKey: .annotations)
    }

    enum CodingKeys: String, CodingKey {
        case schemaVersion, mediaType, manifests, annotations
    }

    /// The entry for `platform`: the best match by ``ImagePlatform`` variant rules, first in index order
    /// among equals (as containerd picks).
    /// - Throws: ``RegistryError/Kind/noMatchingPlatform`` listing every platform the index offers.
    public func manifest(for platform: ImagePlatform, imageName: String) throws -> ImageDescriptor {
        var best: (rank: Int, descriptor: ImageDescriptor)?
        for entry in manifests {
            guard let offered = entry.platform,
                MediaTypeCheck.isManifestLike(entry.mediaType),
                let rank = platform.matchRank(of: offered)
            else { continue }
            if best == nil || rank < best!.rank { best = (rank, entry) }
        }
        if let best { return best.descriptor }
        let offered = manifests.compactMap { entry -> String? in
            guard let p = entry.platform, p.os != "unknown" else { return nil }
            return p.description
        }
        let list = offered.isEmpty ? "none with a platform" : offered.joined(separator: ", ")
        throw RegistryError(
            .noMatchingPlatform,
            "image \(imageName) has no manifest for platform \(platform); it offers: \(list)"
        )
    }
}

private enum MediaTypeCheck {
    /// Index entries without a mediaType are allowed by old tools; attestation blobs are excluded by platform.
    static func isManifestLike(_ type: String) -> Bool {
        type.isEmpty || ImageMediaType.isImageManifest(type) || ImageMediaType.isIndex(type)
    }
}

/// A decoded manifest document: either one image or an index of per-platform images.
public enum ParsedManifest: Hashable, Sendable {
    case image(ImageManifest, mediaType: String)
    case index(ImageIndex, mediaType: String)

    /// Largest manifest Flotilla will read. The bytes come from the network and are decoded in memory,
    /// and real manifests are a few KiB (containerd uses the same 4 MiB bound).
    public static let maximumSize = 4 * 1024 * 1024

    /// Decodes manifest bytes, using the document's own `mediaType` first, then the HTTP `Content-Type`,
    /// then its shape (`manifests` vs `config`). Schema 1 is refused with a message saying what to do.
    public static func decode(_ bytes: [UInt8], contentType: String?, imageName: String) throws -> ParsedManifest {
        guard bytes.count <= maximumSize else {
            throw RegistryError(.tooLarge, "manifest of \(imageName) is \(bytes.count) bytes, over the \(maximumSize)-byte limit")
        }
        let headerType = contentType.map(Self.baseMediaType)
        if headerType == ImageMediaType.dockerSchema1 || headerType == ImageMediaType.dockerSchema1Signed {
            throw schema1Error(imageName)
        }
        struct Probe: Decodable {
            var schemaVersion: Int?
            var mediaType: String?
            var manifests: IgnoredJSONValue?
            var config: IgnoredJSONValue?
            var layers: IgnoredJSONValue?
            var fsLayers: IgnoredJSONValue?
        }
        let data = Data(bytes)
        let probe: Probe
        do {
            probe = try JSONDecoder().decode(Probe.self, from: data)
        } catch {
            throw RegistryError(.malformed, "manifest of \(imageName) is not valid JSON: \(Self.describe(error))")
        }
        if probe.schemaVersion == 1 || probe.fsLayers != nil {
            throw schema1Error(imageName)
        }
        guard probe.schemaVersion == 2 else {
            let shown = probe.schemaVersion.map(String.init) ?? "missing"
            throw RegistryError(.unsupported, "manifest of \(imageName) has schemaVersion \(shown); only schema version 2 is supported")
        }
        let mediaType: String
        if let own = probe.mediaType, !own.isEmpty {
            mediaType = own
        } else if let headerType, ImageMediaType.isIndex(headerType) || ImageMediaType.isImageManifest(headerType) {
            mediaType = headerType
        } else if probe.manifests != nil {
            mediaType = ImageMediaType.ociIndex
        } else if probe.config != nil {
            mediaType = ImageMediaType.ociManifest
        } else {
            throw RegistryError(.malformed, "manifest of \(imageName) is neither an image manifest nor an index (no mediaType, config or manifests)")
        }
        do {
            if ImageMediaType.isIndex(mediaType) {
                return .index(try JSONDecoder().decode(ImageIndex.self, from: data), mediaType: mediaType)
            }
            if ImageMediaType.isImageManifest(mediaType) {
                return .image(try JSONDecoder().decode(ImageManifest.self, from: data), mediaType: mediaType)
            }
        } catch {
            throw RegistryError(.malformed, "manifest of \(imageName) (\(mediaType)) is malformed: \(Self.describe(error))")
        }
        throw RegistryError(.unsupported, "manifest of \(imageName) has unsupported media type \"\(mediaType.prefix(200))\"")
    }

    /// `application/json; charset=utf-8` → `application/json`.
    static func baseMediaType(_ contentType: String) -> String {
        let base = contentType.split(separator: ";", maxSplits: 1).first.map(String.init) ?? contentType
        return base.trimmingCharacters(in: .whitespaces).lowercased()
    }

    private static func schema1Error(_ imageName: String) -> RegistryError {
        RegistryError(
            .unsupported,
            "image \(imageName) uses the deprecated Docker schema 1 manifest format, which Flotilla does not support; re-push it with a current Docker, buildah or skopeo (e.g. `skopeo copy --format v2s2`)"
        )
    }

    /// A one-line, path-qualified rendering of a DecodingError.
    static func describe(_ error: any Error) -> String {
        guard let error = error as? DecodingError else { return "\(error)" }
        func path(_ keys: [any CodingKey]) -> String {
            keys.isEmpty ? "top level" : keys.map { $0.intValue.map { "[\($0)]" } ?? $0.stringValue }.joined(separator: ".")
        }
        switch error {
        case .dataCorrupted(let ctx): return "\(ctx.debugDescription) at \(path(ctx.codingPath))"
        case .keyNotFound(let key, let ctx): return "missing \"\(key.stringValue)\" at \(path(ctx.codingPath))"
        case .typeMismatch(_, let ctx): return "wrong type at \(path(ctx.codingPath)): \(ctx.debugDescription)"
        case .valueNotFound(_, let ctx): return "null value at \(path(ctx.codingPath))"
        @unknown default: return "\(error)"
        }
    }
}

/// Decodes any JSON value and discards it (for presence probes).
struct IgnoredJSONValue: Decodable {
    init(from decoder: any Decoder) throws {}
}

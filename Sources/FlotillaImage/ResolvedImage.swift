/// Everything needed to pull one image for one platform, with every byte already verified.
///
/// `resolve` returns this so the caller can decide what to download (skipping layers it already has)
/// and record `digest` as the exact image that ran, independent of later tag moves.
public struct ResolvedImage: Hashable, Sendable {
    /// The reference as asked for.
    public var reference: ImageReference
    /// Digest of the platform-specific image manifest (hash of ``manifestBytes``).
    public var digest: ImageDigest
    /// Digest of the index the manifest was chosen from, when the reference named a multi-platform image.
    public var indexDigest: ImageDigest?
    /// Media type of the image manifest (Docker schema 2 or OCI).
    public var mediaType: String
    /// The exact manifest bytes, as hashed.
    public var manifestBytes: [UInt8]
    public var manifest: ImageManifest
    /// The platform that was asked for.
    public var platform: ImagePlatform
    /// The exact config bytes (verified against ``configDescriptor``).
    public var configBytes: [UInt8]
    public var config: ImageConfiguration

    public var configDescriptor: ImageDescriptor { manifest.config }
    public var layers: [ImageDescriptor] { manifest.layers }

    /// The reference pinned to the digest users can pull again: the index digest when there was one
    /// (so the same multi-platform name works elsewhere), else the manifest digest.
    public var pinnedReference: ImageReference { reference.withDigest(indexDigest ?? digest) }

    public init(
        reference: ImageReference, digest: ImageDigest, indexDigest: ImageDigest?, mediaType: String,
        manifestBytes: [UInt8], manifest: ImageManifest, platform: ImagePlatform, configBytes: [UInt8],
        config: ImageConfiguration
    ) {
        self.reference = reference
        self.digest = digest
        self.indexDigest = indexDigest
        self.mediaType = mediaType
        self.manifestBytes = manifestBytes
        self.manifest = manifest
        self.platform = platform
        self.configBytes = configBytes
        self.config = config
    }
}

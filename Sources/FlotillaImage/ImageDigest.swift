internal import Crypto

/// A content digest of the form `sha256:<64 lowercase hex>`.
///
/// Every byte Flotilla pulls from a registry is untrusted until its SHA-256 matches the digest that
/// named it, so this type only exists in a validated form: the initialiser rejects anything that is not
/// exactly `sha256:` followed by 64 lowercase hex digits, and names other algorithms (`sha512:`, …)
/// explicitly rather than silently accepting content it could not verify.
public struct ImageDigest: Hashable, Sendable, Comparable, CustomStringConvertible, Codable {
    /// The 64 lowercase hex digits after `sha256:`.
    public let hex: String

    /// The algorithm is always `sha256`; kept as a property so log lines and paths can spell it out.
    public var algorithm: String { "sha256" }

    /// `sha256:<hex>`, the form registries, manifests and `Docker-Content-Digest` use.
    public var description: String { "sha256:" + hex }

    /// Parses and validates `sha256:<64 lowercase hex>`.
    /// - Throws: ``RegistryError`` with kind ``RegistryError/Kind/invalidDigest`` saying what is wrong.
    public init(parsing string: String) throws {
        guard let colon = string.firstIndex(of: ":") else {
            throw RegistryError(.invalidDigest, "invalid digest \"\(string.prefix(100))\": expected sha256:<64 hex digits>")
        }
        let algorithm = string[..<colon]
        let encoded = string[string.index(after: colon)...]
        guard algorithm == "sha256" else {
            if algorithm.isEmpty {
                throw RegistryError(.invalidDigest, "invalid digest \"\(string.prefix(100))\": missing algorithm (expected sha256:<64 hex digits>)")
            }
            throw RegistryError(
                .invalidDigest,
                "unsupported digest algorithm \"\(algorithm.prefix(20))\" in \"\(string.prefix(100))\": only sha256 is supported"
            )
        }
        guard encoded.utf8.count == 64, encoded.utf8.allSatisfy(Self.isLowerHex) else {
            throw RegistryError(
                .invalidDigest,
                "invalid sha256 digest \"\(string.prefix(100))\": expected exactly 64 lowercase hex digits after \"sha256:\""
            )
        }
        self.hex = String(encoded)
    }

    /// Failable form of ``init(parsing:)`` for call sites that only need a yes/no.
    public init?(_ string: String) {
        guard let digest = try? ImageDigest(parsing: string) else { return nil }
        self = digest
    }

    /// Internal: builds a digest from raw hash bytes (always valid by construction).
    init<D: Sequence>(rawSHA256 bytes: D) where D.Element == UInt8 {
        let digits = Array("0123456789abcdef".utf8)
        var out: [UInt8] = []
        out.reserveCapacity(64)
        for byte in bytes {
            out.append(digits[Int(byte >> 4)])
            out.append(digits[Int(byte & 0x0f)])
        }
        self.hex = String(decoding: out, as: UTF8.self)
    }

    /// The digest of a complete byte array (manifests and configs, which are small and held in memory).
    public static func sha256(of bytes: [UInt8]) -> ImageDigest {
        var hasher = SHA256Hasher()
        hasher.update(bytes)
        return hasher.finalize()
    }

    public static func < (lhs: ImageDigest, rhs: ImageDigest) -> Bool { lhs.hex < rhs.hex }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        let string = try container.decode(String.self)
        do {
            self = try ImageDigest(parsing: string)
        } catch let error as RegistryError {
            throw DecodingError.dataCorruptedError(in: container, debugDescription: error.message)
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }

    private static func isLowerHex(_ c: UInt8) -> Bool {
        (c >= UInt8(ascii: "0") && c <= UInt8(ascii: "9")) || (c >= UInt8(ascii: "a") && c <= UInt8(ascii: "f"))
    }

    /// Incremental SHA-256 for blobs that are streamed to disk and never held in memory whole.
    ///
    /// A value type: copy it to fork a hash state. Not `Sendable` because swift-crypto's `SHA256` is not;
    /// a download owns its hasher.
    public struct SHA256Hasher {
        private var inner = SHA256()

        public init() {}

        /// Feeds raw bytes into the hash.
        public mutating func update(bytes: UnsafeRawBufferPointer) {
            inner.update(bufferPointer: bytes)
        }

        /// Feeds an array of bytes into the hash.
        public mutating func update(_ bytes: [UInt8]) {
            bytes.withUnsafeBytes { inner.update(bufferPointer: $0) }
        }

        /// The digest of everything fed so far.
        public func finalize() -> ImageDigest {
            ImageDigest(rawSHA256: inner.finalize())
        }
    }
}

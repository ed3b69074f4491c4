/// The one error type of image resolution and pulling.
///
/// A struct with a coarse ``Kind`` (for callers that branch, e.g. retry on ``Kind/timeout`` but not on
/// ``Kind/notFound``) and a complete human message (for the operator, printed as-is by the CLI), because
/// almost every failure here ends up in front of a person who has to fix a reference or a credential.
public struct RegistryError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What went wrong, coarsely.
    public enum Kind: String, Sendable, Hashable {
        /// The image reference string is malformed.
        case invalidReference
        /// A digest string is malformed or uses an unsupported algorithm.
        case invalidDigest
        /// The registry credentials file is malformed.
        case invalidCredentials
        /// The registry says the repository, tag, manifest or blob does not exist.
        case notFound
        /// Authentication failed or is required and no (valid) credentials were supplied.
        case unauthorized
        /// Authenticated, but the registry refuses access.
        case denied
        /// The registry asks us to slow down (HTTP 429 / TOOMANYREQUESTS).
        case rateLimited
        /// Content did not hash to the digest that named it.
        case digestMismatch
        /// Content was not the size its descriptor promised.
        case sizeMismatch
        /// A manifest or config is larger than Flotilla accepts.
        case tooLarge
        /// A manifest type Flotilla does not support (schema 1, unknown media types, foreign layers).
        case unsupported
        /// A manifest or config that does not decode or violates the spec.
        case malformed
        /// An index has no manifest for the requested platform.
        case noMatchingPlatform
        /// No data arrived for longer than the idle timeout.
        case timeout
        /// The registry (or its token server or blob storage) could not be reached: connection refused,
        /// DNS, TLS or connect timeout. Usually worth retrying later.
        case unreachable
        /// An HTTP-level failure not covered above (5xx, unexpected status, too many redirects).
        case http
        /// A local file-system failure while writing a blob.
        case io
    }

    public var kind: Kind
    public var message: String

    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    public var description: String { message }
}

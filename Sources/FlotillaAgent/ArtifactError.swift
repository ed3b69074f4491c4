import Foundation

/// Why fetching an artifact failed, as a sentence an operator understands:
/// `fetching http://repo/app.tgz failed: 404 Not Found`.
struct ArtifactError: Error, Sendable, CustomStringConvertible, LocalizedError {
    enum Kind: Sendable, Hashable {
        /// The request itself is unusable (bad URI, unsafe output name, unsupported scheme).
        case invalidRequest
        /// The server answered with a non-2xx status.
        case http
        /// Redirect loop or too many redirects.
        case redirect
        /// The server could not be reached.
        case unreachable
        /// No byte arrived for the idle timeout.
        case timeout
        /// The artifact (or what it extracts to) is larger than the configured cap.
        case tooLarge
        /// A local file does not exist.
        case notFound
        /// An archive entry would land outside the sandbox (absolute path, `..`, escaping link).
        case unsafeArchive
        /// The archive is corrupt or uses a feature this extractor does not support.
        case badArchive
        /// Writing into the sandbox or the cache failed.
        case io
    }

    var kind: Kind
    /// The URI being fetched, once known.
    var uri: String?
    /// What went wrong, without the URI.
    var reason: String

    init(_ kind: Kind, _ reason: String, uri: String? = nil) {
        self.kind = kind
        self.reason = reason
        self.uri = uri
    }

    var description: String {
        guard let uri else { return reason }
        return "fetching \(uri) failed: \(reason)"
    }

    var errorDescription: String? { description }

    /// The same error naming `uri` (unless it already names one).
    func fetching(_ uri: String) -> ArtifactError {
        var copy = self
        if copy.uri == nil { copy.uri = uri }
        return copy
    }

    /// An I/O error from `errno`.
    static func posix(_ what: String, _ code: Int32 = errno) -> ArtifactError {
        ArtifactError(.io, "\(what): \(String(cString: strerror(code)))")
    }
}

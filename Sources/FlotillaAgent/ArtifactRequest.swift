/// One artifact to put into an instance's sandbox before it starts: Marathon's `fetch` entry
/// (`{"uri": "...", "extract": true, "executable": false, "cache": false, "outputFile": null, "destPath": null}`),
/// or one of the older `uris` (which are `ArtifactRequest(uri:)` with the defaults).
struct ArtifactRequest: Sendable, Hashable {
    /// `http://`, `https://`, `file://` or a plain absolute path.
    var uri: String
    /// Extract archives (`.tar`, `.tar.gz`/`.tgz`, `.tar.bz2`/`.tbz2`, `.tar.xz`/`.txz`, `.zip`, `.gz`)
    /// next to the saved file. Ignored when ``executable`` is set.
    var extract: Bool = true
    /// Make the saved file mode 0755 (and never extract it).
    var executable: Bool = false
    /// Keep a copy in the fetcher's cache, keyed by URI, and reuse it.
    var cache: Bool = false
    /// Name to save under, relative to the sandbox (default: the URI's last path component).
    var outputFile: String? = nil
    /// Same as ``outputFile`` (used when `outputFile` is not set); a value ending in `/` names a directory
    /// to save the URI's basename into.
    var destPath: String? = nil
}

import Foundation

extension ArtifactRequest {
    /// A URI fit for logs: a password in its user part (`https://user:pass@host/…`) is masked.
    static func redacted(_ uri: String) -> String {
        guard var components = URLComponents(string: uri), components.password != nil else { return uri }
        components.password = "***"
        return components.string ?? uri
    }
}

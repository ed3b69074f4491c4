/// A parsed image reference such as `busybox`, `ghcr.io/org/app:1.2`, or `host:5000/a/b@sha256:…`.
///
/// Parsing follows Docker's own rules (`distribution/reference`'s `ParseNormalizedNamed`) so that a job
/// file means exactly what `docker pull` would make of the same string:
/// - the first `/`-separated component is a registry host only if it contains `.` or `:`, is
///   `localhost`, or has an uppercase letter; otherwise the reference is on Docker Hub;
/// - Docker Hub names without a `/` get the `library/` prefix (`busybox` → `library/busybox`), and
///   `index.docker.io` is the same registry as `docker.io`;
/// - with neither tag nor digest the tag is `latest`; with a digest the digest is what is pulled (a tag
///   given beside it is kept only for display, as Docker does).
public struct ImageReference: Hashable, Sendable, CustomStringConvertible {
    /// Docker Hub's display name (what users write and what `description` shows).
    public static let dockerHubDisplayName = "docker.io"
    /// Docker Hub's actual registry API host.
    public static let dockerHubRegistryHost = "registry-1.docker.io"

    /// The host (and optional `:port`) to speak the registry API to: `registry-1.docker.io` for Docker Hub.
    public let registry: String
    /// The repository path inside the registry, e.g. `library/busybox`.
    public let repository: String
    /// The tag, if any. `latest` when the string had neither tag nor digest.
    public let tag: String?
    /// The digest, if the reference pins one.
    public let digest: ImageDigest?

    /// The registry as users write it: `docker.io` for Docker Hub, the host otherwise.
    public var displayRegistry: String {
        registry == Self.dockerHubRegistryHost ? Self.dockerHubDisplayName : registry
    }

    /// Whether this reference points at Docker Hub.
    public var isDockerHub: Bool { registry == Self.dockerHubRegistryHost }

    /// The manifest reference used in `/v2/<name>/manifests/<reference>`: the digest if pinned, else the tag.
    public var manifestReference: String { digest?.description ?? tag ?? "latest" }

    /// The canonical, fully-qualified form: `docker.io/library/busybox:latest`,
    /// `host:5000/a/b:tag@sha256:…`.
    public var description: String {
        var out = displayRegistry + "/" + repository
        if let tag { out += ":" + tag }
        if let digest { out += "@" + digest.description }
        return out
    }

    /// The token scope for pulling from this repository.
    public var pullScope: String { "repository:\(repository):pull" }

    /// Builds a reference from parts, validating each as ``init(parsing:)`` would.
    public init(registry: String, repository: String, tag: String? = nil, digest: ImageDigest? = nil) throws {
        let host = Self.normalizeRegistry(registry)
        try Self.validateRegistry(host, original: registry)
        var repo = repository
        if host == Self.dockerHubRegistryHost, !repo.contains("/") { repo = "library/" + repo }
        try Self.validateRepository(repo, original: repository)
        if let tag { try Self.validateTag(tag, original: tag) }
        self.registry = host
        self.repository = repo
        self.tag = (tag == nil && digest == nil) ? "latest" : tag
        self.digest = digest
    }

    /// Parses a reference exactly as Docker does.
    /// - Throws: ``RegistryError`` of kind ``RegistryError/Kind/invalidReference`` (or
    ///   ``RegistryError/Kind/invalidDigest``) with a message naming the offending part.
    public init(parsing string: String) throws {
        guard !string.isEmpty else {
            throw RegistryError(.invalidReference, "invalid image reference: empty string")
        }
        guard string.utf8.count <= 4096 else {
            throw RegistryError(.invalidReference, "invalid image reference: longer than 4096 bytes")
        }
        if let bad = string.unicodeScalars.first(where: { $0.value <= 0x20 || $0.value >= 0x7f }) {
            throw RegistryError(
                .invalidReference,
                "invalid image reference \"\(string)\": contains \(bad.value == 0x20 ? "a space" : "the character U+\(String(bad.value, radix: 16, uppercase: true))")"
            )
        }

        // `name[:tag][@digest]`: neither names nor tags may contain `@`, so the first `@` splits off the digest.
        var rest = Substring(string)
        var digest: ImageDigest?
        if let at = rest.firstIndex(of: "@") {
            let digestString = String(rest[rest.index(after: at)...])
            rest = rest[..<at]
            do {
                digest = try ImageDigest(parsing: digestString)
            } catch let error as RegistryError {
                throw RegistryError(error.kind, "invalid image reference \"\(string)\": \(error.message)")
            }
        }

        // A `:` after the last `/` separates the tag (a `:` before it can only be a registry port).
        var tag: String?
        let lastSlash = rest.lastIndex(of: "/")
        let tagSearchStart = lastSlash.map { rest.index(after: $0) } ?? rest.startIndex
        if let colon = rest[tagSearchStart...].firstIndex(of: ":") {
            let tagString = String(rest[rest.index(after: colon)...])
            rest = rest[..<colon]
            try Self.validateTag(tagString, original: string)
            tag = tagString
        }

        let name = String(rest)
        guard !name.isEmpty else {
            throw RegistryError(.invalidReference, "invalid image reference \"\(string)\": missing repository name")
        }

        // Docker's splitDockerDomain.
        var host: String
        var path: String
        if let slash = name.firstIndex(of: "/") {
            let first = String(name[..<slash])
            let isHost = first.contains(".") || first.contains(":") || first == "localhost" || first.lowercased() != first
            if isHost {
                host = first
                path = String(name[name.index(after: slash)...])
            } else {
                host = Self.dockerHubDisplayName
                path = name
            }
        } else {
            host = Self.dockerHubDisplayName
            path = name
        }
        try Self.validateRegistry(host, original: string)
        host = Self.normalizeRegistry(host)
        if host == Self.dockerHubRegistryHost, !path.contains("/") {
            path = "library/" + path
        }
        try Self.validateRepository(path, original: string)
        // Docker refuses a bare 64-hex reference because it is indistinguishable from an image ID.
        if Self.isHex64(string) {
            throw RegistryError(
                .invalidReference,
                "invalid image reference \"\(string)\": a 64-character hexadecimal name looks like an image ID; use repo@sha256:<digest>"
            )
        }
        let fullNameLength = Self.displayName(ofHost: host).utf8.count + 1 + path.utf8.count
        guard fullNameLength <= 255 else {
            throw RegistryError(.invalidReference, "invalid image reference \"\(string)\": repository name longer than 255 characters")
        }

        self.registry = host
        self.repository = path
        self.tag = (tag == nil && digest == nil) ? "latest" : tag
        self.digest = digest
    }

    /// The same image pinned to `digest` (keeps the tag for display), e.g. to record exactly what ran.
    public func withDigest(_ digest: ImageDigest) -> ImageReference {
        ImageReference(uncheckedRegistry: registry, repository: repository, tag: tag, digest: digest)
    }

    private init(uncheckedRegistry: String, repository: String, tag: String?, digest: ImageDigest?) {
        self.registry = uncheckedRegistry
        self.repository = repository
        self.tag = tag
        self.digest = digest
    }

    // MARK: - Validation

    /// Maps Docker Hub's aliases to its API host; leaves other hosts as written.
    static func normalizeRegistry(_ host: String) -> String {
        switch host {
        case "docker.io", "index.docker.io", "registry-1.docker.io": return dockerHubRegistryHost
        default: return host
        }
    }

    static func displayName(ofHost host: String) -> String {
        host == dockerHubRegistryHost ? dockerHubDisplayName : host
    }

    /// `domain-component(.domain-component)*(:port)?` or `[ipv6](:port)?`.
    static func validateRegistry(_ host: String, original: String) throws {
        func fail(_ why: String) -> RegistryError {
            RegistryError(.invalidReference, "invalid image reference \"\(original)\": invalid registry host \"\(host)\": \(why)")
        }
        var hostPart = Substring(host)
        var portPart: Substring?
        if hostPart.hasPrefix("[") {
            guard let close = hostPart.firstIndex(of: "]") else { throw fail("unterminated IPv6 address") }
            let inside = hostPart[hostPart.index(after: hostPart.startIndex)..<close]
            guard !inside.isEmpty, inside.unicodeScalars.allSatisfy({ $0.properties.isASCIIHexDigit || $0 == ":" }) else {
                throw fail("invalid IPv6 address")
            }
            let after = hostPart[hostPart.index(after: close)...]
            if !after.isEmpty {
                guard after.hasPrefix(":") else { throw fail("unexpected characters after IPv6 address") }
                portPart = after.dropFirst()
            }
            hostPart = hostPart[...close]
        } else {
            if let colon = hostPart.firstIndex(of: ":") {
                portPart = hostPart[hostPart.index(after: colon)...]
                hostPart = hostPart[..<colon]
            }
            guard !hostPart.isEmpty else { throw fail("empty host name") }
            for component in hostPart.split(separator: ".", omittingEmptySubsequences: false) {
                guard !component.isEmpty else { throw fail("empty label") }
                guard component.utf8.allSatisfy({ isAlnum($0) || $0 == UInt8(ascii: "-") }) else {
                    throw fail("only letters, digits, '-' and '.' are allowed")
                }
                guard component.utf8.first != UInt8(ascii: "-"), component.utf8.last != UInt8(ascii: "-") else {
                    throw fail("a label may not start or end with '-'")
                }
            }
        }
        if let portPart {
            guard !portPart.isEmpty, portPart.utf8.count <= 5, portPart.utf8.allSatisfy(isDigit), let port = Int(portPart), port <= 65535 else {
                throw fail("invalid port \"\(portPart)\"")
            }
        }
    }

    /// `component(/component)*` with `component = [a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
    static func validateRepository(_ path: String, original: String) throws {
        if path.contains(where: { $0.isUppercase }) {
            throw RegistryError(.invalidReference, "invalid image reference \"\(original)\": repository name \"\(path)\" must be lowercase")
        }
        for component in path.split(separator: "/", omittingEmptySubsequences: false) {
            guard isValidPathComponent(component.utf8) else {
                let shown = component.isEmpty ? "an empty path component" : "path component \"\(component)\""
                throw RegistryError(
                    .invalidReference,
                    "invalid image reference \"\(original)\": \(shown) is not valid: use lowercase letters and digits separated by '.', '_', '__' or '-'"
                )
            }
        }
    }

    static func isValidPathComponent(_ bytes: Substring.UTF8View) -> Bool {
        let chars = Array(bytes)
        guard let first = chars.first, let last = chars.last, isLowerAlnum(first), isLowerAlnum(last) else { return false }
        var i = 0
        while i < chars.count {
            if isLowerAlnum(chars[i]) {
                i += 1
                continue
            }
            // A separator run: ".", "_", "__", or one or more "-". Always followed by an alnum (last is alnum).
            var j = i
            while j < chars.count, !isLowerAlnum(chars[j]) { j += 1 }
            let separator = chars[i..<j]
            let ok: Bool
            if separator.elementsEqual([UInt8(ascii: ".")]) || separator.elementsEqual([UInt8(ascii: "_")])
                || separator.elementsEqual([UInt8(ascii: "_"), UInt8(ascii: "_")])
            {
                ok = true
            } else {
                ok = separator.allSatisfy { $0 == UInt8(ascii: "-") }
            }
            guard ok else { return false }
            i = j
        }
        return true
    }

    /// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
    static func validateTag(_ tag: String, original: String) throws {
        let bytes = Array(tag.utf8)
        guard !bytes.isEmpty else {
            throw RegistryError(.invalidReference, "invalid image reference \"\(original)\": empty tag after ':'")
        }
        guard bytes.count <= 128 else {
            throw RegistryError(.invalidReference, "invalid image reference \"\(original)\": tag is longer than 128 characters")
        }
        let word: (UInt8) -> Bool = { isAlnum($0) || $0 == UInt8(ascii: "_") }
        guard word(bytes[0]), bytes.dropFirst().allSatisfy({ word($0) || $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: "-") }) else {
            throw RegistryError(
                .invalidReference,
                "invalid image reference \"\(original)\": invalid tag \"\(tag)\": use letters, digits, '_', '.' and '-', not starting with '.' or '-'"
            )
        }
    }

    static func isHex64(_ s: String) -> Bool {
        s.utf8.count == 64 && s.utf8.allSatisfy { isDigit($0) || ($0 >= UInt8(ascii: "a") && $0 <= UInt8(ascii: "f")) }
    }
}

@inline(__always) private func isDigit(_ c: UInt8) -> Bool { c >= UInt8(ascii: "0") && c <= UInt8(ascii: "9") }
@inline(__always) private func isLowerAlnum(_ c: UInt8) -> Bool { isDigit(c) || (c >= UInt8(ascii: "a") && c <= UInt8(ascii: "z")) }
@inline(__always) private func isAlnum(_ c: UInt8) -> Bool { isLowerAlnum(c) || (c >= UInt8(ascii: "A") && c <= UInt8(ascii: "Z")) }

public import AsyncHTTPClient
public import Logging
internal import Foundation
internal import NIOCore
internal import NIOHTTP1
internal import Synchronization

/// A client for the OCI Distribution API (Docker Registry HTTP API v2): resolves image references to
/// verified manifests and configs, and downloads layer blobs to disk, resumably and verified.
///
/// Design points, each because registries are remote and untrusted:
/// - every manifest, config and blob is checked against its digest (and size) before it is returned or
///   published under its final name; nothing unverified is ever visible;
/// - authentication is lazy and per registry: requests go out anonymously (or with a cached token) and a
///   `401` challenge decides between Basic and Bearer, so public registries never see credentials;
/// - the only shared mutable state is the token cache, behind a `Mutex`;
/// - timeouts are idle timeouts (no byte for ``idleTimeout``), never total deadlines, so a slow link can
///   still pull a multi-GiB layer while a dead one fails within a minute. Connecting is bounded by the
///   `HTTPClient`'s connect timeout (10 s with ``httpClientConfiguration()``).
public struct RegistryClient: Sendable {
    public let httpClient: HTTPClient
    /// `host:port` of registries spoken to over plain HTTP. Everything else uses HTTPS.
    public let insecureRegistries: Set<String>
    public let credentials: RegistryCredentials
    public let logger: Logger
    /// A request fails when no byte arrives for this long (60 s by default).
    public let idleTimeout: Duration
    private let authCache = RegistryAuthCache()

    /// Redirects followed per request (registries redirect blobs to object storage; more is a loop).
    static let maximumRedirects = 10

    public init(
        httpClient: HTTPClient,
        insecureRegistries: Set<String> = [],
        credentials: RegistryCredentials = RegistryCredentials(),
        logger: Logger,
        idleTimeout: Duration = .seconds(60)
    ) {
        self.httpClient = httpClient
        self.insecureRegistries = Set(insecureRegistries.map { $0.lowercased() })
        self.credentials = credentials
        self.logger = logger
        self.idleTimeout = idleTimeout
    }

    /// The `HTTPClient` configuration this client is meant to run on: 10 s connect timeout, no automatic
    /// redirects (the client follows them itself, dropping `Authorization` when the origin changes), and
    /// no transparent decompression (blobs must be hashed exactly as served).
    public static func httpClientConfiguration() -> HTTPClient.Configuration {
        var configuration = HTTPClient.Configuration(
            redirectConfiguration: .disallow,
            timeout: .init(connect: .seconds(10), read: nil)
        )
        configuration.decompression = .disabled
        return configuration
    }

    // MARK: - Resolve

    /// Fetches the manifest for `reference`, follows an index to `platform`'s manifest, and fetches the
    /// image config; every document is verified against the digest that named it.
    ///
    /// - Throws: ``RegistryError`` — `.notFound` for an unknown repository/tag/digest, `.unauthorized`
    ///   for missing or wrong credentials, `.noMatchingPlatform` listing what an index offers,
    ///   `.unsupported` for schema 1 manifests, foreign layers or non-image artifacts, `.digestMismatch`.
    public func resolve(_ reference: ImageReference, platform: ImagePlatform = .host) async throws -> ResolvedImage {
        try await withIdleTimeout(reference) { monitor in
            try await self.resolveUnlessIdle(reference, platform: platform, monitor: monitor)
        }
    }

    private func resolveUnlessIdle(_ reference: ImageReference, platform: ImagePlatform, monitor: RegistryActivityMonitor) async throws -> ResolvedImage {
        let imageName = reference.description
        var fetched = try await fetchManifest(reference, manifestReference: reference.manifestReference, monitor: monitor)
        var digest = ImageDigest.sha256(of: fetched.bytes)
        if let pinned = reference.digest, pinned != digest {
            throw RegistryError(
                .digestMismatch,
                "manifest of \(imageName) from registry \(reference.displayRegistry) hashes to \(digest), not the requested \(pinned)"
            )
        }
        try checkContentDigestHeader(fetched.headerDigest, actual: digest, what: "manifest of \(imageName)")
        var parsed = try ParsedManifest.decode(fetched.bytes, contentType: fetched.contentType, imageName: imageName)
        var indexDigest: ImageDigest?
        var depth = 0
        while case .index(let index, _) = parsed {
            depth += 1
            guard depth <= 4 else {
                throw RegistryError(.malformed, "image \(imageName) nests indexes more than 4 deep")
            }
            if indexDigest == nil { indexDigest = digest }
            let entry = try index.manifest(for: platform, imageName: imageName)
            logger.debug(
                "index resolved to platform manifest",
                metadata: ["image": "\(imageName)", "platform": "\(platform)", "manifest": "\(entry.digest)"]
            )
            guard entry.size <= Int64(ParsedManifest.maximumSize) else {
                throw RegistryError(.tooLarge, "manifest \(entry.digest) of \(imageName) is \(entry.size) bytes, over the \(ParsedManifest.maximumSize)-byte limit")
            }
            fetched = try await fetchManifest(reference, manifestReference: entry.digest.description, monitor: monitor)
            digest = ImageDigest.sha256(of: fetched.bytes)
            guard Int64(fetched.bytes.count) == entry.size else {
                throw RegistryError(
                    .sizeMismatch,
                    "manifest \(entry.digest) of \(imageName) is \(fetched.bytes.count) bytes but the index says \(entry.size)"
                )
            }
            guard digest == entry.digest else {
                throw RegistryError(.digestMismatch, "manifest of \(imageName) for \(platform) hashes to \(digest), not \(entry.digest) as its index says")
            }
            try checkContentDigestHeader(fetched.headerDigest, actual: digest, what: "manifest \(entry.digest) of \(imageName)")
            parsed = try ParsedManifest.decode(fetched.bytes, contentType: fetched.contentType, imageName: imageName)
        }
        guard case .image(let manifest, let mediaType) = parsed else {
            throw RegistryError(.malformed, "manifest of \(imageName) is not an image manifest")
        }

        let configType = manifest.config.mediaType
        guard configType == ImageMediaType.dockerConfig || configType == ImageMediaType.ociConfig else {
            throw RegistryError(
                .unsupported,
                "\(imageName) is not a container image: its config has media type \"\(configType.prefix(200))\" (expected \(ImageMediaType.ociConfig) or \(ImageMediaType.dockerConfig))"
            )
        }
        for layer in manifest.layers where ImageMediaType.isForeignLayer(layer.mediaType) {
            throw RegistryError(
                .unsupported,
                "image \(imageName) has a foreign (non-distributable) layer \(layer.digest) of type \(layer.mediaType); such layers (typically Windows base layers) are not served by the registry and Flotilla does not pull them"
            )
        }
        guard manifest.config.size <= Int64(ImageConfiguration.maximumSize) else {
            throw RegistryError(.tooLarge, "image config of \(imageName) is \(manifest.config.size) bytes, over the \(ImageConfiguration.maximumSize)-byte limit")
        }
        let configBytes = try await fetchSmallBlob(reference, manifest.config, monitor: monitor)
        let config = try ImageConfiguration.decode(configBytes, imageName: imageName)
        guard config.rootfs.diffIDs.count == manifest.layers.count else {
            throw RegistryError(
                .malformed,
                "image \(imageName) lists \(manifest.layers.count) layers but its config has \(config.rootfs.diffIDs.count) diff_ids"
            )
        }
        if !config.os.isEmpty, !config.architecture.isEmpty,
            platform.matchRank(of: ImagePlatform(architecture: config.architecture, os: config.os, variant: config.variant)) == nil
        {
            logger.warning(
                "image platform differs from the requested platform",
                metadata: ["image": "\(imageName)", "image-platform": "\(config.os)/\(config.architecture)", "wanted": "\(platform)"]
            )
        }
        return ResolvedImage(
            reference: reference, digest: digest, indexDigest: indexDigest, mediaType: mediaType,
            manifestBytes: fetched.bytes, manifest: manifest, platform: platform, configBytes: configBytes, config: config
        )
    }

    private struct FetchedManifest {
        var bytes: [UInt8]
        var contentType: String?
        var headerDigest: String?
    }

    private func fetchManifest(_ reference: ImageReference, manifestReference: String, monitor: RegistryActivityMonitor) async throws -> FetchedManifest {
        let url = baseURL(reference) + "/v2/\(reference.repository)/manifests/\(manifestReference)"
        var headers = HTTPHeaders()
        headers.add(name: "Accept", value: ImageMediaType.manifestAccept.joined(separator: ", "))
        monitor.set(activity: "the manifest of \(reference)")
        let response = try await get(url, reference: reference, headers: headers, monitor: monitor)
        let context = ErrorContext.manifest(reference, manifestReference)
        guard response.status == .ok else {
            throw await failure(response, context: context, monitor: monitor)
        }
        if let length = response.headers.first(name: "Content-Length").flatMap(Int.init), length > ParsedManifest.maximumSize {
            throw RegistryError(.tooLarge, "manifest of \(reference) is \(length) bytes, over the \(ParsedManifest.maximumSize)-byte limit")
        }
        let bytes = try await collect(response.body, limit: ParsedManifest.maximumSize, monitor: monitor) {
            RegistryError(.tooLarge, "manifest of \(reference) is over the \(ParsedManifest.maximumSize)-byte limit")
        }
        return FetchedManifest(
            bytes: bytes,
            contentType: response.headers.first(name: "Content-Type"),
            headerDigest: response.headers.first(name: "Docker-Content-Digest")
        )
    }

    /// A blob read into memory (the config), verified.
    private func fetchSmallBlob(_ reference: ImageReference, _ descriptor: ImageDescriptor, monitor: RegistryActivityMonitor) async throws -> [UInt8] {
        monitor.set(activity: "blob \(descriptor.digest) of \(reference)")
        let url = blobURL(reference, descriptor)
        let response = try await get(url, reference: reference, headers: HTTPHeaders(), monitor: monitor)
        guard response.status == .ok else {
            throw await failure(response, context: .blob(reference, descriptor.digest), monitor: monitor)
        }
        let bytes = try await collect(response.body, limit: Int(descriptor.size), monitor: monitor) {
            RegistryError(.sizeMismatch, "blob \(descriptor.digest) of \(reference) is larger than the \(descriptor.size) bytes its descriptor says")
        }
        guard Int64(bytes.count) == descriptor.size else {
            throw RegistryError(.sizeMismatch, "blob \(descriptor.digest) of \(reference) is \(bytes.count) bytes, not \(descriptor.size)")
        }
        let actual = ImageDigest.sha256(of: bytes)
        guard actual == descriptor.digest else {
            throw RegistryError(.digestMismatch, "blob \(descriptor.digest) of \(reference) from registry \(reference.displayRegistry) hashes to \(actual)")
        }
        return bytes
    }

    private func checkContentDigestHeader(_ header: String?, actual: ImageDigest, what: String) throws {
        guard let header, !header.isEmpty else { return }
        guard let claimed = ImageDigest(header.trimmingCharacters(in: .whitespaces)) else {
            logger.debug("ignoring unparsable Docker-Content-Digest", metadata: ["value": "\(header.prefix(100))"])
            return
        }
        guard claimed == actual else {
            throw RegistryError(.digestMismatch, "\(what): the registry's Docker-Content-Digest says \(claimed) but the bytes hash to \(actual)")
        }
    }

    // MARK: - Blobs

    /// Downloads a blob to `path`, resumably and verified.
    ///
    /// Bytes stream into `path + ".partial"` while being hashed. An existing partial file is resumed with
    /// `Range: bytes=N-` (its prefix is re-hashed first); a server that answers `200` instead of `206`
    /// restarts the download. Only after the size and SHA-256 match `descriptor` is the file `fsync`ed and
    /// renamed to `path` (atomically, `rename(2)`). On a digest mismatch the partial file is deleted.
    /// A download interrupted by an error or cancellation leaves the partial file for the next attempt.
    ///
    /// - Parameter progress: called with the number of bytes of the blob on disk so far (including a
    ///   resumed prefix), after each chunk.
    public func fetchBlob(
        _ reference: ImageReference,
        _ descriptor: ImageDescriptor,
        to path: String,
        progress: @escaping @Sendable (Int64) -> Void = { _ in }
    ) async throws {
        guard descriptor.size >= 0 else {
            throw RegistryError(.malformed, "blob \(descriptor.digest) of \(reference) has a negative size")
        }
        if ImageMediaType.isForeignLayer(descriptor.mediaType) {
            throw RegistryError(.unsupported, "blob \(descriptor.digest) of \(reference) is a foreign (non-distributable) layer; Flotilla does not pull those")
        }
        try await withIdleTimeout(reference) { monitor in
            try await self.fetchBlobUnlessIdle(reference, descriptor, to: path, progress: progress, monitor: monitor)
        }
    }

    private func fetchBlobUnlessIdle(
        _ reference: ImageReference,
        _ descriptor: ImageDescriptor,
        to path: String,
        progress: @escaping @Sendable (Int64) -> Void,
        monitor: RegistryActivityMonitor
    ) async throws {
        let what = "blob \(descriptor.digest) of \(reference)"
        monitor.set(activity: what)
        let file = try PartialBlobFile(openingForAppend: path + ".partial", what: "\(descriptor.digest)")
        var hasher = ImageDigest.SHA256Hasher()
        var written = try file.size()
        if written > descriptor.size {
            logger.debug("partial blob larger than the blob; restarting", metadata: ["path": "\(file.path)"])
            try file.truncate()
            written = 0
        }
        if written > 0 {
            try file.readPrefix(written) { hasher.update(bytes: $0) }
            progress(written)
        }

        var allowRange = true
        transfer: while written < descriptor.size {
            var headers = HTTPHeaders()
            let offset = written
            if offset > 0 && allowRange { headers.add(name: "Range", value: "bytes=\(offset)-") }
            let response = try await get(blobURL(reference, descriptor), reference: reference, headers: headers, monitor: monitor)
            switch response.status {
            case .partialContent where offset > 0 && allowRange:
                let range = response.headers.first(name: "Content-Range").flatMap(Self.parseContentRange)
                guard let range, range.start == offset, range.total == nil || range.total == descriptor.size else {
                    logger.debug("unusable Content-Range on resume; restarting", metadata: ["path": "\(file.path)"])
                    await discard(response.body, monitor: monitor)
                    try file.truncate()
                    hasher = ImageDigest.SHA256Hasher()
                    written = 0
                    allowRange = false
                    continue transfer
                }
                logger.debug("resuming blob download", metadata: ["blob": "\(descriptor.digest)", "offset": "\(offset)"])
            case .ok:
                if offset > 0 {
                    logger.debug("registry ignored Range; restarting", metadata: ["blob": "\(descriptor.digest)"])
                    try file.truncate()
                    hasher = ImageDigest.SHA256Hasher()
                    written = 0
                }
                if let length = response.headers.first(name: "Content-Length").flatMap(Int64.init), length != descriptor.size {
                    throw RegistryError(
                        .sizeMismatch,
                        "\(what): the registry sends \(length) bytes but its descriptor says \(descriptor.size)"
                    )
                }
            case .rangeNotSatisfiable where offset > 0:
                await discard(response.body, monitor: monitor)
                try file.truncate()
                hasher = ImageDigest.SHA256Hasher()
                written = 0
                allowRange = false
                continue transfer
            default:
                throw await failure(response, context: .blob(reference, descriptor.digest), monitor: monitor)
            }

            for try await chunk in response.body {
                monitor.touch()
                let count = Int64(chunk.readableBytes)
                guard written + count <= descriptor.size else {
                    file.remove()
                    throw RegistryError(.sizeMismatch, "\(what) is larger than the \(descriptor.size) bytes its descriptor says; the partial download was deleted")
                }
                try chunk.withUnsafeReadableBytes { bytes in
                    try file.append(bytes)
                    hasher.update(bytes: bytes)
                }
                written += count
                progress(written)
            }
            guard written == descriptor.size else {
                // The body ended early without a transport error; keep the partial file to resume from.
                throw RegistryError(
                    .sizeMismatch,
                    "\(what) ended after \(written) of \(descriptor.size) bytes; the partial download is kept and will be resumed"
                )
            }
        }

        let actual = hasher.finalize()
        guard actual == descriptor.digest else {
            file.remove()
            throw RegistryError(
                .digestMismatch,
                "\(what) from registry \(reference.displayRegistry) hashes to \(actual), not \(descriptor.digest); the partial download was deleted"
            )
        }
        try file.sync()
        try file.publish(as: path)
        logger.debug("blob downloaded", metadata: ["blob": "\(descriptor.digest)", "bytes": "\(written)", "path": "\(path)"])
    }

    /// `bytes START-END/TOTAL` (TOTAL may be `*`).
    static func parseContentRange(_ value: String) -> (start: Int64, end: Int64, total: Int64?)? {
        let trimmed = value.trimmingCharacters(in: .whitespaces)
        guard trimmed.lowercased().hasPrefix("bytes ") else { return nil }
        let spec = trimmed.dropFirst(6).trimmingCharacters(in: .whitespaces)
        let parts = spec.split(separator: "/", maxSplits: 1)
        guard parts.count == 2 else { return nil }
        let bounds = parts[0].split(separator: "-", maxSplits: 1)
        guard bounds.count == 2, let start = Int64(bounds[0]), let end = Int64(bounds[1]), end >= start else { return nil }
        if parts[1] == "*" { return (start, end, nil) }
        guard let total = Int64(parts[1]) else { return nil }
        return (start, end, total)
    }

    // MARK: - HTTP with auth and redirects

    private func baseURL(_ reference: ImageReference) -> String {
        let scheme = insecureRegistries.contains(reference.registry.lowercased()) ? "http" : "https"
        return "\(scheme)://\(reference.registry)"
    }

    private func blobURL(_ reference: ImageReference, _ descriptor: ImageDescriptor) -> String {
        baseURL(reference) + "/v2/\(reference.repository)/blobs/\(descriptor.digest)"
    }

    /// GET against the registry with lazy authentication: sends the cached authorization (if any); on a
    /// `401` answers the challenge once (Basic or Bearer) and retries; a second `401` is an error.
    private func get(_ url: String, reference: ImageReference, headers: HTTPHeaders, monitor: RegistryActivityMonitor) async throws -> HTTPClientResponse {
        var authorization = authCache.lookup(registry: reference.registry, scope: reference.pullScope)
        var answeredChallenge = false
        while true {
            let response = try await send(.GET, url, headers: headers, authorization: authorization, body: nil, reference: reference, monitor: monitor)
            guard response.status == .unauthorized else { return response }
            let body = await errorBody(response.body, monitor: monitor)
            if answeredChallenge {
                throw unauthorized(reference, registryBody: body)
            }
            answeredChallenge = true
            authCache.invalidate(registry: reference.registry, scope: reference.pullScope)
            // Raw values: `headers[canonicalForm:]` would split on the commas inside the challenge.
            let challenges = RegistryAuthChallenge.parse(response.headers["WWW-Authenticate"])
            authorization = try await authenticate(challenges, reference: reference, monitor: monitor)
        }
    }

    /// One request, following redirects itself. `authorization` goes only to the origin of `url`:
    /// registries redirect blob downloads to storage hosts that must not see registry credentials.
    private func send(
        _ method: HTTPMethod,
        _ url: String,
        headers: HTTPHeaders,
        authorization: String?,
        body: [UInt8]?,
        reference: ImageReference,
        monitor: RegistryActivityMonitor
    ) async throws -> HTTPClientResponse {
        guard let originURL = URL(string: url), let origin = Origin(originURL) else {
            throw RegistryError(.http, "invalid URL \(url)")
        }
        var current = originURL
        var method = method
        var body = body
        for _ in 0...Self.maximumRedirects {
            var request = HTTPClientRequest(url: current.absoluteString)
            request.method = method
            request.headers = headers
            request.headers.replaceOrAdd(name: "User-Agent", value: "flotilla")
            if let authorization, Origin(current) == origin {
                request.headers.replaceOrAdd(name: "Authorization", value: authorization)
            }
            if let body {
                request.body = .bytes(ByteBuffer(bytes: body))
            }
            let response: HTTPClientResponse
            do {
                // The watchdog in `withIdleTimeout` is the real bound; this deadline is only a backstop.
                response = try await httpClient.execute(request, deadline: .now() + .nanoseconds(idleTimeout.nanosecondsClamped) + .seconds(5), logger: logger)
            } catch {
                throw transportError(error, url: current, reference: reference, activity: monitor.snapshot().1)
            }
            monitor.touch()
            guard [301, 302, 303, 307, 308].contains(response.status.code) else { return response }
            guard let location = response.headers.first(name: "Location"), let next = URL(string: location, relativeTo: current)?.absoluteURL,
                let scheme = next.scheme?.lowercased(), scheme == "http" || scheme == "https"
            else {
                throw RegistryError(.http, "registry \(reference.displayRegistry) answered \(response.status.code) without a usable Location for \(current.absoluteString)")
            }
            if current.scheme?.lowercased() == "https", scheme == "http" {
                throw RegistryError(.http, "refusing redirect from \(current.host ?? "?") over HTTPS to plain HTTP \(next.host ?? "?")")
            }
            await discard(response.body, monitor: monitor)
            logger.trace("following redirect", metadata: ["from": "\(current.host ?? "")", "to": "\(next.host ?? "")"])
            if response.status == .seeOther, method != .GET, method != .HEAD {
                method = .GET
                body = nil
            }
            current = next
        }
        throw RegistryError(.http, "too many redirects (over \(Self.maximumRedirects)) fetching \(originURL.absoluteString)")
    }

    /// Answers a `401` challenge: returns the `Authorization` header value to retry with (and caches it).
    private func authenticate(_ challenges: [RegistryAuthChallenge], reference: ImageReference, monitor: RegistryActivityMonitor) async throws -> String {
        let credential = credentials.credential(forRegistry: reference.registry)
        if let bearer = challenges.first(where: { $0.scheme == "bearer" }) {
            let token = try await fetchToken(bearer, reference: reference, credential: credential, monitor: monitor)
            let value = "Bearer \(token.token)"
            authCache.store(value, registry: reference.registry, scope: reference.pullScope, lifetime: .seconds(token.expiresIn))
            return value
        }
        if challenges.contains(where: { $0.scheme == "basic" }) {
            guard case .basic(let username, let password) = credential else {
                throw RegistryError(
                    .unauthorized,
                    "registry \(reference.displayRegistry) requires a username and password to pull \(reference.repository), and no credentials are configured for it: supply them with --registry-auth-file (Docker config.json format)"
                )
            }
            let value = "Basic " + Data("\(username):\(password)".utf8).base64EncodedString()
            authCache.store(value, registry: reference.registry, scope: "", lifetime: nil)
            return value
        }
        let schemes = challenges.map(\.scheme).joined(separator: ", ")
        throw RegistryError(
            .unauthorized,
            "registry \(reference.displayRegistry) requires authentication with an unsupported scheme (\(schemes.isEmpty ? "no WWW-Authenticate challenge" : schemes)); Flotilla supports Basic and Bearer"
        )
    }

    private struct Token {
        var token: String
        var expiresIn: Int
    }

    /// Gets a Bearer token from the challenge's realm (Docker's token protocol; OAuth2 refresh-token
    /// POST when the credential is an identity token).
    private func fetchToken(_ challenge: RegistryAuthChallenge, reference: ImageReference, credential: RegistryCredentials.Credential?, monitor: RegistryActivityMonitor) async throws -> Token {
        guard let realm = challenge[parameter: "realm"], var components = URLComponents(string: realm),
            let scheme = components.scheme?.lowercased(), scheme == "https" || scheme == "http", components.host != nil
        else {
            throw RegistryError(.unauthorized, "registry \(reference.displayRegistry) sent a Bearer challenge without a usable realm URL")
        }
        if credential != nil, scheme == "http", !insecureRegistries.contains(reference.registry.lowercased()) {
            throw RegistryError(
                .unauthorized,
                "registry \(reference.displayRegistry) points its token realm at plain HTTP (\(realm)); refusing to send its credentials unencrypted"
            )
        }
        var scopes = [reference.pullScope]
        for extra in (challenge[parameter: "scope"] ?? "").split(separator: " ").map(String.init) where !scopes.contains(extra) {
            scopes.append(extra)
        }
        let service = challenge[parameter: "service"]
        let tokenServer = components.host.map { host in components.port.map { "\(host):\($0)" } ?? host } ?? realm
        monitor.set(activity: "a token from \(tokenServer) for \(reference.displayRegistry)")

        let response: HTTPClientResponse
        if case .identityToken(let refreshToken, _) = credential {
            var form: [(String, String)] = [("grant_type", "refresh_token"), ("refresh_token", refreshToken), ("client_id", "flotilla")]
            if let service { form.append(("service", service)) }
            form.append(("scope", scopes.joined(separator: " ")))
            let body = Array(form.map { "\(Self.formEncode($0.0))=\(Self.formEncode($0.1))" }.joined(separator: "&").utf8)
            var headers = HTTPHeaders()
            headers.add(name: "Content-Type", value: "application/x-www-form-urlencoded")
            response = try await send(.POST, components.string ?? realm, headers: headers, authorization: nil, body: body, reference: reference, monitor: monitor)
        } else {
            var query = components.percentEncodedQueryItems ?? []
            if let service { query.append(URLQueryItem(name: "service", value: Self.formEncode(service))) }
            for scope in scopes { query.append(URLQueryItem(name: "scope", value: Self.formEncode(scope))) }
            var authorization: String?
            if case .basic(let username, let password) = credential {
                query.append(URLQueryItem(name: "account", value: Self.formEncode(username)))
                authorization = "Basic " + Data("\(username):\(password)".utf8).base64EncodedString()
            }
            components.percentEncodedQueryItems = query
            response = try await send(.GET, components.string ?? realm, headers: HTTPHeaders(), authorization: authorization, body: nil, reference: reference, monitor: monitor)
        }
        let body = try await collect(response.body, limit: 1 << 20, monitor: monitor) {
            RegistryError(.http, "token response from \(tokenServer) is over 1 MiB")
        }
        switch response.status.code {
        case 200:
            break
        case 401, 403:
            throw unauthorized(reference, registryBody: body, tokenServer: tokenServer)
        default:
            throw RegistryError(
                .http,
                "token server \(tokenServer) for registry \(reference.displayRegistry) answered HTTP \(response.status.code)\(Self.errorSummary(body).map { ": \($0)" } ?? "")"
            )
        }
        struct TokenResponse: Decodable {
            var token: String?
            var access_token: String?
            var expires_in: Int?
        }
        guard let decoded = try? JSONDecoder().decode(TokenResponse.self, from: Data(body)),
            let token = [decoded.token, decoded.access_token].compactMap({ $0 }).first(where: { !$0.isEmpty })
        else {
            throw RegistryError(.unauthorized, "token server \(tokenServer) for registry \(reference.displayRegistry) returned no token")
        }
        // Tokens are reused until shortly before they expire; 60 s when the server does not say.
        let lifetime = max(0, (decoded.expires_in ?? 60) - 5)
        return Token(token: token, expiresIn: lifetime)
    }

    /// RFC 3986 unreserved characters pass; everything else is percent-encoded (safe in query and form).
    static func formEncode(_ s: String) -> String {
        var out = ""
        for byte in s.utf8 {
            switch byte {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
                UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"):
                out.unicodeScalars.append(Unicode.Scalar(byte))
            default:
                out += String(format: "%%%02X", byte)
            }
        }
        return out
    }

    // MARK: - Errors

    private enum ErrorContext {
        case manifest(ImageReference, String)
        case blob(ImageReference, ImageDigest)
    }

    private func unauthorized(_ reference: ImageReference, registryBody: [UInt8], tokenServer: String? = nil) -> RegistryError {
        let detail = Self.errorSummary(registryBody).map { " (\($0))" } ?? ""
        let by = tokenServer.map { "the token server \($0) of registry \(reference.displayRegistry)" } ?? "registry \(reference.displayRegistry)"
        if credentials.credential(forRegistry: reference.registry) != nil {
            return RegistryError(
                .unauthorized,
                "\(by) rejected the configured credentials for \(reference.repository)\(detail): the username/password (or token) in --registry-auth-file is wrong or lacks pull access"
            )
        }
        return RegistryError(
            .unauthorized,
            "\(by) requires authentication to pull \(reference.repository)\(detail), and no credentials are configured for it: supply them with --registry-auth-file (or the repository does not exist)"
        )
    }

    /// Turns a non-success response into an error, using the registry's JSON error body when present.
    private func failure(_ response: HTTPClientResponse, context: ErrorContext, monitor: RegistryActivityMonitor) async -> RegistryError {
        let body = await errorBody(response.body, monitor: monitor)
        let errors = Self.registryErrors(body)
        let codes = Set(errors.map(\.code))
        let detail = Self.errorSummary(body).map { " (\($0))" } ?? ""
        let reference: ImageReference
        let subject: String
        switch context {
        case .manifest(let ref, let manifestReference):
            reference = ref
            subject = manifestReference == ref.manifestReference ? "image \(ref)" : "manifest \(manifestReference) of image \(ref)"
        case .blob(let ref, let digest):
            reference = ref
            subject = "blob \(digest) of image \(ref)"
        }
        let registry = reference.displayRegistry
        let status = response.status.code
        if codes.contains("NAME_UNKNOWN") {
            return RegistryError(.notFound, "repository \(reference.repository) not found in registry \(registry)\(detail)")
        }
        if status == 404 || codes.contains("MANIFEST_UNKNOWN") || codes.contains("BLOB_UNKNOWN") {
            return RegistryError(.notFound, "\(subject) not found in registry \(registry)\(detail)")
        }
        if status == 403 || codes.contains("DENIED") {
            return RegistryError(.denied, "registry \(registry) denied access to \(subject)\(detail): check that the account in --registry-auth-file may pull \(reference.repository)")
        }
        if status == 429 || codes.contains("TOOMANYREQUESTS") {
            return RegistryError(.rateLimited, "registry \(registry) is rate-limiting pulls (HTTP 429) of \(subject)\(detail); retry later or authenticate")
        }
        if status == 401 {
            return unauthorized(reference, registryBody: body)
        }
        return RegistryError(.http, "registry \(registry) answered HTTP \(status) for \(subject)\(detail)")
    }

    struct RegistryErrorItem: Decodable {
        var code: String
        var message: String?
    }

    /// Parses `{"errors":[{"code","message"}]}`; empty when the body is not that.
    static func registryErrors(_ body: [UInt8]) -> [RegistryErrorItem] {
        struct Envelope: Decodable { var errors: [RegistryErrorItem]? }
        return (try? JSONDecoder().decode(Envelope.self, from: Data(body)))?.errors ?? []
    }

    /// `CODE: message; CODE2: message2`, or a short printable excerpt of a non-JSON body, or nil.
    static func errorSummary(_ body: [UInt8]) -> String? {
        let errors = registryErrors(body)
        if !errors.isEmpty {
            return errors.prefix(5).map { item in
                let message = (item.message ?? "").prefix(300)
                return message.isEmpty ? item.code : "\(item.code): \(message)"
            }.joined(separator: "; ")
        }
        let text = String(decoding: body.prefix(200), as: UTF8.self)
            .unicodeScalars.filter { $0.value >= 0x20 && $0.value < 0x7f }
        let excerpt = String(String.UnicodeScalarView(text)).trimmingCharacters(in: .whitespaces)
        return excerpt.isEmpty ? nil : excerpt
    }

    private func transportError(_ error: any Error, url: URL, reference: ImageReference, activity: String) -> any Error {
        if error is RegistryError || error is CancellationError { return error }
        if let error = error as? HTTPClientError, error == .cancelled { return CancellationError() }
        let host = url.host.map { h in url.port.map { "\(h):\($0)" } ?? h } ?? url.absoluteString
        if let error = error as? HTTPClientError {
            if error == .connectTimeout {
                return RegistryError(.unreachable, "connecting to \(host) (registry \(reference.displayRegistry)) timed out")
            }
            if error == .deadlineExceeded || error == .readTimeout {
                return RegistryError(.timeout, "no response from \(host) (registry \(reference.displayRegistry)) for over \(Self.seconds(idleTimeout)) while fetching \(activity)")
            }
        }
        let text = String(describing: error)
        var hint = ""
        if url.scheme == "https", ["SSL", "TLS", "handshake", "certificate"].contains(where: { text.contains($0) }) {
            hint = "; if \(reference.registry) serves plain HTTP, list it as an insecure registry"
        }
        return RegistryError(.unreachable, "cannot reach \(host) (registry \(reference.displayRegistry)) over \(url.scheme ?? "?"): \(text)\(hint)")
    }

    static func seconds(_ d: Duration) -> String {
        let s = Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
        return s == s.rounded() ? "\(Int(s)) s" : "\(s) s"
    }

    // MARK: - Body reading and idle timeout

    /// Reads a body into memory, failing with `tooLarge()` past `limit` bytes.
    private func collect(
        _ body: HTTPClientResponse.Body,
        limit: Int,
        monitor: RegistryActivityMonitor,
        tooLarge: () -> RegistryError
    ) async throws -> [UInt8] {
        var out: [UInt8] = []
        for try await chunk in body {
            monitor.touch()
            guard out.count + chunk.readableBytes <= limit else { throw tooLarge() }
            out.append(contentsOf: chunk.readableBytesView)
        }
        return out
    }

    /// Reads a small error body (up to 64 KiB; registries' JSON errors are tiny). Never throws: an error
    /// body that cannot be read just means a less detailed message.
    private func errorBody(_ body: HTTPClientResponse.Body, monitor: RegistryActivityMonitor) async -> [UInt8] {
        var out: [UInt8] = []
        do {
            for try await chunk in body {
                monitor.touch()
                out.append(contentsOf: chunk.readableBytesView.prefix(64 * 1024 - out.count))
                if out.count >= 64 * 1024 { break }
            }
        } catch {}
        return out
    }

    /// Drains a body we do not need (redirects, restarts) so the connection can be reused; a large one is
    /// abandoned after 64 KiB instead, which closes the connection.
    private func discard(_ body: HTTPClientResponse.Body, monitor: RegistryActivityMonitor) async {
        _ = await errorBody(body, monitor: monitor)
    }

    /// Runs `operation`, failing it with ``RegistryError/Kind/timeout`` when the monitor sees no activity
    /// for ``idleTimeout``. Not a total deadline: every response head and body chunk resets the clock.
    private func withIdleTimeout<T: Sendable>(
        _ reference: ImageReference,
        _ operation: @escaping @Sendable (RegistryActivityMonitor) async throws -> T
    ) async throws -> T {
        let monitor = RegistryActivityMonitor()
        let timeout = idleTimeout
        return try await withThrowingTaskGroup(of: T?.self) { group in
            group.addTask { try await operation(monitor) }
            group.addTask {
                while true {
                    let (last, activity) = monitor.snapshot()
                    let deadline = last + timeout
                    if ContinuousClock.now >= deadline {
                        throw RegistryError(
                            .timeout,
                            "no data from registry \(reference.displayRegistry) for \(Self.seconds(timeout)) while fetching \(activity)"
                        )
                    }
                    try await Task.sleep(until: deadline, clock: .continuous)
                }
            }
            defer { group.cancelAll() }
            while let result = try await group.next() {
                if let value = result { return value }
            }
            throw CancellationError()
        }
    }
}

/// Last-activity timestamp (and what was being fetched) shared by a request and its idle watchdog.
final class RegistryActivityMonitor: Sendable {
    private let state = Mutex<(ContinuousClock.Instant, String)>((.now, "data"))

    func touch() {
        state.withLock { $0.0 = .now }
    }

    func set(activity: String) {
        state.withLock { $0 = (.now, activity) }
    }

    func snapshot() -> (ContinuousClock.Instant, String) {
        state.withLock { $0 }
    }
}

/// The per-client cache of `Authorization` values: Bearer tokens per (registry, scope) until they expire,
/// and Basic credentials per registry once a registry has asked for them.
final class RegistryAuthCache: Sendable {
    private struct Key: Hashable {
        var registry: String
        var scope: String
    }

    private struct Entry {
        var value: String
        var expires: ContinuousClock.Instant?
    }

    private let entries = Mutex<[Key: Entry]>([:])

    func lookup(registry: String, scope: String) -> String? {
        let now = ContinuousClock.now
        return entries.withLock { entries in
            for key in [Key(registry: registry, scope: scope), Key(registry: registry, scope: "")] {
                guard let entry = entries[key] else { continue }
                if let expires = entry.expires, expires <= now {
                    entries[key] = nil
                    continue
                }
                return entry.value
            }
            return nil
        }
    }

    func store(_ value: String, registry: String, scope: String, lifetime: Duration?) {
        let now = ContinuousClock.now
        entries.withLock { entries in
            if entries.count > 1000 {
                entries = entries.filter { $0.value.expires.map { $0 > now } ?? true }
            }
            entries[Key(registry: registry, scope: scope)] = Entry(value: value, expires: lifetime.map { now + $0 })
        }
    }

    func invalidate(registry: String, scope: String) {
        entries.withLock { entries in
            entries[Key(registry: registry, scope: scope)] = nil
            entries[Key(registry: registry, scope: "")] = nil
        }
    }
}

/// scheme + host + port, for deciding whether a redirect target may see the registry's credentials.
private struct Origin: Equatable {
    var scheme: String
    var host: String
    var port: Int

    init?(_ url: URL) {
        guard let scheme = url.scheme?.lowercased(), let host = url.host?.lowercased() else { return nil }
        self.scheme = scheme
        self.host = host
        self.port = url.port ?? (scheme == "https" ? 443 : 80)
    }
}

extension Duration {
    fileprivate var nanosecondsClamped: Int64 {
        let (seconds, attoseconds) = components
        guard seconds < Int64.max / 1_000_000_000 else { return Int64.max / 2 }
        return seconds * 1_000_000_000 + attoseconds / 1_000_000_000
    }
}

import AsyncHTTPClient
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Puts an instance's artifacts (Marathon's `fetch`, or the older `uris`) into its sandbox before it
/// starts, with the Mesos fetcher's semantics:
///
/// - each artifact is saved under its URI's basename, or `outputFile`/`destPath` (relative to the sandbox;
///   absolute paths and `..` are refused), first into a temporary file next to it, renamed when complete;
/// - `executable: true` makes it mode 0755 and it is never extracted; otherwise it is 0644 and, with
///   `extract: true` (the default), archives are extracted by suffix (`.tar`, `.tar.gz`/`.tgz`,
///   `.tar.bz2`/`.tbz2`, `.tar.xz`/`.txz`, `.zip`, and `.gz` for a single file) into the directory the file
///   was saved in, keeping the file. Extraction is our own code (see ``ArtifactExtraction``), with
///   `bzip2`/`xz` run only as decompressors;
/// - `cache: true` serves it from the ``ArtifactCache``;
/// - URIs: `http`, `https`, `file` and plain absolute paths. Redirects are followed here (at most
///   ``Configuration/maxRedirects``, no loops, never from HTTPS to HTTP); a non-2xx status is an error;
///   a download fails when no byte arrives for ``Configuration/idleTimeout`` and past
///   ``Configuration/maxArtifactBytes``.
///
/// Artifacts are fetched in order, one at a time; every request is checked before the first download.
/// Give it a client made with ``httpClientConfiguration(connectTimeout:)`` (redirects off, so that this
/// type's redirect rules apply, and a 10 s connect timeout).
struct ArtifactFetcher: Sendable {
    struct Configuration: Sendable {
        /// Largest artifact downloaded or copied (a hostile server cannot fill the disk).
        var maxArtifactBytes: Int64 = 4 << 30
        /// Largest total one archive may extract to (decompression bombs).
        var maxExtractedBytes: Int64 = 32 << 30
        /// Most entries one archive may have.
        var maxArchiveEntries = 1_000_000
        /// A download fails when no byte arrives for this long (not a total deadline).
        var idleTimeout: Duration = .seconds(60)
        /// Redirects followed per artifact.
        var maxRedirects = 10
        /// Size cap of the cache directory.
        var cacheMaxBytes: Int64 = 10 << 30

        init() {}
    }

    let httpClient: HTTPClient
    let cache: ArtifactCache
    let logger: Logger
    let configuration: Configuration

    init(httpClient: HTTPClient, cacheDirectory: String, logger: Logger, configuration: Configuration = Configuration()) {
        self.httpClient = httpClient
        self.logger = logger
        self.configuration = configuration
        cache = ArtifactCache(directory: cacheDirectory, maxBytes: configuration.cacheMaxBytes, logger: logger)
    }

    /// The client configuration this fetcher expects: redirects not followed by the client (the fetcher
    /// follows them itself), `connectTimeout` to connect, no response decompression (a `.gz` is saved as
    /// served).
    static func httpClientConfiguration(connectTimeout: Duration = .seconds(10)) -> HTTPClient.Configuration {
        var configuration = HTTPClient.Configuration(
            redirectConfiguration: .disallow,
            timeout: .init(connect: .nanoseconds(connectTimeout.clampedNanoseconds)),
            decompression: .disabled
        )
        configuration.httpVersion = .automatic
        return configuration
    }

    // MARK: - Fetching

    /// Fetches `requests` into the directory `sandbox` (created if missing), in order. `progress` gets
    /// one sentence per step ("fetching …", "saved …", "extracted …").
    func fetch(_ requests: [ArtifactRequest], into sandbox: String, progress: @Sendable (String) -> Void) async throws {
        let plans = try requests.map { request in
            do {
                return try Plan(request)
            } catch let error as ArtifactError {
                throw error.fetching(request.uri)
            }
        }
        let box = try ArtifactSandbox(path: sandbox)
        for plan in plans {
            try Task.checkCancellation()
            do {
                try await fetch(plan, into: box, progress: progress)
            } catch let error as ArtifactError {
                throw error.fetching(plan.request.uri)
            } catch is CancellationError {
                throw CancellationError()
            } catch {
                throw ArtifactError(.io, String(describing: error), uri: plan.request.uri)
            }
        }
    }

    /// Where one request comes from and where it goes.
    struct Plan: Sendable {
        enum Source: Sendable {
            case http(URL)
            case local(String)
        }

        var request: ArtifactRequest
        var source: Source
        /// Sandbox-relative path of the saved file.
        var destination: [String]

        init(_ request: ArtifactRequest) throws {
            self.request = request
            let uri = request.uri
            let fail = { (reason: String) in ArtifactError(.invalidRequest, reason, uri: uri) }
            let basename: String
            if uri.hasPrefix("/") {
                source = .local(uri)
                basename = String(uri.split(separator: "/").last ?? "")
            } else {
                guard let url = URL(string: uri), let scheme = url.scheme?.lowercased() else {
                    throw fail("it is not a valid URI (use http://, https://, file:// or an absolute path)")
                }
                switch scheme {
                case "http", "https":
                    guard let host = url.host, !host.isEmpty else { throw fail("the URI has no host") }
                    source = .http(url)
                case "file":
                    guard url.host == nil || url.host == "" || url.host == "localhost" else {
                        throw fail("file URIs must name a local file (file:///path), not host \(url.host ?? "")")
                    }
                    guard url.path.hasPrefix("/") else { throw fail("the file URI has no absolute path") }
                    source = .local(url.path)
                default:
                    throw fail("the URI scheme '\(scheme)' is not supported (use http, https, file or an absolute path)")
                }
                basename = String(url.path.split(separator: "/").last ?? "")
            }
            if let output = request.outputFile ?? request.destPath, !output.isEmpty {
                var parts = try ArtifactSandbox.components(of: output, what: "output file").map { $0 }
                if output.hasSuffix("/") || parts.isEmpty {
                    guard !basename.isEmpty, basename != ".", basename != ".." else {
                        throw fail("cannot tell a file name from the URI; set outputFile")
                    }
                    parts.append(basename)
                }
                destination = parts
            } else {
                guard !basename.isEmpty, basename != ".", basename != "..", !basename.contains("\0") else {
                    throw fail("cannot tell a file name from the URI; set outputFile")
                }
                destination = [basename]
            }
            if destination.contains(where: { $0 == "." || $0 == ".." || $0.contains("\0") }) {
                throw fail("the output file name '\(ArtifactSandbox.printable(ArtifactSandbox.display(destination)))' is not usable")
            }
            if destination.contains(where: { $0.utf8.count > 255 }) {
                throw fail("the output file name is too long")
            }
        }
    }

    private func fetch(_ plan: Plan, into sandbox: ArtifactSandbox, progress: @Sendable (String) -> Void) async throws {
        let request = plan.request
        let shown = ArtifactSandbox.display(plan.destination)
        let name = plan.destination[plan.destination.count - 1]
        progress("fetching \(request.uri)")
        let started = ContinuousClock.now

        let dirFD = try sandbox.openDirectory(plan.destination.dropLast(), create: true)
        defer { close(dirFD) }
        let temp = ".\(name.prefix(200)).\(ArtifactIO.randomSuffix()).fetching"
        let out = try ArtifactSandbox.createFile(temp, in: dirFD, shown: shown)
        var open = true
        let size: Int64
        do {
            if request.cache {
                let limit = configuration.maxArtifactBytes
                let (cached, downloaded) = try await cache.open(request.uri) { fd in
                    _ = try await self.transfer(plan, to: fd)
                }
                defer { close(cached) }
                if !downloaded { progress("using the cached copy of \(request.uri)") }
                size = try await ArtifactIO.blocking {
                    try ArtifactIO.copy(cached, to: out, limit: limit, shownSource: "the cached copy", shownDestination: shown) { _ in
                        ArtifactError(.tooLarge, "the cached copy is larger than the \(Self.describe(bytes: limit)) limit")
                    }
                }
            } else {
                size = try await transfer(plan, to: out)
            }
            guard fchmod(out, request.executable ? 0o755 : 0o644) == 0 else {
                throw ArtifactError.posix("cannot set the mode of \(shown)")
            }
            open = false
            guard close(out) == 0 else { throw ArtifactError.posix("cannot write \(shown)") }
            guard renameat(dirFD, temp, dirFD, name) == 0 else {
                throw ArtifactError.posix("cannot save \(shown) in the sandbox")
            }
        } catch {
            if open { close(out) }
            unlinkat(dirFD, temp, 0)
            throw error
        }
        logger.info("fetched artifact", metadata: [
            "uri": "\(ArtifactRequest.redacted(request.uri))", "path": "\(shown)", "bytes": "\(size)", "seconds": "\(ContinuousClock.now - started)",
        ])
        progress("saved \(shown) (\(Self.describe(bytes: size)))")

        guard !request.executable, request.extract, let kind = ArtifactArchiveKind(fileName: name) else { return }
        let destination = Array(plan.destination.dropLast())
        let limits = ArtifactExtraction.Limits(maxBytes: configuration.maxExtractedBytes, maxEntries: configuration.maxArchiveEntries)
        let logger = self.logger
        let summary = try await ArtifactIO.blocking {
            let fd = try sandbox.openForReading(plan.destination)
            defer { close(fd) }
            var extraction = ArtifactExtraction(sandbox: sandbox, destination: destination, limits: limits, logger: logger, archive: shown)
            do {
                try extraction.extract(kind, fd: fd, savedName: name)
            } catch let error as ArtifactError {
                throw ArtifactError(error.kind, "cannot extract \(shown): \(error.reason)")
            }
            return extraction.summary
        }
        logger.info("extracted artifact", metadata: ["path": "\(shown)", "entries": "\(summary.entries)", "bytes": "\(summary.bytes)"])
        progress("extracted \(shown) into \(ArtifactSandbox.display(destination)) (\(summary.entries) entries, \(Self.describe(bytes: summary.bytes)))")
    }

    /// Downloads or copies the artifact into `fd`; returns its size.
    private func transfer(_ plan: Plan, to fd: Int32) async throws -> Int64 {
        switch plan.source {
        case .local(let path):
            let limit = configuration.maxArtifactBytes
            return try await ArtifactIO.blocking { try Self.copyLocal(path, to: fd, limit: limit) }
        case .http(let url):
            return try await withIdleTimeout { monitor in
                try await self.download(url, to: fd, monitor: monitor)
            }
        }
    }

    // MARK: - Local files

    static func copyLocal(_ path: String, to out: Int32, limit: Int64) throws -> Int64 {
        let fd = Foundation.open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC)
        guard fd >= 0 else {
            let code = errno
            switch code {
            case ENOENT: throw ArtifactError(.notFound, "no such file \(path)")
            case EACCES: throw ArtifactError(.io, "permission denied reading \(path)")
            default: throw ArtifactError.posix("cannot open \(path)", code)
            }
        }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw ArtifactError.posix("cannot read \(path)") }
        if (info.st_mode & mode_t(S_IFMT)) == mode_t(S_IFDIR) { throw ArtifactError(.invalidRequest, "\(path) is a directory, not a file") }
        guard (info.st_mode & mode_t(S_IFMT)) == mode_t(S_IFREG) else { throw ArtifactError(.invalidRequest, "\(path) is not a regular file") }
        let tooLarge = { (size: Int64) in
            ArtifactError(.tooLarge, "\(path) is larger than the \(describe(bytes: limit)) limit (\(describe(bytes: size)))")
        }
        if Int64(info.st_size) > limit { throw tooLarge(Int64(info.st_size)) }
        return try ArtifactIO.copy(fd, to: out, limit: limit, shownSource: path, shownDestination: "the artifact", tooLarge: tooLarge)
    }

    // MARK: - HTTP

    /// One download, following redirects; the body goes to `fd`.
    private func download(_ origin: URL, to fd: Int32, monitor: ArtifactActivityMonitor) async throws -> Int64 {
        var current = origin
        var visited: Set<String> = [origin.absoluteString]
        var redirects = 0
        while true {
            var request = HTTPClientRequest(url: current.absoluteString)
            request.method = .GET
            request.headers.add(name: "User-Agent", value: "flotilla-fetcher")
            request.headers.add(name: "Accept-Encoding", value: "identity")
            let response: HTTPClientResponse
            do {
                // The idle watchdog is the real bound; this deadline (up to the response head) is a backstop.
                let backstop = configuration.idleTimeout + .seconds(5)
                response = try await httpClient.execute(request, deadline: .now() + .nanoseconds(backstop.clampedNanoseconds), logger: logger)
            } catch {
                throw transportError(error, url: current)
            }
            monitor.touch()
            let code = response.status.code
            if [301, 302, 303, 307, 308].contains(code) {
                guard let location = response.headers.first(name: "Location"),
                    let next = URL(string: location, relativeTo: current)?.absoluteURL,
                    let scheme = next.scheme?.lowercased(), scheme == "http" || scheme == "https", next.host != nil
                else {
                    throw ArtifactError(.http, "\(current.absoluteString) answered \(code) \(response.status.reasonPhrase) without a usable Location")
                }
                if current.scheme?.lowercased() == "https", scheme == "http" {
                    throw ArtifactError(.redirect, "refusing a redirect from HTTPS to plain HTTP (\(next.absoluteString))")
                }
                await drain(response.body, monitor: monitor)
                if visited.contains(next.absoluteString) {
                    throw ArtifactError(.redirect, "redirect loop (\(current.absoluteString) redirects back to \(next.absoluteString))")
                }
                redirects += 1
                if redirects > configuration.maxRedirects {
                    throw ArtifactError(.redirect, "more than \(configuration.maxRedirects) redirects")
                }
                logger.debug("following redirect", metadata: ["from": "\(ArtifactRequest.redacted(current.absoluteString))", "to": "\(ArtifactRequest.redacted(next.absoluteString))"])
                visited.insert(next.absoluteString)
                current = next
                continue
            }
            guard (200..<300).contains(code) else {
                await drain(response.body, monitor: monitor)
                let via = current == origin ? "" : " (from \(current.absoluteString))"
                throw ArtifactError(.http, "\(code) \(response.status.reasonPhrase)\(via)")
            }
            let limit = configuration.maxArtifactBytes
            if let length = response.headers.first(name: "Content-Length").flatMap({ Int64($0) }), length > limit {
                throw ArtifactError(.tooLarge, "it is \(Self.describe(bytes: length)), larger than the \(Self.describe(bytes: limit)) limit")
            }
            var total: Int64 = 0
            do {
                for try await chunk in response.body {
                    monitor.touch()
                    total += Int64(chunk.readableBytes)
                    if total > limit {
                        throw ArtifactError(.tooLarge, "it is larger than the \(Self.describe(bytes: limit)) limit")
                    }
                    try chunk.withUnsafeReadableBytes { try ArtifactIO.writeAll(fd, $0, shown: "the download") }
                }
            } catch let error as ArtifactError {
                throw error
            } catch {
                let mapped = transportError(error, url: current)
                if let artifactError = mapped as? ArtifactError, artifactError.kind == .unreachable {
                    throw ArtifactError(.unreachable, "the download broke off after \(Self.describe(bytes: total)): \(error)")
                }
                throw mapped
            }
            return total
        }
    }

    /// Reads and drops a body we do not need (at most 64 KiB; past that the connection is dropped).
    private func drain(_ body: HTTPClientResponse.Body, monitor: ArtifactActivityMonitor) async {
        var seen = 0
        do {
            for try await chunk in body {
                monitor.touch()
                seen += chunk.readableBytes
                if seen > 64 * 1024 { break }
            }
        } catch {}
    }

    private func transportError(_ error: any Error, url: URL) -> any Error {
        if error is ArtifactError || error is CancellationError { return error }
        let host = url.host.map { h in url.port.map { "\(h):\($0)" } ?? h } ?? url.absoluteString
        if let error = error as? HTTPClientError {
            if error == .cancelled { return CancellationError() }
            if error == .connectTimeout { return ArtifactError(.unreachable, "connecting to \(host) timed out") }
            if error == .deadlineExceeded || error == .readTimeout {
                return ArtifactError(.timeout, "no data from \(host) for \(Self.describe(configuration.idleTimeout))")
            }
        }
        return ArtifactError(.unreachable, "cannot download from \(host): \(error)")
    }

    /// Runs `operation`, failing it when `monitor` sees no activity for ``Configuration/idleTimeout``.
    private func withIdleTimeout<T: Sendable>(_ operation: @escaping @Sendable (ArtifactActivityMonitor) async throws -> T) async throws -> T {
        let monitor = ArtifactActivityMonitor()
        let timeout = configuration.idleTimeout
        return try await withThrowingTaskGroup(of: T?.self) { group in
            group.addTask { try await operation(monitor) }
            group.addTask {
                while true {
                    let deadline = monitor.last + timeout
                    if ContinuousClock.now >= deadline {
                        throw ArtifactError(.timeout, "no data arrived for \(Self.describe(timeout)); the server stalled")
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

    // MARK: - Formatting

    /// `512 bytes`, `10 KiB`, `1.5 GiB`.
    static func describe(bytes: Int64) -> String {
        let units = ["KiB", "MiB", "GiB", "TiB"]
        guard bytes >= 1024 else { return bytes == 1 ? "1 byte" : "\(bytes) bytes" }
        var value = Double(bytes)
        var unit = -1
        while value >= 1024, unit < units.count - 1 {
            value /= 1024
            unit += 1
        }
        let rounded = (value * 10).rounded() / 10
        return rounded == rounded.rounded() ? "\(Int(rounded)) \(units[unit])" : "\(rounded) \(units[unit])"
    }

    static func describe(_ duration: Duration) -> String {
        let seconds = Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
        return seconds == seconds.rounded() ? "\(Int(seconds)) s" : "\(seconds) s"
    }
}

/// Last-activity time shared by a download and its idle watchdog.
final class ArtifactActivityMonitor: Sendable {
    private let state = Mutex<ContinuousClock.Instant>(.now)

    func touch() { state.withLock { $0 = .now } }

    var last: ContinuousClock.Instant { state.withLock { $0 } }
}

extension Duration {
    fileprivate var clampedNanoseconds: Int64 {
        let (seconds, attoseconds) = components
        guard seconds < Int64.max / 1_000_000_000 else { return Int64.max / 2 }
        return seconds * 1_000_000_000 + attoseconds / 1_000_000_000
    }
}

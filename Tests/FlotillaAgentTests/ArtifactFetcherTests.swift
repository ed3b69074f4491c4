import AsyncHTTPClient
import Foundation
import Logging
import Testing
@testable import FlotillaAgent

@Suite("ArtifactFetcher over HTTP")
struct ArtifactHTTPTests {
    @Test("saved under its basename, with progress lines")
    func basename() async throws {
        try await withArtifactHarness { h in
            try artifactWrite(h.www + "/files/app.txt", "hello\n")
            let lines = try await h.fetch([ArtifactRequest(uri: h.url("/files/app.txt"))])
            #expect(artifactRead(h.sandbox + "/app.txt") == "hello\n")
            #expect(artifactMode(h.sandbox + "/app.txt") == 0o644)
            #expect(lines.first == "fetching \(h.url("/files/app.txt"))")
            #expect(lines.contains("saved app.txt (6 bytes)"))
            #expect(artifactListing(h.sandbox) == ["app.txt"])
        }
    }

    @Test("outputFile renames; a nested destPath creates directories; a destPath ending in / is a directory")
    func outputNames() async throws {
        try await withArtifactHarness { h in
            try artifactWrite(h.www + "/app.txt", "hello\n")
            try await h.fetch([
                ArtifactRequest(uri: h.url("/app.txt"), outputFile: "renamed.txt"),
                ArtifactRequest(uri: h.url("/app.txt"), destPath: "conf/nested/deep/settings.json"),
                ArtifactRequest(uri: h.url("/app.txt"), destPath: "into/"),
            ])
            #expect(artifactRead(h.sandbox + "/renamed.txt") == "hello\n")
            #expect(artifactRead(h.sandbox + "/conf/nested/deep/settings.json") == "hello\n")
            #expect(artifactRead(h.sandbox + "/into/app.txt") == "hello\n")
        }
    }

    @Test("unsafe output names are refused before anything is downloaded", arguments: ["../x", "/etc/x", "a/../../x", "a/..", "..", "x/../../../etc/passwd"])
    func unsafeOutputNames(_ name: String) async throws {
        try await withArtifactHarness { h in
            try artifactWrite(h.www + "/app.txt", "hello\n")
            let before = h.outsideSnapshot()
            let error = await h.failure([
                ArtifactRequest(uri: h.url("/app.txt")),
                ArtifactRequest(uri: h.url("/app.txt"), outputFile: name),
            ])
            #expect(error?.kind == .invalidRequest)
            #expect(error?.description.hasPrefix("fetching \(h.url("/app.txt")) failed: ") == true)
            #expect(h.server.requests("/app.txt") == 0)
            #expect(artifactListing(h.sandbox).isEmpty)
            #expect(h.outsideSnapshot() == before)
            #expect(!artifactExists("/etc/x"))
        }
    }

    @Test("a 404 is a sentence naming the URI and status")
    func notFound() async throws {
        try await withArtifactHarness { h in
            let uri = h.url("/files/missing.tgz")
            let error = await h.failure([ArtifactRequest(uri: uri)])
            #expect(error?.kind == .http)
            #expect(error?.description == "fetching \(uri) failed: 404 Not Found")
            #expect(artifactListing(h.sandbox).isEmpty)
        }
    }

    @Test("a redirect chain is followed and the file keeps the original basename")
    func redirectChain() async throws {
        try await withArtifactHarness { h in
            try artifactWrite(h.www + "/target.txt", "moved\n")
            try await h.fetch([ArtifactRequest(uri: h.url("/redirect/10/target.txt"))])
            #expect(artifactRead(h.sandbox + "/target.txt") == "moved\n")
            #expect(h.server.requests("/redirect/1/target.txt") == 1)
            #expect(h.server.requests("/target.txt") == 1)
        }
    }

    @Test("more than 10 redirects is an error")
    func tooManyRedirects() async throws {
        try await withArtifactHarness { h in
            try artifactWrite(h.www + "/target.txt", "moved\n")
            let error = await h.failure([ArtifactRequest(uri: h.url("/redirect/11/target.txt"))])
            #expect(error?.kind == .redirect)
            #expect(error?.description == "fetching \(h.url("/redirect/11/target.txt")) failed: more than 10 redirects")
            #expect(h.server.requests("/target.txt") == 0)
            #expect(artifactListing(h.sandbox).isEmpty)
        }
    }

    @Test("a redirect loop is an error")
    func redirectLoop() async throws {
        try await withArtifactHarness { h in
            let error = await h.failure([ArtifactRequest(uri: h.url("/loop/a"))])
            #expect(error?.kind == .redirect)
            #expect(error?.reason.contains("redirect loop") == true)
            #expect(h.server.requests("/loop/a") == 1)
            #expect(h.server.requests("/loop/b") == 1)
            #expect(artifactListing(h.sandbox).isEmpty)
        }
    }

    @Test("a server that stalls fails after the idle timeout, leaving nothing")
    func stall() async throws {
        try await withArtifactHarness { h in
            let started = ContinuousClock.now
            let error = await h.failure([ArtifactRequest(uri: h.url("/stall/app.bin"))], with: h.fetcher { $0.idleTimeout = .seconds(1) })
            #expect(error?.kind == .timeout)
            #expect(error?.description == "fetching \(h.url("/stall/app.bin")) failed: no data arrived for 1 s; the server stalled")
            #expect(ContinuousClock.now - started < .seconds(120))  // ended by the idle timeout, not hung (loose: a loaded run stalls)
            #expect(artifactListing(h.sandbox).isEmpty)
        }
    }

    @Test("the size cap fails a download, with or without Content-Length, and leaves no file", arguments: ["/big.bin", "/nolength/big.bin"])
    func sizeCap(_ path: String) async throws {
        try await withArtifactHarness { h in
            try artifactWrite(h.www + "/big.bin", bytes: [UInt8](repeating: 7, count: 100_000))
            let error = await h.failure([ArtifactRequest(uri: h.url(path))], with: h.fetcher { $0.maxArtifactBytes = 10_000 })
            #expect(error?.kind == .tooLarge)
            #expect(error?.reason.contains("9.8 KiB limit") == true)
            #expect(artifactListing(h.sandbox).isEmpty)
            // Just under the cap is fine.
            try await h.fetch([ArtifactRequest(uri: h.url(path))], with: h.fetcher { $0.maxArtifactBytes = 100_000 })
            #expect(artifactBytes(h.sandbox + "/big.bin")?.count == 100_000)
        }
    }

    @Test("a body without Content-Length is read to the end")
    func noLength() async throws {
        try await withArtifactHarness { h in
            try artifactWrite(h.www + "/plain.txt", "no length\n")
            try await h.fetch([ArtifactRequest(uri: h.url("/nolength/plain.txt"))])
            #expect(artifactRead(h.sandbox + "/plain.txt") == "no length\n")
        }
    }

    @Test("a refused connection is a clear error, within the client's connect timeout")
    func unreachable() async throws {
        try await withArtifactHarness { h in
            let server = h.server
            try await artifactOffload { server.stop() }  // its port, with nothing listening any more
            let client = HTTPClient(eventLoopGroupProvider: .singleton, configuration: ArtifactFetcher.httpClientConfiguration(connectTimeout: .seconds(1)))
            let fetcher = ArtifactFetcher(httpClient: client, cacheDirectory: h.cacheDirectory, logger: Logger(label: "test"))
            let started = ContinuousClock.now
            let error = await h.failure([ArtifactRequest(uri: h.url("/app.txt"))], with: fetcher)
            try await client.shutdown()
            #expect(ContinuousClock.now - started < .seconds(120), "\(error?.description ?? "")")  // not hung (loose: a loaded machine)
            #expect(error?.kind == .unreachable)
            #expect(error?.description.hasPrefix("fetching \(h.url("/app.txt")) failed: ") == true)
            #expect(error?.description.contains("127.0.0.1:\(h.server.port)") == true)
        }
    }

    @Test("unsupported schemes and malformed URIs are refused", arguments: ["hdfs://namenode/app.tgz", "ftp://host/app.tgz", "relative/app.tgz", "http:///nohost"])
    func unsupported(_ uri: String) async throws {
        try await withArtifactHarness { h in
            let error = await h.failure([ArtifactRequest(uri: uri)])
            #expect(error?.kind == .invalidRequest)
            #expect(error?.description.hasPrefix("fetching \(uri) failed: ") == true)
        }
    }
}

@Suite("ArtifactFetcher with local files")
struct ArtifactLocalTests {
    @Test("file:// URIs and plain paths are copied (and extracted)")
    func localFiles() async throws {
        try await withArtifactHarness { h in
            try artifactWrite(h.www + "/local.txt", "local\n")
            try ArtifactFixtures.makeTree(at: h.dir.path + "/tree")
            try await artifactRun(["tar", "-C", h.dir.path + "/tree", "-czf", h.www + "/local.tgz", "top"])
            try await h.fetch([
                ArtifactRequest(uri: "file://" + h.www + "/local.txt"),
                ArtifactRequest(uri: h.www + "/local.tgz"),
                ArtifactRequest(uri: "file://localhost" + h.www + "/local.txt", outputFile: "again.txt"),
            ])
            #expect(artifactRead(h.sandbox + "/local.txt") == "local\n")
            #expect(artifactRead(h.sandbox + "/again.txt") == "local\n")
            #expect(artifactRead(h.sandbox + "/top/data.txt") == "hello data\n")
            #expect(artifactExists(h.sandbox + "/local.tgz"))
        }
    }

    @Test("a missing local file is a clear error", arguments: [false, true])
    func missing(_ asURI: Bool) async throws {
        try await withArtifactHarness { h in
            let path = h.www + "/missing.txt"
            let uri = asURI ? "file://" + path : path
            let error = await h.failure([ArtifactRequest(uri: uri)])
            #expect(error?.kind == .notFound)
            #expect(error?.description == "fetching \(uri) failed: no such file \(path)")
            #expect(artifactListing(h.sandbox).isEmpty)
        }
    }

    @Test("a directory is refused, and the size cap applies to local files")
    func directoryAndCap() async throws {
        try await withArtifactHarness { h in
            let dirError = await h.failure([ArtifactRequest(uri: h.www)])
            #expect(dirError?.reason == "\(h.www) is a directory, not a file")
            try artifactWrite(h.www + "/big.bin", bytes: [UInt8](repeating: 1, count: 5000))
            let capError = await h.failure([ArtifactRequest(uri: h.www + "/big.bin")], with: h.fetcher { $0.maxArtifactBytes = 1000 })
            #expect(capError?.kind == .tooLarge)
            #expect(artifactListing(h.sandbox).isEmpty)
        }
    }
}

@Suite("ArtifactFetcher cache")
struct ArtifactCacheTests {
    @Test("a second fetch does not hit the server and gives the same bytes")
    func reuse() async throws {
        try await withArtifactHarness { h in
            let bytes = (0..<50_000).map { UInt8(truncatingIfNeeded: $0 &* 31) }
            try artifactWrite(h.www + "/files/app.bin", bytes: bytes)
            let fetcher = h.fetcher()
            let uri = h.url("/files/app.bin")
            try await h.fetch([ArtifactRequest(uri: uri, cache: true)], into: h.work + "/sandbox/one", with: fetcher)
            // A fresh fetcher on the same directory reuses it too (the cache lives on disk).
            let lines = try await h.fetch([ArtifactRequest(uri: uri, cache: true)], into: h.work + "/sandbox/two", with: h.fetcher())
            #expect(h.server.requests("/files/app.bin") == 1)
            #expect(lines.contains("using the cached copy of \(uri)"))
            #expect(artifactBytes(h.work + "/sandbox/one/app.bin") == bytes)
            #expect(artifactBytes(h.work + "/sandbox/two/app.bin") == bytes)
            #expect(artifactListing(h.cacheDirectory) == [ArtifactCache.key(for: uri)])
            #expect(artifactBytes(h.cacheDirectory + "/" + ArtifactCache.key(for: uri)) == bytes)
            // Without cache: true the server is asked again.
            try await h.fetch([ArtifactRequest(uri: uri)], into: h.work + "/sandbox/three", with: fetcher)
            #expect(h.server.requests("/files/app.bin") == 2)
        }
    }

    @Test("concurrent fetches of one URI download once")
    func concurrent() async throws {
        try await withArtifactHarness { h in
            try artifactWrite(h.www + "/shared.bin", bytes: [UInt8](repeating: 42, count: 200_000))
            let fetcher = h.fetcher()
            let uri = h.url("/slow/shared.bin")
            try await withThrowingTaskGroup(of: Void.self) { group in
                for i in 0..<5 {
                    group.addTask {
                        try await fetcher.fetch([ArtifactRequest(uri: uri, cache: true)], into: h.work + "/sandbox/\(i)") { _ in }
                    }
                }
                try await group.waitForAll()
            }
            #expect(h.server.requests("/slow/shared.bin") == 1)
            for i in 0..<5 {
                #expect(artifactBytes(h.work + "/sandbox/\(i)/shared.bin")?.count == 200_000)
            }
        }
    }

    @Test("cached archives are extracted; executable applies to cached copies")
    func cachedArchive() async throws {
        try await withArtifactHarness { h in
            try ArtifactFixtures.makeTree(at: h.dir.path + "/tree")
            try await artifactRun(["tar", "-C", h.dir.path + "/tree", "-czf", h.www + "/app.tgz", "top"])
            try artifactWrite(h.www + "/tool", "#!/bin/sh\n")
            for name in ["a", "b"] {
                try await h.fetch([
                    ArtifactRequest(uri: h.url("/app.tgz"), cache: true),
                    ArtifactRequest(uri: h.url("/tool"), executable: true, cache: true),
                ], into: h.work + "/sandbox/\(name)")
                #expect(artifactRead(h.work + "/sandbox/\(name)/top/data.txt") == "hello data\n")
                #expect(artifactMode(h.work + "/sandbox/\(name)/tool") == 0o755)
            }
            #expect(h.server.requests("/app.tgz") == 1)
            #expect(h.server.requests("/tool") == 1)
        }
    }

    @Test("least recently used entries are evicted past the cap; an artifact larger than the cap is served, not kept")
    func eviction() async throws {
        try await withArtifactHarness { h in
            for name in ["a", "b", "c"] {
                try artifactWrite(h.www + "/\(name).bin", bytes: [UInt8](repeating: UInt8(ascii: "x"), count: 100))
            }
            try artifactWrite(h.www + "/huge.bin", bytes: [UInt8](repeating: 1, count: 1000))
            let fetcher = h.fetcher { $0.cacheMaxBytes = 250 }
            func get(_ name: String) async throws {
                try await h.fetch([ArtifactRequest(uri: h.url("/\(name).bin"), cache: true)], into: h.work + "/sandbox/\(name)-\(UUID().uuidString)", with: fetcher)
                try await Task.sleep(for: .milliseconds(20))  // distinct modification times
            }
            try await get("a")
            try await get("b")
            try await get("a")  // a is now more recently used than b
            try await get("c")  // over 250 bytes: b goes
            #expect(h.server.requests("/a.bin") == 1)
            #expect(Set(artifactListing(h.cacheDirectory)) == Set(["a", "c"].map { ArtifactCache.key(for: h.url("/\($0).bin")) }))
            try await get("b")
            #expect(h.server.requests("/b.bin") == 2)
            try await get("huge")
            #expect(!artifactListing(h.cacheDirectory).contains(ArtifactCache.key(for: h.url("/huge.bin"))))
            #expect(artifactListing(h.work + "/sandbox").contains { $0.hasSuffix("/huge.bin") })
        }
    }
}

@Suite("ArtifactFetcher helpers")
struct ArtifactHelperTests {
    @Test("SHA-256 matches known digests and sha256sum")
    func sha256() async throws {
        #expect(ArtifactCache.key(for: "") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        #expect(ArtifactCache.key(for: "abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        let long = String(repeating: "flotilla/", count: 1000) + "é"
        let dir = try ArtifactTestDir("sha")
        defer { dir.remove() }
        try artifactWrite(dir.path + "/in", long)
        let expected = try await artifactRun(["sha256sum", dir.path + "/in"]).split(separator: " ").first.map(String.init)
        #expect(ArtifactCache.key(for: long) == expected)
    }

    @Test("archive kinds by suffix")
    func kinds() {
        #expect(ArtifactArchiveKind(fileName: "a.tar.gz") == .tar(.gzip))
        #expect(ArtifactArchiveKind(fileName: "a.TGZ") == .tar(.gzip))
        #expect(ArtifactArchiveKind(fileName: "a.tar.bz2") == .tar(.bzip2))
        #expect(ArtifactArchiveKind(fileName: "a.tbz2") == .tar(.bzip2))
        #expect(ArtifactArchiveKind(fileName: "a.tar.xz") == .tar(.xz))
        #expect(ArtifactArchiveKind(fileName: "a.txz") == .tar(.xz))
        #expect(ArtifactArchiveKind(fileName: "a.tar") == .tar(.none))
        #expect(ArtifactArchiveKind(fileName: "a.zip") == .zip)
        #expect(ArtifactArchiveKind(fileName: "a.gz") == .gzipFile)
        #expect(ArtifactArchiveKind(fileName: "a.jar") == nil)
        #expect(ArtifactArchiveKind(fileName: "a.txt") == nil)
    }

    @Test("link targets must stay inside the sandbox")
    func linkTargets() {
        func ok(_ target: String, _ link: [String]) -> Bool {
            (try? ArtifactSandbox.checkLinkTarget(target, linkPath: link, entry: link.joined(separator: "/"))) != nil
        }
        #expect(ok("data.txt", ["link"]))
        #expect(ok("../lib/x.so", ["bin", "x"]))
        #expect(ok("./a/./b", ["x"]))
        #expect(ok("..", ["a", "b"]))
        #expect(!ok("..", ["link"]))
        #expect(!ok("../../x", ["a", "link"]))
        #expect(!ok("/etc/passwd", ["link"]))
        #expect(!ok("a/../b", ["link"]))
        #expect(!ok("", ["link"]))
    }
}

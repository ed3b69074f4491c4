import FlotillaImage
import Foundation
import Synchronization
import Testing

/// Everything against real registries (see ``RegistryFixture``); serialized to keep the 2-core machine calm.
@Suite(.registryFixture, .serialized, .timeLimit(.minutes(5)))
struct RegistryClientTests {
    var fixture: RegistryFixture { RegistryFixture.current! }
    static let amd64 = ImagePlatform(architecture: "amd64")
    static let arm64 = ImagePlatform(architecture: "arm64", variant: "v8")

    func expectError(
        _ kind: RegistryError.Kind,
        containing fragments: [String],
        sourceLocation: SourceLocation = #_sourceLocation,
        _ body: () async throws -> Void
    ) async {
        do {
            try await body()
            Issue.record("expected a \(kind) error", sourceLocation: sourceLocation)
        } catch let error as RegistryError {
            #expect(error.kind == kind, "\(error)", sourceLocation: sourceLocation)
            for fragment in fragments {
                #expect(error.message.contains(fragment), "“\(fragment)” not in: \(error.message)", sourceLocation: sourceLocation)
            }
        } catch {
            Issue.record("unexpected error \(error)", sourceLocation: sourceLocation)
        }
    }

    @Test func resolvesOCIByTag() async throws {
        let ref = try fixture.reference(fixture.openPort, "test/img:oci")
        let image = try await fixture.client().resolve(ref, platform: Self.amd64)
        #expect(image.mediaType == ImageMediaType.ociManifest)
        #expect(image.digest == fixture.amdManifest)
        #expect(image.digest == ImageDigest.sha256(of: image.manifestBytes))
        #expect(image.indexDigest == nil)
        #expect(image.manifestBytes == (try fixture.layoutBlob(fixture.amdManifest)))
        #expect(image.configDescriptor.mediaType == ImageMediaType.ociConfig)
        #expect(image.configBytes == (try fixture.layoutBlob(image.configDescriptor.digest)))
        #expect(image.layers.count == 1)
        #expect(image.layers[0].mediaType == "application/vnd.oci.image.layer.v1.tar+gzip")
        #expect(image.layers[0].size > 256 * 1024)
        let config = image.config
        #expect(config.architecture == "amd64" && config.os == "linux")
        #expect(config.config.entrypoint == ["/bin/app"])
        #expect(config.config.cmd == ["serve"])
        #expect(config.config.env?.contains("A=B") == true)
        #expect(config.config.workingDir == "/srv")
        #expect(config.config.user == "1000:1000")
        #expect(config.config.exposedPorts == ["8080/tcp"])
        #expect(config.config.labels["org.example"] == "flotilla")
        #expect(config.config.stopSignal == "SIGINT")
        #expect(config.rootfs.diffIDs.count == 1)
        #expect(image.pinnedReference.description == "127.0.0.1:\(fixture.openPort)/test/img:oci@\(fixture.amdManifest)")
    }

    @Test func resolvesDockerSchema2ByTagAndByDigest() async throws {
        let client = fixture.client()
        let byTag = try await client.resolve(try fixture.reference(fixture.openPort, "test/img:v2s2"), platform: Self.amd64)
        #expect(byTag.mediaType == ImageMediaType.dockerManifest)
        #expect(byTag.configDescriptor.mediaType == ImageMediaType.dockerConfig)
        #expect(byTag.layers.first?.mediaType == "application/vnd.docker.image.rootfs.diff.tar.gzip")
        #expect(byTag.digest == fixture.v2s2Manifest)
        #expect(byTag.config.config.entrypoint == ["/bin/app"])

        let byDigest = try await client.resolve(try fixture.reference(fixture.openPort, "test/img@\(fixture.v2s2Manifest)"), platform: Self.amd64)
        #expect(byDigest.digest == byTag.digest)
        #expect(byDigest.manifestBytes == byTag.manifestBytes)
        #expect(byDigest.config == byTag.config)
        // A tag beside the digest is ignored for pulling, as in Docker.
        let both = try await client.resolve(try fixture.reference(fixture.openPort, "test/img:nonexistent@\(fixture.amdManifest)"), platform: Self.amd64)
        #expect(both.digest == fixture.amdManifest)
    }

    @Test func fetchesEveryBlobVerified() async throws {
        let client = fixture.client()
        let ref = try fixture.reference(fixture.openPort, "test/img:oci")
        let image = try await client.resolve(ref, platform: Self.amd64)
        let dir = try RegistryTestDir("flotilla-blobs")
        defer { dir.remove() }
        for descriptor in [image.configDescriptor] + image.layers {
            let path = dir.file(descriptor.digest.hex)
            let seen = Mutex<[Int64]>([])
            try await client.fetchBlob(ref, descriptor, to: path) { n in seen.withLock { $0.append(n) } }
            #expect(try sha256sumOf(path) == descriptor.digest.hex)
            #expect(try FileManager.default.attributesOfItem(atPath: path)[.size] as? Int == Int(descriptor.size))
            #expect(!FileManager.default.fileExists(atPath: path + ".partial"))
            let progress = seen.withLock { $0 }
            #expect(progress.last == descriptor.size)
            #expect(progress == progress.sorted())
        }
    }

    @Test func resumesPartialDownloadWithRange() async throws {
        let client = fixture.client()
        let ref = try fixture.reference(fixture.openPort, "test/img:oci")
        let layer = try await client.resolve(ref, platform: Self.amd64).layers[0]
        let full = try fixture.layoutBlob(layer.digest)
        let half = full.count / 2
        let dir = try RegistryTestDir("flotilla-resume")
        defer { dir.remove() }
        let path = dir.file("layer")
        try Data(full[..<half]).write(to: URL(fileURLWithPath: path + ".partial"))
        let seen = Mutex<[Int64]>([])
        try await client.fetchBlob(ref, layer, to: path) { n in seen.withLock { $0.append(n) } }
        #expect(try sha256sumOf(path) == layer.digest.hex)
        #expect(!FileManager.default.fileExists(atPath: path + ".partial"))
        #expect(seen.withLock { $0.first } == Int64(half), "progress starts at the resumed prefix")
        // The registry really served a range: its access log has a 206 for this blob.
        try await Task.sleep(for: .milliseconds(200))
        let log = fixture.openRegistry.log()
        #expect(log.split(separator: "\n").contains { $0.contains("/blobs/\(layer.digest)") && $0.contains("\" 206 ") }, "no 206 in registry log")
    }

    @Test func corruptedPartialIsDeletedThenRetrySucceeds() async throws {
        let client = fixture.client()
        let ref = try fixture.reference(fixture.openPort, "test/img:oci")
        let layer = try await client.resolve(ref, platform: Self.amd64).layers[0]
        let dir = try RegistryTestDir("flotilla-corrupt")
        defer { dir.remove() }
        let path = dir.file("layer")
        try Data(repeating: 0x5a, count: Int(layer.size) / 2).write(to: URL(fileURLWithPath: path + ".partial"))
        await expectError(.digestMismatch, containing: [layer.digest.description, "deleted"]) {
            try await client.fetchBlob(ref, layer, to: path)
        }
        #expect(!FileManager.default.fileExists(atPath: path + ".partial"))
        #expect(!FileManager.default.fileExists(atPath: path))
        try await client.fetchBlob(ref, layer, to: path)
        #expect(try sha256sumOf(path) == layer.digest.hex)
    }

    @Test func oversizedPartialRestartsAndCompletePartialIsPublished() async throws {
        let client = fixture.client()
        let ref = try fixture.reference(fixture.openPort, "test/img:oci")
        let config = try await client.resolve(ref, platform: Self.amd64).configDescriptor
        let dir = try RegistryTestDir("flotilla-partials")
        defer { dir.remove() }
        // Longer than the blob: discarded and downloaded again.
        try Data(repeating: 1, count: Int(config.size) + 10).write(to: URL(fileURLWithPath: dir.file("a.partial")))
        try await client.fetchBlob(ref, config, to: dir.file("a"))
        #expect(try sha256sumOf(dir.file("a")) == config.digest.hex)
        // Already complete (a crash between the last byte and the rename): verified and published.
        try Data(try fixture.layoutBlob(config.digest)).write(to: URL(fileURLWithPath: dir.file("b.partial")))
        try await client.fetchBlob(ref, config, to: dir.file("b"))
        #expect(try sha256sumOf(dir.file("b")) == config.digest.hex)
        #expect(!FileManager.default.fileExists(atPath: dir.file("b.partial")))
    }

    @Test func basicAuthGoodBadAndMissing() async throws {
        let ref = try fixture.reference(fixture.basicPort, "test/img:oci")
        let good = fixture.client(fixture.goodCredentials)
        let image = try await good.resolve(ref, platform: Self.amd64)
        #expect(image.digest == fixture.amdManifest)
        let dir = try RegistryTestDir("flotilla-basic")
        defer { dir.remove() }
        try await good.fetchBlob(ref, image.layers[0], to: dir.file("layer"))
        #expect(try sha256sumOf(dir.file("layer")) == image.layers[0].digest.hex)

        let bad = fixture.client(RegistryCredentials(["127.0.0.1:\(fixture.basicPort)": .basic(username: "user", password: "wrong")]))
        await expectError(.unauthorized, containing: ["127.0.0.1:\(fixture.basicPort)", "rejected", "--registry-auth-file"]) {
            _ = try await bad.resolve(ref, platform: Self.amd64)
        }
        await expectError(.unauthorized, containing: ["127.0.0.1:\(fixture.basicPort)", "no credentials", "--registry-auth-file"]) {
            _ = try await fixture.client().resolve(ref, platform: Self.amd64)
        }
    }

    @Test func bearerTokenFlowAgainstRealTokenAuth() async throws {
        let ref = try fixture.reference(fixture.tokenPort, "test/img:multi")
        let logPath = fixture.dir.file("tokenrequests.log")
        try? FileManager.default.removeItem(atPath: logPath)
        func tokenRequests() -> [[String: Any]] {
            ((try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "").split(separator: "\n").compactMap {
                try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]
            }
        }

        // Anonymous: the token server hands out pull tokens without credentials (as Docker Hub does).
        let anonymous = fixture.client()
        let image = try await anonymous.resolve(ref, platform: Self.amd64)
        #expect(image.digest == fixture.amdManifest)
        #expect(image.indexDigest == fixture.multiIndex)
        var requests = tokenRequests()
        #expect(requests.count == 1, "one token for the whole resolve (cached): \(requests)")
        let query = requests.first?["query"] as? [String: [String]]
        #expect(query?["service"] == ["flotilla-test"])
        #expect(query?["scope"] == ["repository:test/img:pull"])
        #expect((requests.first?["auth"] as? String) == "")
        // The cached token also serves the blob download: still one token request.
        let dir = try RegistryTestDir("flotilla-token")
        defer { dir.remove() }
        try await anonymous.fetchBlob(ref, image.layers[0], to: dir.file("layer"))
        #expect(try sha256sumOf(dir.file("layer")) == image.layers[0].digest.hex)
        #expect(tokenRequests().count == 1)

        // With credentials: they go to the token server as Basic, with account=.
        let withCreds = fixture.client(fixture.goodCredentials)
        _ = try await withCreds.resolve(ref, platform: Self.arm64)
        requests = tokenRequests()
        #expect(requests.count == 2)
        #expect((requests.last?["auth"] as? String)?.hasPrefix("Basic ") == true)
        #expect((requests.last?["query"] as? [String: [String]])?["account"] == ["user"])

        // Wrong credentials: the token server refuses; the error names the registry and the flag.
        let wrong = fixture.client(RegistryCredentials(["127.0.0.1:\(fixture.tokenPort)": .basic(username: "user", password: "nope")]))
        await expectError(.unauthorized, containing: ["127.0.0.1:\(fixture.tokenPort)", "token server", "--registry-auth-file"]) {
            _ = try await wrong.resolve(ref, platform: Self.amd64)
        }

        // An identity token is exchanged by an OAuth2 refresh-token POST.
        let identity = fixture.client(RegistryCredentials(["127.0.0.1:\(fixture.tokenPort)": .identityToken("good-refresh-token", username: nil)]))
        #expect(try await identity.resolve(ref, platform: Self.amd64).digest == fixture.amdManifest)
        let post = tokenRequests().last
        #expect(post?["method"] as? String == "POST")
        #expect((post?["query"] as? [String: [String]])?["grant_type"] == ["refresh_token"])
    }

    @Test func multiPlatformIndexPicksRequestedPlatform() async throws {
        let client = fixture.client()
        let ref = try fixture.reference(fixture.openPort, "test/img:multi")
        let amd = try await client.resolve(ref, platform: Self.amd64)
        #expect(amd.digest == fixture.amdManifest)
        #expect(amd.indexDigest == fixture.multiIndex)
        #expect(amd.config.architecture == "amd64")
        #expect(amd.pinnedReference.digest == fixture.multiIndex)
        let arm = try await client.resolve(ref, platform: Self.arm64)
        #expect(arm.digest == fixture.armManifest)
        #expect(arm.config.architecture == "arm64")
        // By the index digest too.
        let pinned = try await client.resolve(try fixture.reference(fixture.openPort, "test/img@\(fixture.multiIndex)"), platform: Self.amd64)
        #expect(pinned.digest == fixture.amdManifest)
        // This machine's own platform (linux/amd64 here) is the default.
        if ImagePlatform.host.architecture == "amd64" {
            #expect(try await client.resolve(ref).digest == fixture.amdManifest)
        }
        await expectError(.noMatchingPlatform, containing: ["linux/amd64", "offers: linux/arm64/v8"]) {
            _ = try await client.resolve(try fixture.reference(fixture.openPort, "test/img:armonly"), platform: Self.amd64)
        }
    }

    @Test func notFoundAndDigestErrorsAreClear() async throws {
        let client = fixture.client()
        let registry = "127.0.0.1:\(fixture.openPort)"
        await expectError(.notFound, containing: ["image \(registry)/test/img:nope not found in registry \(registry)", "MANIFEST_UNKNOWN"]) {
            _ = try await client.resolve(try fixture.reference(fixture.openPort, "test/img:nope"))
        }
        await expectError(.notFound, containing: ["not found in registry \(registry)"]) {
            _ = try await client.resolve(try fixture.reference(fixture.openPort, "no/such/repo:1"))
        }
        let missing = ImageDigest.sha256(of: Array("not there".utf8))
        await expectError(.notFound, containing: [missing.description, "not found"]) {
            _ = try await client.resolve(try fixture.reference(fixture.openPort, "test/img@\(missing)"))
        }
        let ref = try fixture.reference(fixture.openPort, "test/img:oci")
        let dir = try RegistryTestDir("flotilla-missing")
        defer { dir.remove() }
        let descriptor = ImageDescriptor(mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: missing, size: 9)
        await expectError(.notFound, containing: ["blob \(missing)", "BLOB_UNKNOWN"]) {
            try await client.fetchBlob(ref, descriptor, to: dir.file("x"))
        }
        // A real blob under a wrong size claim is refused before anything is published.
        let layer = try await client.resolve(ref, platform: Self.amd64).layers[0]
        var lying = layer
        lying.size -= 1
        await expectError(.sizeMismatch, containing: [layer.digest.description]) {
            try await client.fetchBlob(ref, lying, to: dir.file("y"))
        }
        #expect(!FileManager.default.fileExists(atPath: dir.file("y")))
        // Nothing listens there: a clear unreachable error.
        let closed = try freeLoopbackPort()
        await expectError(.unreachable, containing: ["127.0.0.1:\(closed)"]) {
            _ = try await fixture.client().resolve(try fixture.reference(closed, "a:b"))
        }
        // A foreign layer is refused without a request.
        var foreign = layer
        foreign.mediaType = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
        await expectError(.unsupported, containing: ["foreign"]) {
            try await client.fetchBlob(ref, foreign, to: dir.file("z"))
        }
    }

    @Test func redirectToAnotherOriginDropsAuthorization() async throws {
        let blob = fixture.fakeBlob
        let descriptor = ImageDescriptor(mediaType: "application/octet-stream", digest: ImageDigest.sha256(of: blob), size: Int64(blob.count))
        let ref = try fixture.reference(fixture.fakePort, "redirect:x")
        let dir = try RegistryTestDir("flotilla-redirect")
        defer { dir.remove() }
        try await fixture.client(fixture.goodCredentials).fetchBlob(ref, descriptor, to: dir.file("blob"))
        #expect(try sha256sumOf(dir.file("blob")) == descriptor.digest.hex)
        let log = (try String(contentsOfFile: fixture.dir.file("fake.log"), encoding: .utf8)).split(separator: "\n").compactMap {
            try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: String]
        }
        #expect(log.contains { $0["server"] == "main" && $0["auth"]?.hasPrefix("Basic ") == true })
        let storage = log.filter { $0["server"] == "storage" }
        #expect(!storage.isEmpty)
        #expect(storage.allSatisfy { $0["auth"] == "" }, "storage saw Authorization: \(storage)")
    }

    @Test func idleTimeoutNotTotalDeadline() async throws {
        let blob = fixture.fakeBlob
        let descriptor = ImageDescriptor(mediaType: "application/octet-stream", digest: ImageDigest.sha256(of: blob), size: Int64(blob.count))
        let client = fixture.client(idleTimeout: .seconds(1))
        let dir = try RegistryTestDir("flotilla-idle")
        defer { dir.remove() }
        // 3.2 s in total but a chunk every 0.4 s: completes under a 1 s idle timeout.
        let started = ContinuousClock.now
        try await client.fetchBlob(try fixture.reference(fixture.fakePort, "slow:x"), descriptor, to: dir.file("slow"))
        #expect(ContinuousClock.now - started > .seconds(2))
        #expect(try sha256sumOf(dir.file("slow")) == descriptor.digest.hex)
        // 10 bytes then silence: fails after about a second, keeping the 10 bytes for a resume.
        let stallStart = ContinuousClock.now
        await expectError(.timeout, containing: ["no data from registry 127.0.0.1:\(fixture.fakePort) for 1 s"]) {
            try await client.fetchBlob(try fixture.reference(fixture.fakePort, "stall:x"), descriptor, to: dir.file("stall"))
        }
        #expect(ContinuousClock.now - stallStart < .seconds(120))  // ended by the idle timeout, not hung (loose: a loaded run stalls)
        #expect(try FileManager.default.attributesOfItem(atPath: dir.file("stall.partial"))[.size] as? Int == 10)
        // No response head at all.
        await expectError(.timeout, containing: ["manifest"]) {
            _ = try await client.resolve(try fixture.reference(fixture.fakePort, "stallhead:x"))
        }
    }

    @Test func untrustedManifestsAreBoundedAndChecked() async throws {
        let client = fixture.client()
        // 5 MiB, chunked (no Content-Length): reading stops at the 4 MiB bound.
        await expectError(.tooLarge, containing: ["over the 4194304-byte limit"]) {
            _ = try await client.resolve(try fixture.reference(fixture.fakePort, "huge:x"))
        }
        await expectError(.unsupported, containing: ["schema 1", "skopeo copy --format v2s2"]) {
            _ = try await client.resolve(try fixture.reference(fixture.fakePort, "schema1:x"))
        }
        await expectError(.digestMismatch, containing: ["Docker-Content-Digest"]) {
            _ = try await client.resolve(try fixture.reference(fixture.fakePort, "baddigest:x"))
        }
    }
}

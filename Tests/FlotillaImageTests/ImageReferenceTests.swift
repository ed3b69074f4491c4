import Foundation
import Testing
@testable import FlotillaImage

@Suite struct ImageReferenceTests {
    static let digest = "sha256:" + String(repeating: "ab", count: 32)

    struct Case: Sendable, CustomTestStringConvertible {
        var input: String
        var registry: String
        var repository: String
        var tag: String?
        var digest: String?
        var canonical: String
        var testDescription: String { input }
    }

    static let valid: [Case] = [
        Case(input: "busybox", registry: "registry-1.docker.io", repository: "library/busybox", tag: "latest", canonical: "docker.io/library/busybox:latest"),
        Case(input: "busybox:1.36", registry: "registry-1.docker.io", repository: "library/busybox", tag: "1.36", canonical: "docker.io/library/busybox:1.36"),
        Case(input: "docker.io/busybox", registry: "registry-1.docker.io", repository: "library/busybox", tag: "latest", canonical: "docker.io/library/busybox:latest"),
        Case(input: "index.docker.io/library/busybox", registry: "registry-1.docker.io", repository: "library/busybox", tag: "latest", canonical: "docker.io/library/busybox:latest"),
        Case(input: "bitnami/redis:7.2", registry: "registry-1.docker.io", repository: "bitnami/redis", tag: "7.2", canonical: "docker.io/bitnami/redis:7.2"),
        Case(input: "host:5000/a/b:tag", registry: "host:5000", repository: "a/b", tag: "tag", canonical: "host:5000/a/b:tag"),
        Case(input: "localhost/app", registry: "localhost", repository: "app", tag: "latest", canonical: "localhost/app:latest"),
        Case(input: "localhost:5000/app", registry: "localhost:5000", repository: "app", tag: "latest", canonical: "localhost:5000/app:latest"),
        Case(input: "ghcr.io/org/team/app:v1.2.3-rc_1", registry: "ghcr.io", repository: "org/team/app", tag: "v1.2.3-rc_1", canonical: "ghcr.io/org/team/app:v1.2.3-rc_1"),
        Case(input: "a/b@\(digest)", registry: "registry-1.docker.io", repository: "a/b", tag: nil, digest: digest, canonical: "docker.io/a/b@\(digest)"),
        Case(input: "host/a:tag@\(digest)", registry: "host", repository: "a", tag: "tag", digest: digest, canonical: "host/a:tag@\(digest)")
            .with { $0.registry = "registry-1.docker.io"; $0.repository = "host/a"; $0.canonical = "docker.io/host/a:tag@\(digest)" },
        Case(input: "my.host/a:tag@\(digest)", registry: "my.host", repository: "a", tag: "tag", digest: digest, canonical: "my.host/a:tag@\(digest)"),
        Case(input: "127.0.0.1:5000/x_y/z__w/a-b/c--d/e.f", registry: "127.0.0.1:5000", repository: "x_y/z__w/a-b/c--d/e.f", tag: "latest", canonical: "127.0.0.1:5000/x_y/z__w/a-b/c--d/e.f:latest"),
        Case(input: "Example.com/app", registry: "Example.com", repository: "app", tag: "latest", canonical: "Example.com/app:latest"),
        Case(input: "[::1]:5000/app:1", registry: "[::1]:5000", repository: "app", tag: "1", canonical: "[::1]:5000/app:1"),
        // Docker's own quirk: without a '/', `localhost:5000` is repository "localhost" with tag "5000".
        Case(input: "localhost:5000", registry: "registry-1.docker.io", repository: "library/localhost", tag: "5000", canonical: "docker.io/library/localhost:5000"),
        Case(input: "busybox:" + String(repeating: "t", count: 128), registry: "registry-1.docker.io", repository: "library/busybox",
             tag: String(repeating: "t", count: 128), canonical: "docker.io/library/busybox:" + String(repeating: "t", count: 128)),
    ]

    @Test(arguments: valid)
    func parsesValid(_ c: Case) throws {
        let ref = try ImageReference(parsing: c.input)
        #expect(ref.registry == c.registry)
        #expect(ref.repository == c.repository)
        #expect(ref.tag == c.tag)
        #expect(ref.digest?.description == c.digest)
        #expect(ref.description == c.canonical)
        // The canonical form parses back to the same reference.
        #expect(try ImageReference(parsing: ref.description) == ref)
    }

    static let invalid: [(String, String)] = [
        ("", "empty"),
        ("Busybox", "lowercase"),
        ("docker.io/Library/busybox", "lowercase"),
        ("busybox:", "empty tag"),
        ("busybox:.bad", "invalid tag"),
        ("busybox:-bad", "invalid tag"),
        ("busybox:" + String(repeating: "t", count: 129), "longer than 128"),
        ("busybox@sha256:abc", "64 lowercase hex"),
        ("busybox@sha256:" + String(repeating: "A", count: 64), "64 lowercase hex"),
        ("busybox@sha512:" + String(repeating: "a", count: 128), "only sha256 is supported"),
        ("busybox@md5", "expected sha256"),
        ("a//b", "empty path component"),
        ("a/b/", "empty path component"),
        ("/a", "empty path component"),
        ("a_-b", "not valid"),
        ("a___b", "not valid"),
        ("-a", "not valid"),
        ("a.", "not valid"),
        ("host:99999/a", "invalid port"),
        ("host:/a", "invalid port"),
        ("-host.com/a", "may not start or end with '-'"),
        ("bad_host.com/a", "only letters, digits"),
        ("a b", "a space"),
        (String(repeating: "ab", count: 32), "image ID"),
        ("example.com/" + String(repeating: "a", count: 250), "longer than 255"),
        (":tag", "missing repository"),
        ("@" + digest, "missing repository"),
    ]

    @Test(arguments: invalid)
    func rejectsInvalid(_ input: String, _ expectedFragment: String) {
        do {
            let ref = try ImageReference(parsing: input)
            Issue.record("accepted \(input) as \(ref)")
        } catch let error as RegistryError {
            #expect(error.kind == .invalidReference || error.kind == .invalidDigest)
            #expect(error.message.contains(expectedFragment), "message: \(error.message)")
        } catch {
            Issue.record("unexpected error \(error)")
        }
    }

    @Test func displayAndScope() throws {
        let ref = try ImageReference(parsing: "busybox")
        #expect(ref.displayRegistry == "docker.io")
        #expect(ref.isDockerHub)
        #expect(ref.pullScope == "repository:library/busybox:pull")
        #expect(ref.manifestReference == "latest")
        let pinned = ref.withDigest(try ImageDigest(parsing: Self.digest))
        #expect(pinned.manifestReference == Self.digest)
        #expect(pinned.description == "docker.io/library/busybox:latest@\(Self.digest)")
        let parts = try ImageReference(registry: "docker.io", repository: "nginx", tag: "1")
        #expect(parts.registry == "registry-1.docker.io" && parts.repository == "library/nginx")
    }
}

@Suite struct ImageDigestTests {
    @Test func hashesKnownVectors() throws {
        #expect(ImageDigest.sha256(of: []).hex == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        #expect(ImageDigest.sha256(of: Array("abc".utf8)).hex == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        var hasher = ImageDigest.SHA256Hasher()
        hasher.update(Array("a".utf8))
        Array("bc".utf8).withUnsafeBytes { hasher.update(bytes: $0) }
        #expect(hasher.finalize() == ImageDigest.sha256(of: Array("abc".utf8)))
    }

    @Test func parsesAndRejects() throws {
        let hex = String(repeating: "0f", count: 32)
        #expect(try ImageDigest(parsing: "sha256:" + hex).hex == hex)
        #expect(ImageDigest("sha256:" + hex.uppercased()) == nil)
        #expect(ImageDigest("sha256:" + hex.dropLast()) == nil)
        #expect(ImageDigest(hex) == nil)
        #expect(throws: RegistryError.self) { try ImageDigest(parsing: "sha384:" + hex) }
        do {
            _ = try ImageDigest(parsing: "sha512:" + hex + hex)
        } catch let error as RegistryError {
            #expect(error.message.contains("unsupported digest algorithm \"sha512\""))
        }
    }

    @Test func codableRoundTripAndValidation() throws {
        let d = ImageDigest.sha256(of: [1, 2, 3])
        let data = try JSONEncoder().encode([d])
        #expect(try JSONDecoder().decode([ImageDigest].self, from: data) == [d])
        #expect(throws: DecodingError.self) { try JSONDecoder().decode([ImageDigest].self, from: Data(#"["sha256:xyz"]"#.utf8)) }
    }
}

extension ImageReferenceTests.Case {
    func with(_ change: (inout Self) -> Void) -> Self {
        var copy = self
        change(&copy)
        return copy
    }
}

import Foundation
import Testing
@testable import FlotillaAgent

@Suite("Artifact extraction")
struct ArtifactExtractionTests {
    /// Checks the fixture tree extracted into `root`.
    func expectTree(_ root: String, links: Bool = true, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(artifactRead(root + "/top/data.txt") == "hello data\n", sourceLocation: sourceLocation)
        #expect(artifactRead(root + "/top/bin/run.sh") == "#!/bin/sh\necho hi\n", sourceLocation: sourceLocation)
        #expect(artifactMode(root + "/top/bin/run.sh") == 0o755, sourceLocation: sourceLocation)
        #expect(artifactMode(root + "/top/data.txt") == 0o644, sourceLocation: sourceLocation)
        #expect(artifactRead(root + "/" + ArtifactFixtures.longName) == "deep\n", sourceLocation: sourceLocation)
        #expect(artifactRead(root + "/top/hard.txt") == "hello data\n", sourceLocation: sourceLocation)
        if links {
            #expect(artifactIsSymlink(root + "/top/link"), sourceLocation: sourceLocation)
            #expect(artifactRead(root + "/top/link") == "hello data\n", sourceLocation: sourceLocation)
            #expect(artifactRead(root + "/top/bin/up") == "hello data\n", sourceLocation: sourceLocation)
        }
    }

    @Test("archives are extracted by suffix next to the kept file", arguments: [
        ("app.tar.gz", ["-czf"]), ("app.tgz", ["-czf"]), ("app.tar", ["-cf"]), ("app.tar.bz2", ["-cjf"]),
        ("app.tbz2", ["-cjf"]), ("app.tar.xz", ["-cJf"]), ("app.txz", ["-cJf"]), ("pax.tar.gz", ["--format=pax", "-czf"]),
        ("ustar.tar", ["--format=ustar", "-cf"]),
    ])
    func tarballs(_ name: String, _ flags: [String]) async throws {
        try await withArtifactHarness { h in
            try ArtifactFixtures.makeTree(at: h.dir.path + "/tree")
            try await artifactRun(["tar", "-C", h.dir.path + "/tree"] + flags + [h.www + "/" + name, "top"])
            let lines = try await h.fetch([ArtifactRequest(uri: h.url("/" + name))])
            expectTree(h.sandbox)
            #expect(artifactExists(h.sandbox + "/" + name))
            #expect(lines.contains { $0.hasPrefix("extracted \(name) into . (") })
        }
    }

    @Test("an archive saved under a nested destPath is extracted into that directory")
    func nested() async throws {
        try await withArtifactHarness { h in
            try ArtifactFixtures.makeTree(at: h.dir.path + "/tree")
            try await artifactRun(["tar", "-C", h.dir.path + "/tree", "-czf", h.www + "/app.tgz", "top"])
            try await h.fetch([ArtifactRequest(uri: h.url("/app.tgz"), destPath: "vendor/pkg/app.tgz")])
            expectTree(h.sandbox + "/vendor/pkg")
        }
    }

    @Test("zip archives (stored and deflated entries, Unix modes and links)")
    func zip() async throws {
        try await withArtifactHarness { h in
            try ArtifactFixtures.makeTree(at: h.dir.path + "/tree")
            try await artifactPython(ArtifactFixtures.zipScript, [h.dir.path + "/tree", h.www + "/app.zip"])
            try await h.fetch([ArtifactRequest(uri: h.url("/app.zip"))])
            expectTree(h.sandbox)
            #expect(artifactExists(h.sandbox + "/app.zip"))
        }
    }

    @Test("a zip64 archive written by Python is read")
    func zip64() async throws {
        try await withArtifactHarness { h in
            try await artifactPython(#"""
import sys, zipfile
with zipfile.ZipFile(sys.argv[1], 'w', zipfile.ZIP_DEFLATED) as z:
    with z.open('big/one.txt', 'w', force_zip64=True) as f:
        f.write(b'zip64\n' * 1000)
"""#, [h.www + "/z64.zip"])
            try await h.fetch([ArtifactRequest(uri: h.url("/z64.zip"))])
            #expect(artifactRead(h.sandbox + "/big/one.txt") == String(repeating: "zip64\n", count: 1000))
        }
    }

    @Test(".gz is decompressed to the name without .gz (concatenated members too)")
    func gzip() async throws {
        try await withArtifactHarness { h in
            try artifactWrite(h.dir.path + "/notes.txt", "first\n")
            try artifactWrite(h.dir.path + "/more.txt", "second\n")
            try await artifactRun(["sh", "-c", "gzip -c notes.txt > www/notes.txt.gz && gzip -c more.txt >> www/notes.txt.gz"], in: h.dir.path)
            try await h.fetch([ArtifactRequest(uri: h.url("/notes.txt.gz"))])
            #expect(artifactRead(h.sandbox + "/notes.txt") == "first\nsecond\n")
            #expect(artifactExists(h.sandbox + "/notes.txt.gz"))
        }
    }

    @Test("extract: false keeps the archive as is")
    func noExtract() async throws {
        try await withArtifactHarness { h in
            try ArtifactFixtures.makeTree(at: h.dir.path + "/tree")
            try await artifactRun(["tar", "-C", h.dir.path + "/tree", "-czf", h.www + "/app.tgz", "top"])
            try await h.fetch([ArtifactRequest(uri: h.url("/app.tgz"), extract: false)])
            #expect(artifactListing(h.sandbox) == ["app.tgz"])
            #expect(artifactBytes(h.sandbox + "/app.tgz") == artifactBytes(h.www + "/app.tgz"))
        }
    }

    @Test("executable: true gives mode 0755 and is never extracted")
    func executable() async throws {
        try await withArtifactHarness { h in
            try ArtifactFixtures.makeTree(at: h.dir.path + "/tree")
            try await artifactRun(["tar", "-C", h.dir.path + "/tree", "-czf", h.www + "/app.tgz", "top"])
            try await h.fetch([ArtifactRequest(uri: h.url("/app.tgz"), extract: true, executable: true)])
            #expect(artifactListing(h.sandbox) == ["app.tgz"])
            #expect(artifactMode(h.sandbox + "/app.tgz") == 0o755)
        }
    }

    @Test("a corrupt archive is a clear error")
    func corrupt() async throws {
        try await withArtifactHarness { h in
            try artifactWrite(h.www + "/broken.tgz", "this is not gzip at all\n")
            try artifactWrite(h.www + "/broken.zip", String(repeating: "nor a zip\n", count: 10))
            let tgz = await h.failure([ArtifactRequest(uri: h.url("/broken.tgz"))])
            #expect(tgz?.kind == .badArchive)
            #expect(tgz?.description.hasPrefix("fetching \(h.url("/broken.tgz")) failed: cannot extract broken.tgz: broken.tgz is corrupt") == true)
            let zip = await h.failure([ArtifactRequest(uri: h.url("/broken.zip"))])
            #expect(zip?.kind == .badArchive)
            #expect(zip?.reason == "cannot extract broken.zip: broken.zip is not a valid zip archive (no end of central directory record)")
        }
    }

    @Test("a decompression bomb stops at the extraction cap")
    func bomb() async throws {
        try await withArtifactHarness { h in
            try await artifactRun(["sh", "-c", "head -c 5000000 /dev/zero | gzip -c > www/zeros.gz"], in: h.dir.path)
            let error = await h.failure([ArtifactRequest(uri: h.url("/zeros.gz"))], with: h.fetcher { $0.maxExtractedBytes = 1_000_000 })
            #expect(error?.kind == .tooLarge)
            #expect(error?.reason.contains("extracts to more than 976.6 KiB") == true)
        }
    }

    @Test("evil archives are refused and nothing is written outside the sandbox", arguments: [
        ("evil.tgz", "dotdot"), ("evil.tgz", "nested-dotdot"), ("evil.tgz", "pax-dotdot"), ("evil.tgz", "absolute"),
        ("evil.tgz", "symlink"), ("evil.tgz", "relative-symlink"), ("evil.tgz", "dot-trick"), ("evil.tgz", "inner-symlink"),
        ("evil.tgz", "hardlink"), ("evil.tgz", "hardlink-dotdot"),
        ("evil.zip", "dotdot"), ("evil.zip", "backslash"), ("evil.zip", "absolute"), ("evil.zip", "symlink"), ("evil.zip", "relative-symlink"),
    ])
    func evil(_ name: String, _ variant: String) async throws {
        try await withArtifactHarness { h in
            try await artifactPython(ArtifactFixtures.evilScript, [h.www + "/" + name, variant, h.outside])
            let before = h.outsideSnapshot()
            #expect(before.contains("outside/victim.txt=untouched\n"))
            let error = await h.failure([ArtifactRequest(uri: h.url("/" + name))])
            #expect(error?.kind == .unsafeArchive, "\(error?.description ?? "")")
            #expect(error?.description.hasPrefix("fetching \(h.url("/" + name)) failed: cannot extract \(name): ") == true)
            #expect(h.outsideSnapshot() == before)
            #expect(!artifactExists(h.work + "/evil.txt"))
            #expect(!artifactExists(h.outside + "/evil.txt"))
            #expect(!artifactExists(h.dir.path + "/evil.txt"))
            // What was extracted before the bad entry stays, inside the sandbox.
            #expect(artifactRead(h.sandbox + "/ok.txt") == "ok\n")
        }
    }
}

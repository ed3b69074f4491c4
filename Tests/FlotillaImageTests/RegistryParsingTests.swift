import Foundation
import Testing
@testable import FlotillaImage

@Suite struct AuthChallengeTests {
    @Test func dockerHubBearer() {
        let c = RegistryAuthChallenge.parse(header: #"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#)
        #expect(c.count == 1)
        #expect(c[0].scheme == "bearer")
        #expect(c[0][parameter: "realm"] == "https://auth.docker.io/token")
        #expect(c[0][parameter: "service"] == "registry.docker.io")
        #expect(c[0][parameter: "scope"] == "repository:library/busybox:pull")
    }

    @Test func quotedCommasEscapesAndSpacing() {
        let c = RegistryAuthChallenge.parse(header: #"BEARER  Realm = "https://h/t?a=1,b=2" , scope="repository:a/b:pull,push", error="insufficient_scope", note="say \"hi\", ok\\""#)
        #expect(c.count == 1)
        #expect(c[0].scheme == "bearer")
        #expect(c[0][parameter: "REALM"] == "https://h/t?a=1,b=2")
        #expect(c[0][parameter: "scope"] == "repository:a/b:pull,push")
        #expect(c[0][parameter: "error"] == "insufficient_scope")
        #expect(c[0][parameter: "note"] == #"say "hi", ok\"#)
    }

    @Test func severalChallengesInOneHeaderAndAcrossHeaders() {
        let c = RegistryAuthChallenge.parse([#"Basic realm="Registry Realm", Bearer realm="https://x/token",service=reg"#, "Negotiate abc+/9==", #"Digest realm="d", nonce="n""#])
        #expect(c.map(\.scheme) == ["basic", "bearer", "negotiate", "digest"])
        #expect(c[0][parameter: "realm"] == "Registry Realm")
        #expect(c[1][parameter: "realm"] == "https://x/token")
        #expect(c[1][parameter: "service"] == "reg")
        #expect(c[2].token68 == "abc+/9==")
        #expect(c[3][parameter: "nonce"] == "n")
    }

    @Test func bareSchemesAndGarbage() {
        #expect(RegistryAuthChallenge.parse(header: "Basic").map(\.scheme) == ["basic"])
        #expect(RegistryAuthChallenge.parse(header: "Basic, Bearer").map(\.scheme) == ["basic", "bearer"])
        #expect(RegistryAuthChallenge.parse(header: "").isEmpty)
        #expect(RegistryAuthChallenge.parse(header: " , ,").isEmpty)
        // Unterminated quoted string: keeps what is there instead of failing.
        let c = RegistryAuthChallenge.parse(header: #"Bearer realm="https://x/tok"#)
        #expect(c.first?[parameter: "realm"] == "https://x/tok")
        // Junk before a valid challenge is skipped.
        let d = RegistryAuthChallenge.parse(header: #"@@@, Bearer realm="r""#)
        #expect(d.map(\.scheme) == ["bearer"])
        #expect(d.first?[parameter: "realm"] == "r")
    }
}

@Suite struct RegistryCredentialsTests {
    @Test func parsesDockerConfigShapes() throws {
        let auth = Data("alice:p:a:ss".utf8).base64EncodedString()
        let json = """
        {
          "auths": {
            "https://index.docker.io/v1/": {"auth": "\(auth)"},
            "ghcr.io": {"username": "bob", "password": "secret"},
            "http://Registry.Example.com:5000/some/path": {"identitytoken": "refresh-me", "auth": "\(Data("carol:".utf8).base64EncodedString())"},
            "helper.example": {}
          },
          "credsStore": "desktop",
          "credHelpers": {"gcr.io": "gcloud"}
        }
        """
        let creds = try RegistryCredentials(dockerConfigJSON: Array(json.utf8))
        #expect(creds.credential(forRegistry: "registry-1.docker.io") == .basic(username: "alice", password: "p:a:ss"))
        #expect(creds.credential(forRegistry: "docker.io") == .basic(username: "alice", password: "p:a:ss"))
        #expect(creds.credential(forRegistry: "ghcr.io") == .basic(username: "bob", password: "secret"))
        #expect(creds.credential(forRegistry: "registry.example.com:5000") == .identityToken("refresh-me", username: "carol"))
        #expect(creds.credential(forRegistry: "registry.example.com") == nil)
        #expect(creds.credential(forRegistry: "helper.example") == nil)
        #expect(creds.ignoredHelpers == ["credsStore:desktop", "gcr.io"])
        #expect(!"\(creds.credential(forRegistry: "ghcr.io")!)".contains("secret"))
    }

    @Test func rejectsMalformed() {
        for (json, fragment) in [
            ("not json", "not valid JSON"),
            ("[]", "JSON object"),
            (#"{"auths": []}"#, "\"auths\" must be an object"),
            (#"{"auths": {"h": 1}}"#, "entry \"h\" must be an object"),
            (#"{"auths": {"h": {"auth": "!!!"}}}"#, "base64"),
            (#"{"auths": {"h": {"auth": "bm9jb2xvbg=="}}}"#, "base64"),  // "nocolon"
        ] {
            do {
                _ = try RegistryCredentials(dockerConfigJSON: Array(json.utf8))
                Issue.record("accepted \(json)")
            } catch let error as RegistryError {
                #expect(error.kind == .invalidCredentials)
                #expect(error.message.contains(fragment), "\(error.message)")
            } catch {
                Issue.record("\(error)")
            }
        }
        #expect(throws: RegistryError.self) { try RegistryCredentials(contentsOfFile: "/nonexistent/flotilla/config.json") }
    }

    @Test func emptyAndExplicit() throws {
        #expect(try RegistryCredentials(dockerConfigJSON: Array("{}".utf8)).entries.isEmpty)
        let c = RegistryCredentials(["https://127.0.0.1:5000/v2/": .basic(username: "u", password: "p")])
        #expect(c.credential(forRegistry: "127.0.0.1:5000") == .basic(username: "u", password: "p"))
    }
}

@Suite struct ManifestDecodingTests {
    static let d1 = "sha256:" + String(repeating: "1", count: 64)
    static let d2 = "sha256:" + String(repeating: "2", count: 64)

    @Test func decodesDockerSchema2() throws {
        let json = """
        {"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",
         "config":{"mediaType":"application/vnd.docker.container.image.v1+json","size":7023,"digest":"\(Self.d1)"},
         "layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":32654,"digest":"\(Self.d2)"}]}
        """
        guard case .image(let m, let type) = try ParsedManifest.decode(Array(json.utf8), contentType: nil, imageName: "x") else {
            Issue.record("not an image"); return
        }
        #expect(type == ImageMediaType.dockerManifest)
        #expect(m.config.size == 7023)
        #expect(m.layers.map(\.digest.description) == [Self.d2])
    }

    @Test func infersTypeFromHeaderThenShape() throws {
        let index = #"{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"\#(Self.d1)","size":1,"platform":{"architecture":"arm","os":"linux","variant":"v7"}}]}"#
        guard case .index(let i, let t) = try ParsedManifest.decode(Array(index.utf8), contentType: nil, imageName: "x") else {
            Issue.record("not an index"); return
        }
        #expect(t == ImageMediaType.ociIndex)
        #expect(i.manifests.first?.platform == ImagePlatform(architecture: "arm", variant: "v7"))
        guard case .index(_, let t2) = try ParsedManifest.decode(Array(index.utf8), contentType: "application/vnd.docker.distribution.manifest.list.v2+json; charset=utf-8", imageName: "x") else {
            Issue.record("not an index"); return
        }
        #expect(t2 == ImageMediaType.dockerManifestList)
    }

    @Test func refusesSchema1TooLargeAndMalformed() {
        func error(_ bytes: [UInt8], _ type: String? = nil) -> RegistryError? {
            do { _ = try ParsedManifest.decode(bytes, contentType: type, imageName: "img"); return nil } catch { return error as? RegistryError }
        }
        let s1 = error(Array(#"{"schemaVersion":1,"name":"a","tag":"b","fsLayers":[]}"#.utf8))
        #expect(s1?.kind == .unsupported)
        #expect(s1?.message.contains("schema 1") == true)
        #expect(error(Array("{}".utf8), ImageMediaType.dockerSchema1Signed)?.message.contains("schema 1") == true)
        #expect(error([UInt8](repeating: 0x20, count: ParsedManifest.maximumSize + 1))?.kind == .tooLarge)
        #expect(error(Array("nope".utf8))?.kind == .malformed)
        #expect(error(Array(#"{"schemaVersion":3}"#.utf8))?.kind == .unsupported)
        #expect(error(Array(#"{"schemaVersion":2}"#.utf8))?.kind == .malformed)
        let badDigest = error(Array(#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:short","size":1},"layers":[]}"#.utf8))
        #expect(badDigest?.kind == .malformed)
        #expect(badDigest?.message.contains("config.digest") == true, "\(badDigest?.message ?? "")")
        let negative = error(Array(#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"\#(Self.d1)","size":-1},"layers":[]}"#.utf8))
        #expect(negative?.message.contains("negative size") == true)
        let wrongType = error(Array(#"{"schemaVersion":2,"mediaType":"application/vnd.example+json","config":{"mediaType":"x","digest":"\#(Self.d1)","size":1}}"#.utf8))
        #expect(wrongType?.kind == .unsupported)
    }

    @Test func decodesImageConfig() throws {
        let json = """
        {"architecture":"amd64","os":"linux","config":{"Entrypoint":["/bin/app"],"Cmd":null,"Env":["A=B"],"WorkingDir":"/srv","User":"1000:1000",
         "ExposedPorts":{"8080/tcp":{},"53/udp":{}},"Labels":{"k":"v"},"StopSignal":"SIGINT"},
         "rootfs":{"type":"layers","diff_ids":["\(Self.d1)"]},"history":[{"created_by":"x"}]}
        """
        let c = try ImageConfiguration.decode(Array(json.utf8), imageName: "x")
        #expect(c.config.entrypoint == ["/bin/app"])
        #expect(c.config.cmd == nil)
        #expect(c.config.env == ["A=B"])
        #expect(c.config.workingDir == "/srv")
        #expect(c.config.user == "1000:1000")
        #expect(c.config.exposedPorts == ["53/udp", "8080/tcp"])
        #expect(c.config.labels == ["k": "v"])
        #expect(c.config.stopSignal == "SIGINT")
        #expect(c.rootfs.diffIDs.map(\.description) == [Self.d1])
        let minimal = try ImageConfiguration.decode(Array(#"{"rootfs":{"type":"layers","diff_ids":[]},"config":{"Labels":null}}"#.utf8), imageName: "x")
        #expect(minimal.config.labels.isEmpty && minimal.config.exposedPorts.isEmpty)
        #expect(throws: RegistryError.self) { try ImageConfiguration.decode(Array(#"{"config":{}}"#.utf8), imageName: "x") }
    }
}

@Suite struct PlatformTests {
    @Test func mapsUnameMachines() {
        #expect(ImagePlatform.fromMachine("x86_64").description == "linux/amd64")
        #expect(ImagePlatform.fromMachine("aarch64").description == "linux/arm64/v8")
        #expect(ImagePlatform.fromMachine("armv7l").description == "linux/arm/v7")
        #expect(ImagePlatform.host.os == "linux")
        #expect(!ImagePlatform.host.architecture.isEmpty)
        #expect(ImagePlatform(parsing: "linux/arm/v6") == ImagePlatform(architecture: "arm", variant: "v6"))
        #expect(ImagePlatform(parsing: "linux") == nil)
    }

    func entry(_ arch: String, _ variant: String? = nil, os: String = "linux", digit: Character) throws -> ImageDescriptor {
        ImageDescriptor(
            mediaType: ImageMediaType.ociManifest,
            digest: try ImageDigest(parsing: "sha256:" + String(repeating: digit, count: 64)),
            size: 10,
            platform: ImagePlatform(architecture: arch, os: os, variant: variant)
        )
    }

    @Test func picksFromIndex() throws {
        let index = ImageIndex(mediaType: ImageMediaType.ociIndex, manifests: [
            try entry("unknown", os: "unknown", digit: "0"),
            try entry("arm", "v6", digit: "1"),
            try entry("arm64", digit: "2"),
            try entry("arm64", "v8", digit: "3"),
            try entry("amd64", digit: "4"),
            try entry("arm", "v7", digit: "5"),
        ])
        #expect(try index.manifest(for: .fromMachine("x86_64"), imageName: "i").digest.hex.first == "4")
        #expect(try index.manifest(for: .fromMachine("aarch64"), imageName: "i").digest.hex.first == "3")
        #expect(try index.manifest(for: .fromMachine("armv7l"), imageName: "i").digest.hex.first == "5")
        #expect(try index.manifest(for: .fromMachine("armv6l"), imageName: "i").digest.hex.first == "1")
        // arm64 without a v8 entry falls back to the variant-less one.
        let noV8 = ImageIndex(mediaType: nil, manifests: [try entry("arm64", digit: "2")])
        #expect(try noV8.manifest(for: .fromMachine("aarch64"), imageName: "i").digest.hex.first == "2")
        do {
            _ = try index.manifest(for: .fromMachine("s390x"), imageName: "reg/img:1")
            Issue.record("matched s390x")
        } catch let error as RegistryError {
            #expect(error.kind == .noMatchingPlatform)
            #expect(error.message == "image reg/img:1 has no manifest for platform linux/s390x; it offers: linux/arm/v6, linux/arm64, linux/arm64/v8, linux/amd64, linux/arm/v7")
        }
    }

    @Test func contentRange() {
        #expect(RegistryClient.parseContentRange("bytes 100-186/187")! == (100, 186, 187))
        #expect(RegistryClient.parseContentRange("bytes 0-9/*")! == (0, 9, nil))
        #expect(RegistryClient.parseContentRange("bytes 9-0/10") == nil)
        #expect(RegistryClient.parseContentRange("items 0-1/2") == nil)
    }

    @Test func registryErrorBodies() {
        let body = Array(#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{"Tag":"x"}}]}"#.utf8)
        #expect(RegistryClient.errorSummary(body) == "MANIFEST_UNKNOWN: manifest unknown")
        #expect(RegistryClient.errorSummary(Array("<html>\n oops".utf8)) == "<html> oops")
        #expect(RegistryClient.errorSummary([]) == nil)
        #expect(RegistryClient.formEncode("repository:a/b:pull x") == "repository%3Aa%2Fb%3Apull%20x")
    }
}

@Suite struct AuthChallengeRegistryHeaderTests {
    @Test func distributionHeader() {
        let c = RegistryAuthChallenge.parse(header: #"Bearer realm="http://127.0.0.1:49957/token",service="flotilla-test",scope="repository:test/img:pull""#)
        #expect(c.count == 1)
        #expect(c.first?.parameters == ["realm": "http://127.0.0.1:49957/token", "service": "flotilla-test", "scope": "repository:test/img:pull"])
    }
}

import FlotillaCore
@testable import FlotillaSecrets
import FlotillaStore
import Foundation
import Testing

@Suite struct SecretKVTests {
    let store = InMemoryStateStore()
    let master: SecretsMasterKey

    init() throws {
        master = try SecretsMasterKey(text: SecretsMasterKey.generate(), source: "test")
    }

    func engine() async throws -> SecretKV {
        SecretKV(store: store, cipher: try await SecretsCipher.open(store: store, master: master))
    }

    func value(_ result: SecretReadResult) -> [String: JSONValue]? {
        if case .found(let data, _, _) = result { return data } else { return nil }
    }

    @Test func versionsAreKeptAndReadBack() async throws {
        let kv = try await engine()
        #expect(try await kv.write("shop/db", data: ["password": "one"], cas: nil).version == 1)
        #expect(try await kv.write("shop/db", data: ["password": "two"], cas: nil).version == 2)
        #expect(value(try await kv.read("shop/db")) == ["password": "two"])
        #expect(value(try await kv.read("shop/db", version: 1)) == ["password": "one"])
        if case .missing = try await kv.read("shop/db", version: 7) {} else { Issue.record("version 7 exists?") }
        if case .missing = try await kv.read("shop/other") {} else { Issue.record("an unwritten secret exists?") }
        let metadata = try #require(try await kv.metadata("shop/db"))
        #expect(metadata.currentVersion == 2 && metadata.oldestVersion == 1 && metadata.versions.map(\.version) == [1, 2])
    }

    @Test func checkAndSet() async throws {
        let kv = try await engine()
        try await kv.write("a", data: ["k": "1"], cas: 0)
        await #expect(throws: SecretKVError.casMismatch) { try await kv.write("a", data: ["k": "2"], cas: 0) }
        await #expect(throws: SecretKVError.casMismatch) { try await kv.write("a", data: ["k": "2"], cas: 5) }
        #expect(try await kv.write("a", data: ["k": "2"], cas: 1).version == 2)
        try await kv.updateMetadata("a", maxVersions: nil, casRequired: true, customMetadata: nil, deleteVersionAfter: nil)
        await #expect(throws: SecretKVError.casRequired) { try await kv.write("a", data: ["k": "3"], cas: nil) }
        try await kv.updateConfig(maxVersions: nil, casRequired: true, deleteVersionAfter: nil)
        await #expect(throws: SecretKVError.casRequired) { try await kv.write("b", data: ["k": "1"], cas: nil) }
    }

    @Test func softDeleteUndeleteAndDestroy() async throws {
        let kv = try await engine()
        try await kv.write("s", data: ["v": "1"], cas: nil)
        try await kv.write("s", data: ["v": "2"], cas: nil)
        try await kv.deleteLatest("s")
        guard case .gone(let info, _) = try await kv.read("s") else { Issue.record("the deleted version reads"); return }
        #expect(info.version == 2 && !info.deletionTime.isEmpty && !info.destroyed)
        try await kv.setDeleted("s", versions: [2], deleted: false)
        #expect(value(try await kv.read("s")) == ["v": "2"])
        try await kv.destroy("s", versions: [1])
        guard case .gone(let destroyed, _) = try await kv.read("s", version: 1) else { Issue.record("the destroyed version reads"); return }
        #expect(destroyed.destroyed)
        // Undeleting a destroyed version does not bring it back.
        try await kv.setDeleted("s", versions: [1], deleted: false)
        if case .found = try await kv.read("s", version: 1) { Issue.record("a destroyed version came back") }
        try await kv.deleteMetadata("s")
        #expect(try await kv.metadata("s") == nil)
        await #expect(throws: SecretKVError.notFound) { try await kv.deleteLatest("s") }
    }

    @Test func maxVersionsPrunesTheOldest() async throws {
        let kv = try await engine()
        try await kv.updateMetadata("m", maxVersions: 2, casRequired: nil, customMetadata: ["owner": "shop"], deleteVersionAfter: nil)
        for index in 1...4 { try await kv.write("m", data: ["n": .number(Double(index))], cas: nil) }
        let metadata = try #require(try await kv.metadata("m"))
        #expect(metadata.versions.map(\.version) == [3, 4])
        #expect(metadata.oldestVersion == 3 && metadata.currentVersion == 4)
        #expect(metadata.customMetadata == ["owner": "shop"])
        if case .missing = try await kv.read("m", version: 1) {} else { Issue.record("a pruned version reads") }
        await #expect(throws: SecretKVError.self) {
            try await kv.updateMetadata("m", maxVersions: nil, casRequired: nil, customMetadata: nil, deleteVersionAfter: "soon")
        }
    }

    @Test func deleteVersionAfterDeletesNewVersionsWhenTheirTimeComes() async throws {
        let clock = TestClock()
        let kv = SecretKV(store: store, cipher: try await SecretsCipher.open(store: store, master: master), now: { clock.now })
        try await kv.write("t", data: ["k": "before"], cas: nil)
        try await kv.updateMetadata("t", maxVersions: nil, casRequired: nil, customMetadata: nil, deleteVersionAfter: "90s")
        #expect(try await kv.metadata("t")?.deleteVersionAfter == "1m30s")
        let info = try await kv.write("t", data: ["k": "timed"], cas: nil)
        #expect(info.deletionTime == "2027-01-15T08:01:30.000Z")
        clock.now += 89
        #expect(value(try await kv.read("t")) == ["k": "timed"])
        #expect(value(try await kv.read("t", version: 1)) == ["k": "before"])  // written before the setting: kept
        clock.now += 1
        if case .gone = try await kv.read("t") {} else { Issue.record("a version past its delete_version_after still reads") }
        #expect(try await kv.currentVersions()["t"] == "2 deleted")
        try await kv.setDeleted("t", versions: [2], deleted: false)
        #expect(value(try await kv.read("t")) == ["k": "timed"])
        // The engine's setting applies where the secret has none; the secret's own wins.
        try await kv.updateConfig(maxVersions: nil, casRequired: nil, deleteVersionAfter: "1h")
        #expect(try await kv.config().deleteVersionAfter == "1h0m0s")
        #expect(try await kv.write("u", data: ["k": "v"], cas: nil).deletionTime == "2027-01-15T09:01:30.000Z")
        #expect(try await kv.write("t", data: ["k": "v"], cas: nil).deletionTime == "2027-01-15T08:03:00.000Z")
        #expect(try SecretKV.deleteVersionAfter("0") == "0s" && SecretKV.deleteVersionAfter("250ms") == "0.25s")
    }

    @Test func patchMergesIntoANewVersion() async throws {
        let kv = try await engine()
        await #expect(throws: SecretKVError.notFound) { try await kv.patch("p", data: ["a": "1"], cas: nil) }
        try await kv.write("p", data: ["a": "1", "b": "2", "nested": ["x": 1, "y": 2]], cas: nil)
        let patched = try await kv.patch("p", data: ["b": .null, "c": "3", "nested": ["y": .null, "z": 3]], cas: 1)
        #expect(patched.version == 2)
        #expect(value(try await kv.read("p")) == ["a": "1", "c": "3", "nested": ["x": 1, "z": 3]])
    }

    @Test func listingShowsSecretsAndFolders() async throws {
        let kv = try await engine()
        for path in ["shop/db", "shop/cache", "shop/payments/stripe", "other"] { try await kv.write(path, data: ["k": "v"], cas: nil) }
        #expect(try await kv.list("") == ["other", "shop/"])
        #expect(try await kv.list("shop") == ["cache", "db", "payments/"])
        #expect(try await kv.list("shop/") == ["cache", "db", "payments/"])
        #expect(try await kv.list("nothing") == nil)
    }

    @Test func badPathsAreRefused() async throws {
        let kv = try await engine()
        for path in ["", "a//b", "../x", "a/./b", "a/", "x\u{7}"] {
            await #expect(throws: SecretKVError.self, "\(path.debugDescription)") { try await kv.write(path, data: ["k": "v"], cas: nil) }
        }
    }

    /// The store holds neither the values nor a usable key; another key does not open it; a
    /// rotated key does, and the old one no longer does.
    @Test func atRestEverythingIsSealed() async throws {
        let kv = try await engine()
        let planted = "planted-\(UUID().uuidString)"
        try await kv.write("shop/db", data: ["password": .string(planted)], cas: nil)
        for entry in try await store.list(prefix: "").entries {
            #expect(!String(decoding: entry.value, as: UTF8.self).contains(planted), "\(entry.key) holds the value")
        }
        let other = try SecretsMasterKey(text: SecretsMasterKey.generate(), source: "other")
        await #expect(throws: SecretsKeyError.self) { _ = try await SecretsCipher.open(store: store, master: other) }
        try await SecretsCipher.rotate(store: store, from: master, to: other)
        let rotated = SecretKV(store: store, cipher: try await SecretsCipher.open(store: store, master: other))
        #expect(value(try await rotated.read("shop/db")) == ["password": .string(planted)])
        await #expect(throws: SecretsKeyError.self) { _ = try await SecretsCipher.open(store: store, master: master) }
    }

    /// A sealed version copied to another path (or version) does not open there.
    @Test func sealedValuesAreBoundToTheirPath() async throws {
        let cipher = try await SecretsCipher.open(store: store, master: master)
        let sealed = try cipher.seal(Data("{}".utf8), context: SecretKV.context("a", 1))
        #expect(throws: (any Error).self) { _ = try cipher.open(sealed, context: SecretKV.context("b", 1)) }
        #expect(throws: (any Error).self) { _ = try cipher.open(sealed, context: SecretKV.context("a", 2)) }
        #expect(try cipher.open(sealed, context: SecretKV.context("a", 1)) == Data("{}".utf8))
    }

    @Test func keysAreParsedStrictly() throws {
        #expect(throws: SecretsKeyError.self) { _ = try SecretsMasterKey(text: "not base64!", source: "t") }
        #expect(throws: SecretsKeyError.self) { _ = try SecretsMasterKey(text: Data(count: 16).base64EncodedString(), source: "t") }
        _ = try SecretsMasterKey(text: "  " + SecretsMasterKey.generate() + "\n", source: "t")
    }
}

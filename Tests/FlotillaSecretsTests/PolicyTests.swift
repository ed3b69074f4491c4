import FlotillaCore
@testable import FlotillaSecrets
import FlotillaStore
import Foundation
import Testing

@Suite struct PolicyTests {
    func set(_ texts: String...) throws -> PolicySet {
        PolicySet(try texts.enumerated().map { try Policy(name: "p\($0.offset)", text: $0.element) })
    }

    @Test func vaultPathsGlobsAndPriority() throws {
        let policies = try set(
            """
            # shop's app reads its secrets
            path "secret/data/shop/*" { capabilities = ["read", "list"] }
            path "secret/data/shop/admin" { capabilities = ["deny"] }
            path "secret/data/+/public" { capabilities = ["read"] }
            path "secret/metadata/shop/*" {
              capabilities = ["list"]
            }
            """)
        #expect(policies.allows("secret/data/shop/db", anyOf: [.read]))
        #expect(policies.allows("secret/data/shop/a/b", anyOf: [.read]))
        #expect(!policies.allows("secret/data/shop/db", anyOf: [.update, .create]))
        #expect(!policies.allows("secret/data/shop/admin", anyOf: [.read]), "the exact deny outranks the glob")
        #expect(!policies.allows("secret/data/shop", anyOf: [.read]), "the glob needs its slash")
        #expect(policies.allows("secret/data/other/public", anyOf: [.read]))
        #expect(!policies.allows("secret/data/other/private", anyOf: [.read]))
        #expect(!policies.allows("secret/data/a/b/public", anyOf: [.read]), "+ is one segment")
        #expect(policies.capabilities(on: "secret/metadata/shop/x") == [.list])
        #expect(policies.capabilities(on: "marathon/apps/shop") == [])
    }

    @Test func policiesAddUpAndDenyWins() throws {
        let both = try set(
            #"path "secret/data/a/*" { capabilities = ["read"] }"#,
            #"path "secret/data/a/*" { capabilities = ["update"] }"#)
        #expect(both.capabilities(on: "secret/data/a/x") == [.read, .update])
        let denied = try set(
            #"path "secret/data/a/*" { capabilities = ["read"] }"#,
            #"path "secret/data/a/*" { capabilities = ["deny"] }"#)
        #expect(!denied.allows("secret/data/a/x", anyOf: [.read]))
        // A more specific pattern decides, even where a broader one grants more.
        let specific = try set(#"path "secret/*" { capabilities = ["read", "update"] } path "secret/data/x" { capabilities = ["read"] }"#)
        #expect(specific.capabilities(on: "secret/data/x") == [.read])
        #expect(PolicySet([.root]).allows("anything/at/all", anyOf: [.delete]))
    }

    @Test func consulRulesAndJSON() throws {
        let consul = try set(
            """
            key_prefix "shop/" { policy = "read" }
            key "shop/secret" { policy = "deny" }
            service_prefix "" { policy = "write" }
            node "n1" { policy = "read" }
            """)
        #expect(consul.allows("consul/kv/shop/config", anyOf: [.read]))
        #expect(!consul.allows("consul/kv/shop/config", anyOf: [.update]))
        #expect(!consul.allows("consul/kv/shop/secret", anyOf: [.read]))
        #expect(consul.allows("consul/service/web", anyOf: [.update]))
        #expect(consul.allows("consul/node/n1", anyOf: [.read]) && !consul.allows("consul/node/n2", anyOf: [.read]))
        let json = try set(#"{"path": {"marathon/apps/shop/*": {"capabilities": ["read", "update"]}}, "key_prefix": {"": {"policy": "list"}}}"#)
        #expect(json.allows("marathon/apps/shop/cart", anyOf: [.update]))
        #expect(json.capabilities(on: "consul/kv/x") == [.list])
    }

    @Test func badPoliciesAreRefusedSayingWhere() {
        for text in [
            #"path "a" { capabilities = ["fly"] }"#, #"path "a" { }"#, #"path a { capabilities = ["read"] }"#,
            #"path "a*b" { capabilities = ["read"] }"#, #"key_prefix "a" { policy = "admin" }"#, #"bucket "a" { policy = "read" }"#,
            #"path "a" { capabilities = ["read"]"#, #"path "a { capabilities = ["read"] }"#, "/* open",
        ] {
            #expect(throws: FlotillaError.self, "\(text)") { _ = try Policy(name: "bad", text: text) }
        }
    }

    /// Hostile policies: deep nesting, huge inputs and random token soup are refused or parsed,
    /// never a crash; whatever parses yields only rules named in the input.
    @Test func hostilePoliciesNeverCrashTheParser() {
        let deep = #"path "a" { capabilities = "# + String(repeating: "[", count: 100_000) + "]"
        #expect(throws: FlotillaError.self) { _ = try Policy(name: "deep", text: deep) }
        let jsonDeep = String(repeating: "{\"path\":", count: 10_000) + "1" + String(repeating: "}", count: 10_000)
        #expect(throws: FlotillaError.self) { _ = try Policy(name: "deep", text: jsonDeep) }
        let pieces = ["path", "key_prefix", "\"a/*\"", "\"\"", "{", "}", "[", "]", "=", ",", "capabilities", "policy", "\"read\"", "\"deny\"",
                      "#", "\n", "/*", "*/", "\\", "\"", "true", "12", "+", "node"]
        var generator = SystemRandomNumberGenerator()
        var parsed = 0
        for _ in 0..<3000 {
            let text = (0..<Int.random(in: 1...24, using: &generator)).map { _ in pieces.randomElement(using: &generator)! }.joined(separator: " ")
            do {
                let policy = try Policy(name: "fuzz", text: text)
                parsed += 1
                #expect(policy.rules.allSatisfy { rule in text.contains(rule.pattern.trimmingCharacters(in: CharacterSet(charactersIn: "*"))) || rule.pattern.hasPrefix("consul/") })
            } catch {
                continue  // typed throws: every refusal is a FlotillaError saying what is wrong
            }
        }
        #expect(parsed < 3000, "random soup mostly fails to parse")
    }

    @Test func tokensAreHashedExpireAndRevokeTheirChildren() async throws {
        let store = InMemoryStateStore()
        let clock = TestClock()
        let tokens = TokenStore(store: store, now: { clock.now })
        let (rootSecret, root) = try await tokens.bootstrap()
        await #expect(throws: FlotillaError.self) { _ = try await tokens.bootstrap() }
        #expect(try await tokens.lookup(secret: rootSecret)?.policies == ["root"])
        let (childSecret, child) = try await tokens.create(
            policies: ["reader"], displayName: "app", ttlSeconds: 60, renewable: true, uses: 0, parent: root, meta: [:])
        let (grandchildSecret, _) = try await tokens.create(
            policies: ["reader"], displayName: "worker", ttlSeconds: 0, renewable: false, uses: 0, parent: child, meta: [:])
        // No secret in the store: only hashes.
        for entry in try await store.list(prefix: "").entries {
            for secret in [rootSecret, childSecret, grandchildSecret] {
                #expect(!String(decoding: entry.value, as: UTF8.self).contains(secret) && !entry.key.contains(secret))
            }
        }
        clock.now += 61
        #expect(try await tokens.lookup(secret: childSecret) == nil, "expired")
        #expect(try await tokens.lookup(secret: grandchildSecret) == nil, "revoked with its parent")
        #expect(try await tokens.lookup(secret: rootSecret) != nil)
        let (onceSecret, _) = try await tokens.create(policies: [], displayName: "once", ttlSeconds: 0, renewable: false, uses: 1, parent: root, meta: [:])
        #expect(try await tokens.lookup(secret: onceSecret) != nil)
        #expect(try await tokens.lookup(secret: onceSecret) == nil, "its one use is spent")
        #expect(try await tokens.lookup(secret: "not-a-token") == nil)
    }
}

final class TestClock: @unchecked Sendable {
    var now = Date(timeIntervalSince1970: 1_800_000_000)
}

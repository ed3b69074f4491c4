internal import Crypto
import Synchronization
public import FlotillaCore
public import FlotillaStore
public import Foundation

/// A token as the API shows it (never its secret, which exists only in the creator's answer).
public struct TokenInfo: Sendable, Hashable, Codable {
    public var accessor: String
    public var policies: [String]
    public var displayName: String
    public var createdAt: Date
    /// Nil: never expires.
    public var expiresAt: Date?
    public var ttlSeconds: Int
    public var renewable: Bool
    /// 0: unlimited; else the uses left.
    public var usesLeft: Int
    public var parent: String?
    public var meta: [String: String]
    /// A policy of the token's own (a workload token's), beside its named ones.
    public var inlinePolicy: String?
}

/// Tokens and policies, in the state store: a token is kept as the SHA-256 of its secret (so the
/// store never holds one), found by that hash; policies as their source text.
public actor TokenStore {
    static let tokenPrefix = "acl/tokens/"
    static let hashPrefix = "acl/token-hashes/"
    static let policyPrefix = "acl/policies/"
    static let bootstrapKey = "acl/bootstrapped"

    let store: any StateStore
    let now: @Sendable () -> Date
    /// Parsed policies with the modify index of the record they were parsed from.
    private var policyCache: [String: (policy: Policy, index: UInt64)] = [:]
    /// Decision sets by the token's policies (and inline policy), reused by every request of
    /// tokens that share them. Dropped when this store writes a policy, and at least every
    /// `setLifetime` so a policy written elsewhere (another node of a cluster) is seen.
    static let setLifetime: TimeInterval = 5
    /// Tokens as last read, by the hash of their secret: a request does not read and decode its
    /// token's record each time. Dropped when this store revokes or changes a token, and after
    /// `tokenLifetime`, so a token revoked through another node of a cluster stops within it.
    static let tokenLifetime: TimeInterval = 1
    /// Both caches, behind a lock rather than the actor, so a request that finds its token and
    /// decision set there does not wait for the actor (every request would queue on it).
    private nonisolated let caches = Caches()

    final class Caches: Sendable {
        let tokens = Mutex<[String: (record: TokenRecord, read: Date)]>([:])
        let sets = Mutex<[String: (set: PolicySet, made: Date)]>([:])
    }

    /// The token from the cache, when it is there, fresh, and (if `consume`) has unlimited uses.
    public nonisolated func cachedToken(secret: String, consume: Bool) -> TokenInfo? {
        let hash = Self.hash(secret)
        let moment = now()
        return caches.tokens.withLock { cache -> TokenInfo? in
            guard let cached = cache[hash], moment.timeIntervalSince(cached.read) < Self.tokenLifetime,
                  cached.record.info.usesLeft == 0 || !consume else { return nil }
            if let expiry = cached.record.info.expiresAt, expiry <= moment { return nil }
            return cached.record.info
        }
    }

    /// The token's decision set from the cache, when it is there and fresh.
    public nonisolated func cachedPolicySet(for token: TokenInfo) -> PolicySet? {
        let key = Self.setKey(token)
        let moment = now()
        return caches.sets.withLock { cache in
            guard let cached = cache[key], moment.timeIntervalSince(cached.made) < Self.setLifetime else { return nil }
            return cached.set
        }
    }

    static func setKey(_ token: TokenInfo) -> String {
        token.policies.joined(separator: "\u{0}") + "\u{1}" + (token.inlinePolicy ?? "")
    }

    public init(store: any StateStore, now: @escaping @Sendable () -> Date = Date.init) {
        self.store = store
        self.now = now
    }

    public static func hash(_ secret: String) -> String {
        SHA256.hash(data: Data(secret.utf8)).map { String(format: "%02x", $0) }.joined()
    }

    /// A new secret: 32 random bytes, hex (usable as Vault's and Consul's opaque tokens).
    static func newSecret() -> String {
        SymmetricKey(size: .bits256).withUnsafeBytes { Data($0) }.map { String(format: "%02x", $0) }.joined()
    }

    // MARK: - Tokens

    /// The first management token (policy `root`). Works once per store, as Consul's bootstrap.
    public func bootstrap() async throws -> (secret: String, info: TokenInfo) {
        let (secret, info, mutations) = try makeToken(policies: ["root"], displayName: "bootstrap", ttlSeconds: 0, renewable: false, uses: 0, parent: nil, meta: [:])
        do {
            try await store.commit(StoreTransaction(
                preconditions: [.absent(Self.bootstrapKey)],
                mutations: mutations + [.put(Self.bootstrapKey, Data(info.accessor.utf8))]))
        } catch StoreError.preconditionFailed {
            throw FlotillaError.conflict(message: "ACL bootstrap already done: ask the holder of a management token for one", deploymentIDs: [])
        }
        return (secret, info)
    }

    public func create(
        policies: [String], displayName: String, ttlSeconds: Int, renewable: Bool, uses: Int, parent: TokenInfo?, meta: [String: String],
        inlinePolicy: String? = nil
    ) async throws -> (secret: String, info: TokenInfo) {
        if let inlinePolicy { _ = try Policy(name: "inline", text: inlinePolicy) }
        var (secret, info, mutations) = try makeToken(
            policies: policies, displayName: displayName, ttlSeconds: ttlSeconds, renewable: renewable, uses: uses, parent: parent?.accessor, meta: meta)
        if let inlinePolicy {
            info.inlinePolicy = inlinePolicy
            mutations[0] = .put(Self.tokenPrefix + info.accessor, try JSONEncoder().encode(TokenRecord(info: info, secretHash: Self.hash(secret))))
        }
        try await store.commit(StoreTransaction(mutations: mutations))
        return (secret, info)
    }

    private func makeToken(
        policies: [String], displayName: String, ttlSeconds: Int, renewable: Bool, uses: Int, parent: String?, meta: [String: String]
    ) throws -> (String, TokenInfo, [StoreMutation]) {
        let secret = Self.newSecret()
        let accessor = UUID().uuidString.lowercased()
        let created = now()
        let info = TokenInfo(
            accessor: accessor, policies: Array(Set(policies)).sorted(), displayName: displayName, createdAt: created,
            expiresAt: ttlSeconds > 0 ? created.addingTimeInterval(Double(ttlSeconds)) : nil, ttlSeconds: ttlSeconds,
            renewable: renewable && ttlSeconds > 0, usesLeft: uses, parent: parent, meta: meta)
        let record = TokenRecord(info: info, secretHash: Self.hash(secret))
        return (secret, info, [
            .put(Self.tokenPrefix + accessor, try JSONEncoder().encode(record)),
            .put(Self.hashPrefix + record.secretHash, Data(accessor.utf8)),
        ])
    }

    struct TokenRecord: Codable {
        var info: TokenInfo
        var secretHash: String
    }

    /// The live token whose secret this is; nil for an unknown, expired or used-up token. A token
    /// with limited uses loses one when `consume` (access control spends one use per request).
    public func lookup(secret: String, consume: Bool = true) async throws -> TokenInfo? {
        let hash = Self.hash(secret)
        if let cached = cachedToken(secret: secret, consume: consume) { return cached }
        guard let pointer = try await store.get(Self.hashPrefix + hash),
              let entry = try await store.get(Self.tokenPrefix + String(decoding: pointer.value, as: UTF8.self)),
              var record = try? JSONDecoder().decode(TokenRecord.self, from: entry.value) else { return nil }
        let moment = now()
        caches.tokens.withLock { cache in
            if cache.count > 10_000 { cache.removeAll() }
            cache[hash] = (record, moment)
        }
        // The hash found the record; compare the stored one in constant time all the same.
        guard Self.constantTimeEqual(record.secretHash, hash) else { return nil }
        if let expiry = record.info.expiresAt, expiry <= now() {
            try? await revoke(accessor: record.info.accessor)
            return nil
        }
        if consume && record.info.usesLeft > 0 {
            record.info.usesLeft -= 1
            if record.info.usesLeft == 0 {
                try await revoke(accessor: record.info.accessor)
                record.info.usesLeft = -1  // this use is the last
            } else {
                try await store.commit(StoreTransaction(
                    preconditions: [.modifyIndex(entry.key, equals: entry.modifyIndex)],
                    mutations: [.put(entry.key, try JSONEncoder().encode(record))]))
            }
        }
        return record.info
    }

    /// Every live token's accessor (Vault's `LIST auth/token/accessors`).
    public func accessors() async throws -> [String] {
        let moment = now()
        return try await store.list(prefix: Self.tokenPrefix).entries
            .compactMap { try? JSONDecoder().decode(TokenRecord.self, from: $0.value) }
            .filter { record in record.info.expiresAt.map { $0 > moment } ?? true }
            .map(\.info.accessor).sorted()
    }

    public func lookup(accessor: String) async throws -> TokenInfo? {
        guard let entry = try await store.get(Self.tokenPrefix + accessor) else { return nil }
        return try JSONDecoder().decode(TokenRecord.self, from: entry.value).info
    }

    /// Extends a renewable token's life by `increment` seconds (at most its original TTL).
    public func renew(accessor: String, incrementSeconds: Int?) async throws -> TokenInfo {
        guard let entry = try await store.get(Self.tokenPrefix + accessor) else { throw FlotillaError.notFound("no such token") }
        var record = try JSONDecoder().decode(TokenRecord.self, from: entry.value)
        guard record.info.renewable else { throw FlotillaError.badRequest("lease is not renewable") }
        let seconds = min(max(1, incrementSeconds ?? record.info.ttlSeconds), record.info.ttlSeconds)
        record.info.expiresAt = now().addingTimeInterval(Double(seconds))
        caches.tokens.withLock { $0.removeAll() }
        try await store.commit(StoreTransaction(mutations: [.put(entry.key, try JSONEncoder().encode(record))]))
        return record.info
    }

    /// Revokes a token and, as Vault does, the tokens it made.
    public func revoke(accessor: String) async throws {
        let all = try await store.list(prefix: Self.tokenPrefix).entries.compactMap { try? JSONDecoder().decode(TokenRecord.self, from: $0.value) }
        var doomed: Set<String> = [accessor]
        var grew = true
        while grew {
            grew = false
            for record in all where !doomed.contains(record.info.accessor) {
                if let parent = record.info.parent, doomed.contains(parent) {
                    doomed.insert(record.info.accessor)
                    grew = true
                }
            }
        }
        var mutations: [StoreMutation] = []
        caches.tokens.withLock { $0.removeAll() }
        for record in all where doomed.contains(record.info.accessor) {
            mutations += [.delete(Self.tokenPrefix + record.info.accessor), .delete(Self.hashPrefix + record.secretHash)]
        }
        if !mutations.isEmpty { try await store.commit(StoreTransaction(mutations: mutations)) }
    }

    /// Revokes every token whose `meta[key]` is one of `values` (an instance's workload token), or,
    /// with `keeping`, every token that has `key` and whose value is not kept.
    public func revoke(meta key: String, in values: Set<String>? = nil, keeping: Set<String>? = nil) async throws {
        let all = try await store.list(prefix: Self.tokenPrefix).entries.compactMap { try? JSONDecoder().decode(TokenRecord.self, from: $0.value) }
        for record in all {
            guard let value = record.info.meta[key] else { continue }
            if let values, !values.contains(value) { continue }
            if let keeping, keeping.contains(value) { continue }
            try await revoke(accessor: record.info.accessor)
        }
    }

    /// The tokens whose `meta[key]` is `value`.
    public func tokens(withMeta key: String, equal value: String) async throws -> [TokenInfo] {
        try await store.list(prefix: Self.tokenPrefix).entries.compactMap { try? JSONDecoder().decode(TokenRecord.self, from: $0.value) }
            .map(\.info).filter { $0.meta[key] == value }
    }

    public func revoke(secret: String) async throws {
        guard let pointer = try await store.get(Self.hashPrefix + Self.hash(secret)) else { return }
        try await revoke(accessor: String(decoding: pointer.value, as: UTF8.self))
    }

    static func constantTimeEqual(_ a: String, _ b: String) -> Bool {
        let x = Array(a.utf8), y = Array(b.utf8)
        guard x.count == y.count else { return false }
        var difference: UInt8 = 0
        for index in x.indices { difference |= x[index] ^ y[index] }
        return difference == 0
    }

    // MARK: - Policies

    public func putPolicy(_ policy: Policy) async throws {
        guard policy.name != "root" else { throw FlotillaError.badRequest("cannot update root policy") }
        try Self.validatePolicyName(policy.name)
        try await store.put(Self.policyPrefix + policy.name, Data(policy.text.utf8))
        caches.sets.withLock { $0.removeAll() }
    }

    public func policy(named name: String) async throws -> Policy? {
        if name == "root" { return .root }
        guard let entry = try await store.get(Self.policyPrefix + name) else { return nil }
        if let cached = policyCache[name], cached.index == entry.modifyIndex { return cached.policy }
        let policy = try Policy(name: name, text: String(decoding: entry.value, as: UTF8.self))
        policyCache[name] = (policy, entry.modifyIndex)
        return policy
    }

    public func deletePolicy(named name: String) async throws {
        guard name != "root" else { throw FlotillaError.badRequest("cannot delete root policy") }
        policyCache[name] = nil
        caches.sets.withLock { $0.removeAll() }
        try await store.commit(StoreTransaction(mutations: [.delete(Self.policyPrefix + name)]))
    }

    public func policyNames() async throws -> [String] {
        (try await store.list(prefix: Self.policyPrefix).entries.map { String($0.key.dropFirst(Self.policyPrefix.count)) } + ["root"]).sorted()
    }

    /// The decision set of a token's policies (unknown names grant nothing).
    public func policySet(for token: TokenInfo) async throws -> PolicySet {
        if let cached = cachedPolicySet(for: token) { return cached }
        let set = try await makePolicySet(for: token)
        let moment = now()
        caches.sets.withLock { cache in
            if cache.count > 10_000 { cache.removeAll() }
            cache[Self.setKey(token)] = (set, moment)
        }
        return set
    }

    private func makePolicySet(for token: TokenInfo) async throws -> PolicySet {
        var policies: [Policy] = []
        for name in token.policies { if let policy = try await policy(named: name) { policies.append(policy) } }
        if let inline = token.inlinePolicy, let policy = try? Policy(name: "inline", text: inline) { policies.append(policy) }
        return PolicySet(policies)
    }

    static func validatePolicyName(_ name: String) throws {
        guard !name.isEmpty, name.count <= 128, name.allSatisfy({ $0.isLetter || $0.isNumber || "-_.".contains($0) }) else {
            throw FlotillaError.badRequest("a policy name is 1-128 letters, digits, '-', '_' or '.'")
        }
    }
}

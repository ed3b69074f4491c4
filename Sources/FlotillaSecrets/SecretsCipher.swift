internal import Crypto
import FlotillaCore
public import FlotillaStore
public import Foundation

/// Why the secrets engine cannot open.
public struct SecretsKeyError: Error, CustomStringConvertible, Sendable {
    public let description: String
    init(_ description: String) { self.description = description }
}

/// The key an operator keeps outside the data directory (`--secrets-key-file`, or the
/// `FLOTILLA_SECRETS_KEY` environment variable): 32 random bytes, written as base64.
public struct SecretsMasterKey: Sendable {
    /// Kept as bytes (swift-crypto's `SymmetricKey` is not `Sendable`), made into a key per use.
    private let bytes: Data
    fileprivate var key: SymmetricKey { SymmetricKey(data: bytes) }

    /// A new key, as `flotilla secrets keygen` prints it.
    public static func generate() -> String {
        SymmetricKey(size: .bits256).withUnsafeBytes { Data($0).base64EncodedString() }
    }

    /// Parses base64 text (surrounding whitespace ignored).
    public init(text: String, source: String) throws {
        let trimmed = text.trimmingCharacters(in: .whitespacesAndNewlines)
        guard let bytes = Data(base64Encoded: trimmed), bytes.count == 32 else {
            throw SecretsKeyError("\(source) does not hold a secrets key (32 bytes of base64, as 'flotilla secrets keygen' writes)")
        }
        self.bytes = bytes
    }

    /// Reads the key file. A key readable by others than its owner is refused, as ssh refuses such keys.
    public init(file path: String) throws {
        var info = stat()
        guard stat(path, &info) == 0 else {
            throw SecretsKeyError("cannot read the secrets key file \(path): \(String(cString: strerror(errno)))")
        }
        if info.st_mode & 0o077 != 0 {
            throw SecretsKeyError("the secrets key file \(path) is readable by others (mode \(String(info.st_mode & 0o777, radix: 8))); chmod 600 it")
        }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw SecretsKeyError("cannot read the secrets key file \(path)")
        }
        try self.init(text: String(decoding: data, as: UTF8.self), source: path)
    }
}

/// Seals and opens secret values with AES-256-GCM under a data key. The data key is random, kept in
/// the store only wrapped (sealed) under the master key, so the store never holds a usable key and
/// a new master key re-wraps one record instead of re-encrypting every secret.
public struct SecretsCipher: Sendable {
    public static let keyringKey = "secrets/keyring"

    struct Keyring: Codable {
        var version: Int
        /// The data key sealed under the master key (nonce, ciphertext and tag, base64).
        var wrappedKey: String
        var createdAt: String
    }

    private let dataKeyBytes: Data
    private var dataKey: SymmetricKey { SymmetricKey(data: dataKeyBytes) }

    init(dataKey: SymmetricKey) {
        self.dataKeyBytes = dataKey.withUnsafeBytes { Data($0) }
    }

    private static let wrappingContext = Data("flotilla secrets keyring v1".utf8)

    /// Opens the store's keyring with `master`, making one on first use. A key that does not open
    /// an existing keyring is an error: secrets are never written in the clear or under a new key
    /// beside old ones.
    public static func open(store: any StateStore, master: SecretsMasterKey) async throws -> SecretsCipher {
        if let entry = try await store.get(keyringKey) {
            return try unwrap(entry.value, master: master)
        }
        let dataKey = SymmetricKey(size: .bits256)
        let sealed = try dataKey.withUnsafeBytes { try AES.GCM.seal(Data($0), using: master.key, authenticating: wrappingContext) }
        let keyring = Keyring(version: 1, wrappedKey: sealed.combined!.base64EncodedString(), createdAt: Timestamp.format(Date()))
        do {
            try await store.commit(StoreTransaction(preconditions: [.absent(keyringKey)], mutations: [.put(keyringKey, try JSONEncoder().encode(keyring))]))
            return SecretsCipher(dataKey: dataKey)
        } catch StoreError.preconditionFailed {
            // Another agent of the cluster made it first.
            guard let entry = try await store.get(keyringKey) else { throw SecretsKeyError("the secrets keyring vanished while it was made") }
            return try unwrap(entry.value, master: master)
        }
    }

    /// Re-wraps the data key under `new` (after opening it with `old`): every secret stays readable.
    public static func rotate(store: any StateStore, from old: SecretsMasterKey, to new: SecretsMasterKey) async throws {
        guard let entry = try await store.get(keyringKey) else { throw SecretsKeyError("there is no secrets keyring to rotate yet") }
        let cipher = try unwrap(entry.value, master: old)
        let sealed = try cipher.dataKey.withUnsafeBytes { try AES.GCM.seal(Data($0), using: new.key, authenticating: wrappingContext) }
        let keyring = Keyring(version: 1, wrappedKey: sealed.combined!.base64EncodedString(), createdAt: Timestamp.format(Date()))
        try await store.commit(
            StoreTransaction(
                preconditions: [.modifyIndex(keyringKey, equals: entry.modifyIndex)],
                mutations: [.put(keyringKey, try JSONEncoder().encode(keyring))]))
    }

    private static func unwrap(_ data: Data, master: SecretsMasterKey) throws -> SecretsCipher {
        guard let keyring = try? JSONDecoder().decode(Keyring.self, from: data), keyring.version == 1,
              let combined = Data(base64Encoded: keyring.wrappedKey) else {
            throw SecretsKeyError("the store's secrets keyring is unreadable")
        }
        do {
            let box = try AES.GCM.SealedBox(combined: combined)
            let key = try AES.GCM.open(box, using: master.key, authenticating: wrappingContext)
            return SecretsCipher(dataKey: SymmetricKey(data: key))
        } catch {
            throw SecretsKeyError("the secrets key does not open this store's secrets (a different key than the one they were written with?)")
        }
    }

    /// Seals `plaintext`; `context` (the secret's path and version) is authenticated, so a sealed
    /// value moved to another path or version does not open.
    func seal(_ plaintext: Data, context: String) throws -> String {
        try AES.GCM.seal(plaintext, using: dataKey, authenticating: Data(context.utf8)).combined!.base64EncodedString()
    }

    func open(_ sealed: String, context: String) throws -> Data {
        guard let combined = Data(base64Encoded: sealed) else { throw SecretsKeyError("a sealed secret is not base64") }
        return try AES.GCM.open(try AES.GCM.SealedBox(combined: combined), using: dataKey, authenticating: Data(context.utf8))
    }
}

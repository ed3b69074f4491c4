public import FlotillaCore
public import FlotillaStore
public import Foundation

/// One version's metadata, as Vault's KV v2 shows it.
public struct SecretVersionInfo: Sendable, Hashable, Codable {
    public var version: Int
    public var createdTime: String
    /// Empty while the version is not deleted (Vault's spelling).
    public var deletionTime: String
    public var destroyed: Bool
}

/// A secret's metadata (`GET /v1/secret/metadata/<path>`).
public struct SecretMetadata: Sendable, Hashable {
    public var currentVersion: Int
    public var oldestVersion: Int
    public var maxVersions: Int
    public var casRequired: Bool
    public var customMetadata: [String: String]?
    public var deleteVersionAfter: String
    public var createdTime: String
    public var updatedTime: String
    public var versions: [SecretVersionInfo]
}

/// The engine's settings (`/v1/secret/config`).
public struct SecretKVConfig: Sendable, Hashable, Codable {
    public var maxVersions: Int = 0
    public var casRequired: Bool = false
    public var deleteVersionAfter: String = "0s"

    public init() {}
}

/// What reading a version found.
public enum SecretReadResult: Sendable {
    case found(data: [String: JSONValue], info: SecretVersionInfo, customMetadata: [String: String]?)
    /// The version exists but was deleted or destroyed: Vault answers 404 with its metadata.
    case gone(info: SecretVersionInfo, customMetadata: [String: String]?)
    case missing
}

/// Errors with Vault's messages; `status` is the HTTP status Vault answers with.
public struct SecretKVError: Error, CustomStringConvertible, Sendable, Equatable {
    public let status: Int
    public let description: String

    public init(status: Int, description: String) {
        self.status = status
        self.description = description
    }

    static func invalid(_ message: String) -> SecretKVError { SecretKVError(status: 400, description: message) }
    static let casRequired = SecretKVError(status: 400, description: "check-and-set parameter required for this call")
    static let casMismatch = SecretKVError(status: 400, description: "check-and-set parameter did not match the current version")
    static let notFound = SecretKVError(status: 404, description: "")
}

/// Vault's KV version 2 engine over the state store: versions with soft delete, undelete and
/// destroy, check-and-set, per-secret and engine-wide `max_versions` / `cas_required`, custom
/// metadata and listing. Each secret path is one record (so one commit changes it, guarded by the
/// record's modify index, on SQLite and etcd alike); every version's data is sealed on its own by
/// the `SecretsCipher`, with its path and version authenticated.
public actor SecretKV {
    public static let recordPrefix = "secrets/kv/data/"
    public static let configKey = "secrets/kv/config"
    /// Vault's default when neither the secret nor the engine says.
    public static let defaultMaxVersions = 10
    public static let maximumPathBytes = 512
    public static let maximumDataBytes = 512 * 1024

    struct Record: Codable {
        var currentVersion: Int
        var oldestVersion: Int
        var maxVersions: Int
        var casRequired: Bool
        var customMetadata: [String: String]?
        var deleteVersionAfter: String
        var createdTime: String
        var updatedTime: String
        var versions: [Version]

        struct Version: Codable {
            var version: Int
            var createdTime: String
            var deletionTime: String
            var destroyed: Bool
            /// The data, sealed; nil once destroyed.
            var sealed: String?

            var info: SecretVersionInfo {
                SecretVersionInfo(version: version, createdTime: createdTime, deletionTime: deletionTime, destroyed: destroyed)
            }
        }
    }

    let store: any StateStore
    let cipher: SecretsCipher
    let now: @Sendable () -> Date

    public init(store: any StateStore, cipher: SecretsCipher, now: @escaping @Sendable () -> Date = Date.init) {
        self.store = store
        self.cipher = cipher
        self.now = now
    }

    // MARK: - Paths

    /// A secret's path: segments of printable characters, none empty, `.` or `..`.
    public static func validate(_ path: String) throws(SecretKVError) {
        guard !path.isEmpty else { throw .invalid("missing secret path") }
        guard path.utf8.count <= maximumPathBytes else { throw .invalid("the secret path is longer than \(maximumPathBytes) bytes") }
        guard !path.unicodeScalars.contains(where: { $0.properties.generalCategory == .control }) else {
            throw .invalid("the secret path has a control character")
        }
        for segment in path.split(separator: "/", omittingEmptySubsequences: false) {
            if segment.isEmpty || segment == "." || segment == ".." {
                throw .invalid("invalid secret path '\(path)': empty, '.' and '..' segments are not allowed")
            }
        }
    }

    // MARK: - Reading

    public func read(_ path: String, version: Int? = nil) async throws -> SecretReadResult {
        try Self.validate(path)
        guard let (record, _) = try await load(path) else { return .missing }
        let wanted = (version ?? 0) == 0 ? record.currentVersion : version!
        guard let entry = record.versions.first(where: { $0.version == wanted }) else { return .missing }
        guard !Self.isDeleted(entry, at: now()), !entry.destroyed, let sealed = entry.sealed else {
            return .gone(info: entry.info, customMetadata: record.customMetadata)
        }
        let plaintext = try cipher.open(sealed, context: Self.context(path, wanted))
        guard case .object(let data) = try JSONValue.parse(plaintext) else { throw SecretsKeyError("a sealed secret is not an object") }
        return .found(data: data, info: entry.info, customMetadata: record.customMetadata)
    }

    public func metadata(_ path: String) async throws -> SecretMetadata? {
        try Self.validate(path)
        guard let (record, _) = try await load(path) else { return nil }
        return SecretMetadata(
            currentVersion: record.currentVersion, oldestVersion: record.oldestVersion, maxVersions: record.maxVersions,
            casRequired: record.casRequired, customMetadata: record.customMetadata, deleteVersionAfter: record.deleteVersionAfter,
            createdTime: record.createdTime, updatedTime: record.updatedTime, versions: record.versions.map(\.info))
    }

    /// The names directly below `prefix` (`""`: the top): secrets as they are, folders with a
    /// trailing `/`, as Vault's LIST answers. Nil when there is nothing below it.
    public func list(_ prefix: String) async throws -> [String]? {
        var folder = prefix
        if !folder.isEmpty {
            if !folder.hasSuffix("/") { folder += "/" }
            try Self.validate(String(folder.dropLast()))
        }
        let entries = try await store.list(prefix: Self.recordPrefix + folder).entries
        var names: [String] = []
        var seen: Set<String> = []
        for entry in entries {
            let rest = entry.key.dropFirst(Self.recordPrefix.count + folder.count)
            let name = rest.firstIndex(of: "/").map { String(rest[...$0]) } ?? String(rest)
            if !name.isEmpty, seen.insert(name).inserted { names.append(name) }
        }
        return names.isEmpty ? nil : names.sorted()
    }

    public func config() async throws -> SecretKVConfig {
        guard let entry = try await store.get(Self.configKey) else { return SecretKVConfig() }
        return try JSONDecoder().decode(SecretKVConfig.self, from: entry.value)
    }

    public func updateConfig(maxVersions: Int?, casRequired: Bool?, deleteVersionAfter: String?) async throws {
        var config = try await config()
        if let maxVersions {
            guard maxVersions >= 0 else { throw SecretKVError.invalid("max_versions must not be negative") }
            config.maxVersions = maxVersions
        }
        if let casRequired { config.casRequired = casRequired }
        if let deleteVersionAfter { config.deleteVersionAfter = try Self.deleteVersionAfter(deleteVersionAfter) }
        try await store.put(Self.configKey, try JSONEncoder().encode(config))
    }

    // MARK: - Writing

    /// Writes a new version. `cas`: 0 writes only if the secret has no version yet; N only if N is
    /// the current version. Required when the secret or the engine says `cas_required`.
    @discardableResult
    public func write(_ path: String, data: [String: JSONValue], cas: Int?) async throws -> SecretVersionInfo {
        try Self.validate(path)
        return try await addVersion(path, data: data, cas: cas, create: true)
    }

    /// JSON merge patch (RFC 7386) of the current version into a new one; a missing or deleted
    /// current version is 404, as in Vault.
    @discardableResult
    public func patch(_ path: String, data: [String: JSONValue], cas: Int?) async throws -> SecretVersionInfo {
        let current: [String: JSONValue]
        switch try await read(path) {
        case .found(let data, _, _): current = data
        case .gone, .missing: throw SecretKVError.notFound
        }
        return try await addVersion(path, data: Self.mergePatch(current, data), cas: cas, create: false)
    }

    /// Seals `data` as the secret's next version, if `cas` (or its absence) allows.
    private func addVersion(_ path: String, data: [String: JSONValue], cas: Int?, create: Bool) async throws -> SecretVersionInfo {
        let plaintext = try JSONEncoder().encode(JSONValue.object(data))
        guard plaintext.count <= Self.maximumDataBytes else { throw SecretKVError.invalid("the secret is larger than \(Self.maximumDataBytes) bytes") }
        let config = try await config()
        return try await change(path, create: create) { record in
            if (record.casRequired || config.casRequired) && cas == nil { throw SecretKVError.casRequired }
            if let cas, cas != record.currentVersion { throw SecretKVError.casMismatch }
            return try self.appendVersion(to: &record, path: path, plaintext: plaintext, config: config)
        }
    }

    /// Soft-deletes the current version (`DELETE /v1/secret/data/<path>`).
    public func deleteLatest(_ path: String) async throws {
        try Self.validate(path)
        let moment = now()
        let stamp = Timestamp.format(moment)
        _ = try await change(path, create: false) { record in
            if let index = record.versions.firstIndex(where: { $0.version == record.currentVersion }), !Self.isDeleted(record.versions[index], at: moment) {
                record.versions[index].deletionTime = stamp
            }
        }
    }

    /// Soft-deletes (`deleted: true`) or undeletes versions; destroyed ones stay destroyed.
    public func setDeleted(_ path: String, versions: [Int], deleted: Bool) async throws {
        try Self.validate(path)
        guard !versions.isEmpty else { throw SecretKVError.invalid("no versions provided") }
        let moment = now()
        let stamp = Timestamp.format(moment)
        _ = try await change(path, create: false) { record in
            for index in record.versions.indices where versions.contains(record.versions[index].version) && !record.versions[index].destroyed {
                if deleted {
                    if !Self.isDeleted(record.versions[index], at: moment) { record.versions[index].deletionTime = stamp }
                } else {
                    record.versions[index].deletionTime = ""
                }
            }
        }
    }

    /// Destroys versions: their data is gone for good (the sealed bytes are removed from the record).
    public func destroy(_ path: String, versions: [Int]) async throws {
        try Self.validate(path)
        guard !versions.isEmpty else { throw SecretKVError.invalid("no versions provided") }
        _ = try await change(path, create: false) { record in
            for index in record.versions.indices where versions.contains(record.versions[index].version) {
                record.versions[index].destroyed = true
                record.versions[index].sealed = nil
            }
        }
    }

    /// `POST /v1/secret/metadata/<path>`: creates the metadata if there is none.
    public func updateMetadata(
        _ path: String, maxVersions: Int?, casRequired: Bool?, customMetadata: [String: String]?, deleteVersionAfter: String?
    ) async throws {
        try Self.validate(path)
        if let maxVersions, maxVersions < 0 { throw SecretKVError.invalid("max_versions must not be negative") }
        if let customMetadata {
            guard customMetadata.count <= 64 else { throw SecretKVError.invalid("custom_metadata has more than 64 keys") }
            for (key, value) in customMetadata where key.utf8.count > 128 || value.utf8.count > 512 {
                throw SecretKVError.invalid("custom_metadata key '\(key.prefix(32))' or its value is too long (128 / 512 bytes)")
            }
        }
        let after = try deleteVersionAfter.map(Self.deleteVersionAfter)
        let config = try await config()
        _ = try await change(path, create: true) { record in
            if let maxVersions { record.maxVersions = maxVersions }
            if let casRequired { record.casRequired = casRequired }
            if let customMetadata { record.customMetadata = customMetadata }
            if let after { record.deleteVersionAfter = after }
            Self.prune(&record, config: config)
        }
    }

    /// Removes the secret: every version and its metadata.
    public func deleteMetadata(_ path: String) async throws {
        try Self.validate(path)
        try await store.commit(StoreTransaction(mutations: [.delete(Self.recordPrefix + path)]))
    }

    // MARK: - For instances

    /// Each secret's current version as instances would read it (`"3"`, or `"3 deleted"` when
    /// that version is deleted or destroyed), to notice changes that matter to them.
    public func currentVersions() async throws -> [String: String] {
        var versions: [String: String] = [:]
        let moment = now()
        for entry in try await store.list(prefix: Self.recordPrefix).entries {
            guard let record = try? JSONDecoder().decode(Record.self, from: entry.value) else { continue }
            let current = record.versions.first { $0.version == record.currentVersion }
            let gone = current.map { Self.isDeleted($0, at: moment) || $0.destroyed } ?? true
            versions[String(entry.key.dropFirst(Self.recordPrefix.count))] = "\(record.currentVersion)\(gone ? " deleted" : "")"
        }
        return versions
    }

    /// Waits until a secret changes (or `timeout` passes), after the store's index `after`.
    public func waitForChange(after index: UInt64, timeout: Duration) async throws -> UInt64 {
        try await store.waitForChange(prefix: Self.recordPrefix, after: index, timeout: timeout)
    }

    public func currentIndex() async throws -> UInt64 { try await store.currentIndex() }

    /// The value an app's `secrets` entry names: `path@key` is that key's value; `path` alone is
    /// the value of a secret with one key, or the JSON object of one with several. Strings come
    /// as they are, other JSON values as JSON. Errors say what is missing, never a value.
    public func value(of source: SecretSource) async throws -> String {
        guard let (path, key) = source.path else { throw SecretKVError.invalid("'\(source.source)' is not a secret path") }
        let data: [String: JSONValue]
        switch try await read(path) {
        case .found(let found, _, _): data = found
        case .gone(let info, _): throw SecretKVError(status: 404, description: "version \(info.version) of \(path) is deleted")
        case .missing: throw SecretKVError(status: 404, description: "there is no secret at \(path)")
        }
        func text(_ value: JSONValue) -> String {
            if case .string(let string) = value { return string }
            return String(decoding: value.serialized(), as: UTF8.self)
        }
        if let key {
            guard let value = data[key] else { throw SecretKVError(status: 404, description: "the secret at \(path) has no key '\(key)'") }
            return text(value)
        }
        if data.count == 1, let only = data.values.first { return text(only) }
        return text(.object(data))
    }

    // MARK: - Internals

    static func context(_ path: String, _ version: Int) -> String { "kv2:\(path)#\(version)" }

    /// A version is deleted once its deletion time has come: a soft delete stamps the moment it
    /// happened, `delete_version_after` a moment in the version's future.
    static func isDeleted(_ version: Record.Version, at moment: Date) -> Bool {
        guard !version.deletionTime.isEmpty else { return false }
        guard let due = Timestamp.parse(version.deletionTime) else { return true }
        return due <= moment
    }

    /// `delete_version_after` in Go's canonical form (`1h0m0s`, `90s` → `1m30s`, `0s`: never).
    static func deleteVersionAfter(_ value: String) throws -> String {
        guard let seconds = GoDuration.seconds(value), seconds.isFinite, seconds >= 0, seconds <= 100 * 365 * 86_400 else {
            throw SecretKVError.invalid("delete_version_after must be a duration such as 30s, 1h or 0s (never): got '\(value.prefix(40))'")
        }
        let whole = Int(seconds.rounded(.down))
        let (hours, minutes, rest) = (whole / 3600, (whole % 3600) / 60, whole % 60)
        let fraction = seconds - Double(whole)
        let secondsText = fraction > 0 ? String(format: "%g", Double(rest) + fraction) : "\(rest)"
        if hours > 0 { return "\(hours)h\(minutes)m\(secondsText)s" }
        if minutes > 0 { return "\(minutes)m\(secondsText)s" }
        return "\(secondsText)s"
    }

    private func load(_ path: String) async throws -> (Record, UInt64)? {
        guard let entry = try await store.get(Self.recordPrefix + path) else { return nil }
        return (try JSONDecoder().decode(Record.self, from: entry.value), entry.modifyIndex)
    }

    /// Read, change, commit guarded by the record's modify index; retried when another writer got
    /// there first.
    private func change<T>(_ path: String, create: Bool, _ body: (inout Record) throws -> T) async throws -> T {
        for _ in 0..<8 {
            let loaded = try await load(path)
            guard create || loaded != nil else { throw SecretKVError.notFound }
            let stamp = Timestamp.format(now())
            var record = loaded?.0 ?? Record(
                currentVersion: 0, oldestVersion: 0, maxVersions: 0, casRequired: false, customMetadata: nil, deleteVersionAfter: "0s",
                createdTime: stamp, updatedTime: stamp, versions: [])
            let result = try body(&record)
            record.updatedTime = stamp
            let key = Self.recordPrefix + path
            let precondition: StorePrecondition = loaded.map { .modifyIndex(key, equals: $0.1) } ?? .absent(key)
            do {
                try await store.commit(StoreTransaction(preconditions: [precondition], mutations: [.put(key, try JSONEncoder().encode(record))]))
                return result
            } catch StoreError.preconditionFailed {
                continue
            }
        }
        throw SecretKVError(status: 500, description: "the secret at \(path) kept changing under this write; try again")
    }

    private nonisolated func appendVersion(to record: inout Record, path: String, plaintext: Data, config: SecretKVConfig) throws -> SecretVersionInfo {
        let version = record.currentVersion + 1
        let created = now()
        // The secret's own delete_version_after, else the engine's; 0 keeps versions until deleted.
        let after = [record.deleteVersionAfter, config.deleteVersionAfter].lazy.compactMap { GoDuration.seconds($0) }.first { $0 > 0 }
        let entry = Record.Version(
            version: version, createdTime: Timestamp.format(created), deletionTime: after.map { Timestamp.format(created.addingTimeInterval($0)) } ?? "",
            destroyed: false,
            sealed: try cipher.seal(plaintext, context: Self.context(path, version)))
        record.versions.append(entry)
        record.currentVersion = version
        if record.oldestVersion == 0 { record.oldestVersion = version }
        Self.prune(&record, config: config)
        return entry.info
    }

    /// Drops the oldest versions beyond `max_versions` (the secret's, else the engine's, else 10).
    static func prune(_ record: inout Record, config: SecretKVConfig) {
        let limit = record.maxVersions > 0 ? record.maxVersions : (config.maxVersions > 0 ? config.maxVersions : defaultMaxVersions)
        if record.versions.count > limit {
            record.versions.removeFirst(record.versions.count - limit)
        }
        record.oldestVersion = record.versions.first?.version ?? record.oldestVersion
    }

    /// RFC 7386: objects merge key by key, `null` removes a key, anything else replaces.
    static func mergePatch(_ target: [String: JSONValue], _ patch: [String: JSONValue]) -> [String: JSONValue] {
        var result = target
        for (key, value) in patch {
            switch value {
            case .null:
                result[key] = nil
            case .object(let inner):
                if case .object(let existing)? = result[key] {
                    result[key] = .object(mergePatch(existing, inner))
                } else {
                    result[key] = .object(mergePatch([:], inner))
                }
            default:
                result[key] = value
            }
        }
        return result
    }
}

import FlotillaCore
public import FlotillaSecrets
import Foundation
import HTTPTypes
public import Hummingbird
import NIOCore

/// Vault's HTTP API for the KV version 2 engine mounted at `secret/`, as `hvac` and the `vault kv`
/// commands speak it: `data/`, `delete/`, `undelete/`, `destroy/`, `metadata/` (listing with
/// `?list=true`) and `config`, Vault's response envelope and its `{"errors": [...]}` shape.
public struct VaultRoutes: Sendable {
    /// Nil when the agent has no secrets key: every call answers 503, as a sealed Vault does.
    let kv: SecretKV?

    public init(kv: SecretKV?) {
        self.kv = kv
    }

    static let mount = "/v1/secret"
    static let maximumBodyBytes = SecretKV.maximumDataBytes * 2

    public func add<Context: RequestContext>(to router: Router<Context>) {
        let m = Self.mount
        router.get("\(m)/data/**") { request, _ in await handle { try await readData(request) } }
        router.post("\(m)/data/**") { request, _ in await handle { try await writeData(request) } }
        router.put("\(m)/data/**") { request, _ in await handle { try await writeData(request) } }
        router.patch("\(m)/data/**") { request, _ in await handle { try await patchData(request) } }
        router.delete("\(m)/data/**") { request, _ in await handle { try await deleteLatest(request) } }
        for (action, method) in [("delete", "delete"), ("undelete", "undelete"), ("destroy", "destroy")] {
            for verb in [HTTPRequest.Method.post, .put] {
                router.on("\(m)/\(action)/**", method: verb) { request, _ in await handle { try await versions(request, action: method) } }
            }
        }
        // Listing is `GET …?list=true`; the server turns Vault's `LIST` method into that before
        // the HTTP parser (which knows no `LIST`) sees it.
        router.get("\(m)/metadata") { request, _ in await handle { try await metadataOrList(request, root: true) } }
        router.get("\(m)/metadata/**") { request, _ in await handle { try await metadataOrList(request, root: false) } }
        for verb in [HTTPRequest.Method.post, .put, .patch] {
            router.on("\(m)/metadata/**", method: verb) { request, _ in await handle { try await writeMetadata(request) } }
        }
        router.delete("\(m)/metadata/**") { request, _ in await handle { try await deleteMetadata(request) } }
        router.get("\(m)/config") { request, _ in await handle { try await readConfig() } }
        for verb in [HTTPRequest.Method.post, .put] {
            router.on("\(m)/config", method: verb) { request, _ in await handle { try await writeConfig(request) } }
        }
        // How the `vault kv` commands learn that `secret/` is a KV version 2 mount.
        router.get("/v1/sys/internal/ui/mounts/secret") { _, _ in
            await handle {
                try Self.envelope(["type": "kv", "path": "secret/", "options": ["version": "2"], "description": "key/value secret storage"])
            }
        }
    }

    // MARK: - data/

    private func readData(_ request: Request) async throws -> Response {
        let (engine, path) = try target(request, "data")
        var version: Int?
        if let text = request.formValue("version") {
            guard let number = Int(text), number >= 0 else { throw SecretKVError(status: 400, description: "version must be a number") }
            version = number
        }
        switch try await engine.read(path, version: version) {
        case .found(let data, let info, let custom):
            return try Self.envelope(["data": .object(data), "metadata": Self.versionJSON(info, custom)])
        case .gone(let info, let custom):
            // Vault answers a deleted or destroyed version with 404 and its metadata.
            return try Self.envelope(["data": .null, "metadata": Self.versionJSON(info, custom)], status: .notFound)
        case .missing:
            throw SecretKVError(status: 404, description: "")
        }
    }

    private func writeData(_ request: Request) async throws -> Response {
        let (engine, path) = try target(request, "data")
        let (data, cas) = try await Self.dataAndOptions(request)
        let info = try await engine.write(path, data: data, cas: cas)
        return try Self.envelope(Self.versionJSON(info, try await engine.metadata(path)?.customMetadata))
    }

    private func patchData(_ request: Request) async throws -> Response {
        let (engine, path) = try target(request, "data")
        let (data, cas) = try await Self.dataAndOptions(request)
        let info = try await engine.patch(path, data: data, cas: cas)
        return try Self.envelope(Self.versionJSON(info, try await engine.metadata(path)?.customMetadata))
    }

    private func deleteLatest(_ request: Request) async throws -> Response {
        let (engine, path) = try target(request, "data")
        try await engine.deleteLatest(path)
        return Response(status: .noContent)
    }

    private func versions(_ request: Request, action: String) async throws -> Response {
        let (engine, path) = try target(request, action)
        let body = try await Self.body(request)
        guard case .array(let items)? = body["versions"] else { throw SecretKVError(status: 400, description: "no versions provided") }
        let versions = try items.map { item -> Int in
            guard case .number(let number) = item, number >= 1, number == number.rounded() else {
                throw SecretKVError(status: 400, description: "versions must be positive whole numbers")
            }
            return Int(number)
        }
        switch action {
        case "delete": try await engine.setDeleted(path, versions: versions, deleted: true)
        case "undelete": try await engine.setDeleted(path, versions: versions, deleted: false)
        default: try await engine.destroy(path, versions: versions)
        }
        return Response(status: .noContent)
    }

    // MARK: - metadata/

    private func metadataOrList(_ request: Request, root: Bool) async throws -> Response {
        if request.formValue("list") == "true" { return try await listing(request, root: root) }
        let (engine, path) = try target(request, "metadata")
        guard let metadata = try await engine.metadata(path) else { throw SecretKVError(status: 404, description: "") }
        var versions: [String: JSONValue] = [:]
        for info in metadata.versions {
            versions[String(info.version)] = [
                "created_time": .string(info.createdTime), "deletion_time": .string(info.deletionTime), "destroyed": .bool(info.destroyed),
            ]
        }
        return try Self.envelope([
            "cas_required": .bool(metadata.casRequired), "created_time": .string(metadata.createdTime),
            "current_version": .number(Double(metadata.currentVersion)), "custom_metadata": Self.customJSON(metadata.customMetadata),
            "delete_version_after": .string(metadata.deleteVersionAfter), "max_versions": .number(Double(metadata.maxVersions)),
            "oldest_version": .number(Double(metadata.oldestVersion)), "updated_time": .string(metadata.updatedTime),
            "versions": .object(versions),
        ])
    }

    private func listing(_ request: Request, root: Bool) async throws -> Response {
        let engine = try engine()
        let prefix = root ? "" : try Self.path(of: request, after: "metadata")
        guard let keys = try await engine.list(prefix) else { throw SecretKVError(status: 404, description: "") }
        return try Self.envelope(["keys": .array(keys.map(JSONValue.string))])
    }

    private func writeMetadata(_ request: Request) async throws -> Response {
        let (engine, path) = try target(request, "metadata")
        let body = try await Self.body(request)
        let known: Set<String> = ["max_versions", "cas_required", "custom_metadata", "delete_version_after"]
        if let unknown = body.keys.sorted().first(where: { !known.contains($0) }) {
            throw SecretKVError(status: 400, description: "unknown field '\(unknown)'; metadata takes \(known.sorted().joined(separator: ", "))")
        }
        var custom: [String: String]?
        if let value = body["custom_metadata"], value != .null {
            guard case .object(let fields) = value else { throw SecretKVError(status: 400, description: "custom_metadata must be an object of strings") }
            custom = try fields.mapValues { value in
                guard case .string(let text) = value else { throw SecretKVError(status: 400, description: "custom_metadata values must be strings") }
                return text
            }
        }
        try await engine.updateMetadata(
            path, maxVersions: try Self.integer(body["max_versions"], "max_versions"), casRequired: try Self.bool(body["cas_required"], "cas_required"),
            customMetadata: custom, deleteVersionAfter: try Self.duration(body["delete_version_after"]))
        return Response(status: .noContent)
    }

    private func deleteMetadata(_ request: Request) async throws -> Response {
        let (engine, path) = try target(request, "metadata")
        try await engine.deleteMetadata(path)
        return Response(status: .noContent)
    }

    // MARK: - config

    private func readConfig() async throws -> Response {
        let config = try await engine().config()
        return try Self.envelope([
            "cas_required": .bool(config.casRequired), "delete_version_after": .string(config.deleteVersionAfter),
            "max_versions": .number(Double(config.maxVersions)),
        ])
    }

    private func writeConfig(_ request: Request) async throws -> Response {
        let engine = try engine()
        let body = try await Self.body(request)
        let known: Set<String> = ["max_versions", "cas_required", "delete_version_after"]
        if let unknown = body.keys.sorted().first(where: { !known.contains($0) }) {
            throw SecretKVError(status: 400, description: "unknown field '\(unknown)'; config takes \(known.sorted().joined(separator: ", "))")
        }
        try await engine.updateConfig(
            maxVersions: try Self.integer(body["max_versions"], "max_versions"), casRequired: try Self.bool(body["cas_required"], "cas_required"),
            deleteVersionAfter: try Self.duration(body["delete_version_after"]))
        return Response(status: .noContent)
    }

    // MARK: - Helpers

    private func engine() throws -> SecretKV {
        guard let kv else {
            throw SecretKVError(
                status: 503, description: "secrets are off on this agent: start it with --secrets-key-file (make a key with 'flotilla secrets keygen')")
        }
        return kv
    }

    private func target(_ request: Request, _ section: String) throws -> (SecretKV, String) {
        let engine = try engine()
        return (engine, try Self.path(of: request, after: section))
    }

    /// The secret's path: what follows `/v1/secret/<section>/`, percent-decoded.
    static func path(of request: Request, after section: String) throws -> String {
        let prefix = "\(mount)/\(section)/"
        let raw = request.uri.path
        guard raw.hasPrefix(prefix) else { throw SecretKVError(status: 400, description: "missing secret path") }
        let encoded = String(raw.dropFirst(prefix.count))
        guard let path = encoded.removingPercentEncoding else { throw SecretKVError(status: 400, description: "the secret path is not valid percent-encoding") }
        // A trailing slash names a folder (LIST); data calls need a secret.
        return path.hasSuffix("/") && section == "metadata" ? String(path.dropLast()) : path
    }

    static func body(_ request: Request) async throws -> [String: JSONValue] {
        var request = request
        let buffer = try await request.collectBody(upTo: maximumBodyBytes)
        if buffer.readableBytes == 0 { return [:] }
        guard case .object(let object) = try? JSONValue.parse(Data(buffer.readableBytesView)) else {
            throw SecretKVError(status: 400, description: "failed to parse JSON input: the body must be a JSON object")
        }
        return object
    }

    static func dataAndOptions(_ request: Request) async throws -> ([String: JSONValue], Int?) {
        let body = try await body(request)
        guard case .object(let data)? = body["data"] else {
            throw SecretKVError(status: 400, description: "no data provided")
        }
        var cas: Int?
        if case .object(let options)? = body["options"] {
            if let unknown = options.keys.sorted().first(where: { $0 != "cas" }) {
                throw SecretKVError(status: 400, description: "unknown option '\(unknown)'; the options are: cas")
            }
            cas = try integer(options["cas"], "options.cas")
        }
        return (data, cas)
    }

    static func integer(_ value: JSONValue?, _ name: String) throws -> Int? {
        switch value {
        case nil, .null?: return nil
        case .number(let number)? where number == number.rounded() && number >= 0 && number < 1e15: return Int(number)
        case .string(let text)? where Int(text).map { $0 >= 0 } == true: return Int(text)
        default: throw SecretKVError(status: 400, description: "\(name) must be a non-negative whole number")
        }
    }

    static func bool(_ value: JSONValue?, _ name: String) throws -> Bool? {
        switch value {
        case nil, .null?: return nil
        case .bool(let flag)?: return flag
        case .string(let text)? where text == "true" || text == "false": return text == "true"
        default: throw SecretKVError(status: 400, description: "\(name) must be true or false")
        }
    }

    static func duration(_ value: JSONValue?) throws -> String? {
        switch value {
        case nil, .null?: return nil
        case .string(let text)?: return text
        case .number(let seconds)?: return "\(Int(seconds))s"
        default: throw SecretKVError(status: 400, description: "delete_version_after must be a duration such as 0s")
        }
    }

    static func versionJSON(_ info: SecretVersionInfo, _ custom: [String: String]?) -> JSONValue {
        [
            "created_time": .string(info.createdTime), "custom_metadata": customJSON(custom), "deletion_time": .string(info.deletionTime),
            "destroyed": .bool(info.destroyed), "version": .number(Double(info.version)),
        ]
    }

    static func customJSON(_ custom: [String: String]?) -> JSONValue {
        custom.map { .object($0.mapValues(JSONValue.string)) } ?? .null
    }

    /// Vault's response envelope around `data`.
    static func envelope(_ data: JSONValue, status: HTTPResponse.Status = .ok) throws -> Response {
        let body: JSONValue = [
            "request_id": .string(UUID().uuidString.lowercased()), "lease_id": "", "renewable": false, "lease_duration": 0,
            "data": data, "wrap_info": .null, "warnings": .null, "auth": .null, "mount_type": "kv",
        ]
        return Self.json(body, status: status)
    }

    /// Vault's Content-Type is exactly `application/json` (hvac reads error bodies only then).
    static func json(_ value: JSONValue, status: HTTPResponse.Status) -> Response {
        Response(status: status, headers: [.contentType: "application/json"], body: ResponseBody(byteBuffer: ByteBuffer(bytes: value.serialized())))
    }

    private func handle(_ body: () async throws -> Response) async -> Response {
        do {
            return try await body()
        } catch let error as SecretKVError {
            let status = HTTPResponse.Status(code: error.status)
            return Self.json(["errors": .array(error.description.isEmpty ? [] : [.string(error.description)])], status: status)
        } catch let error as any HTTPResponseError where error.status == .contentTooLarge {
            return Self.json(["errors": ["request body too large"]], status: .contentTooLarge)
        } catch let error as SecretsKeyError {
            return Self.json(["errors": .array([.string(error.description)])], status: .internalServerError)
        } catch {
            return Self.json(["errors": .array([.string("internal error: \(type(of: error))")])], status: .internalServerError)
        }
    }
}

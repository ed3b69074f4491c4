public import FlotillaControl
import FlotillaCore
public import FlotillaImage
import Foundation
public import Hummingbird
import NIOCore

/// The node's image store over HTTP, for `flotilla images`, `flotilla image pull|import|prune`:
///
///     GET  /flotilla/v1/images                  every stored image, with the apps that use it
///     POST /flotilla/v1/images/pull             {"image": REF}; newline-delimited JSON progress, then the image
///     POST /flotilla/v1/images/import?name=REF  a docker save or OCI layout tarball as the body,
///                                               or ?path=PATH of one (or of a layout directory) on this node
///     POST /flotilla/v1/images/prune            removes images no app version references
public struct ImageRoutes: Sendable {
    let control: ControlPlane
    let images: ImageStore
    /// Where uploaded archives wait while they are imported.
    let uploadDirectory: String

    /// Largest archive an upload may carry (a big image is tens of GB at most).
    static let maximumUploadBytes = 64 << 30

    public init(control: ControlPlane, images: ImageStore, uploadDirectory: String) {
        self.control = control
        self.images = images
        self.uploadDirectory = uploadDirectory
    }

    public func add<Context: RequestContext>(to router: Router<Context>) {
        router.get("/flotilla/v1/images") { _, _ in await FlotillaRoutes.handle { try await self.list() } }
        router.post("/flotilla/v1/images/pull") { request, _ in await FlotillaRoutes.handle { try await self.pull(request) } }
        router.post("/flotilla/v1/images/import") { request, _ in await FlotillaRoutes.handle { try await self.importImages(request) } }
        router.post("/flotilla/v1/images/prune") { _, _ in await FlotillaRoutes.handle { try await self.prune() } }
    }

    static func json(_ image: StoredImage, usedBy: [String]) -> JSONValue {
        [
            "id": .string(image.id.description), "references": .array(image.references.map(JSONValue.string)),
            "size": .number(Double(image.size)), "layers": .number(Double(image.layers.count)), "storedAt": .string(image.storedAt),
            "architecture": .string(image.config.architecture), "os": .string(image.config.os),
            "usedBy": .array(usedBy.map(JSONValue.string)),
        ]
    }

    private func list() async throws -> Response {
        let uses = try await Self.referencedImages(control)
        let stored = await images.images()
        var result: [JSONValue] = []
        for image in stored {
            var users: Set<String> = []
            for (name, apps) in uses where image.references.contains(name) || name == image.id.description { users.formUnion(apps) }
            result.append(Self.json(image, usedBy: users.sorted()))
        }
        return APIResponse.json(.array(result))
    }

    private func pull(_ request: Request) async throws -> Response {
        var request = request
        let body = try await request.collectBody(upTo: 64 * 1024)
        guard case .object(let object) = try JSONValue.parse(Data(body.readableBytesView)), let name = object["image"]?.stringValue else {
            throw FlotillaError.malformed("the body must be {\"image\": \"registry/repository:tag\"}")
        }
        let reference: ImageReference
        do {
            reference = try ImageReference(parsing: name)
        } catch {
            throw FlotillaError.invalid([FieldError("/image", "\(error)")])
        }
        let images = images
        let (stream, continuation) = AsyncStream.makeStream(of: ByteBuffer.self)
        // The pull goes on if the client goes away: a later pull of the same image joins it.
        Task {
            do {
                let image = try await images.pull(reference) { progress in
                    let line: JSONValue = [
                        "phase": .string(progress.phase.rawValue), "bytesDone": .number(Double(progress.bytesDone)),
                        "bytesTotal": .number(Double(progress.bytesTotal)), "message": .string(progress.summary),
                    ]
                    continuation.yield(ByteBuffer(bytes: line.serialized() + [0x0A]))
                }
                continuation.yield(ByteBuffer(bytes: JSONValue.object(["image": Self.json(image, usedBy: [])]).serialized() + [0x0A]))
            } catch {
                continuation.yield(ByteBuffer(bytes: JSONValue.object(["error": .string("\(error)")]).serialized() + [0x0A]))
            }
            continuation.finish()
        }
        return Response(status: .ok, headers: [.contentType: "application/x-ndjson"], body: ResponseBody(asyncSequence: stream))
    }

    private func importImages(_ request: Request) async throws -> Response {
        let name = request.uri.queryParameters["name"].map(String.init)
        if let name, (try? ImageReference(parsing: name)) == nil {
            throw FlotillaError.invalid([FieldError("/name", "'\(name)' is not an image reference")])
        }
        let imported: [StoredImage]
        if let path = request.uri.queryParameters["path"].map(String.init) {
            guard path.hasPrefix("/") else { throw FlotillaError.invalid([FieldError("/path", "must be an absolute path on the agent's node")]) }
            imported = try await importing { try await images.importImages(from: path, name: name) }
        } else {
            try FileManager.default.createDirectory(atPath: uploadDirectory, withIntermediateDirectories: true)
            let upload = uploadDirectory + "/upload-" + UUID().uuidString + ".tar"
            defer { try? FileManager.default.removeItem(atPath: upload) }
            guard FileManager.default.createFile(atPath: upload, contents: nil), let handle = FileHandle(forWritingAtPath: upload) else {
                throw FlotillaError.unavailable("cannot store the upload in \(uploadDirectory)")
            }
            var received = 0
            do {
                for try await buffer in request.body {
                    received += buffer.readableBytes
                    if received > Self.maximumUploadBytes { throw FlotillaError.badRequest("the archive is over \(Self.maximumUploadBytes >> 30) GiB") }
                    try handle.write(contentsOf: Data(buffer.readableBytesView))
                }
                try handle.close()
            } catch {
                try? handle.close()
                throw error
            }
            guard received > 0 else { throw FlotillaError.malformed("send the archive as the body, or give ?path=") }
            imported = try await importing { try await images.importImages(from: upload, name: name) }
        }
        return APIResponse.json(.array(imported.map { Self.json($0, usedBy: []) }))
    }

    /// Import failures are the archive's fault: a 422 that says what is wrong with it.
    private func importing(_ work: () async throws -> [StoredImage]) async throws -> [StoredImage] {
        do {
            return try await work()
        } catch let error as FlotillaError {
            throw error
        } catch {
            throw FlotillaError.invalid([FieldError("/", "cannot import the archive: \(error)")])
        }
    }

    private func prune() async throws -> Response {
        let uses = try await Self.referencedImages(control)
        let (removed, bytes) = await images.prune(keeping: Set(uses.keys))
        return APIResponse.json([
            "removed": .array(removed.map { Self.json($0, usedBy: []) }), "bytesFreed": .number(Double(bytes)),
        ])
    }

    /// Canonical image references (and `sha256:` ids) that some app version or live instance
    /// names, with the apps that name them.
    public static func referencedImages(_ control: ControlPlane) async throws -> [String: Set<String>] {
        let snapshot = await control.snapshot()
        var uses: [String: Set<String>] = [:]
        func note(_ image: String, _ app: AppID) {
            guard let reference = try? ImageReference(parsing: image) else { return }
            uses[reference.description, default: []].insert(app.path)
            if let digest = reference.digest { uses[digest.description, default: []].insert(app.path) }
        }
        for (id, record) in snapshot.apps {
            if let image = record.definition.container?.image { note(image, id) }
            for version in try await control.versions(of: id) {
                if let image = try? await control.version(version, of: id).definition.container?.image { note(image, id) }
            }
        }
        for instance in snapshot.instances.values where !instance.state.isTerminal {
            if let image = instance.spec.definition.container?.image { note(image, instance.spec.appID) }
        }
        return uses
    }
}

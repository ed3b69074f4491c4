import Foundation
import Glibc
public import Logging
import Synchronization

/// An image in the store: its manifest's digest names it; the references that point at it, its
/// configuration and its layers (compressed blobs, bottom first).
public struct StoredImage: Sendable, Hashable, Codable {
    /// The manifest digest (`sha256:…`): the image's identity.
    public var id: ImageDigest
    /// Canonical references that resolve to it (`registry:5000/shop/cart:1.4`).
    public var references: [String]
    public var configDigest: ImageDigest
    public var config: ImageConfiguration
    public var layers: [ImageDescriptor]
    /// Bytes of its blobs (compressed layers and config) as stored.
    public var size: Int64
    /// When it was pulled or imported (RFC 3339).
    public var storedAt: String
}

/// Where images live on a node: content-addressed blobs, each layer unpacked once and shared by
/// every container of every image that has it (as an overlayfs lower directory), and one record
/// per image. Layout under `root`:
///
///     blobs/sha256/<hex>     manifests, configs, layers as downloaded (digest-verified)
///     layers/<hex>/          a layer unpacked for overlayfs (named by its blob digest)
///     images/<hex>.json      a StoredImage, named by its manifest digest
///
/// Pulls of one reference share one download, whoever asks; blobs that are there are not fetched
/// again, and a broken download resumes where it stopped.
public actor ImageStore {
    public nonisolated let root: String
    private let client: RegistryClient?
    private let logger: Logger
    private var inFlight: [String: Task<StoredImage, any Error>] = [:]
    private var progressHandlers: [String: [@Sendable (PullProgress) -> Void]] = [:]
    /// Layers being unpacked, so two images sharing one unpack it once.
    private var unpacking: [ImageDigest: Task<String, any Error>] = [:]
    /// The image records as last read; every start looks its image up here. The store is the
    /// only writer of its directory, and forgets this whenever it writes or removes a record.
    private var records: [StoredImage]?

    /// - Parameter client: the registry client pulls go through; nil for a store that only imports.
    public init(root: String, client: RegistryClient?, logger: Logger) throws {
        self.root = root
        self.client = client
        self.logger = logger
        for directory in ["blobs/sha256", "layers", "images", "tmp"] {
            try FileManager.default.createDirectory(atPath: root + "/" + directory, withIntermediateDirectories: true)
        }
        // Leftovers of an interrupted unpack or import; partial downloads stay (they resume).
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: root + "/tmp")) ?? [] {
            try? FileManager.default.removeItem(atPath: root + "/tmp/" + entry)
        }
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: root + "/layers")) ?? [] where entry.hasPrefix(".") {
            try? FileManager.default.removeItem(atPath: root + "/layers/" + entry)
        }
    }

    // MARK: - Reading

    public func images() -> [StoredImage] {
        if let records { return records }
        let loaded = Self.readRecords(in: root + "/images")
        records = loaded
        return loaded
    }

    private static func readRecords(in directory: String) -> [StoredImage] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        return entries.filter { $0.hasSuffix(".json") }.compactMap { entry in
            guard let data = FileManager.default.contents(atPath: directory + "/" + entry) else { return nil }
            return try? JSONDecoder().decode(StoredImage.self, from: data)
        }.sorted { ($0.references.first ?? $0.id.description) < ($1.references.first ?? $1.id.description) }
    }

    /// The image a reference names here: by canonical reference, by digest (`…@sha256:…` or a bare
    /// `sha256:…`), or by a unique prefix of its id of at least 12 hex digits.
    public func image(named name: String) -> StoredImage? {
        let all = images()
        if let digest = ImageDigest(name) {
            return all.first { $0.id == digest }
        }
        if name.count >= 12, name.count <= 64, name.allSatisfy({ $0.isHexDigit }) {
            let matches = all.filter { $0.id.hex.hasPrefix(name) }
            if matches.count == 1 { return matches[0] }
        }
        guard let reference = try? ImageReference(parsing: name) else { return nil }
        if let digest = reference.digest {
            return all.first { $0.id == digest }
        }
        let canonical = reference.description
        return all.first { $0.references.contains(canonical) }
    }

    public func blobPath(_ digest: ImageDigest) -> String { root + "/blobs/sha256/" + digest.hex }

    // MARK: - Pulling

    /// Pulls `reference` from its registry (sharing a pull already under way) and returns the image.
    public func pull(_ reference: ImageReference, progress: @escaping @Sendable (PullProgress) -> Void = { _ in }) async throws -> StoredImage {
        let key = reference.description
        progressHandlers[key, default: []].append(progress)
        if let running = inFlight[key] { return try await running.value }
        guard let client else { throw RegistryError(.unsupported, "this store has no registry client; import the image instead") }
        let task = Task { try await self.download(reference, client: client) }
        inFlight[key] = task
        defer {
            inFlight[key] = nil
            progressHandlers[key] = nil
        }
        return try await task.value
    }

    private func report(_ key: String, _ progress: PullProgress) {
        for handler in progressHandlers[key] ?? [] { handler(progress) }
    }

    private func download(_ reference: ImageReference, client: RegistryClient) async throws -> StoredImage {
        let key = reference.description
        report(key, PullProgress(reference: key, phase: .resolving, bytesDone: 0, bytesTotal: 0))
        let resolved = try await client.resolve(reference)
        try write(resolved.manifestBytes, as: resolved.digest)
        try write(resolved.configBytes, as: resolved.configDescriptor.digest)
        let layers = resolved.layers
        let total = layers.reduce(Int64(0)) { $0 + $1.size }
        let counters = ByteCounters()
        for layer in layers where FileManager.default.fileExists(atPath: blobPath(layer.digest)) {
            counters.values.withLock { $0[layer.digest] = layer.size }
        }
        let sendProgress: @Sendable () -> Void = { [weak self] in
            let done = counters.values.withLock { $0.values.reduce(0, +) }
            Task { await self?.report(key, PullProgress(reference: key, phase: .downloading, bytesDone: done, bytesTotal: total)) }
        }
        sendProgress()
        // Three layers at a time, as Docker does: enough to fill a link, few enough to finish some early.
        let missing = layers.filter { !FileManager.default.fileExists(atPath: blobPath($0.digest)) }
        var seen: Set<ImageDigest> = []
        let unique = missing.filter { seen.insert($0.digest).inserted }
        try await withThrowingTaskGroup(of: Void.self) { group in
            var next = 0
            func startNext() {
                guard next < unique.count else { return }
                let layer = unique[next]
                next += 1
                let path = blobPath(layer.digest)
                group.addTask {
                    try await client.fetchBlob(resolved.reference, layer, to: path) { bytes in
                        counters.values.withLock { $0[layer.digest] = bytes }
                        sendProgress()
                    }
                }
            }
            for _ in 0..<3 { startNext() }
            while try await group.next() != nil { startNext() }
        }
        report(key, PullProgress(reference: key, phase: .unpacking, bytesDone: total, bytesTotal: total))
        for layer in layers { _ = try await unpackedLayer(layer) }
        let size = total + resolved.configDescriptor.size
        var image = StoredImage(
            id: resolved.digest, references: [], configDigest: resolved.configDescriptor.digest, config: resolved.config, layers: layers,
            size: size, storedAt: Self.now())
        image = try record(image, reference: reference.tag == nil && reference.digest != nil ? nil : reference.withoutDigest)
        report(key, PullProgress(reference: key, phase: .done, bytesDone: total, bytesTotal: total))
        logger.info("pulled \(key) (\(resolved.digest), \(layers.count) layers, \(total) bytes)")
        return image
    }

    // MARK: - Layers

    /// The directory a layer is unpacked in (overlayfs form), unpacking it the first time.
    public func unpackedLayer(_ layer: ImageDescriptor) async throws -> String {
        let directory = root + "/layers/" + layer.digest.hex
        if FileManager.default.fileExists(atPath: directory) { return directory }
        if let running = unpacking[layer.digest] { return try await running.value }
        let blob = blobPath(layer.digest)
        let temporary = root + "/layers/.unpacking-" + layer.digest.hex + "-" + UUID().uuidString
        let task = Task<String, any Error> {
            try await Self.offThread {
                try FileManager.default.createDirectory(atPath: temporary, withIntermediateDirectories: false)
                do {
                    _ = try LayerUnpacker(mode: .overlay).unpack(layer: blob, into: temporary)
                    guard rename(temporary, directory) == 0 else {
                        throw LayerError.system(path: directory, operation: "rename unpacked layer", errno: errno)
                    }
                } catch {
                    try? FileManager.default.removeItem(atPath: temporary)
                    throw error
                }
                return directory
            }
        }
        unpacking[layer.digest] = task
        defer { unpacking[layer.digest] = nil }
        return try await task.value
    }

    /// The unpacked layer directories of an image, bottom first.
    public func layerDirectories(of image: StoredImage) async throws -> [String] {
        var directories: [String] = []
        for layer in image.layers { directories.append(try await unpackedLayer(layer)) }
        return directories
    }

    /// Unpacks all of an image's layers one over the other into `directory` (a copy of the root
    /// filesystem, for nodes without overlayfs).
    public func flatten(_ image: StoredImage, into directory: String) async throws {
        let blobs = image.layers.map { blobPath($0.digest) }
        try await Self.offThread {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            let unpacker = LayerUnpacker(mode: .apply)
            for blob in blobs { _ = try unpacker.unpack(layer: blob, into: directory) }
        }
    }

    // MARK: - Importing

    /// Imports a `docker save` tarball, or an OCI image layout (a directory, or a tar of one).
    /// - Parameter name: the reference to give the image when the archive names none (or to
    ///   replace the tag-only names an OCI layout carries).
    public func importImages(from path: String, name: String? = nil) async throws -> [StoredImage] {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else {
            throw RegistryError(.io, "\(path) does not exist")
        }
        if isDirectory.boolValue { return try await importLayout(path, name: name, origin: path) }
        // An archive is untrusted bytes like a layer: unpacked by the same careful code.
        let scratch = root + "/tmp/import-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: scratch) }
        try await Self.offThread {
            try FileManager.default.createDirectory(atPath: scratch, withIntermediateDirectories: true)
            _ = try LayerUnpacker(mode: .apply).unpack(layer: path, into: scratch)
        }
        if FileManager.default.fileExists(atPath: scratch + "/manifest.json") {
            return try await importDockerArchive(scratch, name: name)
        }
        if FileManager.default.fileExists(atPath: scratch + "/index.json") {
            return try await importLayout(scratch, name: name, origin: path)
        }
        throw RegistryError(.malformed, "\(path) is neither a docker save archive (manifest.json) nor an OCI image layout (index.json)")
    }

    private func importLayout(_ layout: String, name: String?, origin: String) async throws -> [StoredImage] {
        let indexBytes = try Self.read(layout + "/index.json", limit: ParsedManifest.maximumSize)
        guard case .index(let index, _) = try ParsedManifest.decode(indexBytes, contentType: nil, imageName: origin) else {
            throw RegistryError(.malformed, "\(origin)/index.json is not an image index")
        }
        var imported: [StoredImage] = []
        for entry in index.manifests {
            var descriptor = entry
            var manifestBytes = try copyBlob(from: layout, descriptor.digest, size: descriptor.size, maximum: ParsedManifest.maximumSize)
            var parsed = try ParsedManifest.decode(manifestBytes, contentType: descriptor.mediaType, imageName: origin)
            if case .index(let nested, _) = parsed {
                descriptor = try nested.manifest(for: .host, imageName: origin)
                manifestBytes = try copyBlob(from: layout, descriptor.digest, size: descriptor.size, maximum: ParsedManifest.maximumSize)
                parsed = try ParsedManifest.decode(manifestBytes, contentType: descriptor.mediaType, imageName: origin)
            }
            guard case .image(let manifest, _) = parsed else { continue }
            let configBytes = try copyBlob(from: layout, manifest.config.digest, size: manifest.config.size, maximum: ImageConfiguration.maximumSize)
            let config = try ImageConfiguration.decode(configBytes, imageName: origin)
            for layer in manifest.layers { _ = try copyBlob(from: layout, layer.digest, size: layer.size, maximum: nil) }
            for layer in manifest.layers { _ = try await unpackedLayer(layer) }
            let annotated = entry.annotations?["io.containerd.image.name"] ?? entry.annotations?["org.opencontainers.image.ref.name"]
            var reference = try Self.importReference(annotated: annotated, name: name, origin: origin)
            // One name for a layout of several tagged images: each keeps its own tag under that name.
            if let given = reference, name != nil, index.manifests.count > 1, let tag = annotated, !tag.contains("/"), !tag.contains(":") {
                reference = try ImageReference(registry: given.registry, repository: given.repository, tag: tag)
            }
            let image = StoredImage(
                id: descriptor.digest, references: [], configDigest: manifest.config.digest, config: config, layers: manifest.layers,
                size: manifest.layers.reduce(manifest.config.size) { $0 + $1.size }, storedAt: Self.now())
            imported.append(try record(image, reference: reference))
        }
        guard !imported.isEmpty else { throw RegistryError(.malformed, "\(origin) holds no image for this platform") }
        return imported
    }

    /// `docker save`: manifest.json lists each image's config file, layer tarballs and tags.
    private func importDockerArchive(_ directory: String, name: String?) async throws -> [StoredImage] {
        struct Entry: Decodable {
            var Config: String
            var RepoTags: [String]?
            var Layers: [String]
        }
        let entries: [Entry]
        do {
            entries = try JSONDecoder().decode([Entry].self, from: Data(try Self.read(directory + "/manifest.json", limit: 1 << 20)))
        } catch let error as RegistryError {
            throw error
        } catch {
            throw RegistryError(.malformed, "manifest.json of the archive does not decode: \(error)")
        }
        var imported: [StoredImage] = []
        for entry in entries {
            let configBytes = try Self.read(try Self.inside(directory, entry.Config), limit: ImageConfiguration.maximumSize)
            let config = try ImageConfiguration.decode(configBytes, imageName: entry.RepoTags?.first ?? "archive")
            let configDigest = ImageDigest.sha256(of: configBytes)
            try write(configBytes, as: configDigest)
            var layers: [ImageDescriptor] = []
            for layerPath in entry.Layers {
                let source = try Self.inside(directory, layerPath)
                let (digest, size) = try await Self.offThread { try Self.hashFile(source) }
                let destination = blobPath(digest)
                if !FileManager.default.fileExists(atPath: destination) {
                    try Self.moveOrCopy(source, to: destination)
                }
                layers.append(ImageDescriptor(mediaType: "application/vnd.oci.image.layer.v1.tar", digest: digest, size: size))
            }
            for layer in layers { _ = try await unpackedLayer(layer) }
            let manifest = ImageManifest(
                mediaType: ImageMediaType.ociManifest,
                config: ImageDescriptor(mediaType: ImageMediaType.ociConfig, digest: configDigest, size: Int64(configBytes.count)), layers: layers)
            let manifestBytes = Array(try JSONEncoder().encode(manifest))
            let manifestDigest = ImageDigest.sha256(of: manifestBytes)
            try write(manifestBytes, as: manifestDigest)
            var image = StoredImage(
                id: manifestDigest, references: [], configDigest: configDigest, config: config, layers: layers,
                size: layers.reduce(Int64(configBytes.count)) { $0 + $1.size }, storedAt: Self.now())
            let tags = name.map { [$0] } ?? entry.RepoTags ?? []
            if tags.isEmpty {
                image = try record(image, reference: nil)
            }
            for tag in tags {
                image = try record(image, reference: try ImageReference(parsing: tag))
            }
            imported.append(image)
        }
        return imported
    }

    static func importReference(annotated: String?, name: String?, origin: String) throws -> ImageReference? {
        if let name { return try ImageReference(parsing: name) }
        guard let annotated, !annotated.isEmpty else { return nil }
        // A tag alone (what umoci and skopeo write): named after the layout it came from.
        if !annotated.contains("/") && !annotated.contains(":") {
            var base = URL(fileURLWithPath: origin).lastPathComponent.lowercased()
            for suffix in [".tar", ".oci"] where base.hasSuffix(suffix) { base = String(base.dropLast(suffix.count)) }
            let repository = base.filter { $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" || $0 == "." }
            return try ImageReference(parsing: "localhost/\(repository.isEmpty ? "image" : repository):\(annotated)")
        }
        return try ImageReference(parsing: annotated)
    }

    // MARK: - Removing

    /// Removes images no reference in `keep` names (canonical references or image ids), then the
    /// blobs and unpacked layers no remaining image uses. Returns the removed images and bytes freed.
    public func prune(keeping keep: Set<String>, inUseLayers: Set<String> = []) -> (removed: [StoredImage], bytes: Int64) {
        var removed: [StoredImage] = []
        var remaining: [StoredImage] = []
        for image in images() {
            let kept = keep.contains(image.id.description) || image.references.contains(where: keep.contains)
            if kept { remaining.append(image) } else { removed.append(image) }
        }
        for image in removed { unlink(root + "/images/" + image.id.hex + ".json") }
        records = nil
        var live: Set<String> = []
        for image in remaining {
            live.insert(image.id.hex)
            live.insert(image.configDigest.hex)
            for layer in image.layers { live.insert(layer.digest.hex) }
        }
        live.formUnion(inUseLayers)
        var freed: Int64 = 0
        let blobs = root + "/blobs/sha256"
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: blobs)) ?? [] {
            let hex = entry.hasSuffix(".partial") ? String(entry.dropLast(".partial".count)) : entry
            guard !live.contains(hex) else { continue }
            let path = blobs + "/" + entry
            freed += (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? Int64) ?? 0
            unlink(path)
        }
        let layers = root + "/layers"
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: layers)) ?? [] where !entry.hasPrefix(".") && !live.contains(entry) {
            try? FileManager.default.removeItem(atPath: layers + "/" + entry)
        }
        return (removed, freed)
    }

    /// Bytes the store takes on disk (blobs and unpacked layers).
    public func diskUsage() -> Int64 {
        var total: Int64 = 0
        if let enumerator = FileManager.default.enumerator(atPath: root) {
            for case let path as String in enumerator {
                var info = stat()
                if lstat(root + "/" + path, &info) == 0, (info.st_mode & S_IFMT) == S_IFREG { total += Int64(info.st_blocks) * 512 }
            }
        }
        return total
    }

    // MARK: - Records and blobs

    /// Writes the image's record, adding `reference` to it and taking it from any other image.
    private func record(_ image: StoredImage, reference: ImageReference?) throws -> StoredImage {
        var image = image
        if let existing = images().first(where: { $0.id == image.id }) {
            image.references = existing.references
        }
        if let reference {
            let name = reference.description
            for var other in images() where other.id != image.id && other.references.contains(name) {
                other.references.removeAll { $0 == name }
                try save(other)
            }
            if !image.references.contains(name) { image.references.append(name) }
        }
        try save(image)
        return image
    }

    private func save(_ image: StoredImage) throws {
        records = nil
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        try Self.atomicWrite(Array(try encoder.encode(image)), to: root + "/images/" + image.id.hex + ".json", temporaryDirectory: root + "/tmp")
    }

    private func write(_ bytes: [UInt8], as digest: ImageDigest) throws {
        let path = blobPath(digest)
        if FileManager.default.fileExists(atPath: path) { return }
        try Self.atomicWrite(bytes, to: path, temporaryDirectory: root + "/tmp")
    }

    /// Copies a blob of an OCI layout into the store, checking its size and digest; returns its
    /// bytes when `maximum` asks for them (manifests and configs), else nothing.
    private func copyBlob(from layout: String, _ digest: ImageDigest, size: Int64, maximum: Int?) throws -> [UInt8] {
        let source = try Self.inside(layout, "blobs/sha256/" + digest.hex)
        let (actual, actualSize) = try Self.hashFile(source)
        guard actual == digest else {
            throw RegistryError(.digestMismatch, "blob \(digest) of the layout hashes to \(actual); the layout is corrupt")
        }
        guard actualSize == size else {
            throw RegistryError(.sizeMismatch, "blob \(digest) of the layout is \(actualSize) bytes, its descriptor says \(size)")
        }
        let destination = blobPath(digest)
        if !FileManager.default.fileExists(atPath: destination) {
            let temporary = root + "/tmp/copy-" + UUID().uuidString
            try FileManager.default.copyItem(atPath: source, toPath: temporary)
            guard rename(temporary, destination) == 0 else { throw RegistryError(.io, "cannot store blob \(digest): \(String(cString: strerror(errno)))") }
        }
        guard let maximum else { return [] }
        return try Self.read(destination, limit: maximum)
    }

    // MARK: - File helpers

    static func now() -> String {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return formatter.string(from: Date())
    }

    /// A path under `directory` from a name an archive gave; refuses names that climb out.
    static func inside(_ directory: String, _ relative: String) throws -> String {
        let parts = relative.split(separator: "/")
        guard !relative.hasPrefix("/"), !parts.contains(".."), !parts.isEmpty else {
            throw RegistryError(.malformed, "the archive names '\(relative)', which is outside it")
        }
        return directory + "/" + parts.joined(separator: "/")
    }

    static func read(_ path: String, limit: Int) throws -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else { throw RegistryError(.io, "cannot open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65_536)
        while true {
            let count = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if count < 0 {
                if errno == EINTR { continue }
                throw RegistryError(.io, "cannot read \(path): \(String(cString: strerror(errno)))")
            }
            if count == 0 { break }
            bytes.append(contentsOf: buffer[0..<count])
            if bytes.count > limit { throw RegistryError(.tooLarge, "\(path) is over the \(limit)-byte limit") }
        }
        return bytes
    }

    static func hashFile(_ path: String) throws -> (ImageDigest, Int64) {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else { throw RegistryError(.io, "cannot open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var hasher = ImageDigest.SHA256Hasher()
        var size: Int64 = 0
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 16)
        defer { buffer.deallocate() }
        while true {
            let count = Glibc.read(fd, buffer.baseAddress, buffer.count)
            if count < 0 {
                if errno == EINTR { continue }
                throw RegistryError(.io, "cannot read \(path): \(String(cString: strerror(errno)))")
            }
            if count == 0 { break }
            hasher.update(bytes: UnsafeRawBufferPointer(rebasing: buffer[0..<count]))
            size += Int64(count)
        }
        return (hasher.finalize(), size)
    }

    static func atomicWrite(_ bytes: [UInt8], to path: String, temporaryDirectory: String) throws {
        let temporary = temporaryDirectory + "/write-" + UUID().uuidString
        let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw RegistryError(.io, "cannot create \(temporary): \(String(cString: strerror(errno)))") }
        var written = 0
        while written < bytes.count {
            let count = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + written, $0.count - written) }
            if count < 0 {
                if errno == EINTR { continue }
                close(fd)
                unlink(temporary)
                throw RegistryError(.io, "cannot write \(temporary): \(String(cString: strerror(errno)))")
            }
            written += count
        }
        fsync(fd)
        close(fd)
        guard rename(temporary, path) == 0 else {
            unlink(temporary)
            throw RegistryError(.io, "cannot store \(path): \(String(cString: strerror(errno)))")
        }
    }

    static func moveOrCopy(_ source: String, to destination: String) throws {
        if rename(source, destination) == 0 { return }
        try FileManager.default.copyItem(atPath: source, toPath: destination + ".copy")
        guard rename(destination + ".copy", destination) == 0 else {
            throw RegistryError(.io, "cannot store \(destination): \(String(cString: strerror(errno)))")
        }
    }

    /// Runs blocking file work on a thread of its own, not on one of the few threads async code shares.
    static func offThread<Value: Sendable>(_ work: @escaping @Sendable () throws -> Value) async throws -> Value {
        try await withCheckedThrowingContinuation { continuation in
            let thread = Thread {
                continuation.resume(with: Result<Value, any Error> { try work() })
            }
            thread.start()
        }
    }
}

/// Bytes on disk per layer while a pull runs, shared by its downloads.
final class ByteCounters: Sendable {
    let values = Mutex([ImageDigest: Int64]())
}

/// How a pull is going, for `flotilla image pull` and an instance's staging message.
public struct PullProgress: Sendable, Hashable, Codable {
    public enum Phase: String, Sendable, Hashable, Codable { case resolving, downloading, unpacking, done }

    public var reference: String
    public var phase: Phase
    public var bytesDone: Int64
    public var bytesTotal: Int64

    public init(reference: String, phase: Phase, bytesDone: Int64, bytesTotal: Int64) {
        self.reference = reference
        self.phase = phase
        self.bytesDone = bytesDone
        self.bytesTotal = bytesTotal
    }

    /// `pulling registry:5000/shop/cart:1.4: 12.5 of 48.0 MB`.
    public var summary: String {
        switch phase {
        case .resolving: return "pulling \(reference): resolving"
        case .downloading:
            return "pulling \(reference): \(Self.megabytes(bytesDone)) of \(Self.megabytes(bytesTotal)) MB"
        case .unpacking: return "pulling \(reference): unpacking \(Self.megabytes(bytesTotal)) MB"
        case .done: return "pulled \(reference)"
        }
    }

    static func megabytes(_ bytes: Int64) -> String { String(format: "%.1f", Double(bytes) / 1_000_000) }
}

extension ImageReference {
    /// The reference without its digest (the name a tag lives under).
    var withoutDigest: ImageReference {
        (try? ImageReference(registry: registry, repository: repository, tag: tag ?? "latest", digest: nil)) ?? self
    }
}

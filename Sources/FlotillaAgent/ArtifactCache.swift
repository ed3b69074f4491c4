import FlotillaImage
import Foundation
import Logging
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The fetcher's cache of `cache: true` artifacts: one file per URI in ``directory``, named by the
/// SHA-256 of the URI (64 hex digits).
///
/// - Reuse: a cached copy is used as is, forever (like the Mesos fetcher cache, which never revalidates);
///   change the URI to get new bytes.
/// - Size cap and eviction: after each new entry, least recently used entries (by modification time,
///   which every use refreshes, so the order survives agent restarts) are deleted until the total is at
///   most ``maxBytes``. An artifact larger than the whole cap is served to the fetch that downloaded it
///   and not kept.
/// - Concurrency: fetches of one URI that overlap share one download; if it fails, they all fail with
///   its error. Create one cache (one ``ArtifactFetcher``) per directory: sharing is per instance.
/// - Downloads go to `.<key>.<random>.part` and are renamed into place when complete; leftovers of a
///   crash older than 10 minutes are deleted when the cache is first used.
actor ArtifactCache {
    let directory: String
    let maxBytes: Int64
    private let logger: Logger
    private var inFlight: [String: Task<Int32, any Error>] = [:]
    private var prepared = false

    init(directory: String, maxBytes: Int64, logger: Logger) {
        self.directory = directory.hasSuffix("/") && directory.count > 1 ? String(directory.dropLast()) : directory
        self.maxBytes = maxBytes
        self.logger = logger
    }

    /// The hex SHA-256 of the URI's UTF-8 bytes.
    static func key(for uri: String) -> String {
        var hasher = ImageDigest.SHA256Hasher()
        hasher.update(Array(uri.utf8))
        return hasher.finalize().hex
    }

    /// The path of the entry for `uri` (whether or not it exists).
    nonisolated func path(for uri: String) -> String { "\(directory)/\(Self.key(for: uri))" }

    /// An open descriptor (the caller closes it) of the cached bytes of `uri`, positioned at the start.
    /// On a miss, `download` writes the artifact into the descriptor it is given (a temporary file in the
    /// cache directory). `downloaded` is true only for the caller whose call ran the download.
    func open(_ uri: String, download: @escaping @Sendable (Int32) async throws -> Void) async throws -> (fd: Int32, downloaded: Bool) {
        let key = Self.key(for: uri)
        while true {
            if let shared = inFlight[key] {
                _ = try await shared.value
                if let fd = openEntry(key) { return (fd, false) }
                continue  // not kept (larger than the cache): download it ourselves
            }
            if let fd = openEntry(key) {
                logger.debug("artifact cache hit", metadata: ["uri": "\(ArtifactRequest.redacted(uri))", "key": "\(key)"])
                return (fd, false)
            }
            let task = Task { try await self.fill(key: key, uri: uri, download: download) }
            inFlight[key] = task
            let result = await task.result
            inFlight[key] = nil
            return (try result.get(), true)
        }
    }

    /// Opens an existing entry and marks it used (modification time = now).
    private func openEntry(_ key: String) -> Int32? {
        let fd = artifactOpenFile("\(directory)/\(key)", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        _ = futimens(fd, nil)
        return fd
    }

    private func prepare() throws {
        guard !prepared else { return }
        do {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        } catch {
            throw ArtifactError(.io, "cannot create the artifact cache directory \(directory): \(error.localizedDescription)")
        }
        let now = Date()
        for name in (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [] where name.hasPrefix(".") && name.hasSuffix(".part") {
            let path = "\(directory)/\(name)"
            if let modified = (try? FileManager.default.attributesOfItem(atPath: path))?[.modificationDate] as? Date,
                now.timeIntervalSince(modified) > 600
            {
                unlink(path)
            }
        }
        prepared = true
    }

    private func fill(key: String, uri: String, download: @Sendable (Int32) async throws -> Void) async throws -> Int32 {
        try prepare()
        let temp = "\(directory)/.\(key).\(ArtifactIO.randomSuffix()).part"
        let fd = artifactOpenFile(temp, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw ArtifactError.posix("cannot create a file in the artifact cache \(directory)") }
        do {
            try await download(fd)
            guard rename(temp, "\(directory)/\(key)") == 0 else {
                throw ArtifactError.posix("cannot store into the artifact cache \(directory)")
            }
        } catch {
            close(fd)
            unlink(temp)
            throw error
        }
        _ = futimens(fd, nil)
        evict(keeping: key)
        _ = lseek(fd, 0, SEEK_SET)
        logger.debug("artifact cached", metadata: ["uri": "\(ArtifactRequest.redacted(uri))", "key": "\(key)"])
        return fd
    }

    /// Deletes least recently used entries until the total is within ``maxBytes``; `key` (just added)
    /// goes last, and only if it alone is over the cap.
    private func evict(keeping key: String) {
        struct Item {
            var name: String
            var size: Int64
            var used: Double
        }
        var items: [Item] = []
        for name in (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [] {
            guard name.utf8.count == 64, name.utf8.allSatisfy({ (0x30...0x39).contains($0) || (0x61...0x66).contains($0) }) else { continue }
            var info = stat()
            guard lstat("\(directory)/\(name)", &info) == 0 else { continue }
            #if canImport(Darwin)
            let used = Double(info.st_mtimespec.tv_sec) + Double(info.st_mtimespec.tv_nsec) / 1e9
            #else
            let used = Double(info.st_mtim.tv_sec) + Double(info.st_mtim.tv_nsec) / 1e9
            #endif
            items.append(Item(name: name, size: Int64(info.st_size), used: used))
        }
        var total = items.reduce(0) { $0 + $1.size }
        guard total > maxBytes else { return }
        let order = items.filter { $0.name != key }.sorted { ($0.used, $0.name) < ($1.used, $1.name) } + items.filter { $0.name == key }
        for item in order where total > maxBytes {
            if unlink("\(directory)/\(item.name)") == 0 {
                total -= item.size
                logger.info(
                    item.name == key ? "artifact larger than the whole cache; not kept" : "evicted artifact from cache",
                    metadata: ["key": "\(item.name)", "bytes": "\(item.size)"]
                )
            }
        }
    }
}

private func artifactOpenFile(_ path: String, _ flags: Int32, _ mode: mode_t = 0) -> Int32 {
    open(path, flags, mode)
}

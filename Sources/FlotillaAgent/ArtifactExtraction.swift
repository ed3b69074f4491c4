import FlotillaImage
import Logging
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// What an archive is, by its name's suffix (case-insensitive), as the Mesos fetcher decides.
enum ArtifactArchiveKind: Sendable, Equatable {
    enum Compression: Sendable, Equatable {
        case none, gzip, bzip2, xz
    }

    case tar(Compression)
    case zip
    /// A single gzip-compressed file, extracted to the name without `.gz`.
    case gzipFile

    init?(fileName: String) {
        let name = fileName.lowercased()
        if name.hasSuffix(".tar.gz") || name.hasSuffix(".tgz") {
            self = .tar(.gzip)
        } else if name.hasSuffix(".tar.bz2") || name.hasSuffix(".tbz2") {
            self = .tar(.bzip2)
        } else if name.hasSuffix(".tar.xz") || name.hasSuffix(".txz") {
            self = .tar(.xz)
        } else if name.hasSuffix(".tar") {
            self = .tar(.none)
        } else if name.hasSuffix(".zip") {
            self = .zip
        } else if name.hasSuffix(".gz") {
            self = .gzipFile
        } else {
            return nil
        }
    }
}

/// Extracts one untrusted archive into a directory of the sandbox, with our own code (no `tar`/`unzip`
/// process): names are checked by ``ArtifactSandbox/components(of:what:kind:)``, link targets by
/// ``ArtifactSandbox/checkLinkTarget(_:linkPath:entry:)``, and every write goes through
/// ``ArtifactSandbox`` (no link ever followed). Owners are never set (files belong to the agent's user) and
/// modes are sanitized (no set-id bits, no group/world write). The first unsafe entry fails the whole
/// extraction; entries before it stay (inside the sandbox).
struct ArtifactExtraction {
    struct Limits: Sendable {
        /// Bytes all entries of one archive may extract to (decompression bombs).
        var maxBytes: Int64
        /// Entries one archive may have.
        var maxEntries: Int
    }

    struct Summary: Sendable, Equatable {
        var entries = 0
        var bytes: Int64 = 0
    }

    let sandbox: ArtifactSandbox
    /// The sandbox-relative directory the archive is extracted into.
    let destination: [String]
    let limits: Limits
    let logger: Logger
    /// The archive's name, for messages.
    let archive: String
    private(set) var summary = Summary()

    init(sandbox: ArtifactSandbox, destination: [String], limits: Limits, logger: Logger, archive: String) {
        self.sandbox = sandbox
        self.destination = destination
        self.limits = limits
        self.logger = logger
        self.archive = archive
    }

    /// Extracts the archive open at `fd` (positioned at its start; not closed here).
    mutating func extract(_ kind: ArtifactArchiveKind, fd: Int32, savedName: String) throws {
        do {
            switch kind {
            case .tar(.none):
                // `Decompressor` also recognizes a gzip or zstd stream saved as `.tar`, as `tar -xf` does.
                try extractTar(TarReader(Decompressor(fileDescriptor: fd, closeWhenDone: false, name: archive)))
            case .tar(.gzip):
                try extractTar(TarReader(gzip(fd)))
            case .tar(let compression):
                let tool = try ArtifactDecompressorProcess(
                    tool: compression == .bzip2 ? "bzip2" : "xz", arguments: ["-dc"], inputFD: fd, what: archive
                )
                do {
                    try extractTar(TarReader(Decompressor(fileDescriptor: tool.outputFD, closeWhenDone: false, name: archive)))
                } catch {
                    try? tool.finish(success: false)
                    throw error
                }
                try tool.finish(success: true)
            case .zip:
                var zip = try ArtifactZipReader(fd: fd, what: archive, maxEntries: limits.maxEntries)
                try extractZip(&zip)
            case .gzipFile:
                let output = String(savedName.dropLast(3))
                guard !output.isEmpty else {
                    throw ArtifactError(.badArchive, "cannot tell what to name the file decompressed from \(archive)")
                }
                let source = try gzip(fd)
                try countEntry()
                try writeFile(destination + [output], mode: 0o644, mtime: nil, entry: output) { buffer in
                    try source.read(into: buffer)
                }
            }
        } catch let error as LayerError {
            throw artifactError(error)
        }
    }

    /// A decompressor of the gzip stream (one or more members) at `fd`; anything else is refused.
    private func gzip(_ fd: Int32) throws -> Decompressor {
        let source = try Decompressor(fileDescriptor: fd, closeWhenDone: false, name: archive)
        guard source.compression == .gzip else {
            throw ArtifactError(.badArchive, "\(archive) is corrupt (it is not gzip data)")
        }
        return source
    }

    /// The fetcher's error for a failure of the tar reader or a decompressor.
    private func artifactError(_ error: LayerError) -> ArtifactError {
        switch error {
        case .decompression(let message):
            return ArtifactError(.badArchive, "\(archive) is corrupt (\(message))")
        case .malformedArchive(let entry, let reason):
            let at = entry.map { " at entry '\(ArtifactSandbox.printable($0))'" } ?? ""
            return ArtifactError(.badArchive, "\(archive) is not a valid tar archive (\(reason)\(at))")
        case .system(_, _, let code):
            return ArtifactError.posix("cannot read \(archive)", code)
        case .unsafeEntry, .unsupported:
            return ArtifactError(.badArchive, "cannot read \(archive): \(error)")
        }
    }

    // MARK: - Limits

    private mutating func countEntry() throws {
        summary.entries += 1
        if summary.entries > limits.maxEntries {
            throw ArtifactError(.tooLarge, "\(archive) has more than \(limits.maxEntries) entries")
        }
    }

    private mutating func countBytes(_ count: Int64) throws {
        summary.bytes += count
        if summary.bytes > limits.maxBytes {
            throw ArtifactError(.tooLarge, "\(archive) extracts to more than \(ArtifactFetcher.describe(bytes: limits.maxBytes)), the configured limit")
        }
    }

    // MARK: - Writing

    /// Sandbox-relative components for an entry name (nil for the archive's root, `./`).
    private func entryPath(_ name: String) throws -> [String]? {
        let parts = try ArtifactSandbox.components(of: name, what: "archive entry", kind: .unsafeArchive)
        return parts.isEmpty ? nil : destination + parts
    }

    /// Creates the file `path` from `produce` (which fills a buffer, 0 at the end), counting bytes.
    private mutating func writeFile(
        _ path: [String],
        mode: mode_t,
        mtime: Int64?,
        entry: String,
        produce: (UnsafeMutableRawBufferPointer) throws -> Int
    ) throws {
        let shown = ArtifactSandbox.display(path)
        let dirFD = try sandbox.openDirectory(path.dropLast(), create: true)
        defer { close(dirFD) }
        let fd = try ArtifactSandbox.createFile(path[path.count - 1], in: dirFD, shown: shown)
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 256 * 1024)
        while true {
            let n = try buffer.withUnsafeMutableBytes { try produce($0) }
            if n == 0 { break }
            try countBytes(Int64(n))
            try buffer.withUnsafeBytes { try ArtifactIO.writeAll(fd, UnsafeRawBufferPointer(rebasing: $0[0..<n]), shown: shown) }
        }
        guard fchmod(fd, ArtifactSandbox.sanitizedMode(mode)) == 0 else {
            throw ArtifactError.posix("cannot set the mode of \(shown)")
        }
        if let mtime {
            var times = [timespec(tv_sec: Int(truncatingIfNeeded: mtime), tv_nsec: 0), timespec(tv_sec: Int(truncatingIfNeeded: mtime), tv_nsec: 0)]
            _ = futimens(fd, &times)
        }
    }

    // MARK: - tar

    private mutating func extractTar(_ reader: TarReader) throws {
        while let entry = try reader.next() {
            try countEntry()
            let name = entry.path
            var kind = entry.kind
            // Old tars write directories as files whose name ends in a slash.
            if kind == .regular, name.hasSuffix("/") { kind = .directory }
            // Data that is skipped still counts: decompressing it costs time.
            if kind != .regular { try countBytes(entry.size) }
            guard let path = try entryPath(name) else { continue }
            let mode = mode_t(truncatingIfNeeded: entry.mode)
            switch kind {
            case .directory:
                try sandbox.makeDirectory(path, mode: mode)
            case .regular:
                try writeFile(path, mode: mode, mtime: entry.modificationTime, entry: name) { buffer in
                    try reader.read(into: buffer)
                }
            case .symlink:
                try ArtifactSandbox.checkLinkTarget(entry.linkTarget, linkPath: path, entry: name)
                try sandbox.makeSymlink(path, target: entry.linkTarget)
            case .hardlink:
                let target = try ArtifactSandbox.components(of: entry.linkTarget, what: "the target of hard link '\(ArtifactSandbox.printable(name))'", kind: .unsafeArchive)
                try sandbox.makeHardlink(path, to: destination + target, entry: name)
            case .characterDevice, .blockDevice, .fifo:
                logger.warning("skipping device or FIFO entry", metadata: ["archive": "\(archive)", "entry": "\(ArtifactSandbox.printable(name))"])
            }
        }
    }

    // MARK: - zip

    private mutating func extractZip(_ zip: inout ArtifactZipReader) throws {
        for entry in zip.entries {
            try countEntry()
            guard let path = try entryPath(entry.name) else { continue }
            if entry.isDirectory {
                try sandbox.makeDirectory(path, mode: entry.unixMode ?? 0o755)
                continue
            }
            if entry.isSymlink {
                guard entry.uncompressedSize <= 4096 else {
                    throw ArtifactError(.badArchive, "\(archive) has a symbolic link entry '\(ArtifactSandbox.printable(entry.name))' with an oversized target")
                }
                var target: [UInt8] = []
                let reader = try zip.open(entry)
                var chunk = [UInt8](repeating: 0, count: 4096)
                while true {
                    let n = try chunk.withUnsafeMutableBytes { try reader.read(into: $0) }
                    if n == 0 { break }
                    target.append(contentsOf: chunk[0..<n])
                }
                let text = String(decoding: target, as: UTF8.self)
                try ArtifactSandbox.checkLinkTarget(text, linkPath: path, entry: entry.name)
                try sandbox.makeSymlink(path, target: text)
                continue
            }
            let reader = try zip.open(entry)
            try writeFile(path, mode: entry.unixMode ?? 0o644, mtime: nil, entry: entry.name) { buffer in
                try reader.read(into: buffer)
            }
        }
    }
}

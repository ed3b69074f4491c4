import Dispatch
import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Writes into an instance's sandbox without ever leaving it.
///
/// Every operation starts from a descriptor of the sandbox root and walks the path one component at a time
/// with `openat(O_NOFOLLOW | O_DIRECTORY)`, creating directories with `mkdirat`; files are created with
/// `O_CREAT | O_EXCL | O_NOFOLLOW`. So no symbolic link (from an earlier archive entry, an earlier artifact,
/// or anything else already in the sandbox) is ever followed while writing, and paths are checked to be
/// relative with no `..` before they are used. Thread-safe: it holds one immutable descriptor.
final class ArtifactSandbox: Sendable {
    /// The sandbox directory as given.
    let path: String
    private let rootFD: Int32

    /// Opens (creating it and its parents if needed) the sandbox directory `path`.
    init(path: String) throws {
        self.path = path
        do {
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        } catch {
            throw ArtifactError(.io, "cannot create the sandbox directory \(path): \(error.localizedDescription)")
        }
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw ArtifactError.posix("cannot open the sandbox directory \(path)") }
        rootFD = fd
    }

    deinit { close(rootFD) }

    // MARK: - Path checks

    /// The components of a path that must stay inside the sandbox: relative, no `..`, no NUL; empty and `.`
    /// components are dropped. `what` names the path in errors ("output file", "archive entry").
    static func components(of relative: String, what: String, kind: ArtifactError.Kind = .invalidRequest) throws -> [String] {
        if relative.utf8.contains(0) {
            throw ArtifactError(kind, "\(what) '\(printable(relative))' contains a NUL byte")
        }
        if relative.hasPrefix("/") {
            throw ArtifactError(kind, "\(what) '\(printable(relative))' is an absolute path, which would land outside the sandbox")
        }
        let parts = relative.split(separator: "/", omittingEmptySubsequences: true).map(String.init).filter { $0 != "." }
        if parts.contains("..") {
            throw ArtifactError(kind, "\(what) '\(printable(relative))' contains '..', which could land outside the sandbox")
        }
        return parts
    }

    /// Checks that a symbolic link at `linkPath` (sandbox-relative components) with `target` resolves inside
    /// the sandbox. Accepted targets are relative, and `..` may only lead (`../../lib/x`, never `a/../b`):
    /// the leading `..`s climb real directories (links are only ever created under real directories), at
    /// most up to the sandbox root, and then only names descend, each of them a real directory or another
    /// such checked link, so resolution can never climb out, whatever links are added later.
    static func checkLinkTarget(_ target: String, linkPath: [String], entry: String) throws {
        let shown = "archive entry '\(printable(entry))' is a symbolic link to '\(printable(target))'"
        if target.isEmpty || target.utf8.contains(0) {
            throw ArtifactError(.unsafeArchive, "\(shown), which is not a valid target")
        }
        if target.hasPrefix("/") {
            throw ArtifactError(.unsafeArchive, "\(shown), an absolute path outside the sandbox")
        }
        var ups = 0
        var sawName = false
        for part in target.split(separator: "/", omittingEmptySubsequences: true) where part != "." {
            if part == ".." {
                if sawName {
                    throw ArtifactError(.unsafeArchive, "\(shown); '..' after a name is not allowed in link targets")
                }
                ups += 1
            } else {
                sawName = true
            }
        }
        if ups > linkPath.count - 1 {
            throw ArtifactError(.unsafeArchive, "\(shown), which points outside the sandbox")
        }
    }

    /// A path for messages: control characters escaped, at most 200 characters.
    static func printable(_ text: String) -> String {
        var out = ""
        for scalar in text.unicodeScalars.prefix(200) {
            if scalar.value < 0x20 || scalar.value == 0x7f {
                out += "\\u{\(String(scalar.value, radix: 16))}"
            } else {
                out.unicodeScalars.append(scalar)
            }
        }
        return text.unicodeScalars.count > 200 ? out + "…" : out
    }

    static func display(_ components: [String]) -> String {
        components.isEmpty ? "." : components.joined(separator: "/")
    }

    // MARK: - Directories

    /// A new descriptor (the caller closes it) of the directory at `components`, walked without following
    /// links; missing directories are created (mode 0755 less umask) when `create` is set.
    func openDirectory(_ components: some Collection<String>, create: Bool) throws -> Int32 {
        var fd = fcntl(rootFD, F_DUPFD_CLOEXEC, 0)
        guard fd >= 0 else { throw ArtifactError.posix("cannot open the sandbox") }
        var walked: [String] = []
        for name in components {
            walked.append(name)
            var next = openat(fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            if next < 0, errno == ENOENT, create {
                if mkdirat(fd, name, 0o755) != 0, errno != EEXIST {
                    let code = errno
                    close(fd)
                    throw ArtifactError.posix("cannot create directory \(Self.display(walked)) in the sandbox", code)
                }
                next = openat(fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            }
            if next < 0 {
                let code = errno
                close(fd)
                if code == ELOOP || code == ENOTDIR {
                    throw ArtifactError(.unsafeArchive, "\(Self.display(walked)) in the sandbox is a symbolic link or not a directory; refusing to write through it")
                }
                throw ArtifactError.posix("cannot open directory \(Self.display(walked)) in the sandbox", code)
            }
            close(fd)
            fd = next
        }
        return fd
    }

    /// Runs `body` with a descriptor of the directory `components` (created if needed).
    func withDirectory<T>(_ components: some Collection<String>, create: Bool = true, _ body: (Int32) throws -> T) throws -> T {
        let fd = try openDirectory(components, create: create)
        defer { close(fd) }
        return try body(fd)
    }

    /// Creates (or keeps) the directory at `components` and gives it `mode` (owner always rwx).
    func makeDirectory(_ components: [String], mode: mode_t) throws {
        try withDirectory(components) { fd in
            _ = fchmod(fd, Self.sanitizedMode(mode) | 0o700)
        }
    }

    // MARK: - Entries

    /// Removes whatever non-directory is at `name` in `dirFD`, so that it can be replaced; a directory
    /// there is an error.
    static func clear(_ name: String, in dirFD: Int32, shown: String) throws {
        var info = stat()
        guard fstatat(dirFD, name, &info, AT_SYMLINK_NOFOLLOW) == 0 else { return }
        if (info.st_mode & S_IFMT) == S_IFDIR {
            throw ArtifactError(.io, "\(shown) already exists in the sandbox as a directory")
        }
        if unlinkat(dirFD, name, 0) != 0, errno != ENOENT {
            throw ArtifactError.posix("cannot replace \(shown) in the sandbox")
        }
    }

    /// Creates a new regular file `name` in `dirFD` (replacing a non-directory already there) and returns
    /// its descriptor, open for writing, mode 0600 until the caller sets the final mode.
    static func createFile(_ name: String, in dirFD: Int32, shown: String) throws -> Int32 {
        try clear(name, in: dirFD, shown: shown)
        let fd = openat(dirFD, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw ArtifactError.posix("cannot create \(shown) in the sandbox") }
        return fd
    }

    /// Creates the symbolic link `components` → `target` (the target already checked by
    /// ``checkLinkTarget(_:linkPath:entry:)``).
    func makeSymlink(_ components: [String], target: String) throws {
        let shown = Self.display(components)
        try withDirectory(components.dropLast()) { dirFD in
            try Self.clear(components[components.count - 1], in: dirFD, shown: shown)
            guard symlinkat(target, dirFD, components[components.count - 1]) == 0 else {
                throw ArtifactError.posix("cannot create the symbolic link \(shown) in the sandbox")
            }
        }
    }

    /// Creates the hard link `components` to the existing regular file `source` (both sandbox-relative).
    func makeHardlink(_ components: [String], to source: [String], entry: String) throws {
        let shown = Self.display(components)
        guard let sourceName = source.last else {
            throw ArtifactError(.unsafeArchive, "archive entry '\(Self.printable(entry))' is a hard link to the sandbox itself")
        }
        let sourceDir = try openDirectory(source.dropLast(), create: false)
        defer { close(sourceDir) }
        var info = stat()
        guard fstatat(sourceDir, sourceName, &info, AT_SYMLINK_NOFOLLOW) == 0, (info.st_mode & S_IFMT) == S_IFREG else {
            throw ArtifactError(.badArchive, "archive entry '\(Self.printable(entry))' is a hard link to \(Self.display(source)), which is not a file extracted before it")
        }
        try withDirectory(components.dropLast()) { dirFD in
            try Self.clear(components[components.count - 1], in: dirFD, shown: shown)
            guard linkat(sourceDir, sourceName, dirFD, components[components.count - 1], 0) == 0 else {
                throw ArtifactError.posix("cannot create the hard link \(shown) in the sandbox")
            }
        }
    }

    /// Opens the existing regular file at `components` for reading (no link followed).
    func openForReading(_ components: [String]) throws -> Int32 {
        try withDirectory(components.dropLast(), create: false) { dirFD in
            let fd = openat(dirFD, components[components.count - 1], O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
            guard fd >= 0 else { throw ArtifactError.posix("cannot open \(Self.display(components)) in the sandbox") }
            return fd
        }
    }

    /// Permission bits an extracted entry may keep: no set-id or sticky bits, no group/world write,
    /// and always readable and writable by the owner (`--no-same-permissions`, umask 022).
    static func sanitizedMode(_ mode: mode_t) -> mode_t {
        (mode & 0o755) | 0o600
    }
}

// MARK: - Plain descriptor helpers

enum ArtifactIO {
    /// Writes all of `bytes` to `fd`.
    static func writeAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, shown: @autoclosure () -> String) throws {
        var offset = 0
        while offset < bytes.count {
            let n = write(fd, bytes.baseAddress! + offset, bytes.count - offset)
            if n < 0 {
                if errno == EINTR { continue }
                throw ArtifactError.posix("cannot write \(shown())")
            }
            offset += n
        }
    }

    /// Reads up to `buffer.count` bytes (0 at end of file).
    static func read(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer, shown: @autoclosure () -> String) throws -> Int {
        while true {
            #if canImport(Glibc)
            let n = Glibc.read(fd, buffer.baseAddress!, buffer.count)
            #else
            let n = Darwin.read(fd, buffer.baseAddress!, buffer.count)
            #endif
            if n >= 0 { return n }
            if errno == EINTR { continue }
            throw ArtifactError.posix("cannot read \(shown())")
        }
    }

    /// Copies `fd` to `out` until end of file, failing past `limit` bytes; returns the bytes copied.
    static func copy(_ fd: Int32, to out: Int32, limit: Int64, shownSource: String, shownDestination: String, tooLarge: (Int64) -> ArtifactError) throws -> Int64 {
        var buffer = [UInt8](repeating: 0, count: 256 * 1024)
        var total: Int64 = 0
        while true {
            let n = try buffer.withUnsafeMutableBytes { try read(fd, into: $0, shown: shownSource) }
            if n == 0 { return total }
            total += Int64(n)
            if total > limit { throw tooLarge(total) }
            try buffer.withUnsafeBytes { try writeAll(out, UnsafeRawBufferPointer(rebasing: $0[0..<n]), shown: shownDestination) }
        }
    }

    /// Runs blocking work (disk copies, extraction) on a Dispatch thread instead of the cooperative pool.
    static func blocking<T: Sendable>(_ work: @escaping @Sendable () throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { continuation in
            DispatchQueue.global().async {
                continuation.resume(with: Result(catching: work))
            }
        }
    }

    /// A random suffix for temporary names.
    static func randomSuffix() -> String {
        String(UInt64.random(in: 0...UInt64.max), radix: 36)
    }
}


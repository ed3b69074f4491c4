#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The `.partial` file a blob download writes into, with the few POSIX operations the download needs.
///
/// POSIX rather than FileHandle so that every step is explicit and checked: an exclusive `flock` (two
/// concurrent pulls of one layer must not interleave writes), full writes across short writes and
/// `EINTR`, `fsync` before the `rename(2)` that publishes the blob (so a crash never leaves a complete-
/// looking but empty file under the final name).
struct PartialBlobFile: ~Copyable {
    let path: String
    private let fd: Int32

    /// Opens (creating if needed) `path` for writing and locks it exclusively without blocking.
    init(openingForAppend path: String, what: String) throws {
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw PartialBlobFile.error("cannot open \(path) for \(what)") }
        if flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let code = errno
            close(fd)
            if code == EWOULDBLOCK {
                throw RegistryError(.io, "another download of \(what) into \(path) is already in progress")
            }
            throw PartialBlobFile.error("cannot lock \(path)", code: code)
        }
        self.path = path
        self.fd = fd
    }

    deinit { close(fd) }

    /// Current size of the file.
    func size() throws -> Int64 {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw PartialBlobFile.error("cannot stat \(path)") }
        return Int64(st.st_size)
    }

    /// Feeds the file's first `length` bytes to `body` in chunks (to hash a resumed prefix).
    func readPrefix(_ length: Int64, _ body: (UnsafeRawBufferPointer) -> Void) throws {
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        var offset: Int64 = 0
        while offset < length {
            let want = Int(min(Int64(buffer.count), length - offset))
            let n = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, want, off_t(offset)) }
            if n < 0 {
                if errno == EINTR { continue }
                throw PartialBlobFile.error("cannot read \(path)")
            }
            guard n > 0 else { throw RegistryError(.io, "\(path) shrank while being read") }
            buffer.withUnsafeBytes { body(UnsafeRawBufferPointer(rebasing: $0[..<n])) }
            offset += Int64(n)
        }
    }

    /// Discards the content (a server that ignored `Range`, or a bad prefix).
    func truncate() throws {
        guard ftruncate(fd, 0) == 0 else { throw PartialBlobFile.error("cannot truncate \(path)") }
    }

    /// Appends all of `bytes` at the end of the file.
    func append(_ bytes: UnsafeRawBufferPointer) throws {
        guard lseek(fd, 0, SEEK_END) >= 0 else { throw PartialBlobFile.error("cannot seek \(path)") }
        var done = 0
        while done < bytes.count {
            let n = write(fd, bytes.baseAddress! + done, bytes.count - done)
            if n < 0 {
                if errno == EINTR { continue }
                throw PartialBlobFile.error("cannot write \(path)")
            }
            done += n
        }
    }

    func sync() throws {
        guard fsync(fd) == 0 else { throw PartialBlobFile.error("cannot fsync \(path)") }
    }

    /// Atomically publishes the file under `destination` (same directory, so same file system).
    func publish(as destination: String) throws {
        guard rename(path, destination) == 0 else { throw PartialBlobFile.error("cannot rename \(path) to \(destination)") }
    }

    /// Removes the file (while still holding the lock, so no other download races the unlink).
    func remove() {
        unlink(path)
    }

    static func error(_ what: String, code: Int32 = errno) -> RegistryError {
        RegistryError(.io, "\(what): \(String(cString: strerror(code)))")
    }
}

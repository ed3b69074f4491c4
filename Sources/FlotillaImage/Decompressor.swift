import CFlotillaArchive
import Glibc

/// How a layer blob is compressed. Detected from magic bytes rather than taken
/// from the manifest's media type, which tools and registries get wrong often
/// enough (e.g. gzip blobs labelled as plain tar) to make it untrustworthy.
public enum LayerCompression: Sendable, Equatable, CustomStringConvertible {
    case none, gzip, zstd

    public var description: String {
        switch self {
        case .none: return "tar"
        case .gzip: return "gzip"
        case .zstd: return "zstd"
        }
    }
}

/// Streams the decompressed bytes of a layer blob from a file descriptor.
///
/// Layers can be gigabytes, so this never holds more than one fixed input
/// buffer (128 KiB) plus the decoder's own window; the caller supplies the
/// output buffer. Concatenated gzip members and zstd frames are decoded as one
/// stream, and a stream that ends mid-member is reported as truncated instead
/// of silently yielding a short layer.
public final class Decompressor {
    /// What the first bytes of the blob said.
    public let compression: LayerCompression

    private let fd: Int32
    private let ownsDescriptor: Bool
    private let name: String
    private var decoder: OpaquePointer?
    private let input: UnsafeMutableRawBufferPointer
    private var inStart = 0
    private var inEnd = 0
    private var inputEOF = false
    private var finished = false

    static let inputBufferSize = 128 * 1024

    /// Opens `path` and sniffs its compression. The file is closed when the
    /// decompressor is released.
    public convenience init(path: String) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw LayerError.system(path: path, operation: "open layer", errno: errno) }
        try self.init(fileDescriptor: fd, closeWhenDone: true, name: path)
    }

    /// Reads from an already-open descriptor (a pipe from a download works:
    /// nothing here seeks). `closeWhenDone` hands ownership of `fileDescriptor` over.
    public convenience init(fileDescriptor: Int32, closeWhenDone: Bool = false) throws {
        try self.init(fileDescriptor: fileDescriptor, closeWhenDone: closeWhenDone, name: "descriptor \(fileDescriptor)")
    }

    /// As ``init(fileDescriptor:closeWhenDone:)``, naming the stream `name` in errors.
    public init(fileDescriptor: Int32, closeWhenDone: Bool, name: String) throws {
        self.fd = fileDescriptor
        self.ownsDescriptor = closeWhenDone
        self.name = name
        self.input = UnsafeMutableRawBufferPointer.allocate(byteCount: Self.inputBufferSize, alignment: 16)
        // Sniff: read up to 4 bytes, keeping them as the start of the input.
        var got = 0
        var sniffError: Int32 = 0
        while got < 4 {
            let n = Glibc.read(fileDescriptor, input.baseAddress! + got, 4 - got)
            if n < 0 {
                if errno == EINTR { continue }
                sniffError = errno
                break
            }
            if n == 0 { inputEOF = true; break }
            got += n
        }
        inEnd = got
        let b = UnsafeRawBufferPointer(rebasing: input[0..<got])
        if got >= 2 && b[0] == 0x1f && b[1] == 0x8b {
            compression = .gzip
        } else if got >= 4 && b[0] == 0x28 && b[1] == 0xb5 && b[2] == 0x2f && b[3] == 0xfd {
            compression = .zstd
        } else {
            compression = .none
        }
        if sniffError != 0 {
            throw LayerError.system(path: name, operation: "read layer", errno: sniffError)
        }
        if compression != .none {
            var message = [CChar](repeating: 0, count: 512)
            let format = compression == .gzip ? Int32(FLOTILLA_FORMAT_GZIP) : Int32(FLOTILLA_FORMAT_ZSTD)
            decoder = flotilla_decoder_new(format, &message, message.count)
            if decoder == nil {
                throw LayerError.decompression(String(decoding: message.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))
            }
        }
    }

    deinit {
        if let decoder { flotilla_decoder_free(decoder) }
        input.deallocate()
        if ownsDescriptor { close(fd) }
    }

    /// Fills `buffer` with the next decompressed bytes and returns how many;
    /// 0 means the stream ended cleanly. Throws on corrupt or truncated input.
    public func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        guard let out = buffer.baseAddress, buffer.count > 0, !finished else { return 0 }
        guard let decoder else {
            if inStart < inEnd {
                let n = min(buffer.count, inEnd - inStart)
                out.copyMemory(from: input.baseAddress! + inStart, byteCount: n)
                inStart += n
                return n
            }
            if inputEOF { finished = true; return 0 }
            let n = try readDescriptor(out, buffer.count)
            if n == 0 { inputEOF = true; finished = true }
            return n
        }
        while true {
            if inStart == inEnd && !inputEOF {
                inStart = 0
                inEnd = try readDescriptor(input.baseAddress!, input.count)
                if inEnd == 0 { inputEOF = true }
            }
            var used = 0
            var made = 0
            let available = inEnd - inStart
            let rc = flotilla_decoder_step(decoder,
                                           input.baseAddress!.assumingMemoryBound(to: UInt8.self) + inStart,
                                           available, &used,
                                           out.assumingMemoryBound(to: UInt8.self), buffer.count, &made)
            inStart += used
            if rc != 0 {
                finished = true
                throw LayerError.decompression(String(cString: flotilla_decoder_error(decoder)))
            }
            if made > 0 { return made }
            if inStart == inEnd && inputEOF {
                finished = true
                if flotilla_decoder_at_boundary(decoder) != 0 { return 0 }
                throw LayerError.decompression("\(compression) stream is truncated (unexpected end of \(name))")
            }
            if used == 0 && available > 0 {
                finished = true
                throw LayerError.decompression("\(compression) decoder made no progress on \(name)")
            }
        }
    }

    /// Reads and discards the rest of a compressed stream, so that its trailer
    /// (gzip CRC and length) is verified even after the tar end marker.
    func drain() throws {
        guard decoder != nil, !finished else { return }
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 * 1024, alignment: 16)
        defer { scratch.deallocate() }
        while try read(into: scratch) > 0 {}
    }

    private func readDescriptor(_ p: UnsafeMutableRawPointer, _ count: Int) throws -> Int {
        while true {
            let n = Glibc.read(fd, p, count)
            if n >= 0 { return n }
            if errno == EINTR { continue }
            throw LayerError.system(path: name, operation: "read layer", errno: errno)
        }
    }
}

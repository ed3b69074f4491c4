import CFlotillaArchive
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Reads a zip archive's central directory (zip64 included) and its stored and deflated entries, checking
/// each entry's size and CRC-32. Encrypted entries, other compression methods and multi-disk archives are
/// refused.
struct ArtifactZipReader {
    struct Entry {
        /// The name as stored, with `\` turned into `/` (some Windows tools write those).
        var name: String
        var method: UInt16
        var flags: UInt16
        var crc: UInt32
        var compressedSize: Int64
        var uncompressedSize: Int64
        var localHeaderOffset: Int64
        /// Permission and type bits, when the archive was made on Unix.
        var unixMode: mode_t?
        var isDirectory: Bool
        var isSymlink: Bool
    }

    let fd: Int32
    let what: String
    let fileSize: Int64
    private(set) var entries: [Entry] = []

    init(fd: Int32, what: String, maxEntries: Int) throws {
        self.fd = fd
        self.what = what
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw ArtifactError.posix("cannot read \(what)") }
        fileSize = Int64(info.st_size)
        try readCentralDirectory(maxEntries: maxEntries)
    }

    private func bad(_ detail: String) -> ArtifactError {
        ArtifactError(.badArchive, "\(what) is not a valid zip archive (\(detail))")
    }

    /// Exactly `count` bytes at `offset`.
    func read(at offset: Int64, _ count: Int) throws -> [UInt8] {
        guard offset >= 0, count >= 0, offset + Int64(count) <= fileSize else { throw bad("a record lies past the end of the file") }
        var out = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let n = out.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + done, count - done, off_t(offset + Int64(done))) }
            if n < 0, errno == EINTR { continue }
            if n < 0 { throw ArtifactError.posix("cannot read \(what)") }
            if n == 0 { throw bad("it is truncated") }
            done += n
        }
        return out
    }

    private mutating func readCentralDirectory(maxEntries: Int) throws {
        let tailLength = Int(min(fileSize, 22 + 65535))
        guard tailLength >= 22 else { throw bad("it is too short") }
        let tailStart = fileSize - Int64(tailLength)
        let tail = try read(at: tailStart, tailLength)
        var eocd: Int?
        var i = tailLength - 22
        while i >= 0 {
            if tail.le32(i) == 0x0605_4b50, i + 22 + Int(tail.le16(i + 20)) <= tailLength {
                eocd = i
                break
            }
            i -= 1
        }
        guard let eocd else { throw bad("no end of central directory record") }
        guard tail.le16(eocd + 4) == 0, tail.le16(eocd + 6) == 0 else {
            throw ArtifactError(.badArchive, "\(what) is a multi-disk zip archive, which is not supported")
        }
        var count = Int64(tail.le16(eocd + 10))
        var directorySize = Int64(tail.le32(eocd + 12))
        var directoryOffset = Int64(tail.le32(eocd + 16))
        let eocdOffset = tailStart + Int64(eocd)
        if count == 0xffff || directorySize == 0xffff_ffff || directoryOffset == 0xffff_ffff {
            // zip64: a locator just before the end record points at the zip64 end record.
            guard eocdOffset >= 20 else { throw bad("no zip64 locator") }
            let locator = try read(at: eocdOffset - 20, 20)
            guard locator.le32(0) == 0x0706_4b50 else { throw bad("no zip64 locator") }
            let record = try read(at: Int64(clamping: locator.le64(8)), 56)
            guard record.le32(0) == 0x0606_4b50 else { throw bad("bad zip64 end record") }
            count = Int64(clamping: record.le64(32))
            directorySize = Int64(clamping: record.le64(40))
            directoryOffset = Int64(clamping: record.le64(48))
        }
        guard count <= Int64(maxEntries) else {
            throw ArtifactError(.tooLarge, "\(what) has more than \(maxEntries) entries")
        }
        guard directorySize <= 512 << 20, directoryOffset >= 0, directoryOffset + directorySize <= eocdOffset else {
            throw bad("its central directory is out of bounds")
        }
        let directory = try read(at: directoryOffset, Int(directorySize))
        var position = 0
        for _ in 0..<count {
            guard position + 46 <= directory.count, directory.le32(position) == 0x0201_4b50 else {
                throw bad("a central directory entry is damaged")
            }
            let madeBy = directory.le16(position + 4)
            let flags = directory.le16(position + 8)
            let method = directory.le16(position + 10)
            let crc = directory.le32(position + 16)
            var compressed = Int64(directory.le32(position + 20))
            var uncompressed = Int64(directory.le32(position + 24))
            let nameLength = Int(directory.le16(position + 28))
            let extraLength = Int(directory.le16(position + 30))
            let commentLength = Int(directory.le16(position + 32))
            let external = directory.le32(position + 38)
            var offset = Int64(directory.le32(position + 42))
            let nameStart = position + 46
            let extraStart = nameStart + nameLength
            let next = extraStart + extraLength + commentLength
            guard next <= directory.count else { throw bad("a central directory entry is damaged") }
            let name = String(decoding: directory[nameStart..<extraStart], as: UTF8.self).replacingBackslashes()
            // zip64 extended information: the 64-bit values of the fields that are all ones, in order.
            var extra = extraStart
            while extra + 4 <= extraStart + extraLength {
                let id = directory.le16(extra)
                let size = Int(directory.le16(extra + 2))
                let body = extra + 4
                guard body + size <= extraStart + extraLength else { break }
                if id == 0x0001 {
                    var field = body
                    func take() throws -> Int64 {
                        guard field + 8 <= body + size else { throw bad("a zip64 field is missing") }
                        defer { field += 8 }
                        return Int64(clamping: directory.le64(field))
                    }
                    if uncompressed == 0xffff_ffff { uncompressed = try take() }
                    if compressed == 0xffff_ffff { compressed = try take() }
                    if offset == 0xffff_ffff { offset = try take() }
                }
                extra = body + size
            }
            var unixMode: mode_t?
            if madeBy >> 8 == 3, external >> 16 != 0 {
                unixMode = mode_t(truncatingIfNeeded: external >> 16)
            }
            let type = unixMode.map { $0 & mode_t(S_IFMT) }
            let isDirectory = name.hasSuffix("/") || type == mode_t(S_IFDIR) || (external & 0x10 != 0 && unixMode == nil)
            let isSymlink = !isDirectory && type == mode_t(S_IFLNK)
            entries.append(Entry(
                name: name, method: method, flags: flags, crc: crc, compressedSize: compressed, uncompressedSize: uncompressed,
                localHeaderOffset: offset, unixMode: unixMode.map { $0 & 0o7777 }, isDirectory: isDirectory, isSymlink: isSymlink
            ))
            position = next
        }
    }

    /// A reader of the entry's decompressed bytes; it fails at the end if the size or CRC-32 is wrong.
    func open(_ entry: Entry) throws -> ArtifactZipEntrySource {
        let shown = "entry '\(ArtifactSandbox.printable(entry.name))' of \(what)"
        if entry.flags & 1 != 0 {
            throw ArtifactError(.badArchive, "\(shown) is encrypted, which is not supported")
        }
        guard entry.method == 0 || entry.method == 8 else {
            throw ArtifactError(.badArchive, "\(shown) uses compression method \(entry.method); only stored and deflated entries are supported")
        }
        let header = try read(at: entry.localHeaderOffset, 30)
        guard header.le32(0) == 0x0403_4b50 else { throw bad("the local header of \(shown) is missing") }
        let dataStart = entry.localHeaderOffset + 30 + Int64(header.le16(26)) + Int64(header.le16(28))
        guard entry.compressedSize >= 0, entry.uncompressedSize >= 0, dataStart + entry.compressedSize <= fileSize else {
            throw bad("the data of \(shown) lies past the end of the file")
        }
        if entry.method == 0, entry.compressedSize != entry.uncompressedSize {
            throw bad("stored \(shown) has mismatched sizes")
        }
        return try ArtifactZipEntrySource(reader: self, entry: entry, dataStart: dataStart, shown: shown)
    }
}

/// The decompressed bytes of one zip entry.
final class ArtifactZipEntrySource {
    private let reader: ArtifactZipReader
    private let entry: ArtifactZipReader.Entry
    private let shown: String
    private let inflater: ArtifactZipInflater?
    private var position: Int64
    private var compressedLeft: Int64
    private var input = [UInt8](repeating: 0, count: 256 * 1024)
    private var inputStart = 0
    private var inputEnd = 0
    private var produced: Int64 = 0
    private var crc: UInt32 = 0
    private var done = false

    init(reader: ArtifactZipReader, entry: ArtifactZipReader.Entry, dataStart: Int64, shown: String) throws {
        self.reader = reader
        self.entry = entry
        self.shown = shown
        position = dataStart
        compressedLeft = entry.compressedSize
        inflater = entry.method == 8 ? try ArtifactZipInflater(shown: shown) : nil
    }

    private func refill() throws {
        guard inputStart == inputEnd, compressedLeft > 0 else { return }
        let n = Int(min(compressedLeft, Int64(input.count)))
        let bytes = try reader.read(at: position, n)
        input.replaceSubrange(0..<n, with: bytes)
        inputStart = 0
        inputEnd = n
        position += Int64(n)
        compressedLeft -= Int64(n)
    }

    /// Fills the start of `buffer`; returns how many bytes, 0 only at the end of the entry.
    func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        guard buffer.count > 0 else { return 0 }
        while !done {
            try refill()
            var count = 0
            if let inflater {
                let available = inputEnd - inputStart
                let (consumed, made, end) = try input.withUnsafeBytes { bytes in
                    try inflater.inflate(UnsafeRawBufferPointer(rebasing: bytes[inputStart..<inputEnd]), into: buffer)
                }
                inputStart += consumed
                count = made
                if end {
                    done = true
                } else if made == 0 {
                    if inputStart == inputEnd, compressedLeft == 0 {
                        throw ArtifactError(.badArchive, "\(shown) is truncated")
                    }
                    if consumed == 0, available > 0 {
                        throw ArtifactError(.badArchive, "\(shown) is corrupt (the deflate stream makes no progress)")
                    }
                }
            } else {
                count = min(inputEnd - inputStart, buffer.count)
                input.withUnsafeBytes { bytes in
                    buffer.baseAddress!.copyMemory(from: bytes.baseAddress! + inputStart, byteCount: count)
                }
                inputStart += count
                if inputStart == inputEnd, compressedLeft == 0 { done = true }
            }
            produced += Int64(count)
            if produced > entry.uncompressedSize {
                throw ArtifactError(.badArchive, "\(shown) holds more data than its declared \(entry.uncompressedSize) bytes")
            }
            if count > 0 {
                crc = flotilla_crc32(crc, buffer.baseAddress!.assumingMemoryBound(to: UInt8.self), count)
            }
            if done {
                guard produced == entry.uncompressedSize else {
                    throw ArtifactError(.badArchive, "\(shown) holds \(produced) bytes, not its declared \(entry.uncompressedSize)")
                }
                guard crc == entry.crc else { throw ArtifactError(.badArchive, "\(shown) is corrupt (CRC-32 mismatch)") }
            }
            if count > 0 { return count }
        }
        return 0
    }
}

/// Raw deflate (RFC 1951, zip's method 8), with CFlotillaArchive's zlib decoder.
final class ArtifactZipInflater {
    private let decoder: OpaquePointer
    private let shown: String

    init(shown: String) throws {
        self.shown = shown
        var message = [CChar](repeating: 0, count: 256)
        guard let decoder = flotilla_decoder_new(Int32(FLOTILLA_FORMAT_DEFLATE), &message, message.count) else {
            let text = String(decoding: message.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            throw ArtifactError(.io, "cannot decompress \(shown): \(text)")
        }
        self.decoder = decoder
    }

    deinit { flotilla_decoder_free(decoder) }

    /// Inflates from `input` into `output`; returns (bytes consumed, bytes produced, reached the end of
    /// the stream). Input after the end of the stream is not consumed.
    func inflate(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) throws -> (consumed: Int, produced: Int, end: Bool) {
        var used = 0
        var made = 0
        let status = flotilla_decoder_step(
            decoder,
            input.baseAddress?.assumingMemoryBound(to: UInt8.self), input.count, &used,
            output.baseAddress?.assumingMemoryBound(to: UInt8.self), output.count, &made
        )
        guard status == 0 else {
            throw ArtifactError(.badArchive, "\(shown) is corrupt (\(String(cString: flotilla_decoder_error(decoder))))")
        }
        return (used, made, flotilla_decoder_at_boundary(decoder) != 0)
    }
}

extension [UInt8] {
    fileprivate func le16(_ at: Int) -> UInt16 { UInt16(self[at]) | UInt16(self[at + 1]) << 8 }
    fileprivate func le32(_ at: Int) -> UInt32 { UInt32(le16(at)) | UInt32(le16(at + 2)) << 16 }
    fileprivate func le64(_ at: Int) -> UInt64 { UInt64(le32(at)) | UInt64(le32(at + 4)) << 32 }
}

extension String {
    fileprivate func replacingBackslashes() -> String {
        String(String.UnicodeScalarView(unicodeScalars.map { $0 == "\\" ? "/" : $0 }))
    }
}

/// A streaming tar parser for untrusted input.
///
/// It reads ustar, GNU (`L`/`K` long names, base-256 numbers) and PAX (`x`/`g`)
/// archives one entry at a time, so a layer of any size needs only a 64 KiB
/// buffer. Every field is validated rather than trusted: checksums are
/// verified, numbers that overflow or are not octal are errors (never traps),
/// extended headers are capped at 1 MiB, and an archive that stops before its
/// end-of-archive marker is reported as truncated instead of looking complete.
///
/// Usage: call `next()` for each header, then optionally `read(into:)` for the
/// entry's content; unread content is skipped by the following `next()`.
/// When `next()` returns nil the rest of a compressed stream has been drained
/// and verified (gzip CRC, zstd checksums).
public final class TarReader {
    /// Cap on a PAX or GNU long-name header: real ones are a few hundred bytes;
    /// anything larger is an attempt to exhaust memory.
    public static let maxExtendedHeaderSize = 1 << 20

    private let source: Decompressor
    private let buffer: UnsafeMutableRawBufferPointer
    private var start = 0
    private var end = 0
    private var sourceEOF = false
    private var entryRemaining: Int64 = 0
    private var entryPadding = 0
    private var entryName: String?
    private var globalRecords: [String: [UInt8]] = [:]
    private var globalBytes = 0
    private var done = false

    /// Reads the archive from `source`, which has already detected compression.
    public init(_ source: Decompressor) {
        self.source = source
        self.buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 * 1024, alignment: 16)
    }

    deinit { buffer.deallocate() }

    /// Returns the next entry, or nil after the end-of-archive marker.
    public func next() throws -> TarEntry? {
        if done { return nil }
        if entryRemaining > 0 || entryPadding > 0 {
            let total = entryRemaining + Int64(entryPadding) // size is capped below Int64.max - 512
            let missing = try skip(total)
            if missing > 0 {
                throw malformed("archive is truncated inside this entry (\(missing) bytes missing)")
            }
            entryRemaining = 0
            entryPadding = 0
        }

        var local: [String: [UInt8]] = [:]
        var extendedBytes = 0
        var longName: [UInt8]?
        var longLink: [UInt8]?
        var pendingExtended = false
        var block = [UInt8](repeating: 0, count: 512)

        while true {
            let n = try readFully(&block)
            if n == 0 {
                throw malformed(pendingExtended
                    ? "archive ends right after an extended header"
                    : "archive ends without the end-of-archive marker (truncated download?)")
            }
            if n < 512 { throw malformed("archive is truncated inside a header block") }

            if block.allSatisfy({ $0 == 0 }) {
                if pendingExtended { throw malformed("extended header is followed by the end-of-archive marker instead of an entry") }
                let m = try readFully(&block)
                if m == 0 || (m == 512 && block.allSatisfy({ $0 == 0 })) {
                    done = true
                    try source.drain()
                    return nil
                }
                throw malformed("unexpected data after an end-of-archive block")
            }

            let headerName = Self.cString(block[0..<100])
            try verifyChecksum(block, name: headerName)
            let typeflag = block[156]
            entryName = String(decoding: headerName, as: UTF8.self)

            switch typeflag {
            case UInt8(ascii: "x"), UInt8(ascii: "g"), UInt8(ascii: "L"), UInt8(ascii: "K"):
                let size = try Self.parseNumeric(block[124..<136], field: "size", allowNegative: false)
                    .orThrow { malformed($0) }
                guard size <= Int64(Self.maxExtendedHeaderSize) else {
                    throw malformed("extended header of \(size) bytes exceeds the \(Self.maxExtendedHeaderSize)-byte limit")
                }
                extendedBytes += Int(size)
                guard extendedBytes <= Self.maxExtendedHeaderSize else {
                    throw malformed("extended headers before one entry exceed \(Self.maxExtendedHeaderSize) bytes")
                }
                let data = try readExtended(Int(size))
                pendingExtended = true
                switch typeflag {
                case UInt8(ascii: "x"):
                    try parsePAX(data, into: &local)
                case UInt8(ascii: "g"):
                    var records: [String: [UInt8]] = [:]
                    try parsePAX(data, into: &records)
                    for (key, value) in records {
                        if value.isEmpty { globalRecords[key] = nil } else { globalRecords[key] = value }
                    }
                    globalBytes += Int(size)
                    guard globalBytes <= Self.maxExtendedHeaderSize else {
                        throw malformed("global PAX headers exceed \(Self.maxExtendedHeaderSize) bytes in total")
                    }
                    // A global header is complete on its own; it does not need a following entry.
                    pendingExtended = !local.isEmpty || longName != nil || longLink != nil
                case UInt8(ascii: "L"):
                    longName = Self.cString(data[...])
                default:
                    longLink = Self.cString(data[...])
                }
                continue
            default:
                break
            }

            return try makeEntry(block, headerName: headerName, longName: longName, longLink: longLink, local: local)
        }
    }

    /// Reads the current entry's content; returns 0 at its end. A stream that
    /// ends early throws rather than returning a short file.
    public func read(into destination: UnsafeMutableRawBufferPointer) throws -> Int {
        guard entryRemaining > 0, let base = destination.baseAddress, destination.count > 0 else { return 0 }
        let want = Int(min(Int64(destination.count), entryRemaining))
        let n = try readSome(base, want)
        if n == 0 {
            throw malformed("archive is truncated inside this entry (\(entryRemaining) bytes missing)")
        }
        entryRemaining -= Int64(n)
        return n
    }

    // MARK: - Header decoding

    private func makeEntry(_ block: [UInt8], headerName: [UInt8], longName: [UInt8]?, longLink: [UInt8]?,
                           local: [String: [UInt8]]) throws -> TarEntry {
        let isPOSIXUstar = block[257..<263].elementsEqual("ustar\0".utf8)
        var path = headerName
        if isPOSIXUstar {
            let prefix = Self.cString(block[345..<500])
            if !prefix.isEmpty { path = prefix + [UInt8(ascii: "/")] + headerName }
        }
        if let longName { path = longName }
        var link = Self.cString(block[157..<257])
        if let longLink { link = longLink }
        entryName = String(decoding: path, as: UTF8.self)

        func number(_ range: Range<Int>, _ field: String, negative: Bool = false) throws -> Int64 {
            try Self.parseNumeric(block[range], field: field, allowNegative: negative).orThrow { malformed($0) }
        }
        func id32(_ value: Int64, _ field: String) throws -> UInt32 {
            guard let v = UInt32(exactly: value) else { throw malformed("\(field) \(value) is out of range") }
            return v
        }

        var size = try number(124..<136, "size")
        let mode = UInt32(truncatingIfNeeded: try number(100..<108, "mode") & 0o7777)
        var uid = try id32(try number(108..<116, "uid"), "uid")
        var gid = try id32(try number(116..<124, "gid"), "gid")
        var mtime = try number(136..<148, "mtime", negative: true)
        var mtimeNanos: Int32 = 0

        let typeflag = block[156]
        let kind: TarEntry.Kind
        switch typeflag {
        case UInt8(ascii: "0"), UInt8(ascii: "7"): kind = .regular
        case 0: kind = path.last == UInt8(ascii: "/") ? .directory : .regular // pre-POSIX tar
        case UInt8(ascii: "1"): kind = .hardlink
        case UInt8(ascii: "2"): kind = .symlink
        case UInt8(ascii: "3"): kind = .characterDevice
        case UInt8(ascii: "4"): kind = .blockDevice
        case UInt8(ascii: "5"): kind = .directory
        case UInt8(ascii: "6"): kind = .fifo
        default:
            let shown = (0x21...0x7e).contains(typeflag) ? "'\(Character(Unicode.Scalar(typeflag)))'" : "0x\(String(typeflag, radix: 16))"
            let hint = typeflag == UInt8(ascii: "S") ? " (GNU sparse files are not supported)" : ""
            throw malformed("unsupported entry type \(shown)\(hint)")
        }

        var major: UInt32 = 0
        var minor: UInt32 = 0
        if kind == .characterDevice || kind == .blockDevice {
            major = try id32(try number(329..<337, "device major"), "device major")
            minor = try id32(try number(337..<345, "device minor"), "device minor")
        }

        // PAX records override everything; local ones override global ones.
        var records = globalRecords
        for (key, value) in local { records[key] = value }
        var xattrs: [String: [UInt8]] = [:]
        for (key, value) in records {
            switch key {
            case "path":
                if !value.isEmpty { path = value }
            case "linkpath":
                if !value.isEmpty { link = value }
            case "size":
                if !value.isEmpty { size = try paxDecimal(value, key) }
            case "uid":
                if !value.isEmpty { uid = try id32(try paxDecimal(value, key), key) }
            case "gid":
                if !value.isEmpty { gid = try id32(try paxDecimal(value, key), key) }
            case "mtime":
                if !value.isEmpty { (mtime, mtimeNanos) = try paxTime(value) }
            default:
                if key.hasPrefix("SCHILY.xattr.") {
                    let name = String(key.dropFirst("SCHILY.xattr.".count))
                    guard !name.isEmpty, !name.utf8.contains(0) else { throw malformed("PAX record has an invalid xattr name") }
                    xattrs[name] = value
                } else if key.hasPrefix("GNU.sparse.") {
                    throw malformed("GNU sparse files are not supported")
                }
            }
        }
        entryName = String(decoding: path, as: UTF8.self)
        guard !path.isEmpty else { throw malformed("entry has an empty name") }
        guard !path.contains(0) else { throw malformed("entry name contains a NUL byte") }
        guard !link.contains(0) else { throw malformed("link target contains a NUL byte") }
        // Keeps `size + padding` and callers' arithmetic far from overflow.
        guard size <= Int64.max - 4096 else { throw malformed("size \(size) is out of range") }
        if kind != .hardlink && kind != .symlink { link = [] }
        if (kind == .hardlink || kind == .symlink) && link.isEmpty {
            throw malformed("\(kind == .hardlink ? "hardlink" : "symlink") has an empty target")
        }

        // Like GNU and Go tar: only regular files carry content; the size of
        // other types is ignored.
        let dataSize: Int64 = kind == .regular ? size : 0
        entryRemaining = dataSize
        entryPadding = Int((512 - dataSize % 512) % 512)

        return TarEntry(kind: kind, pathBytes: path, linkTargetBytes: link, size: dataSize, mode: mode,
                        uid: uid, gid: gid, modificationTime: mtime, modificationNanoseconds: mtimeNanos,
                        deviceMajor: major, deviceMinor: minor, xattrs: xattrs)
    }

    private func verifyChecksum(_ block: [UInt8], name: [UInt8]) throws {
        entryName = name.isEmpty ? entryName : String(decoding: name, as: UTF8.self)
        let stored: Int64
        switch Self.parseNumeric(block[148..<156], field: "checksum", allowNegative: false, octalOnly: true) {
        case .success(let v): stored = v
        case .failure: throw malformed("header checksum field is not a number (corrupt archive or not a tar file)")
        }
        var unsigned: Int64 = 0
        var signed: Int64 = 0
        for i in 0..<512 {
            let b = (148..<156).contains(i) ? UInt8(ascii: " ") : block[i]
            unsigned += Int64(b)
            signed += Int64(Int8(bitPattern: b))
        }
        // Some historic writers summed signed chars; accept either.
        guard stored == unsigned || stored == signed else {
            throw malformed("header checksum mismatch (corrupt archive or not a tar file)")
        }
    }

    /// Parses `len key=value\n` records (POSIX pax extended header format).
    private func parsePAX(_ data: [UInt8], into records: inout [String: [UInt8]]) throws {
        var i = 0
        while i < data.count {
            if data[i] == 0 {
                guard data[i...].allSatisfy({ $0 == 0 }) else { throw malformed("malformed PAX header") }
                break
            }
            var length = 0
            var j = i
            while j < data.count, data[j] >= UInt8(ascii: "0"), data[j] <= UInt8(ascii: "9") {
                length = length * 10 + Int(data[j] - UInt8(ascii: "0"))
                guard length <= data.count else { throw malformed("PAX record length exceeds its header") }
                j += 1
            }
            guard j > i, j < data.count, data[j] == UInt8(ascii: " "),
                  length > j - i + 1, length <= data.count - i else {
                throw malformed("malformed PAX record")
            }
            let recordEnd = i + length
            guard data[recordEnd - 1] == UInt8(ascii: "\n") else { throw malformed("PAX record is not newline-terminated") }
            let body = data[(j + 1)..<(recordEnd - 1)]
            guard let eq = body.firstIndex(of: UInt8(ascii: "=")), eq > body.startIndex else {
                throw malformed("PAX record has no key")
            }
            records[String(decoding: body[..<eq], as: UTF8.self)] = Array(body[(eq + 1)...])
            i = recordEnd
        }
    }

    private func paxDecimal(_ value: [UInt8], _ key: String) throws -> Int64 {
        var v: Int64 = 0
        for c in value {
            guard c >= UInt8(ascii: "0"), c <= UInt8(ascii: "9") else { throw malformed("PAX \(key) is not a decimal number") }
            let (m, o1) = v.multipliedReportingOverflow(by: 10)
            let (a, o2) = m.addingReportingOverflow(Int64(c - UInt8(ascii: "0")))
            guard !o1, !o2 else { throw malformed("PAX \(key) is out of range") }
            v = a
        }
        return v
    }

    private func paxTime(_ value: [UInt8]) throws -> (Int64, Int32) {
        var digits = value[...]
        let negative = digits.first == UInt8(ascii: "-")
        if negative { digits = digits.dropFirst() }
        let dot = digits.firstIndex(of: UInt8(ascii: "."))
        let whole = dot.map { digits[..<$0] } ?? digits
        guard !whole.isEmpty else { throw malformed("PAX mtime is not a number") }
        var seconds = try paxDecimal(Array(whole), "mtime")
        var nanos: Int32 = 0
        if let dot {
            let fraction = digits[(dot + 1)...]
            var scale: Int32 = 100_000_000
            for c in fraction {
                guard c >= UInt8(ascii: "0"), c <= UInt8(ascii: "9") else { throw malformed("PAX mtime is not a number") }
                nanos += Int32(c - UInt8(ascii: "0")) * scale // digits past nanoseconds are dropped
                scale /= 10
            }
        }
        if negative {
            seconds = -seconds
            if nanos > 0 { seconds -= 1; nanos = 1_000_000_000 - nanos }
        }
        return (seconds, nanos)
    }

    /// Parses a numeric header field: octal text (space/NUL padded) or GNU
    /// base-256 (high bit set). Never traps: overflow and junk are failures.
    static func parseNumeric(_ field: ArraySlice<UInt8>, field name: String, allowNegative: Bool,
                             octalOnly: Bool = false) -> Result<Int64, NumericError> {
        guard let first = field.first else { return .success(0) }
        if first & 0x80 != 0 && !octalOnly {
            let negative = first & 0x40 != 0
            if negative && !allowNegative { return .failure(NumericError("\(name) field is negative")) }
            let invert: UInt8 = negative ? 0xff : 0
            var x: UInt64 = 0
            for (i, raw) in field.enumerated() {
                var c = raw ^ invert
                if i == 0 { c &= 0x7f }
                guard x >> 56 == 0 else { return .failure(NumericError("\(name) field does not fit in 64 bits")) }
                x = x << 8 | UInt64(c)
            }
            guard x >> 63 == 0 else { return .failure(NumericError("\(name) field does not fit in 64 bits")) }
            return .success(negative ? ~Int64(x) : Int64(x))
        }
        var digits = field
        while let c = digits.first, c == 0 || c == 0x20 { digits = digits.dropFirst() }
        while let c = digits.last, c == 0 || c == 0x20 { digits = digits.dropLast() }
        var v: Int64 = 0
        for c in digits {
            guard c >= UInt8(ascii: "0"), c <= UInt8(ascii: "7") else {
                return .failure(NumericError("\(name) field is not an octal number"))
            }
            guard v <= Int64.max >> 3 else { return .failure(NumericError("\(name) field does not fit in 64 bits")) }
            v = v << 3 | Int64(c - UInt8(ascii: "0"))
        }
        return .success(v)
    }

    struct NumericError: Error {
        let message: String
        init(_ message: String) { self.message = message }
    }

    private static func cString(_ bytes: ArraySlice<UInt8>) -> [UInt8] {
        Array(bytes.prefix { $0 != 0 })
    }

    private func malformed(_ reason: String) -> LayerError {
        .malformedArchive(entry: entryName, reason: reason)
    }

    private func malformed(_ error: NumericError) -> LayerError {
        malformed(error.message)
    }

    // MARK: - Buffered input

    private func readExtended(_ size: Int) throws -> [UInt8] {
        var data = [UInt8](repeating: 0, count: size)
        let n = try readFully(&data)
        guard n == size else { throw malformed("archive is truncated inside an extended header") }
        let padding = (512 - size % 512) % 512
        guard try skip(Int64(padding)) == 0 else { throw malformed("archive is truncated inside an extended header") }
        return data
    }

    private func readFully(_ array: inout [UInt8]) throws -> Int {
        try array.withUnsafeMutableBytes { raw in
            guard let base = raw.baseAddress else { return 0 }
            var got = 0
            while got < raw.count {
                let n = try readSome(base + got, raw.count - got)
                if n == 0 { break }
                got += n
            }
            return got
        }
    }

    /// Copies up to `count` bytes; returns 0 only at end of input.
    private func readSome(_ destination: UnsafeMutableRawPointer, _ count: Int) throws -> Int {
        if start == end {
            if sourceEOF { return 0 }
            if count >= buffer.count {
                // Big content reads go straight to the caller's buffer.
                let n = try source.read(into: UnsafeMutableRawBufferPointer(start: destination, count: count))
                if n == 0 { sourceEOF = true }
                return n
            }
            start = 0
            end = try source.read(into: buffer)
            if end == 0 { sourceEOF = true; return 0 }
        }
        let n = min(count, end - start)
        destination.copyMemory(from: buffer.baseAddress! + start, byteCount: n)
        start += n
        return n
    }

    /// Discards `count` bytes; returns how many were missing at end of input.
    private func skip(_ count: Int64) throws -> Int64 {
        var remaining = count
        while remaining > 0 {
            if start == end {
                if sourceEOF { return remaining }
                start = 0
                end = try source.read(into: buffer)
                if end == 0 { sourceEOF = true; return remaining }
            }
            let n = Int(min(Int64(end - start), remaining))
            start += n
            remaining -= Int64(n)
        }
        return 0
    }
}

extension Result where Failure == TarReader.NumericError {
    func orThrow(_ transform: (TarReader.NumericError) -> LayerError) throws -> Success {
        switch self {
        case .success(let v): return v
        case .failure(let e): throw transform(e)
        }
    }
}

import CFlotillaArchive
import Foundation
import Glibc
import Testing
@testable import FlotillaImage

/// Writes tar archives byte by byte, so tests control every header field
/// (including broken ones) instead of trusting a tar implementation.
struct TarBuilder {
    enum Format { case ustar, gnu, v7 }

    struct Header {
        var name: String
        var type: UInt8 = UInt8(ascii: "0")
        var size = 0
        var mode = 0o644
        var uid = 0
        var gid = 0
        var mtime = 1_600_000_000
        var link = ""
        var format = Format.ustar
        var prefix = ""
        var devMajor = 0
        var devMinor = 0
        /// Raw 12-byte size field, replacing the octal one (base-256, junk...).
        var rawSize: [UInt8]?
        var rawUID: [UInt8]?
        var rawMtime: [UInt8]?
        var rawMode: [UInt8]?
        var checksumDelta = 0
    }

    var bytes: [UInt8] = []

    static func block(_ h: Header) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 512)
        func put(_ offset: Int, _ width: Int, _ value: [UInt8]) {
            for (i, c) in value.prefix(width).enumerated() { b[offset + i] = c }
        }
        func octal(_ offset: Int, _ width: Int, _ value: Int) {
            var s = String(value, radix: 8)
            while s.count < width - 1 { s = "0" + s }
            put(offset, width, Array(s.utf8) + [0])
        }
        put(0, 100, Array(h.name.utf8))
        if let raw = h.rawMode { put(100, 8, raw) } else { octal(100, 8, h.mode) }
        if let raw = h.rawUID { put(108, 8, raw) } else { octal(108, 8, h.uid) }
        octal(116, 8, h.gid)
        if let raw = h.rawSize { put(124, 12, raw) } else { octal(124, 12, h.size) }
        if let raw = h.rawMtime { put(136, 12, raw) } else { octal(136, 12, h.mtime) }
        b[156] = h.type
        put(157, 100, Array(h.link.utf8))
        switch h.format {
        case .ustar:
            put(257, 8, Array("ustar\u{0}00".utf8))
            put(345, 155, Array(h.prefix.utf8))
        case .gnu:
            put(257, 8, Array("ustar  \u{0}".utf8))
        case .v7:
            break
        }
        put(265, 32, Array("root".utf8))
        put(297, 32, Array("root".utf8))
        octal(329, 8, h.devMajor)
        octal(337, 8, h.devMinor)
        for i in 148..<156 { b[i] = 0x20 }
        let sum = b.reduce(0) { $0 + Int($1) } + h.checksumDelta
        var s = String(sum, radix: 8)
        while s.count < 6 { s = "0" + s }
        put(148, 8, Array(s.utf8) + [0, 0x20])
        return b
    }

    static func base256(_ value: UInt64, width: Int = 12) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: width)
        var v = value
        for i in stride(from: width - 1, to: 0, by: -1) {
            out[i] = UInt8(v & 0xff)
            v >>= 8
        }
        out[0] = 0x80
        return out
    }

    static func paxRecord(_ key: String, _ value: [UInt8]) -> [UInt8] {
        let body = Array(" \(key)=".utf8) + value + [0x0a]
        var length = body.count + 1
        while String(length).count + body.count != length { length = String(length).count + body.count }
        return Array(String(length).utf8) + body
    }

    mutating func append(_ h: Header, data: [UInt8] = []) {
        bytes += Self.block(h)
        bytes += data
        let pad = (512 - data.count % 512) % 512
        bytes += [UInt8](repeating: 0, count: pad)
    }

    mutating func file(_ name: String, _ contents: [UInt8] = [], mode: Int = 0o644, uid: Int = 0, gid: Int = 0,
                       mtime: Int = 1_600_000_000) {
        append(Header(name: name, size: contents.count, mode: mode, uid: uid, gid: gid, mtime: mtime), data: contents)
    }

    mutating func file(_ name: String, _ text: String, mode: Int = 0o644) {
        file(name, Array(text.utf8), mode: mode)
    }

    mutating func dir(_ name: String, mode: Int = 0o755, uid: Int = 0, gid: Int = 0, mtime: Int = 1_600_000_000) {
        append(Header(name: name, type: UInt8(ascii: "5"), mode: mode, uid: uid, gid: gid, mtime: mtime))
    }

    mutating func symlink(_ name: String, to target: String, mtime: Int = 1_600_000_000) {
        append(Header(name: name, type: UInt8(ascii: "2"), mode: 0o777, mtime: mtime, link: target))
    }

    mutating func hardlink(_ name: String, to target: String) {
        append(Header(name: name, type: UInt8(ascii: "1"), link: target))
    }

    mutating func node(_ name: String, type: Character, major: Int = 0, minor: Int = 0, mode: Int = 0o600) {
        append(Header(name: name, type: type.asciiValue!, mode: mode, devMajor: major, devMinor: minor))
    }

    mutating func pax(_ records: [(String, [UInt8])], global: Bool = false) {
        let data = records.flatMap { Self.paxRecord($0.0, $0.1) }
        append(Header(name: "PaxHeaders/x", type: UInt8(ascii: global ? "g" : "x"), size: data.count), data: data)
    }

    mutating func pax(_ records: [(String, String)], global: Bool = false) {
        pax(records.map { ($0.0, Array($0.1.utf8)) }, global: global)
    }

    mutating func gnuLongName(_ name: String) {
        let data = Array(name.utf8) + [0]
        append(Header(name: "././@LongLink", type: UInt8(ascii: "L"), size: data.count, format: .gnu), data: data)
    }

    mutating func gnuLongLink(_ target: String) {
        let data = Array(target.utf8) + [0]
        append(Header(name: "././@LongLink", type: UInt8(ascii: "K"), size: data.count, format: .gnu), data: data)
    }

    mutating func end() {
        bytes += [UInt8](repeating: 0, count: 1024)
    }

    func ended() -> [UInt8] {
        var copy = self
        copy.end()
        return copy.bytes
    }
}

/// A scratch directory removed when the test ends.
final class Scratch {
    let path: String

    init() throws {
        var template = Array((NSTemporaryDirectory() + "flotilla-archive-XXXXXX").utf8CString)
        guard let p = mkdtemp(&template) else { throw POSIXError(.EIO) }
        path = String(cString: p)
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }

    func sub(_ name: String) -> String { path + "/" + name }

    /// Creates and returns a fresh directory to unpack into.
    func directory(_ name: String) throws -> String {
        let p = sub(name)
        try FileManager.default.createDirectory(atPath: p, withIntermediateDirectories: true)
        return p
    }

    @discardableResult
    func write(_ name: String, _ bytes: [UInt8]) throws -> String {
        let p = sub(name)
        try Data(bytes).write(to: URL(fileURLWithPath: p))
        return p
    }
}

/// Runs a shell command (for gzip, zstd and tar) and fails the test if it fails.
@discardableResult
func sh(_ command: String) throws -> String {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/bin/sh")
    process.arguments = ["-c", command]
    let pipe = Pipe()
    process.standardOutput = pipe
    try process.run()
    let out = pipe.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    guard process.terminationStatus == 0 else {
        throw ShellError(command: command, status: process.terminationStatus)
    }
    return String(decoding: out, as: UTF8.self)
}

struct ShellError: Error, CustomStringConvertible {
    let command: String
    let status: Int32
    var description: String { "`\(command)` exited with \(status)" }
}

func lstatPath(_ path: String) -> stat? {
    var st = stat()
    return lstat(path, &st) == 0 ? st : nil
}

func permissions(_ path: String) -> mode_t? { lstatPath(path).map { $0.st_mode & 0o7777 } }

func exists(_ path: String) -> Bool { lstatPath(path) != nil }

func fileType(_ path: String) -> mode_t? { lstatPath(path).map { $0.st_mode & S_IFMT } }

func xattr(_ path: String, _ name: String) -> [UInt8]? {
    var buffer = [UInt8](repeating: 0, count: 4096)
    let n = flotilla_lgetxattr(path, name, &buffer, buffer.count)
    return n < 0 ? nil : Array(buffer.prefix(n))
}

func contents(_ path: String) -> String? {
    guard let data = FileManager.default.contents(atPath: path) else { return nil }
    return String(decoding: data, as: UTF8.self)
}

/// Reads every entry (and its content) of a tar file.
func readEntries(_ path: String) throws -> [(entry: TarEntry, data: [UInt8])] {
    let reader = TarReader(try Decompressor(path: path))
    var out: [(TarEntry, [UInt8])] = []
    var buffer = [UInt8](repeating: 0, count: 7000) // odd size: exercises partial reads
    while let entry = try reader.next() {
        var data: [UInt8] = []
        while true {
            let n = try buffer.withUnsafeMutableBytes { try reader.read(into: $0) }
            if n == 0 { break }
            data += buffer.prefix(n)
        }
        out.append((entry, data))
    }
    return out
}

/// Unpacks `tar` (uncompressed) into a fresh directory `root` of `scratch`.
@discardableResult
func unpack(_ tar: [UInt8], in scratch: Scratch, mode: LayerUnpacker.Mode = .apply, root: String = "root",
            layerName: String = "layer.tar", privileged: Bool? = nil) throws -> LayerUnpacker.Summary {
    let layer = try scratch.write(layerName, tar)
    let target = scratch.sub(root)
    if !exists(target) { _ = try scratch.directory(root) }
    let unpacker = privileged.map { LayerUnpacker(mode: mode, privileged: $0) } ?? LayerUnpacker(mode: mode)
    return try unpacker.unpack(layer: layer, into: target)
}

/// Expects the unpack to be refused, and the message to name the entry.
func expectRefused(_ tar: [UInt8], entry: String, mode: LayerUnpacker.Mode = .apply,
                   sourceLocation: SourceLocation = #_sourceLocation) throws {
    let scratch = try Scratch()
    let error = #expect(throws: LayerError.self, sourceLocation: sourceLocation) {
        try unpack(tar, in: scratch, mode: mode)
    }
    guard let error else { return }
    guard case .unsafeEntry(let path, _) = error else {
        Issue.record("expected an unsafe-entry refusal, got: \(error)", sourceLocation: sourceLocation)
        return
    }
    #expect(path == entry, sourceLocation: sourceLocation)
    #expect(error.description.contains("refusing layer entry \"\(entry)\""), sourceLocation: sourceLocation)
}

/// Deterministic pseudo-random bytes (so compressed sizes are realistic).
func pseudoRandom(_ count: Int, seed: UInt64 = 0x9e3779b97f4a7c15) -> [UInt8] {
    var state = seed
    var out = [UInt8](repeating: 0, count: count)
    for i in 0..<count {
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        // Limited alphabet so that gzip has something to compress.
        out[i] = UInt8(truncatingIfNeeded: state % 16) + 0x41
    }
    return out
}

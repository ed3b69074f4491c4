import Foundation
import Testing
@testable import FlotillaImage

@Suite struct TarReaderTests {
    func entries(_ tar: [UInt8]) throws -> [(entry: TarEntry, data: [UInt8])] {
        let scratch = try Scratch()
        return try readEntries(try scratch.write("t.tar", tar))
    }

    func malformed(_ tar: [UInt8], sourceLocation: SourceLocation = #_sourceLocation) throws -> (entry: String?, reason: String) {
        let scratch = try Scratch()
        let path = try scratch.write("t.tar", tar)
        let error = #expect(throws: LayerError.self, sourceLocation: sourceLocation) { try readEntries(path) }
        guard case .malformedArchive(let entry, let reason)? = error else {
            Issue.record("expected malformedArchive, got \(String(describing: error))", sourceLocation: sourceLocation)
            return (nil, "")
        }
        return (entry, reason)
    }

    @Test func ustarFieldsAndAllKinds() throws {
        var t = TarBuilder()
        t.append(.init(name: "file.txt", size: 5, mode: 0o4755, uid: 1000, gid: 2000, mtime: 1_234_567_890,
                       prefix: "some/long/prefix"), data: Array("hello".utf8))
        t.append(.init(name: "contig", type: UInt8(ascii: "7"), size: 1), data: [0x41])
        t.append(.init(name: "old-dir/", type: 0, format: .v7))
        t.append(.init(name: "old-file", type: 0, size: 2, format: .v7), data: [1, 2])
        t.hardlink("hard", to: "file.txt")
        t.symlink("sym", to: "../target")
        t.node("null", type: "3", major: 1, minor: 3)
        t.node("loop0", type: "4", major: 7, minor: 0)
        t.dir("dir/", mode: 0o1777)
        t.node("pipe", type: "6")
        let e = try entries(t.ended())
        #expect(e.map(\.entry.kind) == [.regular, .regular, .directory, .regular, .hardlink, .symlink,
                                        .characterDevice, .blockDevice, .directory, .fifo])
        let f = e[0].entry
        #expect(f.path == "some/long/prefix/file.txt")
        #expect(f.mode == 0o4755)
        #expect(f.uid == 1000 && f.gid == 2000)
        #expect(f.modificationTime == 1_234_567_890)
        #expect(f.size == 5)
        #expect(e[0].data == Array("hello".utf8))
        #expect(e[1].data == [0x41])
        #expect(e[3].data == [1, 2])
        #expect(e[4].entry.linkTarget == "file.txt")
        #expect(e[5].entry.linkTarget == "../target")
        #expect(e[6].entry.deviceMajor == 1 && e[6].entry.deviceMinor == 3)
        #expect(e[7].entry.deviceMajor == 7)
        #expect(e[8].entry.mode == 0o1777)
    }

    @Test func gnuLongNamesAndLinks() throws {
        let longName = String(repeating: "n", count: 150) + "/" + String(repeating: "m", count: 120)
        let longTarget = String(repeating: "t", count: 200)
        var t = TarBuilder()
        t.gnuLongName(longName)
        t.append(.init(name: String(longName.prefix(100)), size: 3, format: .gnu), data: [7, 8, 9])
        t.gnuLongName("short-again-but-long-header")
        t.gnuLongLink(longTarget)
        t.append(.init(name: "x", type: UInt8(ascii: "2"), link: String(longTarget.prefix(100)), format: .gnu))
        t.file("plain", [1])
        let e = try entries(t.ended())
        #expect(e.count == 3)
        #expect(e[0].entry.path == longName)
        #expect(e[0].data == [7, 8, 9])
        #expect(e[1].entry.path == "short-again-but-long-header")
        #expect(e[1].entry.linkTarget == longTarget)
        #expect(e[2].entry.path == "plain") // long names do not leak to the next entry
    }

    @Test func paxRecordsOverrideHeaders() throws {
        var t = TarBuilder()
        t.pax([("path", "pax/é/" + String(repeating: "p", count: 200)), ("uid", "3000000"), ("gid", "4000000"),
               ("mtime", "1700000000.123456789123"), ("size", "4"), ("SCHILY.xattr.user.comment", "hi there"),
               ("SCHILY.xattr.security.capability", "\u{1}\u{2}"), ("comment", "ignored")])
        t.append(.init(name: "short", size: 4), data: [1, 2, 3, 4])
        t.pax([("linkpath", String(repeating: "l", count: 300)), ("mtime", "-1.5")])
        t.append(.init(name: "link", type: UInt8(ascii: "2"), link: "short"))
        let e = try entries(t.ended())
        #expect(e.count == 2)
        let f = e[0].entry
        #expect(f.path == "pax/é/" + String(repeating: "p", count: 200))
        #expect(f.uid == 3_000_000 && f.gid == 4_000_000)
        #expect(f.modificationTime == 1_700_000_000)
        #expect(f.modificationNanoseconds == 123_456_789)
        #expect(e[0].data == [1, 2, 3, 4])
        #expect(f.xattrs == ["user.comment": Array("hi there".utf8), "security.capability": [1, 2]])
        #expect(e[1].entry.linkTarget == String(repeating: "l", count: 300))
        #expect(e[1].entry.modificationTime == -2)
        #expect(e[1].entry.modificationNanoseconds == 500_000_000)
        #expect(e[1].entry.xattrs.isEmpty) // local records apply to one entry only
    }

    @Test func globalPaxHeadersApplyToLaterEntries() throws {
        var t = TarBuilder()
        t.file("before", [], mode: 0o600)
        t.pax([("uid", "42"), ("SCHILY.xattr.user.g", "global")], global: true)
        t.file("a")
        t.pax([("uid", "7")])
        t.file("b")
        t.pax([("uid", "")], global: true) // empty value removes a global record
        t.file("c")
        let e = try entries(t.ended())
        #expect(e.map(\.entry.path) == ["before", "a", "b", "c"])
        #expect(e.map(\.entry.uid) == [0, 42, 7, 0])
        #expect(e[2].entry.xattrs["user.g"] == Array("global".utf8))
    }

    @Test func base256AndPaddedOctalFields() throws {
        var t = TarBuilder()
        var h = TarBuilder.Header(name: "b256", size: 3)
        h.rawSize = TarBuilder.base256(3)
        h.rawUID = [0x80, 0, 0, 0, 0, 0x01, 0x00, 0x00] // 65536
        h.rawMtime = [0xff] + [UInt8](repeating: 0xff, count: 10) + [0xf6] // -10
        t.append(h, data: [9, 9, 9])
        var o = TarBuilder.Header(name: "octal", size: 0)
        o.rawMode = Array("  755 \u{0}\u{0}".utf8)
        o.rawSize = Array("0\u{0}\u{0}\u{0}\u{0}\u{0}\u{0}\u{0}\u{0}\u{0}\u{0}\u{0}".utf8)
        t.append(o)
        let e = try entries(t.ended())
        #expect(e[0].entry.size == 3)
        #expect(e[0].data == [9, 9, 9])
        #expect(e[0].entry.uid == 65536)
        #expect(e[0].entry.modificationTime == -10)
        #expect(e[1].entry.mode == 0o755)
    }

    @Test func unreadContentIsSkipped() throws {
        var t = TarBuilder()
        t.file("big", pseudoRandom(100_000))
        t.file("small", [1, 2, 3])
        let scratch = try Scratch()
        let reader = TarReader(try Decompressor(path: try scratch.write("t.tar", t.ended())))
        #expect(try reader.next()?.path == "big")
        let second = try reader.next()
        #expect(second?.path == "small")
        var buffer = [UInt8](repeating: 0, count: 16)
        #expect(try buffer.withUnsafeMutableBytes { try reader.read(into: $0) } == 3)
        #expect(Array(buffer.prefix(3)) == [1, 2, 3])
        #expect(try reader.next() == nil)
        #expect(try reader.next() == nil)
    }

    @Test func loneZeroBlockAtEndIsAccepted() throws {
        var t = TarBuilder()
        t.file("a", [1])
        t.bytes += [UInt8](repeating: 0, count: 512)
        #expect(try entries(t.bytes).count == 1)
    }

    @Test func badChecksumIsRefused() throws {
        var t = TarBuilder()
        t.file("ok", [1])
        t.append(.init(name: "corrupt", size: 1, checksumDelta: 1), data: [1])
        let (entry, reason) = try malformed(t.ended())
        #expect(entry == "corrupt")
        #expect(reason.contains("checksum"))
    }

    @Test func truncatedArchivesAreRefused() throws {
        var t = TarBuilder()
        t.file("a", [1])
        t.file("payload", pseudoRandom(5000))
        let full = t.ended()
        // Inside content.
        var (entry, reason) = try malformed(Array(full.prefix(1024 + 512 + 2000)))
        #expect(entry == "payload")
        #expect(reason.contains("truncated"))
        // Inside a header block.
        (_, reason) = try malformed(Array(full.prefix(1024 + 100)))
        #expect(reason.contains("truncated"))
        // At an entry boundary, without the end-of-archive marker.
        (_, reason) = try malformed(t.bytes)
        #expect(reason.contains("end-of-archive"))
        // Empty input.
        (_, reason) = try malformed([])
        #expect(reason.contains("end-of-archive"))
    }

    @Test func badNumericFieldsAreRefused() throws {
        var h = TarBuilder.Header(name: "huge")
        h.rawSize = [0x80] + [UInt8](repeating: 0xff, count: 11) // > 64 bits
        var t = TarBuilder(); t.append(h)
        var (entry, reason) = try malformed(t.ended())
        #expect(entry == "huge")
        #expect(reason.contains("size"))

        h.rawSize = [0xff] + [UInt8](repeating: 0xff, count: 11) // -1
        t = TarBuilder(); t.append(h)
        (_, reason) = try malformed(t.ended())
        #expect(reason.contains("negative"))

        h.rawSize = Array("0000000012x\u{0}".utf8)
        t = TarBuilder(); t.append(h)
        (_, reason) = try malformed(t.ended())
        #expect(reason.contains("not an octal number"))

        h.rawSize = nil
        h.rawUID = TarBuilder.base256(1 << 40, width: 8)
        t = TarBuilder(); t.append(h)
        (_, reason) = try malformed(t.ended())
        #expect(reason.contains("uid"))

        // Valid but far larger than the archive: caught as truncation, not trusted.
        h.rawUID = nil
        h.rawSize = TarBuilder.base256(1 << 62)
        t = TarBuilder(); t.append(h, data: [1, 2, 3])
        (_, reason) = try malformed(t.ended())
        #expect(reason.contains("truncated"))
    }

    @Test func absurdExtendedHeadersAreRefused() throws {
        // Header claims a 2 GiB PAX block.
        var t = TarBuilder()
        t.append(.init(name: "PaxHeaders/evil", type: UInt8(ascii: "x"), size: 2 << 30))
        var (_, reason) = try malformed(t.ended())
        #expect(reason.contains("limit"))

        // Same for a GNU long name.
        t = TarBuilder()
        t.append(.init(name: "././@LongLink", type: UInt8(ascii: "L"), size: (1 << 20) + 1, format: .gnu))
        (_, reason) = try malformed(t.ended())
        #expect(reason.contains("limit"))

        // A record whose length field is absurd.
        let record = Array("99999999999999999999 path=x\n".utf8)
        t = TarBuilder()
        t.append(.init(name: "PaxHeaders/evil", type: UInt8(ascii: "x"), size: record.count), data: record)
        t.file("victim")
        (_, reason) = try malformed(t.ended())
        #expect(reason.contains("PAX record"))

        // A record without a newline.
        let unterminated = Array("12 path=abc ".utf8)
        t = TarBuilder()
        t.append(.init(name: "PaxHeaders/evil", type: UInt8(ascii: "x"), size: unterminated.count), data: unterminated)
        t.file("victim")
        (_, reason) = try malformed(t.ended())
        #expect(reason.contains("PAX record"))

        // Many extended headers before one entry add up.
        t = TarBuilder()
        for _ in 0..<5 { t.pax([("SCHILY.xattr.user.\(UUID().uuidString)", String(repeating: "v", count: 300_000))]) }
        t.file("victim")
        (_, reason) = try malformed(t.ended())
        #expect(reason.contains("exceed"))
    }

    @Test func unsupportedAndInconsistentEntriesAreRefused() throws {
        var t = TarBuilder()
        t.append(.init(name: "sparse", type: UInt8(ascii: "S")))
        var (entry, reason) = try malformed(t.ended())
        #expect(entry == "sparse")
        #expect(reason.contains("sparse"))

        t = TarBuilder()
        t.pax([("path", "a\u{0}b")])
        t.file("x")
        (_, reason) = try malformed(t.ended())
        #expect(reason.contains("NUL"))

        t = TarBuilder()
        t.pax([("uid", "12ab")])
        t.file("x")
        (_, reason) = try malformed(t.ended())
        #expect(reason.contains("uid"))

        t = TarBuilder()
        t.file("a")
        t.bytes += [UInt8](repeating: 0, count: 512)
        t.file("after-end")
        (_, reason) = try malformed(t.bytes)
        #expect(reason.contains("after an end-of-archive block"))

        t = TarBuilder()
        t.pax([("path", "dangling")])
        (_, reason) = try malformed(t.ended())
        #expect(reason.contains("extended header"))
    }
}

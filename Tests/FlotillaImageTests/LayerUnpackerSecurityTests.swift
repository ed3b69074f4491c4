import Foundation
import Glibc
import Testing
@testable import FlotillaImage

/// Hostile layers: each must be refused, and nothing may appear outside the root.
@Suite struct LayerUnpackerSecurityTests {
    @Test func parentTraversalIsRefused() throws {
        let scratch = try Scratch()
        var t = TarBuilder()
        t.file("../x", "evil")
        let error = #expect(throws: LayerError.self) { try unpack(t.ended(), in: scratch) }
        #expect(error?.description == "refusing layer entry \"../x\": path climbs out of the layer root")
        #expect(!exists(scratch.sub("x")))
    }

    @Test func nestedTraversalIsRefused() throws {
        let scratch = try Scratch()
        var t = TarBuilder()
        t.file("a/../../x", "evil")
        #expect(throws: LayerError.unsafeEntry(path: "a/../../x", reason: "path climbs out of the layer root")) {
            try unpack(t.ended(), in: scratch)
        }
        #expect(!exists(scratch.sub("x")))
        // Even a ".." that stays inside is refused: there is no legitimate use.
        var u = TarBuilder()
        u.file("a/../b", "x")
        try expectRefused(u.ended(), entry: "a/../b")
    }

    @Test func absolutePathIsRefused() throws {
        let existedBefore = exists("/etc/x")
        var t = TarBuilder()
        t.file("/etc/x", "evil")
        try expectRefused(t.ended(), entry: "/etc/x")
        #expect(exists("/etc/x") == existedBefore)
    }

    @Test func writingThroughASymlinkIsRefused() throws {
        let scratch = try Scratch()
        let outside = try scratch.directory("outside")
        var t = TarBuilder()
        t.symlink("a", to: outside) // absolute targets are fine by themselves...
        t.file("a/evil", "pwned") // ...but nothing may be written through them
        let error = #expect(throws: LayerError.self) { try unpack(t.ended(), in: scratch) }
        guard case .unsafeEntry(let path, let reason)? = error else {
            Issue.record("expected refusal, got \(String(describing: error))")
            return
        }
        #expect(path == "a/evil")
        #expect(reason.contains("symlink \"a\""))
        #expect(!exists(outside + "/evil"))
        #expect(fileType(scratch.sub("root/a")) == S_IFLNK)
    }

    @Test func symlinkFromAnEarlierLayerIsNotFollowed() throws {
        let scratch = try Scratch()
        let outside = try scratch.directory("outside")
        var l1 = TarBuilder()
        l1.symlink("etc", to: outside)
        try unpack(l1.ended(), in: scratch)
        var l2 = TarBuilder()
        l2.file("etc/passwd", "root::0:0::/:/bin/sh\n")
        try expectRefusedIn(scratch, l2.ended(), entry: "etc/passwd")
        #expect(!exists(outside + "/passwd"))
    }

    @Test func replacingASymlinkDoesNotWriteItsTarget() throws {
        let scratch = try Scratch()
        let victim = try scratch.write("victim", Array("original".utf8))
        let victimDir = try scratch.directory("victim-dir")
        var t = TarBuilder()
        t.symlink("f", to: victim)
        t.file("f", "replaced")
        t.symlink("d", to: victimDir)
        t.dir("d")
        t.file("d/inner", "inside")
        try unpack(t.ended(), in: scratch)
        #expect(contents(victim) == "original")
        #expect(fileType(scratch.sub("root/f")) == S_IFREG)
        #expect(contents(scratch.sub("root/f")) == "replaced")
        #expect(fileType(scratch.sub("root/d")) == S_IFDIR)
        #expect(contents(scratch.sub("root/d/inner")) == "inside")
        #expect(!exists(victimDir + "/inner"))
    }

    @Test func parentThatIsAFileIsRefused() throws {
        var t = TarBuilder()
        t.file("a", "file")
        t.file("a/b", "x")
        try expectRefused(t.ended(), entry: "a/b")
    }

    @Test func climbingSymlinkIsRefused() throws {
        var t = TarBuilder()
        t.symlink("l", to: "../../..")
        try expectRefused(t.ended(), entry: "l")

        var u = TarBuilder()
        u.symlink("a/b/l", to: "../../../etc")
        try expectRefused(u.ended(), entry: "a/b/l")
    }

    @Test func relativeSymlinksThatStayInsideAreKept() throws {
        let scratch = try Scratch()
        var t = TarBuilder()
        t.symlink("a/b/up", to: "../../x")
        t.symlink("a/dot", to: "./../a/./b")
        t.symlink("abs", to: "/usr/bin/env")
        try unpack(t.ended(), in: scratch)
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: scratch.sub("root/a/b/up")) == "../../x")
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: scratch.sub("root/a/dot")) == "./../a/./b")
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: scratch.sub("root/abs")) == "/usr/bin/env")
    }

    @Test func climbingHardlinkIsRefused() throws {
        let scratch = try Scratch()
        let outside = try scratch.write("outside", Array("secret".utf8))
        var t = TarBuilder()
        t.hardlink("h", to: "../outside")
        let error = #expect(throws: LayerError.self) { try unpack(t.ended(), in: scratch) }
        #expect(error?.description == "refusing layer entry \"h\": hardlink target \"../outside\" climbs out of the layer root")
        #expect(lstatPath(outside)?.st_nlink == 1)

        var u = TarBuilder()
        u.hardlink("h", to: "/etc/passwd")
        try expectRefused(u.ended(), entry: "h")
    }

    @Test func hardlinkThroughASymlinkIsRefused() throws {
        let scratch = try Scratch()
        let outsideDir = try scratch.directory("outside")
        let secret = outsideDir + "/secret"
        try Data("secret".utf8).write(to: URL(fileURLWithPath: secret))
        var t = TarBuilder()
        t.symlink("s", to: outsideDir)
        t.hardlink("h", to: "s/secret")
        let error = #expect(throws: LayerError.self) { try unpack(t.ended(), in: scratch) }
        #expect(error?.description.contains("symlink \"s\"") == true)
        #expect(lstatPath(secret)?.st_nlink == 1)
        #expect(!exists(scratch.sub("root/h")))
    }

    @Test func hardlinkToASymlinkLinksTheSymlinkItself() throws {
        let scratch = try Scratch()
        let outside = try scratch.write("outside", Array("secret".utf8))
        var t = TarBuilder()
        t.symlink("s", to: outside)
        t.hardlink("h", to: "s")
        try unpack(t.ended(), in: scratch)
        #expect(fileType(scratch.sub("root/h")) == S_IFLNK)
        #expect(lstatPath(outside)?.st_nlink == 1)
    }

    @Test func malformedArchivesAreRefused() throws {
        var t = TarBuilder()
        t.file("a", pseudoRandom(3000))
        let full = t.ended()
        let scratch = try Scratch()
        // Truncated.
        var error = #expect(throws: LayerError.self) { try unpack(Array(full.prefix(2000)), in: scratch, root: "r1") }
        #expect(error?.description == "malformed layer archive at entry \"a\": archive is truncated inside this entry (1512 bytes missing)")
        // Bad checksum.
        var bad = full
        bad[10] ^= 1
        error = #expect(throws: LayerError.self) { try unpack(bad, in: scratch, root: "r2") }
        #expect(error?.description.contains("checksum") == true)
        // Huge size field.
        var h = TarBuilder.Header(name: "huge")
        h.rawSize = [0x80] + [UInt8](repeating: 0xff, count: 11)
        var u = TarBuilder()
        u.append(h)
        error = #expect(throws: LayerError.self) { try unpack(u.ended(), in: scratch, root: "r3") }
        #expect(error?.description.contains("size field does not fit in 64 bits") == true)
        // PAX header of absurd length.
        u = TarBuilder()
        u.append(.init(name: "PaxHeaders/huge", type: UInt8(ascii: "x"), size: 0o77777777777))
        error = #expect(throws: LayerError.self) { try unpack(u.ended(), in: scratch, root: "r4") }
        #expect(error?.description.contains("exceeds the 1048576-byte limit") == true)
    }

    @Test func whiteoutNamesAreValidated() throws {
        var t = TarBuilder()
        t.file("a/.wh..", "")
        try expectRefused(t.ended(), entry: "a/.wh..")
        var u = TarBuilder()
        u.file("../.wh.x", "")
        try expectRefused(u.ended(), entry: "../.wh.x")
    }

    @Test func nonDirectoryRootIsRefused() throws {
        var t = TarBuilder()
        t.file("./", "")
        try expectRefused(t.ended(), entry: "./")
    }

    @Test func overlayXattrsFromTheLayerAreIgnored() throws {
        let scratch = try Scratch()
        var t = TarBuilder()
        t.pax([("SCHILY.xattr.trusted.overlay.redirect", "/etc"), ("SCHILY.xattr.user.ok", "1")])
        t.dir("d")
        let summary = try unpack(t.ended(), in: scratch, mode: .overlay)
        #expect(xattr(scratch.sub("root/d"), "trusted.overlay.redirect") == nil)
        #expect(xattr(scratch.sub("root/d"), "user.ok") == Array("1".utf8))
        #expect(summary.warnings == 1)
    }

    func expectRefusedIn(_ scratch: Scratch, _ tar: [UInt8], entry: String) throws {
        let error = #expect(throws: LayerError.self) { try unpack(tar, in: scratch, layerName: "layer2.tar") }
        guard case .unsafeEntry(let path, _)? = error else {
            Issue.record("expected refusal, got \(String(describing: error))")
            return
        }
        #expect(path == entry)
    }
}

import CFlotillaArchive
import Foundation
import Glibc
import Testing
@testable import FlotillaImage

@Suite struct LayerUnpackerTests {
    // MARK: Whiteouts

    @Test func overlayWhiteoutsBecomeDevicesAndXattrs() throws {
        let scratch = try Scratch()
        var t = TarBuilder()
        t.dir("a")
        t.file("a/keep", "k")
        t.file("a/.wh.gone", "")
        t.dir("b")
        t.file("b/.wh..wh..opq", "")
        t.file("b/new", "n")
        t.file("c/f", "same layer")
        t.file("c/.wh.f", "") // whiteouts never hide the same layer's files
        t.file(".wh.top", "")
        t.file(".wh..wh.plnk/123", "") // AUFS metadata: ignored
        let summary = try unpack(t.ended(), in: scratch, mode: .overlay)
        let root = scratch.sub("root")

        let gone = try #require(lstatPath(root + "/a/gone"))
        #expect(gone.st_mode & S_IFMT == S_IFCHR)
        #expect(gone.st_rdev == 0)
        #expect(!exists(root + "/a/.wh.gone"))
        #expect(fileType(root + "/top") == S_IFCHR)
        #expect(xattr(root + "/b", "trusted.overlay.opaque") == Array("y".utf8))
        #expect(xattr(root + "/a", "trusted.overlay.opaque") == nil)
        #expect(contents(root + "/b/new") == "n")
        #expect(!exists(root + "/b/.wh..wh..opq"))
        #expect(contents(root + "/c/f") == "same layer")
        #expect(!exists(root + "/.wh..wh.plnk"))
        #expect(summary.whiteouts == 4)
        #expect(summary.entries == 10)
    }

    @Test func overlayDirectoryOverSameLayerWhiteoutBecomesOpaque() throws {
        let scratch = try Scratch()
        var t = TarBuilder()
        t.file(".wh.d", "")
        t.dir("d")
        t.file("d/x", "x")
        try unpack(t.ended(), in: scratch, mode: .overlay)
        #expect(fileType(scratch.sub("root/d")) == S_IFDIR)
        #expect(xattr(scratch.sub("root/d"), "trusted.overlay.opaque") == Array("y".utf8))
    }

    @Test func overlayWhiteoutsNeedPrivileges() throws {
        let scratch = try Scratch()
        var t = TarBuilder()
        t.file("a/.wh.x", "")
        let error = #expect(throws: LayerError.self) {
            try unpack(t.ended(), in: scratch, mode: .overlay, privileged: false)
        }
        guard case .unsupported(let path, _)? = error else {
            Issue.record("expected unsupported, got \(String(describing: error))")
            return
        }
        #expect(path == "a/.wh.x")
    }

    @Test func applyWhiteoutsDeleteLowerLayersOnly() throws {
        let scratch = try Scratch()
        var l1 = TarBuilder()
        l1.file("a/x", "x")
        l1.file("a/y", "y")
        l1.file("b/z", "z")
        l1.dir("b/sub")
        l1.file("b/sub/deep", "deep")
        l1.file("d/k", "k")
        l1.file("d/more/k2", "k2")
        l1.file("e/lower", "lower")
        l1.file("g/old", "old")
        try unpack(l1.ended(), in: scratch, layerName: "l1.tar")

        var l2 = TarBuilder()
        l2.file("a/.wh.x", "")
        l2.file("b/new", "new")        // same layer, before the opaque marker
        l2.dir("b/sub")                 // same layer directory: kept, but its lower contents go
        l2.file("b/.wh..wh..opq", "")
        l2.file(".wh.d", "")            // recursive
        l2.file("c/f", "same")
        l2.file("c/.wh.f", "")          // same layer: no effect
        l2.file("e/.wh..wh..opq", "")   // opaque before the layer's own entries
        l2.file("e/upper", "upper")
        l2.file("missing/.wh.nothing", "") // nothing to delete: fine
        l2.file("g/.wh.old", "")
        l2.file("g/old", "recreated")   // re-added after its whiteout
        let summary = try unpack(l2.ended(), in: scratch, layerName: "l2.tar")
        let root = scratch.sub("root")

        #expect(!exists(root + "/a/x"))
        #expect(contents(root + "/a/y") == "y")
        #expect(!exists(root + "/b/z"))
        #expect(contents(root + "/b/new") == "new")
        #expect(fileType(root + "/b/sub") == S_IFDIR)
        #expect(!exists(root + "/b/sub/deep"))
        #expect(!exists(root + "/d"))
        #expect(contents(root + "/c/f") == "same")
        #expect(!exists(root + "/e/lower"))
        #expect(contents(root + "/e/upper") == "upper")
        #expect(!exists(root + "/missing"))
        #expect(contents(root + "/g/old") == "recreated")
        #expect(summary.whiteouts == 7)
        // No whiteout files are left behind in apply mode.
        let all = try FileManager.default.subpathsOfDirectory(atPath: root)
        #expect(!all.contains { $0.contains(".wh.") })
    }

    @Test func applyReplacesAcrossLayers() throws {
        let scratch = try Scratch()
        var l1 = TarBuilder()
        l1.file("x/inner", "dir content")
        l1.file("f", "file")
        l1.file("keep", "keep")
        try unpack(l1.ended(), in: scratch, layerName: "l1.tar")
        var l2 = TarBuilder()
        l2.file("x", "now a file") // replaces a directory tree
        l2.dir("f")                 // replaces a file
        l2.hardlink("keep-link", to: "keep") // to a lower layer's file: fine in apply mode
        try unpack(l2.ended(), in: scratch, layerName: "l2.tar")
        let root = scratch.sub("root")
        #expect(contents(root + "/x") == "now a file")
        #expect(fileType(root + "/f") == S_IFDIR)
        #expect(lstatPath(root + "/keep-link")?.st_ino == lstatPath(root + "/keep")?.st_ino)
    }

    @Test func overlayHardlinkToALowerLayerIsRefused() throws {
        let scratch = try Scratch()
        var t = TarBuilder()
        t.file("here", "h")
        t.hardlink("ok", to: "here")
        t.hardlink("bad", to: "usr/lib/libc.so")
        let error = #expect(throws: LayerError.self) { try unpack(t.ended(), in: scratch, mode: .overlay) }
        #expect(error?.description == "refusing layer entry \"bad\": hardlink target \"usr/lib/libc.so\" is not in this layer (an overlay layer cannot link to a lower layer's file)")
        #expect(lstatPath(scratch.sub("root/ok"))?.st_nlink == 2)
    }

    // MARK: Metadata

    @Test func ownershipModesTimesAndXattrsArePreserved() throws {
        let scratch = try Scratch()
        var t = TarBuilder()
        t.dir("./", mode: 0o751, mtime: 1_000_000_000)
        t.dir("d", mode: 0o1777, uid: 11, gid: 12, mtime: 1_111_111_111)
        t.pax([("mtime", "1500000000.25"), ("SCHILY.xattr.user.comment", "hello"),
               ("SCHILY.xattr.user.empty", "")])
        t.file("d/suid", Array("#!/bin/sh\n".utf8), mode: 0o4755, uid: 1234, gid: 5678)
        t.file("d/sgid", [], mode: 0o2711, uid: 1, gid: 2)
        t.symlink("d/link", to: "suid", mtime: 1_222_222_222)
        t.node("d/null", type: "3", major: 1, minor: 3, mode: 0o666)
        t.node("d/loop", type: "4", major: 7, minor: 0)
        t.node("d/fifo", type: "6", mode: 0o640)
        t.dir("ro", mode: 0o555)
        t.file("ro/inside", "written before the mode was set")
        let summary = try unpack(t.ended(), in: scratch)
        let root = scratch.sub("root")

        let rootStat = try #require(lstatPath(root))
        #expect(rootStat.st_mode & 0o7777 == 0o751)
        #expect(rootStat.st_mtim.tv_sec == 1_000_000_000)

        let d = try #require(lstatPath(root + "/d"))
        #expect(d.st_mode & 0o7777 == 0o1777)
        #expect(d.st_uid == 11 && d.st_gid == 12)
        #expect(d.st_mtim.tv_sec == 1_111_111_111) // set after its contents

        let suid = try #require(lstatPath(root + "/d/suid"))
        #expect(suid.st_mode & 0o7777 == 0o4755) // setuid survives chown
        #expect(suid.st_uid == 1234 && suid.st_gid == 5678)
        #expect(suid.st_mtim.tv_sec == 1_500_000_000)
        #expect(suid.st_mtim.tv_nsec == 250_000_000)
        #expect(xattr(root + "/d/suid", "user.comment") == Array("hello".utf8))
        #expect(xattr(root + "/d/suid", "user.empty") == [])

        #expect(permissions(root + "/d/sgid") == 0o2711)

        let link = try #require(lstatPath(root + "/d/link"))
        #expect(link.st_mode & S_IFMT == S_IFLNK)
        #expect(link.st_mtim.tv_sec == 1_222_222_222)

        let null = try #require(lstatPath(root + "/d/null"))
        #expect(null.st_mode & S_IFMT == S_IFCHR)
        #expect(flotilla_major(null.st_rdev) == 1 && flotilla_minor(null.st_rdev) == 3)
        #expect(null.st_mode & 0o7777 == 0o666)
        let loop = try #require(lstatPath(root + "/d/loop"))
        #expect(loop.st_mode & S_IFMT == S_IFBLK)
        #expect(flotilla_major(loop.st_rdev) == 7)
        let fifo = try #require(lstatPath(root + "/d/fifo"))
        #expect(fifo.st_mode & S_IFMT == S_IFIFO)
        #expect(fifo.st_mode & 0o7777 == 0o640)

        #expect(permissions(root + "/ro") == 0o555)
        #expect(contents(root + "/ro/inside") == "written before the mode was set")

        #expect(summary.entries == 10)
        #expect(summary.bytesWritten == 10 + 31)
        #expect(summary.skippedDevices == 0)
    }

    @Test func unprivilegedSkipsDevicesWithWarnings() throws {
        let scratch = try Scratch()
        var t = TarBuilder()
        t.node("null", type: "3", major: 1, minor: 3)
        t.node("sda", type: "4", major: 8, minor: 0)
        t.node("fifo", type: "6")
        t.file("owned", "x", mode: 0o640)
        let summary = try unpack(t.ended(), in: scratch, privileged: false)
        #expect(summary.skippedDevices == 2)
        #expect(summary.warnings == 2)
        #expect(summary.warningMessages.first?.contains("null") == true)
        #expect(!exists(scratch.sub("root/null")))
        #expect(!exists(scratch.sub("root/sda")))
        #expect(fileType(scratch.sub("root/fifo")) == S_IFIFO)
        #expect(permissions(scratch.sub("root/owned")) == 0o640)
    }

    @Test func failingSecurityXattrIsAWarning() throws {
        let scratch = try Scratch()
        var t = TarBuilder()
        // Not a valid capability blob: the kernel rejects it.
        t.pax([("SCHILY.xattr.security.capability", "bogus")])
        t.file("bin", "x", mode: 0o755)
        let summary = try unpack(t.ended(), in: scratch)
        #expect(contents(scratch.sub("root/bin")) == "x")
        #expect(summary.warnings == 1)
        #expect(summary.warningMessages.first?.contains("security.capability") == true)
    }

    @Test func duplicateEntriesInOneLayerReplaceEachOther() throws {
        let scratch = try Scratch()
        var t = TarBuilder()
        t.file("f", "first")
        t.file("f", "second")
        t.symlink("s", to: "f")
        t.file("s", "no longer a link")
        t.dir("d", mode: 0o700)
        t.dir("d", mode: 0o750)
        try unpack(t.ended(), in: scratch, mode: .overlay)
        #expect(contents(scratch.sub("root/f")) == "second")
        #expect(contents(scratch.sub("root/s")) == "no longer a link")
        #expect(contents(scratch.sub("root/f")) == "second")
        #expect(permissions(scratch.sub("root/d")) == 0o750)
    }

    // MARK: Real archives and size

    @Test(arguments: ["gzip -c", "zstd -q -c", "cat"])
    func realTarLayerRoundTrips(compressor: String) throws {
        let scratch = try Scratch()
        let src = try scratch.directory("src")
        let longName = String(repeating: "long-name-", count: 15)
        try sh("""
            cd '\(src)' && mkdir -p usr/bin etc/deep/er && printf 'hello\\n' > etc/hello && \
            printf '#!/bin/sh\\n' > usr/bin/tool && chmod 4755 usr/bin/tool && \
            ln usr/bin/tool usr/bin/tool-link && ln -s ../etc/hello usr/hello-link && \
            printf 'long' > 'etc/deep/er/\(longName)' && mkfifo pipe && \
            chown 123:456 etc/hello && \
            python3 -c "import os; os.setxattr('etc/hello', 'user.note', b'kept')" && \
            touch -d @1400000000 etc/hello
            """)
        for format in ["gnu", "pax"] {
            let tar = scratch.sub("layer-\(format).tar")
            let xattrs = format == "pax" ? "--xattrs --xattrs-include='*'" : ""
            try sh("tar --format=\(format) \(xattrs) -C '\(src)' -cf '\(tar)' . && \(compressor) '\(tar)' > '\(tar).c'")
            let root = try scratch.directory("out-\(format)")
            let summary = try LayerUnpacker(mode: .overlay).unpack(layer: tar + ".c", into: root)
            #expect(contents(root + "/etc/hello") == "hello\n")
            #expect(contents(root + "/etc/deep/er/\(longName)") == "long")
            let tool = try #require(lstatPath(root + "/usr/bin/tool"))
            #expect(tool.st_mode & 0o7777 == 0o4755)
            #expect(lstatPath(root + "/usr/bin/tool-link")?.st_ino == tool.st_ino)
            #expect(try FileManager.default.destinationOfSymbolicLink(atPath: root + "/usr/hello-link") == "../etc/hello")
            #expect(fileType(root + "/pipe") == S_IFIFO)
            let hello = try #require(lstatPath(root + "/etc/hello"))
            #expect(hello.st_uid == 123 && hello.st_gid == 456)
            #expect(hello.st_mtim.tv_sec == 1_400_000_000)
            if format == "pax" {
                #expect(xattr(root + "/etc/hello", "user.note") == Array("kept".utf8))
            }
            #expect(summary.bytesWritten == 6 + 10 + 4)
            // tar itself agrees with what we wrote.
            let listing = try sh("cd '\(root)' && find . | sort")
            let original = try sh("cd '\(src)' && find . | sort")
            #expect(listing == original)
        }
    }

    @Test(arguments: ["gzip -1 -c", "zstd -q -1 -c"])
    func largeFileIsStreamed(compressor: String) throws {
        let scratch = try Scratch()
        let size = 50 * 1024 * 1024
        let tarPath = scratch.sub("big.tar")
        // Written in chunks so the test itself does not hold 50 MB either.
        #expect(FileManager.default.createFile(atPath: tarPath, contents: nil))
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: tarPath))
        try handle.write(contentsOf: TarBuilder.block(.init(name: "big.bin", size: size)))
        let chunk = pseudoRandom(1 << 20)
        for i in 0..<50 {
            var c = chunk
            c[0] = UInt8(i)
            try handle.write(contentsOf: c)
        }
        var tail = TarBuilder()
        tail.file("after", "tail")
        try handle.write(contentsOf: tail.ended())
        try handle.close()
        try sh("\(compressor) '\(tarPath)' > '\(tarPath).c'")

        let root = try scratch.directory("root")
        let summary = try LayerUnpacker(mode: .apply).unpack(layer: tarPath + ".c", into: root)
        #expect(summary.bytesWritten == Int64(size + 4))
        #expect(lstatPath(root + "/big.bin")?.st_size == size)
        #expect(contents(root + "/after") == "tail")
        let sums = try sh("dd if='\(tarPath)' bs=512 skip=1 count=\(size / 512) status=none | cmp - '\(root)/big.bin' && echo same")
        #expect(sums.contains("same"))
    }
}

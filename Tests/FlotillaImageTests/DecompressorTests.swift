import Foundation
import Testing
@testable import FlotillaImage

@Suite struct DecompressorTests {
    /// Reads a whole stream through small, odd-sized chunks.
    func drain(_ path: String) throws -> (LayerCompression, [UInt8]) {
        let d = try Decompressor(path: path)
        var out: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 3001)
        while true {
            let n = try buffer.withUnsafeMutableBytes { try d.read(into: $0) }
            if n == 0 { break }
            out += buffer.prefix(n)
        }
        return (d.compression, out)
    }

    @Test func sniffsAndDecodesEachFormat() throws {
        let scratch = try Scratch()
        let data = pseudoRandom(300_000)
        let plain = try scratch.write("data", data)
        try sh("gzip -c '\(plain)' > '\(plain).gz' && zstd -q -c '\(plain)' > '\(plain).zst'")

        let (c1, d1) = try drain(plain)
        #expect(c1 == .none)
        #expect(d1 == data)
        let (c2, d2) = try drain(plain + ".gz")
        #expect(c2 == .gzip)
        #expect(d2 == data)
        let (c3, d3) = try drain(plain + ".zst")
        #expect(c3 == .zstd)
        #expect(d3 == data)
    }

    @Test func emptyAndTinyPlainFiles() throws {
        let scratch = try Scratch()
        let (c0, d0) = try drain(try scratch.write("empty", []))
        #expect(c0 == .none)
        #expect(d0.isEmpty)
        let (c1, d1) = try drain(try scratch.write("one", [0x1f]))
        #expect(c1 == .none)
        #expect(d1 == [0x1f])
    }

    @Test func concatenatedGzipMembersAndTrailingZeros() throws {
        let scratch = try Scratch()
        let data = pseudoRandom(200_000)
        let parts = [data[0..<1], data[1..<150_000], data[150_000...]]
        for (i, part) in parts.enumerated() {
            let p = try scratch.write("part\(i)", Array(part))
            try sh("gzip -c '\(p)' > '\(p).gz'")
        }
        try sh("cd '\(scratch.path)' && cat part0.gz part1.gz part2.gz > all.gz")
        let (c, d) = try drain(scratch.sub("all.gz"))
        #expect(c == .gzip)
        #expect(d == data)

        try sh("cd '\(scratch.path)' && cp all.gz padded.gz && head -c 4096 /dev/zero >> padded.gz")
        #expect(try drain(scratch.sub("padded.gz")).1 == data)
    }

    @Test func concatenatedZstdFrames() throws {
        let scratch = try Scratch()
        let a = pseudoRandom(100_000, seed: 1)
        let b = pseudoRandom(100_000, seed: 2)
        let pa = try scratch.write("a", a)
        let pb = try scratch.write("b", b)
        try sh("zstd -q -c '\(pa)' > '\(scratch.sub("ab.zst"))' && zstd -q -c '\(pb)' >> '\(scratch.sub("ab.zst"))'")
        #expect(try drain(scratch.sub("ab.zst")).1 == a + b)
    }

    @Test(arguments: ["gzip -c", "zstd -q -c"])
    func truncatedStreamIsAnError(compressor: String) throws {
        let scratch = try Scratch()
        let p = try scratch.write("data", pseudoRandom(200_000))
        try sh("\(compressor) '\(p)' > '\(p).c' && head -c 20000 '\(p).c' > '\(p).cut'")
        let error = #expect(throws: LayerError.self) { try drain(p + ".cut") }
        #expect(error?.description.contains("truncated") == true)
    }

    @Test func corruptGzipIsAnError() throws {
        let scratch = try Scratch()
        let p = try scratch.write("data", pseudoRandom(100_000))
        try sh("gzip -c '\(p)' > '\(p).gz'")
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: p + ".gz")))
        for i in stride(from: 100, to: 2000, by: 7) { bytes[i] ^= 0x5a }
        let bad = try scratch.write("bad.gz", bytes)
        let error = #expect(throws: LayerError.self) { try drain(bad) }
        guard case .decompression(let message)? = error else {
            Issue.record("expected a decompression error, got \(String(describing: error))")
            return
        }
        #expect(message.hasPrefix("gzip: "))
    }

    @Test func garbageAfterGzipStreamIsAnError() throws {
        let scratch = try Scratch()
        let p = try scratch.write("data", Array("hello".utf8))
        try sh("gzip -c '\(p)' > '\(p).gz' && printf 'junk' >> '\(p).gz'")
        let error = #expect(throws: LayerError.self) { try drain(p + ".gz") }
        #expect(error?.description.contains("unexpected data after the end") == true)
    }

    @Test func missingFileNamesThePath() throws {
        let error = #expect(throws: LayerError.self) { try Decompressor(path: "/nonexistent/layer.tar") }
        #expect(error == .system(path: "/nonexistent/layer.tar", operation: "open layer", errno: ENOENT))
    }
}

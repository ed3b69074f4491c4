import FlotillaAPI
import Foundation
import Testing

@Suite struct AuditLogTests {
    func entry(_ number: Int) -> AuditEntry {
        AuditEntry(
            time: "2026-12-02T00:00:00.000Z", accessor: "a-\(number)", tokenName: nil, client: "127.0.0.1", method: "PUT",
            path: "/v1/kv/key-\(number)", status: 200, decision: "allowed")
    }

    @Test func theLogRotatesAndKeepsItsNewestFiles() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("audit-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let path = directory + "/audit.log"
        let log = try AuditLog(path: path, maxBytes: 4096, keep: 2)
        for number in 0..<300 { log.record(entry(number)) }
        let files = try FileManager.default.contentsOfDirectory(atPath: directory).sorted()
        #expect(files == ["audit.log", "audit.log.1", "audit.log.2"])
        for file in files {
            let size = try #require(try FileManager.default.attributesOfItem(atPath: directory + "/" + file)[.size] as? Int)
            #expect(size <= 4096 && size > 0)
        }
        // Oldest first, the newest last, across the files; only what rotation kept.
        let all = log.tail(10_000)
        #expect(all.last?.accessor == "a-299")
        let numbers = all.map { Int($0.accessor.dropFirst(2))! }
        #expect(numbers == Array(numbers.first!...299))
        #expect(numbers.first! > 0, "nothing was dropped by rotation?")
        #expect(log.tail(3).map(\.accessor) == ["a-297", "a-298", "a-299"])
        // A restarted agent appends to the file it finds, and rotates by its size.
        let reopened = try AuditLog(path: path, maxBytes: 4096, keep: 2)
        reopened.record(entry(300))
        #expect(reopened.tail(2).map(\.accessor) == ["a-299", "a-300"])
    }
}

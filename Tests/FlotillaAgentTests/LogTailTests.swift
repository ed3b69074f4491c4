@testable import FlotillaAgent
import FlotillaCore
import Foundation
import Testing

/// The forwarder's tail over real files in a temp directory, rotated the way the agent rotates them.
@Suite struct LogTailTests {
    let directory: String
    let logs: InstanceLogs

    init() throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("logtail-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        logs = InstanceLogs(directory: directory, maxBytes: 1 << 20, keep: 3)
    }

    func append(_ text: String) {
        InstanceLogs.append(text, to: logs.stdoutPath)
    }

    func texts(_ tail: inout LogTail) -> [String] {
        tail.observe()
        return tail.read(budget: 1 << 20, now: 0).map { String(decoding: $0.text, as: UTF8.self) }
    }

    func newTail() -> LogTail { LogTail(instance: "shop_web.1", app: "/shop/web", stream: .stdout, sandbox: directory) }

    @Test func readsWholeLinesAndWaitsForTheRest() {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        var tail = newTail()
        append("one\ntwo\nthr")
        #expect(texts(&tail) == ["one", "two"])
        append("ee\n")
        #expect(texts(&tail) == ["three"])
        #expect(tail.lag == 0)
    }

    @Test func followsRotationsWithoutLosingLines() {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        var tail = newTail()
        append("a1\na2\n")
        #expect(texts(&tail) == ["a1", "a2"])
        append("a3\n")
        logs.rotate(logs.stdoutPath)
        append("b1\n")
        #expect(texts(&tail) == ["a3", "b1"])
        // Two rotations between looks: both generations are found, oldest first.
        append("b2\n")
        logs.rotate(logs.stdoutPath)
        append("c1\n")
        logs.rotate(logs.stdoutPath)
        append("d1\n")
        #expect(texts(&tail) == ["b2", "c1", "d1"])
        #expect(tail.droppedBytes == 0)
    }

    @Test func resumesFromItsPositionAfterARotation() {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        var tail = newTail()
        append("a1\na2\n")
        #expect(texts(&tail) == ["a1", "a2"])
        let position = tail.position
        // While the agent is down the file grows and rotates.
        append("a3\n")
        logs.rotate(logs.stdoutPath)
        append("b1\n")
        var resumed = newTail()
        resumed.resume(from: position)
        #expect(texts(&resumed) == ["a3", "b1"])
    }

    @Test func countsWhatItDrops() {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        var tail = newTail()
        append("a1\n")
        #expect(texts(&tail) == ["a1"])
        append("a2\na3\n")
        logs.rotate(logs.stdoutPath)
        append("b1\n")
        tail.observe()
        let dropped = tail.dropOldest()
        #expect(dropped?.lines == 2)
        #expect(dropped?.bytes == 6)
        #expect(texts(&tail) == ["b1"])
        #expect(tail.droppedLines == 2)
    }

    @Test func cutsOverlongLines() {
        var lines: [(millis: Int64, text: [UInt8])] = []
        let long = [UInt8](repeating: UInt8(ascii: "x"), count: LogTail.maxLineBytes + 10) + [UInt8(ascii: "\n")]
        let used = LogTail.split(long, at: 0, index: LogTimeIndex(), now: 7, final: false, into: &lines)
        #expect(used == long.count)
        #expect(lines.map(\.text.count) == [LogTail.maxLineBytes, 10])
        #expect(lines.allSatisfy { $0.millis == 7 })
    }
}

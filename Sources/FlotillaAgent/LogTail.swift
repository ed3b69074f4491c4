import FlotillaCore
import Foundation
import Glibc

/// A log file generation the forwarder holds open while it still has lines to read from it: a
/// rotated copy (`stdout.1`) stays readable through this descriptor when the next rotation or
/// retention removes its name. Read with `pread`, so one handle needs no position and no lock.
final class OpenLogFile: @unchecked Sendable {
    let descriptor: Int32

    init?(path: String) {
        descriptor = open(path, O_RDONLY | O_CLOEXEC)
        if descriptor < 0 { return nil }
    }

    deinit { close(descriptor) }

    var size: UInt64 {
        var info = stat()
        return fstat(descriptor, &info) == 0 ? UInt64(info.st_size) : 0
    }

    func read(from offset: UInt64, count: Int) -> [UInt8] {
        guard count > 0 else { return [] }
        var bytes = [UInt8](repeating: 0, count: count)
        let got = bytes.withUnsafeMutableBytes { pread(descriptor, $0.baseAddress, count, off_t(offset)) }
        if got <= 0 { return [] }
        if got < count { bytes.removeSubrange(got...) }
        return bytes
    }
}

/// The forwarder's place in one stream of one instance (`<sandbox>/stdout`): where it has read to
/// in the current file, and the rotated generations it has yet to finish, oldest first.
///
/// Rotation copies the file to `.1` and truncates it (`InstanceLogs.rotate`). A tail notices it
/// when the file is shorter than its offset or no longer starts with the bytes it started with
/// (`head`), finds the generation that does (`.1`, or older after several rotations) and keeps it
/// open until read. A value type: the forwarder keeps the last acknowledged tails beside the ones
/// it reads ahead with, and goes back to them when a connection is lost.
struct LogTail: Sendable {
    struct Segment: Sendable {
        var file: OpenLogFile
        var offset: UInt64
        var end: UInt64
        var index: LogTimeIndex
        var head: [UInt8]
    }

    /// What a checkpoint keeps of a tail: the oldest unread file, named by its first bytes.
    struct Position: Codable, Sendable, Equatable {
        var offset: UInt64
        /// The file's first bytes (base64), to tell it from the generations after a rotation.
        var head: String
        /// The file's size when last seen, for what to report when it is gone.
        var size: UInt64
    }

    let instance: String
    let app: String
    let stream: LogStream
    let path: String
    private(set) var backlog: [Segment] = []
    private(set) var offset: UInt64 = 0
    private(set) var head: [UInt8] = []
    private(set) var size: UInt64 = 0
    /// The current file's time index, read as it grows (`indexRead` bytes of `.times` so far).
    private var index = LogTimeIndex()
    private var indexRead: UInt64 = 0
    /// When the current file last grew, to send a last line that never got its newline.
    private var grewAt = ContinuousClock.now
    /// Lines and bytes lost since the last notice, to report in the next batch.
    var droppedLines = 0
    var droppedBytes: UInt64 = 0

    static let headLength = 256
    /// A line longer than this is sent in pieces (a collector cuts long messages anyway).
    static let maxLineBytes = 64 << 10
    /// A last line without its newline is sent once the file has not grown for this long.
    static let partialLineDelay: Duration = .seconds(3)

    init(instance: String, app: String, stream: LogStream, sandbox: String) {
        self.instance = instance
        self.app = app
        self.stream = stream
        self.path = sandbox + "/" + stream.rawValue
    }

    /// Starts at the current end of the file (history is not replayed when forwarding is turned on).
    mutating func skipToEnd() {
        observe()
        offset = size
    }

    /// Resumes from a checkpoint: the file that still starts with the checkpoint's bytes is read on
    /// from its offset, the generations after it from their start. When none does (removed while
    /// the agent was down), what is left is read from the oldest generation, the loss counted.
    mutating func resume(from position: Position) {
        let wanted = Data(base64Encoded: position.head).map(Array.init) ?? []
        var generations: [String] = [path]
        var generation = 1
        while FileManager.default.fileExists(atPath: "\(path).\(generation)") {
            generations.append("\(path).\(generation)")
            generation += 1
        }
        var found: Int?
        for (number, file) in generations.enumerated() {
            guard let open = OpenLogFile(path: file) else { continue }
            let fileSize = open.size
            if fileSize >= position.offset, open.read(from: 0, count: wanted.count) == wanted, wanted.count > 0 || number == 0 {
                found = number
                break
            }
        }
        let start: Int
        var startOffset: UInt64 = 0
        if let found {
            start = found
            startOffset = position.offset
        } else {
            start = generations.count - 1
            droppedBytes += position.size > position.offset ? position.size - position.offset : 0
        }
        for number in stride(from: start, to: 0, by: -1) {
            guard let open = OpenLogFile(path: generations[number]) else { continue }
            let end = open.size
            backlog.append(
                Segment(
                    file: open, offset: number == start ? startOffset : 0, end: end, index: Self.readIndex(generations[number]),
                    head: open.read(from: 0, count: Self.headLength)))
        }
        offset = start == 0 ? startOffset : 0
        observe()
    }

    /// Where a checkpoint should resume this tail.
    var position: Position {
        if let oldest = backlog.first {
            return Position(offset: oldest.offset, head: Data(oldest.head).base64EncodedString(), size: oldest.end)
        }
        return Position(offset: offset, head: Data(head).base64EncodedString(), size: size)
    }

    /// Bytes written and not yet read.
    var lag: UInt64 {
        backlog.reduce(UInt64(0)) { $0 + ($1.end - $1.offset) } + (size > offset ? size - offset : 0)
    }

    /// Whether the stream is gone for good: its file removed and nothing left to read.
    var finished: Bool { backlog.isEmpty && !FileManager.default.fileExists(atPath: path) }

    /// Looks at the current file: its size, and whether it was rotated since (then the rest of
    /// what was being read is taken from the generation that holds it, kept open).
    mutating func observe() {
        guard let file = OpenLogFile(path: path) else {
            size = 0
            return
        }
        let newSize = file.size
        var rotated = newSize < offset
        // Same size or larger is no proof of the same file: it may have been rotated and refilled.
        if !rotated, !head.isEmpty {
            let compared = Int(min(UInt64(head.count), newSize))
            rotated = file.read(from: 0, count: compared) != Array(head.prefix(compared))
        }
        if rotated {
            holdRotatedGenerations()
            offset = 0
            head = []
            index = LogTimeIndex()
            indexRead = 0
        }
        if newSize != size { grewAt = .now }
        size = newSize
        if head.count < Self.headLength, size > UInt64(head.count) {
            head = file.read(from: 0, count: min(Self.headLength, Int(size)))
        }
    }

    /// After a rotation: the generation that starts as the current file did holds the unread rest;
    /// it and any newer generations are queued in order.
    private mutating func holdRotatedGenerations() {
        var generation = 1
        var newer: [Segment] = []
        while let open = OpenLogFile(path: "\(path).\(generation)") {
            let generationHead = open.read(from: 0, count: Self.headLength)
            let segment = Segment(file: open, offset: 0, end: open.size, index: Self.readIndex("\(path).\(generation)"), head: generationHead)
            if !head.isEmpty, generationHead.starts(with: head) || head.starts(with: generationHead) && !generationHead.isEmpty {
                var ours = segment
                ours.offset = min(offset, ours.end)
                backlog.append(ours)
                backlog += newer.reversed()
                return
            }
            newer.append(segment)
            generation += 1
        }
        // Not found: rotated more than `--log-keep` times between two looks, or removed.
        if size > offset {
            droppedBytes += size - offset
        }
        backlog += newer.reversed()
    }

    /// Reads up to `budget` bytes of whole lines, oldest first; each line with the time it was
    /// written (from the time index; lines the agent has not sampled yet: now).
    mutating func read(budget: Int, now: Int64) -> [(millis: Int64, text: [UInt8])] {
        var lines: [(millis: Int64, text: [UInt8])] = []
        var left = budget
        while left > 0, !backlog.isEmpty {
            var segment = backlog[0]
            let count = Int(min(UInt64(left), segment.end - segment.offset))
            let bytes = segment.file.read(from: segment.offset, count: count)
            // A generation's end ends its last line.
            let consumed = Self.split(bytes, at: segment.offset, index: segment.index, now: now, final: segment.offset + UInt64(bytes.count) >= segment.end, into: &lines)
            segment.offset += UInt64(consumed)
            left -= max(consumed, 1)
            if segment.offset >= segment.end || bytes.isEmpty {
                backlog.removeFirst()
            } else {
                backlog[0] = segment
                return lines
            }
        }
        guard left > 0, size > offset, let file = OpenLogFile(path: path) else { return lines }
        refreshIndex()
        let bytes = file.read(from: offset, count: Int(min(UInt64(left), size - offset)))
        let idle = ContinuousClock.now - grewAt >= Self.partialLineDelay
        offset += UInt64(Self.split(bytes, at: offset, index: index, now: now, final: idle && offset + UInt64(bytes.count) >= size, into: &lines))
        return lines
    }

    /// Appends the lines of `bytes` (read at `start`); a last piece without a newline only when
    /// `final` or too long to wait for. Returns the bytes used.
    static func split(
        _ bytes: [UInt8], at start: UInt64, index: LogTimeIndex, now: Int64, final: Bool, into lines: inout [(millis: Int64, text: [UInt8])]
    ) -> Int {
        var lineStart = 0
        var position = 0
        while position < bytes.count {
            if bytes[position] == UInt8(ascii: "\n") || position - lineStart >= maxLineBytes {
                let end = bytes[position] == UInt8(ascii: "\n") ? position + 1 : position
                let millis = index.millis(forLineEndingAt: start + UInt64(end)) ?? now
                lines.append((millis, Array(bytes[lineStart..<position])))
                lineStart = end
                position = end
            } else {
                position += 1
            }
        }
        if final, lineStart < bytes.count {
            lines.append((index.millis(forLineEndingAt: start + UInt64(bytes.count)) ?? now, Array(bytes[lineStart...])))
            lineStart = bytes.count
        }
        return lineStart
    }

    /// Drops the oldest unread generation (over the buffer's bound), counting its lines.
    mutating func dropOldest() -> (lines: Int, bytes: UInt64)? {
        guard !backlog.isEmpty else { return nil }
        let segment = backlog.removeFirst()
        var lines = 0
        var at = segment.offset
        while at < segment.end {
            let chunk = segment.file.read(from: at, count: Int(min(1 << 20, segment.end - at)))
            if chunk.isEmpty { break }
            lines += chunk.reduce(0) { $1 == UInt8(ascii: "\n") ? $0 + 1 : $0 }
            if at + UInt64(chunk.count) >= segment.end, chunk.last != UInt8(ascii: "\n") { lines += 1 }
            at += UInt64(chunk.count)
        }
        let bytes = segment.end - segment.offset
        droppedLines += lines
        droppedBytes += bytes
        return (lines, bytes)
    }

    /// Skips the current file's unread bytes up to `bytes` (at a line end), counting the lines.
    mutating func dropCurrent(upTo bytes: UInt64) -> (lines: Int, bytes: UInt64) {
        guard let file = OpenLogFile(path: path), size > offset else { return (0, 0) }
        let chunk = file.read(from: offset, count: Int(min(bytes, size - offset)))
        guard let lastNewline = chunk.lastIndex(of: UInt8(ascii: "\n")) else { return (0, 0) }
        let lines = chunk[...lastNewline].reduce(0) { $1 == UInt8(ascii: "\n") ? $0 + 1 : $0 }
        offset += UInt64(lastNewline + 1)
        droppedLines += lines
        droppedBytes += UInt64(lastNewline + 1)
        return (lines, UInt64(lastNewline + 1))
    }

    /// Reads what the sampler appended to the current file's `.times` since the last call.
    private mutating func refreshIndex() {
        guard let file = OpenLogFile(path: path + LogTimeIndex.fileSuffix) else { return }
        let indexSize = file.size
        if indexSize < indexRead {
            index = LogTimeIndex()
            indexRead = 0
        }
        guard indexSize > indexRead else { return }
        let bytes = file.read(from: indexRead, count: Int(indexSize - indexRead))
        guard let lastNewline = bytes.lastIndex(of: UInt8(ascii: "\n")) else { return }
        let added = LogTimeIndex.parse(bytes[...lastNewline])
        // Entries for bytes already read are never asked for again.
        index = LogTimeIndex(entries: index.entries.filter { $0.endOffset > offset } + added.entries)
        indexRead += UInt64(lastNewline + 1)
    }

    static func readIndex(_ file: String) -> LogTimeIndex {
        guard let open = OpenLogFile(path: file + LogTimeIndex.fileSuffix) else { return LogTimeIndex() }
        return LogTimeIndex.parse(open.read(from: 0, count: Int(open.size)))
    }
}

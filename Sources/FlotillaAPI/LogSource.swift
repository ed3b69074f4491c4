import FlotillaCore
import Foundation
import Glibc

/// One stream of one instance on this node, read as dated lines: its current file
/// (`<sandbox>/stdout`), the rotated generations before it (`stdout.1`, …) and their time indexes.
///
/// `initial` reads what a query asks for from the history; `poll` then returns the lines written
/// since, and follows a rotation (the lines between the last read and the rotation are read from
/// `.1`, so a follower loses none).
struct LogSource: Sendable {
    let instance: String
    let app: String
    let node: String
    let stream: LogStream
    /// The current file.
    let path: String
    /// Where the next `poll` reads from in the current file, and a line begun there but not ended.
    private(set) var offset: UInt64 = 0
    private var partial: [UInt8] = []
    /// The newest time given to a line so far.
    private var latest = Int64.min

    init(instance: String, app: String, node: String, stream: LogStream, sandbox: String) {
        self.instance = instance
        self.app = app
        self.node = node
        self.stream = stream
        self.path = sandbox + "/" + stream.rawValue
    }

    /// The newest `query.lines` lines that match, oldest first; reads older generations only while
    /// the newer ones hold too few. Afterwards `poll` goes on from the end of the current file.
    mutating func initial(_ query: LogQuery) -> [LogLine] {
        var collected: [[LogLine]] = []
        var count = 0
        var generation = 0
        while true {
            let file = generation == 0 ? path : "\(path).\(generation)"
            guard let size = Self.size(of: file) else {
                if generation == 0 {
                    generation += 1
                    continue  // not written yet, or removed: older generations may still be there
                }
                break
            }
            let index = LogTimeIndex.parse(Self.read(file + LogTimeIndex.fileSuffix, from: 0, to: nil))
            var start = query.sinceMillis.map { index.offset(forLinesFrom: $0) } ?? 0
            // Without a pattern the newest lines are at the end: read a window, widened if too short.
            let window = UInt64(min(query.lines, 1 << 30)) * 512 + 4096
            var lines: [LogLine] = []
            var end = size
            if query.pattern == nil, size > window, size - window > start {
                let windowed = datedLines(of: file, from: size - window, to: size, index: index, dropFirstPartial: true)
                lines = windowed.lines.filter(query.matches)
                end = windowed.end
                if lines.count < query.lines { lines = [] } else { start = size }
            }
            if lines.isEmpty && start < size {
                let read = datedLines(of: file, from: start, to: size, index: index, dropFirstPartial: false)
                lines = read.lines.filter(query.matches)
                end = read.end
            }
            if generation == 0 {
                offset = end
                // A line still being written is shown in a plain read; a follower waits for its end.
                if !query.follow, end < size {
                    let rest = Self.read(file, from: end, to: size)
                    let last = line(rest, index: index, endingAt: size, fallback: Self.modified(file))
                    if !rest.isEmpty, query.matches(last) { lines.append(last) }
                }
            }
            collected.insert(lines, at: 0)
            count += lines.count
            // Older generations hold only older lines: they are read only for lines still missing.
            if count >= query.lines || start > 0 { break }
            generation += 1
        }
        var lines = Array(collected.joined().suffix(query.lines))
        // File times come from the kernel's coarse clock, a few milliseconds behind the samples':
        // a source's times never go back, so the merge keeps every source in order.
        for position in lines.indices {
            lines[position].millis = max(lines[position].millis, latest)
            latest = lines[position].millis
        }
        return lines
    }

    /// The complete lines written since the last call (each dated when it was read: a follower
    /// sees lines within a poll of their writing).
    mutating func poll(_ query: LogQuery) -> [LogLine] {
        guard let size = Self.size(of: path) else { return [] }
        var bytes: [UInt8] = []
        if size < offset {
            // Rotated: the rest of what was read from is now the start of `.1`.
            bytes = Self.read(path + ".1", from: offset, to: nil)
            offset = 0
        }
        if size > offset {
            let current = Self.read(path, from: offset, to: size)
            bytes += current
            offset += UInt64(current.count)
        }
        guard !bytes.isEmpty else { return [] }
        let millis = max(latest, Int64((Date().timeIntervalSince1970 * 1000).rounded(.down)))
        latest = millis
        var lines: [LogLine] = []
        var start = 0
        for position in bytes.indices where bytes[position] == UInt8(ascii: "\n") {
            var text = partial
            text += bytes[start..<position]
            partial.removeAll(keepingCapacity: true)
            lines.append(LogLine(millis: millis, instance: instance, app: app, node: node, stream: stream, text: String(decoding: text, as: UTF8.self)))
            start = position + 1
        }
        partial += bytes[start...]
        return lines.filter(query.matches)
    }

    /// The lines of `[from, to)` of a file, dated by its index (past the index: by the file's last
    /// write); a last line without its newline is left for later. Returns where reading stopped.
    private func datedLines(of file: String, from: UInt64, to: UInt64, index: LogTimeIndex, dropFirstPartial: Bool) -> (lines: [LogLine], end: UInt64) {
        let bytes = Self.read(file, from: from, to: to)
        let fallback = Self.modified(file)
        var lines: [LogLine] = []
        var start = 0
        var first = true
        for position in bytes.indices where bytes[position] == UInt8(ascii: "\n") {
            defer {
                start = position + 1
                first = false
            }
            if first && dropFirstPartial { continue }
            lines.append(line(bytes[start..<position], index: index, endingAt: from + UInt64(position) + 1, fallback: fallback))
        }
        return (lines, from + UInt64(start))
    }

    private func line(_ bytes: some Collection<UInt8>, index: LogTimeIndex, endingAt end: UInt64, fallback: Int64) -> LogLine {
        LogLine(
            millis: index.millis(forLineEndingAt: end) ?? fallback, instance: instance, app: app, node: node, stream: stream,
            text: String(decoding: bytes, as: UTF8.self))
    }

    // Through FileManager rather than stat(2): in release builds the compiler takes `struct stat`
    // from Dispatch's C module, whose members this module may not name (MemberImportVisibility).
    static func size(of path: String) -> UInt64? {
        (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? NSNumber)?.uint64Value
    }

    /// The file's last write in milliseconds since 1970 (now when it cannot be read).
    static func modified(_ path: String) -> Int64 {
        let date = (try? FileManager.default.attributesOfItem(atPath: path)[.modificationDate] as? Date) ?? Date()
        return Int64((date.timeIntervalSince1970 * 1000).rounded(.down))
    }

    static func read(_ path: String, from: UInt64, to: UInt64?) -> [UInt8] {
        guard let handle = FileHandle(forReadingAtPath: path) else { return [] }
        defer { try? handle.close() }
        do {
            try handle.seek(toOffset: from)
            if let to {
                guard to > from else { return [] }
                return Array(try handle.read(upToCount: Int(to - from)) ?? Data())
            }
            return Array(try handle.readToEnd() ?? Data())
        } catch {
            return []
        }
    }
}

/// When the bytes of a log file were written, kept beside it (`stdout.times` for `stdout`).
///
/// Instances write their log files themselves (the agent is not in their output's path, so a
/// chatty instance never waits for it and an agent restart loses no line). The agent samples each
/// file's size about once a second and, when it grew, appends one line `<size> <unix ms>`: every
/// byte before `size` had been written by then. A line's time is the first sample that saw it
/// whole — at most one sampling period late, never early — and costs the writer nothing: one short
/// append per file per period that had output, however many lines that period brought.
///
/// ```
/// 1837 1717236000123
/// 4410 1717236001125
/// ```
public struct LogTimeIndex: Sendable, Equatable {
    public struct Entry: Sendable, Equatable {
        /// The file's size when sampled.
        public var endOffset: UInt64
        public var millis: Int64

        public init(endOffset: UInt64, millis: Int64) {
            self.endOffset = endOffset
            self.millis = millis
        }
    }

    /// Sizes and times both non-decreasing.
    public private(set) var entries: [Entry]

    public init(entries: [Entry] = []) {
        self.entries = []
        for entry in entries { append(entry) }
    }

    /// The suffix of the index file for a log file.
    public static let fileSuffix = ".times"

    /// Reads an index file's text; lines it cannot read, and entries that would go backwards (an
    /// index left from before a truncation), are skipped.
    public static func parse(_ bytes: some Sequence<UInt8>) -> LogTimeIndex {
        var index = LogTimeIndex()
        var fields: [UInt64] = [0, 0]
        var field = 0
        var digits = 0
        var valid = true
        for byte in bytes {
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"):
                if field < 2 {
                    fields[field] = fields[field] &* 10 &+ UInt64(byte - UInt8(ascii: "0"))
                    digits += 1
                }
            case UInt8(ascii: " "):
                if digits == 0 { valid = false }
                field += 1
                digits = 0
            case UInt8(ascii: "\n"):
                if valid, field == 1, digits > 0 { index.append(Entry(endOffset: fields[0], millis: Int64(truncatingIfNeeded: fields[1]))) }
                fields = [0, 0]
                field = 0
                digits = 0
                valid = true
            default:
                valid = false
            }
        }
        return index
    }

    /// The line an agent appends to the index file.
    public static func line(endOffset: UInt64, millis: Int64) -> String { "\(endOffset) \(millis)\n" }

    public mutating func append(_ entry: Entry) {
        if let last = entries.last, entry.endOffset <= last.endOffset || entry.millis < last.millis { return }
        entries.append(entry)
    }

    /// The time of a line whose last byte is just before `offset`: the first sample that saw the
    /// file that long. Nil when no sample has yet (the caller falls back to the file's mtime).
    public func millis(forLineEndingAt offset: UInt64) -> Int64? {
        var low = 0
        var high = entries.count
        while low < high {
            let middle = (low + high) / 2
            if entries[middle].endOffset < offset { low = middle + 1 } else { high = middle }
        }
        return low < entries.count ? entries[low].millis : nil
    }

    /// Where lines at or after `millis` begin: every line before this offset was sampled earlier.
    public func offset(forLinesFrom millis: Int64) -> UInt64 {
        var low = 0
        var high = entries.count
        while low < high {
            let middle = (low + high) / 2
            if entries[middle].millis < millis { low = middle + 1 } else { high = middle }
        }
        return low == 0 ? 0 : entries[low - 1].endOffset
    }
}

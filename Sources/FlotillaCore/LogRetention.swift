import Foundation

/// How long, and how much, of instances' logs a node keeps (`--log-retention 7d`, `1GiB`, `7d,1GiB`).
///
/// - `age`: a log file (a rotated generation, or any file of an instance that ended) is removed once
///   its last write is older than this.
/// - `bytes`: the node's logs together take at most this much; past it the oldest files go first.
///   The file a running instance writes now is never removed (`--log-max-mib` bounds it).
public struct LogRetention: Sendable, Equatable {
    public var age: Double?
    public var bytes: Int64?

    public init(age: Double? = nil, bytes: Int64? = nil) {
        self.age = age
        self.bytes = bytes
    }

    /// A week, and a gigabyte at most.
    public static let `default` = LogRetention(age: 7 * 86_400, bytes: 1 << 30)

    /// Parses a comma-separated duration and/or size: `7d`, `12h`, `500MB`, `1GiB`, `7d,1GiB`.
    /// - Throws: `FlotillaError.badRequest` naming the part it could not read.
    public static func parse(_ text: String) throws -> LogRetention {
        var retention = LogRetention()
        let parts = text.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
        guard !parts.isEmpty else { throw FlotillaError.badRequest("log retention '\(text)' is empty: give an age (7d), a size (1GiB), or both (7d,1GiB)") }
        for part in parts {
            if let bytes = byteSize(part) {
                guard retention.bytes == nil else { throw FlotillaError.badRequest("log retention '\(text)' gives two sizes") }
                retention.bytes = bytes
            } else if let seconds = LogDuration.seconds(part), seconds > 0 {
                guard retention.age == nil else { throw FlotillaError.badRequest("log retention '\(text)' gives two ages") }
                retention.age = seconds
            } else {
                throw FlotillaError.badRequest("log retention part '\(part)' is neither an age (30m, 12h, 7d) nor a size (500MB, 1GiB)")
            }
        }
        return retention
    }

    /// `500MB`, `1GiB`, `64k`: decimal and binary units, case-insensitive. A size needs its unit: a
    /// bare number would read as seconds too.
    static func byteSize(_ text: String) -> Int64? {
        let lowered = text.lowercased()
        let units: [(String, Double)] = [
            ("kib", 1024), ("mib", 1_048_576), ("gib", 1_073_741_824), ("tib", 1_099_511_627_776),
            ("kb", 1e3), ("mb", 1e6), ("gb", 1e9), ("tb", 1e12), ("k", 1024), ("m", 1_048_576), ("g", 1_073_741_824), ("b", 1),
        ]
        for (unit, scale) in units where lowered.hasSuffix(unit) {
            // `m` alone is minutes: sizes in mebibytes say `mib` or `mb`.
            if unit == "m" { return nil }
            guard let value = Double(lowered.dropLast(unit.count)), value > 0 else { return nil }
            return Int64(value * scale)
        }
        return nil
    }
}

/// Durations as logs take them: Go's syntax (`10m`, `1h30m`, `250ms`) plus days (`7d`, `1d12h`).
public enum LogDuration {
    public static func seconds(_ text: String) -> Double? {
        let trimmed = text.trimmingCharacters(in: .whitespaces)
        guard let dayMark = trimmed.firstIndex(of: "d") else { return GoDuration.seconds(trimmed) }
        guard let days = Double(trimmed[..<dayMark]), days >= 0 else { return nil }
        let rest = trimmed[trimmed.index(after: dayMark)...]
        if rest.isEmpty { return days * 86_400 }
        guard let more = GoDuration.seconds(String(rest)) else { return nil }
        return days * 86_400 + more
    }
}

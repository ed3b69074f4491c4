public import FlotillaCore
public import Foundation
import Glibc

/// Which log files `--log-retention` removes: pure over a listing, so it is tested without a node.
///
/// A file is a candidate when nobody writes it any more: a rotated generation (`stdout.2`), or any
/// file of an instance that no longer runs here. Candidates older than the age go; then, while the
/// node's logs together pass the size, the oldest candidates go. The file a running instance
/// writes is never removed. A file's time index (`.times`) goes with it.
public struct LogRetentionPlan: Sendable {
    public struct File: Sendable, Equatable {
        public var path: String
        public var bytes: Int64
        public var modified: Date
        /// A file an instance that runs writes now (`stdout`, `stderr` of a running instance).
        public var inUse: Bool

        public init(path: String, bytes: Int64, modified: Date, inUse: Bool) {
            self.path = path
            self.bytes = bytes
            self.modified = modified
            self.inUse = inUse
        }
    }

    public var retention: LogRetention

    public init(retention: LogRetention) {
        self.retention = retention
    }

    /// The paths to remove, oldest first.
    public func expired(_ files: [File], now: Date) -> [String] {
        var total = files.reduce(Int64(0)) { $0 + $1.bytes }
        var removed: [String] = []
        for file in files.filter({ !$0.inUse }).sorted(by: { $0.modified < $1.modified }) {
            let tooOld = retention.age.map { now.timeIntervalSince(file.modified) > $0 } ?? false
            let overBudget = retention.bytes.map { total > $0 } ?? false
            guard tooOld || overBudget else { continue }
            removed.append(file.path)
            total -= file.bytes
        }
        return removed
    }

    /// Whether a sandbox entry is a log file (`stdout`, `stderr.3`) or a time index of one.
    public static func isLogFile(_ name: String) -> Bool {
        let base = name.hasSuffix(LogTimeIndex.fileSuffix) ? String(name.dropLast(LogTimeIndex.fileSuffix.count)) : name
        for stream in LogStream.allCases {
            if base == stream.rawValue { return true }
            if base.hasPrefix(stream.rawValue + "."), Int(base.dropFirst(stream.rawValue.count + 1)) != nil { return true }
        }
        return false
    }

    /// The log files (with their indexes) of one sandbox, as `expired` takes them.
    static func files(inSandbox directory: String, running: Bool) -> [File] {
        var files: [File] = []
        for name in (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [] where isLogFile(name) {
            let path = directory + "/" + name
            var info = stat()
            guard stat(path, &info) == 0 else { continue }
            let modified = Date(timeIntervalSince1970: Double(info.st_mtim.tv_sec) + Double(info.st_mtim.tv_nsec) / 1e9)
            let inUse = running && LogStream.allCases.contains { name == $0.rawValue || name == $0.rawValue + LogTimeIndex.fileSuffix }
            files.append(File(path: path, bytes: Int64(info.st_size), modified: modified, inUse: inUse))
        }
        return files
    }
}

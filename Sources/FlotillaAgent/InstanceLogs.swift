import FlotillaCore
public import Foundation
import Glibc

/// An instance's `stdout` and `stderr` files in its sandbox, rotated by size, each with its time
/// index (`stdout.times`, see `LogTimeIndex`).
///
/// The process writes its files directly (opened `O_APPEND`), so its output never depends on the
/// agent being up: an agent restart loses no line and stalls no instance, and a line costs the
/// instance one `write` however fast it writes. The agent samples the files' sizes to date their
/// lines (`recordTimes`). Rotation copies the file to `.1` (shifting older ones) and truncates it
/// in place; `O_APPEND` writers continue at the new end. A line written between the copy and the
/// truncation can be lost; that is the price of not putting a relay process in front of every
/// instance.
public struct InstanceLogs: Sendable {
    public let directory: String
    public let maxBytes: Int64
    public let keep: Int

    public init(directory: String, maxBytes: Int64, keep: Int) {
        self.directory = directory
        self.maxBytes = maxBytes
        self.keep = keep
    }

    public var stdoutPath: String { directory + "/stdout" }
    public var stderrPath: String { directory + "/stderr" }

    /// Opens both files for the child to inherit. The caller closes them after the spawn.
    func openForProcess() throws -> (stdout: Int32, stderr: Int32) {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let out = open(stdoutPath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o640)
        guard out >= 0 else { throw AgentError.launch("cannot open \(stdoutPath): \(String(cString: strerror(errno)))") }
        let err = open(stderrPath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o640)
        guard err >= 0 else {
            close(out)
            throw AgentError.launch("cannot open \(stderrPath): \(String(cString: strerror(errno)))")
        }
        return (out, err)
    }

    /// The sizes of both files as last sampled (stdout, stderr), to tell whether they grew.
    public typealias SampledSizes = (stdout: Int64, stderr: Int64)

    /// Dates what the instance wrote since the last sample: each file that grew gets one line in its
    /// index (one `stat` per file, one short append per file that grew), then rotates if it has
    /// passed `maxBytes`. Returns the sizes to hand to the next call.
    public func recordTimes(since last: SampledSizes?, now: Date = Date()) -> SampledSizes {
        let millis = Int64((now.timeIntervalSince1970 * 1000).rounded(.down))
        var sizes: SampledSizes = (0, 0)
        for (index, path) in [stdoutPath, stderrPath].enumerated() {
            let previous = index == 0 ? last?.stdout : last?.stderr
            var size = Self.size(of: path) ?? 0
            if size > 0, size != previous {
                Self.append(LogTimeIndex.line(endOffset: UInt64(size), millis: millis), to: path + LogTimeIndex.fileSuffix)
            }
            if size > maxBytes {
                rotate(path)
                size = 0
            }
            if index == 0 { sizes.stdout = size } else { sizes.stderr = size }
        }
        return sizes
    }

    /// Marks the files' last write as now, when the instance has ended: retention counts an ended
    /// instance's logs from its end, not from the last line it wrote.
    public func markEnded() {
        for path in [stdoutPath, stderrPath] { utimes(path, nil) }
    }

    /// Rotates whichever file has grown past `maxBytes`.
    public func rotateIfNeeded() {
        for path in [stdoutPath, stderrPath] {
            guard let size = Self.size(of: path), size > maxBytes else { continue }
            rotate(path)
        }
    }

    /// Shifts the generations of a file and of its time index together, so `.N.times` always
    /// dates `.N`.
    func rotate(_ path: String) {
        let manager = FileManager.default
        let times = path + LogTimeIndex.fileSuffix
        if keep > 0 {
            for suffix in ["", LogTimeIndex.fileSuffix] {
                try? manager.removeItem(atPath: "\(path).\(keep)\(suffix)")
                if keep > 1 {
                    for generation in stride(from: keep - 1, through: 1, by: -1) {
                        try? manager.moveItem(atPath: "\(path).\(generation)\(suffix)", toPath: "\(path).\(generation + 1)\(suffix)")
                    }
                }
            }
            try? manager.copyItem(atPath: path, toPath: "\(path).1")
            try? manager.copyItem(atPath: times, toPath: "\(path).1\(LogTimeIndex.fileSuffix)")
        }
        truncate(path, 0)
        truncate(times, 0)
    }

    static func append(_ text: String, to path: String) {
        let descriptor = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o640)
        guard descriptor >= 0 else { return }
        defer { close(descriptor) }
        var bytes = Array(text.utf8)
        _ = bytes.withUnsafeMutableBytes { write(descriptor, $0.baseAddress, $0.count) }
    }

    /// The last `lines` lines of a log file, for failure messages.
    public static func tail(of path: String, lines: Int, maxBytes: Int = 8192) -> String {
        guard let handle = FileHandle(forReadingAtPath: path) else { return "" }
        defer { try? handle.close() }
        let size = (try? handle.seekToEnd()) ?? 0
        try? handle.seek(toOffset: size > UInt64(maxBytes) ? size - UInt64(maxBytes) : 0)
        let data = (try? handle.readToEnd()) ?? Data()
        let text = String(decoding: data, as: UTF8.self)
        return text.split(separator: "\n", omittingEmptySubsequences: false).suffix(lines + 1)
            .joined(separator: "\n").trimmingCharacters(in: .whitespacesAndNewlines)
    }

    static func size(of path: String) -> Int64? {
        var info = stat()
        guard stat(path, &info) == 0 else { return nil }
        return Int64(info.st_size)
    }
}

public enum AgentError: Error, CustomStringConvertible {
    case launch(String)

    public var description: String {
        switch self {
        case .launch(let message): return message
        }
    }
}

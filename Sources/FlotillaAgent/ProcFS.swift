import Foundation
import Glibc

/// Small readers of `/proc`, the agent's view of processes it did not start or has lost track of.
enum ProcFS {
    /// Field 22 of `/proc/<pid>/stat`: start time in clock ticks after boot. Nil if the pid is gone.
    static func startTicks(of pid: Int32) -> UInt64? {
        statFields(of: pid).flatMap { $0.count > 19 ? UInt64($0[19]) : nil }
    }

    /// Whether the pid names a process that still runs: not gone, and not a zombie waiting for its
    /// parent to collect it.
    static func isAlive(_ pid: Int32) -> Bool {
        guard let fields = statFields(of: pid), let state = fields.first else { return false }
        return state != "Z" && state != "X"
    }

    /// Session id (field 6), to find the leader of an instance's session.
    static func sessionID(of pid: Int32) -> Int32? {
        statFields(of: pid).flatMap { $0.count > 3 ? Int32($0[3]) : nil }
    }

    /// The fields after the command name (which may contain spaces and parentheses), from field 3 on.
    private static func statFields(of pid: Int32) -> [Substring]? {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
            let close = text.lastIndex(of: ")")
        else { return nil }
        return text[text.index(after: close)...].split(separator: " ")
    }

    /// Every pid on the machine.
    static func allPIDs() -> [Int32] {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).compactMap { Int32($0) }
    }

    /// The value of one environment variable of a process, if readable.
    static func environment(of pid: Int32, variable: String) -> String? {
        guard let data = FileManager.default.contents(atPath: "/proc/\(pid)/environ") else { return nil }
        let prefix = Array((variable + "=").utf8)
        for entry in data.split(separator: 0) where entry.starts(with: prefix) {
            return String(decoding: entry.dropFirst(prefix.count), as: UTF8.self)
        }
        return nil
    }
}

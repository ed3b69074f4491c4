import Foundation
import Glibc

/// What an instance has used, read from its cgroup (and below it: a container's cgroup) at one
/// moment. Counters are cumulative since the cgroup was made; gauges are the value now. A field the
/// node's cgroups cannot give is nil (and its metric is absent rather than zero).
public struct CgroupUsage: Sendable, Equatable {
    /// CPU time used, user and system, in seconds.
    public var cpuSeconds: Double?
    /// CFS periods in which the instance was throttled by its `resourceLimits.cpus` quota, and for how long.
    public var throttledPeriods: UInt64?
    public var throttledSeconds: Double?
    /// Memory in use the way the kernel's OOM decision sees it (usage minus inactive file cache:
    /// cAdvisor's and the kubelet's "working set").
    public var memoryBytes: UInt64?
    public var rssBytes: UInt64?
    public var cacheBytes: UInt64?
    /// The hard limit; nil when there is none.
    public var memoryLimitBytes: UInt64?
    /// Processes the kernel's OOM killer ended in the instance.
    public var oomKills: UInt64?
    /// Processes (v2: `pids.current`; v1: the pids controller's).
    public var processes: UInt64?
    /// Bytes read from and written to block devices (cgroup v2's `io.stat`).
    public var diskReadBytes: UInt64?
    public var diskWriteBytes: UInt64?

    public init() {}
}

extension Cgroups {
    /// The instance's usage now, or nil when it has no cgroup here (cgroups off, already removed).
    public func usage(instanceID: String) -> CgroupUsage? {
        switch mode {
        case .disabled:
            return nil
        case .v2(let parent):
            let directory = parent + "/" + instanceID
            guard let cpu = Self.readSmall(directory + "/cpu.stat") else { return nil }
            var usage = CgroupUsage()
            CgroupUsageParser.v2CPU(cpu, into: &usage)
            if let stat = Self.readSmall(directory + "/memory.stat"), let current = Self.readSmall(directory + "/memory.current").flatMap(CgroupUsageParser.number) {
                CgroupUsageParser.v2Memory(stat: stat, current: current, into: &usage)
            }
            usage.memoryLimitBytes = Self.readSmall(directory + "/memory.max").flatMap(CgroupUsageParser.limit)
            usage.oomKills = Self.readSmall(directory + "/memory.events").flatMap { CgroupUsageParser.keyed($0)["oom_kill"] }
            usage.processes = Self.readSmall(directory + "/pids.current").flatMap(CgroupUsageParser.number)
            if let io = Self.readSmall(directory + "/io.stat") { CgroupUsageParser.v2IO(io, into: &usage) }
            return usage
        case .v1(let parents):
            guard let memory = parents["memory"], let stat = Self.readSmall(memory + "/" + instanceID + "/memory.stat") else { return nil }
            var usage = CgroupUsage()
            let directory = memory + "/" + instanceID
            let current = Self.readSmall(directory + "/memory.usage_in_bytes").flatMap(CgroupUsageParser.number) ?? 0
            CgroupUsageParser.v1Memory(stat: stat, usage: current, into: &usage)
            usage.memoryLimitBytes = Self.readSmall(directory + "/memory.limit_in_bytes").flatMap(CgroupUsageParser.limit)
            usage.oomKills = Self.readSmall(directory + "/memory.oom_control").flatMap { CgroupUsageParser.keyed($0)["oom_kill"] }
            if let cpu = parents["cpu"], let text = Self.readSmall(cpu + "/" + instanceID + "/cpu.stat") {
                CgroupUsageParser.v1Throttling(text, into: &usage)
            }
            // cpuacct is mounted with cpu on most hosts (its files are in the cpu directory), on
            // its own on some.
            for controller in ["cpuacct", "cpu"] {
                if let parent = parents[controller], let nanoseconds = Self.readSmall(parent + "/" + instanceID + "/cpuacct.usage").flatMap(CgroupUsageParser.number) {
                    usage.cpuSeconds = Double(nanoseconds) / 1e9
                    break
                }
            }
            if let pids = parents["pids"] {
                usage.processes = Self.readSmall(pids + "/" + instanceID + "/pids.current").flatMap(CgroupUsageParser.number)
            }
            return usage
        }
    }

    /// A control file's contents (they are a few hundred bytes; `memory.stat` a few KiB), read
    /// with one `read` into a stack-sized buffer: no FileHandle, no Data.
    static func readSmall(_ path: String, capacity: Int = 8192) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: capacity)
        var total = 0
        while total < bytes.count {
            let count = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress! + total, $0.count - total) }
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { break }
            total += count
        }
        return String(decoding: bytes[0..<total], as: UTF8.self)
    }
}

/// The cgroup control files' formats, apart from reading them (tested on their own).
enum CgroupUsageParser {
    /// "key value" lines (`cpu.stat`, `memory.stat`, `memory.events`, `memory.oom_control`).
    static func keyed(_ text: String) -> [Substring: UInt64] {
        var values: [Substring: UInt64] = [:]
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: " ", maxSplits: 1)
            if parts.count == 2, let value = UInt64(parts[1].trimmingCharacters(in: .whitespaces)) { values[parts[0]] = value }
        }
        return values
    }

    static func number(_ text: String) -> UInt64? {
        UInt64(text.trimmingCharacters(in: .whitespacesAndNewlines))
    }

    /// A limit file: "max" (v2) or a page-rounded `LONG_MAX` (v1) mean none.
    static func limit(_ text: String) -> UInt64? {
        let trimmed = text.trimmingCharacters(in: .whitespacesAndNewlines)
        guard trimmed != "max", let value = UInt64(trimmed), value < (1 << 62) else { return nil }
        return value
    }

    static func v2CPU(_ text: String, into usage: inout CgroupUsage) {
        let values = keyed(text)
        if let micros = values["usage_usec"] { usage.cpuSeconds = Double(micros) / 1e6 }
        usage.throttledPeriods = values["nr_throttled"]
        if let micros = values["throttled_usec"] { usage.throttledSeconds = Double(micros) / 1e6 }
    }

    static func v2Memory(stat: String, current: UInt64, into usage: inout CgroupUsage) {
        let values = keyed(stat)
        let inactiveFile = values["inactive_file"] ?? 0
        usage.memoryBytes = current > inactiveFile ? current - inactiveFile : 0
        usage.rssBytes = values["anon"]
        usage.cacheBytes = values["file"]
    }

    /// v1's `memory.stat` counts this cgroup alone in `rss`/`cache` and with its children in
    /// `total_*`: the totals are the instance's (a container's cgroup is a child).
    static func v1Memory(stat: String, usage current: UInt64, into usage: inout CgroupUsage) {
        let values = keyed(stat)
        let inactiveFile = values["total_inactive_file"] ?? values["inactive_file"] ?? 0
        usage.memoryBytes = current > inactiveFile ? current - inactiveFile : 0
        usage.rssBytes = values["total_rss"] ?? values["rss"]
        usage.cacheBytes = values["total_cache"] ?? values["cache"]
    }

    static func v1Throttling(_ text: String, into usage: inout CgroupUsage) {
        let values = keyed(text)
        usage.throttledPeriods = values["nr_throttled"]
        if let nanoseconds = values["throttled_time"] { usage.throttledSeconds = Double(nanoseconds) / 1e9 }
    }

    /// `io.stat`: one line per device, `MAJ:MIN rbytes=N wbytes=N rios=N …`; summed over devices.
    static func v2IO(_ text: String, into usage: inout CgroupUsage) {
        var read: UInt64 = 0, written: UInt64 = 0
        for line in text.split(separator: "\n") {
            for field in line.split(separator: " ").dropFirst() {
                let pair = field.split(separator: "=", maxSplits: 1)
                guard pair.count == 2, let value = UInt64(pair[1]) else { continue }
                if pair[0] == "rbytes" { read &+= value } else if pair[0] == "wbytes" { written &+= value }
            }
        }
        usage.diskReadBytes = read
        usage.diskWriteBytes = written
    }
}

import Foundation
import Glibc

/// The node's own use of CPU, memory, disk and load, from `/proc` and `statvfs`.
public struct NodeUsage: Sendable, Equatable {
    /// CPU seconds since boot by mode (`user`, `nice`, `system`, `idle`, `iowait`, `irq`,
    /// `softirq`, `steal`), summed over CPUs, as node_exporter's `node_cpu_seconds_total` has them.
    public var cpuSeconds: [String: Double] = [:]
    public var cpus = 0
    public var memoryTotalBytes: UInt64 = 0
    /// `MemAvailable`: what can be given to new work without swapping.
    public var memoryAvailableBytes: UInt64 = 0
    public var load1 = 0.0, load5 = 0.0, load15 = 0.0
    /// The file system of the data directory (sandboxes, images, state).
    public var diskTotalBytes: UInt64 = 0
    public var diskFreeBytes: UInt64 = 0

    public init() {}

    /// Reads it all now; `dataDirectory` names the file system to measure.
    public static func read(dataDirectory: String) -> NodeUsage {
        var usage = NodeUsage()
        if let stat = Cgroups.readSmall("/proc/stat", capacity: 1 << 16) { NodeUsageParser.cpu(stat, into: &usage) }
        if let meminfo = Cgroups.readSmall("/proc/meminfo") { NodeUsageParser.memory(meminfo, into: &usage) }
        if let loadavg = Cgroups.readSmall("/proc/loadavg") { NodeUsageParser.load(loadavg, into: &usage) }
        var fs = statvfs()
        if statvfs(dataDirectory, &fs) == 0 {
            usage.diskTotalBytes = UInt64(fs.f_blocks) * UInt64(fs.f_frsize)
            usage.diskFreeBytes = UInt64(fs.f_bavail) * UInt64(fs.f_frsize)
        }
        return usage
    }
}

enum NodeUsageParser {
    static let cpuModes = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"]

    /// `/proc/stat`'s first line (all CPUs) in USER_HZ ticks, and a count of the `cpuN` lines.
    static func cpu(_ text: String, into usage: inout NodeUsage, ticksPerSecond: Double = Double(sysconf(Int32(_SC_CLK_TCK)))) {
        var cpus = 0
        for line in text.split(separator: "\n") where line.hasPrefix("cpu") {
            let fields = line.split(separator: " ")
            if fields[0] == "cpu" {
                for (mode, value) in zip(cpuModes, fields.dropFirst()) {
                    if let ticks = Double(value) { usage.cpuSeconds[mode] = ticks / max(ticksPerSecond, 1) }
                }
            } else {
                cpus += 1
            }
        }
        usage.cpus = cpus
    }

    static func memory(_ text: String, into usage: inout NodeUsage) {
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: " ", omittingEmptySubsequences: true)
            guard parts.count >= 2, let kib = UInt64(parts[1]) else { continue }
            switch parts[0] {
            case "MemTotal:": usage.memoryTotalBytes = kib * 1024
            case "MemAvailable:": usage.memoryAvailableBytes = kib * 1024
            default: break
            }
        }
    }

    static func load(_ text: String, into usage: inout NodeUsage) {
        let parts = text.split(separator: " ")
        guard parts.count >= 3 else { return }
        usage.load1 = Double(parts[0]) ?? 0
        usage.load5 = Double(parts[1]) ?? 0
        usage.load15 = Double(parts[2]) ?? 0
    }

    /// `/proc/<pid>/net/dev`: received and sent bytes over every interface but loopback.
    static func network(_ text: String) -> (received: UInt64, transmitted: UInt64) {
        var received: UInt64 = 0, transmitted: UInt64 = 0
        for line in text.split(separator: "\n") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            let name = line[..<colon].trimmingCharacters(in: .whitespaces)
            if name == "lo" || name.isEmpty { continue }
            let fields = line[line.index(after: colon)...].split(separator: " ")
            guard fields.count >= 9, let rx = UInt64(fields[0]), let tx = UInt64(fields[8]) else { continue }
            received &+= rx
            transmitted &+= tx
        }
        return (received, transmitted)
    }
}

extension ProcFS {
    /// The network namespace a process is in (`net:[4026531840]`), nil when it is gone.
    static func networkNamespace(of pid: Int32) -> String? {
        var buffer = [CChar](repeating: 0, count: 64)
        let count = readlink("/proc/\(pid)/ns/net", &buffer, buffer.count - 1)
        guard count > 0 else { return nil }
        return String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// Bytes through the network namespace of `pid` (loopback left out).
    static func networkBytes(of pid: Int32) -> (received: UInt64, transmitted: UInt64)? {
        Cgroups.readSmall("/proc/\(pid)/net/dev").map(NodeUsageParser.network)
    }
}

import Foundation
import Glibc
public import Logging

/// Puts each instance in its own cgroup under the agent's own, with memory and CPU limits, on
/// cgroup v2 (unified) or v1 (one hierarchy per controller). Without permission it says so once and
/// the agent runs instances without limits.
public struct Cgroups: Sendable {
    public enum Mode: Sendable, Equatable {
        /// The directory under which instance cgroups are made (`<agent cgroup>/flotilla`).
        case v2(parent: String)
        /// Per controller (`memory`, `cpu`, `pids`, and `cpuacct` where it is mounted apart from
        /// `cpu`), the directory instance cgroups go under.
        case v1(parents: [String: String])
        case disabled(reason: String)
    }

    public let mode: Mode

    public init(mode: Mode) {
        self.mode = mode
    }

    /// Finds the agent's own cgroup (`/proc/self/cgroup`) and prepares a `flotilla` child under it.
    public static func detect(namespace: String, logger: Logger) -> Cgroups {
        let cgroups = detectMode(namespace: namespace)
        switch cgroups.mode {
        case .disabled(let reason):
            logger.warning("running instances without resource limits: \(reason)")
        case .v1(let parents):
            logger.info("cgroup v1: instance cgroups under \(parents.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " "))")
        case .v2(let parent):
            logger.info("cgroup v2: instance cgroups under \(parent)")
        }
        return cgroups
    }

    static func detectMode(namespace: String) -> Cgroups {
        guard let membership = try? String(contentsOfFile: "/proc/self/cgroup", encoding: .utf8) else {
            return Cgroups(mode: .disabled(reason: "/proc/self/cgroup is not readable"))
        }
        let mounts = CgroupMounts.read()
        var v1Paths: [String: String] = [:]
        var v2Path: String?
        for line in membership.split(separator: "\n") {
            let parts = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            guard parts.count == 3 else { continue }
            if parts[1].isEmpty {
                v2Path = String(parts[2])
            } else {
                for controller in parts[1].split(separator: ",") { v1Paths[String(controller)] = String(parts[2]) }
            }
        }
        // Unified (v2) when its mount offers the memory controller; otherwise v1.
        if let v2Path, let mount = mounts.unified,
            let controllers = try? String(contentsOfFile: mount + "/cgroup.controllers", encoding: .utf8),
            controllers.split(whereSeparator: \.isWhitespace).contains("memory")
        {
            return prepareV2(mount: mount, ownPath: v2Path, namespace: namespace)
        }
        var parents: [String: String] = [:]
        var problems: [String] = []
        // cpuacct (CPU time, for metrics) gets a directory of its own only where it is not
        // mounted with cpu; it is optional.
        var controllers = ["memory", "cpu", "pids"]
        if let cpuacct = mounts.v1["cpuacct"], cpuacct != mounts.v1["cpu"] { controllers.append("cpuacct") }
        for controller in controllers {
            guard let mount = mounts.v1[controller], let path = v1Paths[controller] else {
                if controller != "cpuacct" { problems.append("no \(controller) controller mounted") }
                continue
            }
            let parent = join(mount, path, namespace)
            do {
                try makeDirectory(parent)
                parents[controller] = parent
            } catch {
                problems.append("cannot create \(parent): \(error)")
            }
        }
        guard parents["memory"] != nil else {
            return Cgroups(mode: .disabled(reason: problems.joined(separator: "; ")))
        }
        return Cgroups(mode: .v1(parents: parents))
    }

    /// v2 forbids processes in a cgroup whose children have controllers, so the agent first moves
    /// itself into a leaf (`flotilla-agent`) beside the instances' parent.
    static func prepareV2(mount: String, ownPath: String, namespace: String) -> Cgroups {
        var base = join(mount, ownPath)
        if base.hasSuffix("/flotilla-agent") { base = String(base.dropLast("/flotilla-agent".count)) }
        do {
            if base != mount {
                let leaf = base + "/flotilla-agent"
                try makeDirectory(leaf)
                try write("\(getpid())", to: leaf + "/cgroup.procs")
            }
            try write("+memory +cpu +pids", to: base + "/cgroup.subtree_control")
            let parent = base + "/" + namespace
            try makeDirectory(parent)
            try write("+memory +cpu +pids", to: parent + "/cgroup.subtree_control")
            // Disk I/O accounting (`io.stat`, for metrics) where the io controller is offered.
            if (try? write("+io", to: base + "/cgroup.subtree_control")) != nil { try? write("+io", to: parent + "/cgroup.subtree_control") }
            return Cgroups(mode: .v2(parent: parent))
        } catch {
            return Cgroups(mode: .disabled(reason: "cannot prepare cgroup v2 under \(base): \(error)"))
        }
    }

    public var isEnabled: Bool {
        if case .disabled = mode { return false }
        return true
    }

    /// Creates the instance's cgroups with its limits and returns the `cgroup.procs` files the new
    /// process must join.
    /// - Parameters:
    ///   - memoryMiB: the hard memory limit; nil for none (`resourceLimits.mem: "unlimited"`).
    ///   - cpus: the CPU weight.
    ///   - cpuLimit: a CFS quota in CPUs (`resourceLimits.cpus`); nil for none.
    public func create(instanceID: String, memoryMiB: Double?, cpus: Double, cpuLimit: Double? = nil) throws -> [String] {
        let memoryBytes = memoryMiB.flatMap { $0 > 0 ? Int64($0 * 1024 * 1024) : nil }
        let shares = max(2, Int(cpus * 1024))
        let period = 100_000
        let quota = cpuLimit.map { max(1000, Int($0 * Double(period))) }
        switch mode {
        case .disabled:
            return []
        case .v2(let parent):
            let directory = parent + "/" + instanceID
            try Self.makeDirectory(directory)
            if let memoryBytes {
                try Self.write("\(memoryBytes)", to: directory + "/memory.max")
                try? Self.write("0", to: directory + "/memory.swap.max")
            }
            // cgroup v2 weight from v1 shares, the conversion runc and systemd use.
            let weight = min(10_000, max(1, 1 + ((shares - 2) * 9999) / 262_142))
            try? Self.write("\(weight)", to: directory + "/cpu.weight")
            if let quota { try Self.write("\(quota) \(period)", to: directory + "/cpu.max") }
            return [directory + "/cgroup.procs"]
        case .v1(let parents):
            var procs: [String] = []
            for (controller, parent) in parents.sorted(by: { $0.key < $1.key }) {
                let directory = parent + "/" + instanceID
                try Self.makeDirectory(directory)
                switch controller {
                case "memory":
                    if let memoryBytes {
                        try Self.write("\(memoryBytes)", to: directory + "/memory.limit_in_bytes")
                        // Keep swap out of it where the kernel accounts swap, so the limit is the limit.
                        try? Self.write("\(memoryBytes)", to: directory + "/memory.memsw.limit_in_bytes")
                    }
                case "cpu":
                    try? Self.write("\(shares)", to: directory + "/cpu.shares")
                    if let quota {
                        try Self.write("\(period)", to: directory + "/cpu.cfs_period_us")
                        try Self.write("\(quota)", to: directory + "/cpu.cfs_quota_us")
                    }
                default:
                    break
                }
                procs.append(directory + "/cgroup.procs")
            }
            return procs
        }
    }

    /// Whether the kernel's OOM killer killed a process in the instance's cgroup, or in one below
    /// it (a container's, whose own limit may be the one that was hit).
    public func wasOOMKilled(instanceID: String) -> Bool {
        let directory: String
        let fileName: String
        switch mode {
        case .disabled: return false
        case .v2(let parent):
            directory = parent + "/" + instanceID
            fileName = "memory.events"
        case .v1(let parents):
            guard let memory = parents["memory"] else { return false }
            directory = memory + "/" + instanceID
            fileName = "memory.oom_control"
        }
        for cgroup in Self.tree(directory) {
            guard let text = try? String(contentsOfFile: cgroup + "/" + fileName, encoding: .utf8) else { continue }
            for line in text.split(separator: "\n") {
                let parts = line.split(separator: " ")
                if parts.count == 2, parts[0] == "oom_kill", let count = Int(parts[1]), count > 0 { return true }
            }
        }
        return false
    }

    /// Every process still in the instance's cgroup, or in a cgroup below it (a container runtime
    /// puts the container in a child cgroup of the instance's).
    public func processes(instanceID: String) -> [Int32] {
        var pids: Set<Int32> = []
        for directory in directories(instanceID: instanceID).flatMap(Self.tree) {
            if let text = try? String(contentsOfFile: directory + "/cgroup.procs", encoding: .utf8) {
                pids.formUnion(text.split(separator: "\n").compactMap { Int32($0) })
            }
        }
        return pids.sorted()
    }

    /// Removes the instance's cgroups; a cgroup with processes left in it cannot be removed.
    public func remove(instanceID: String) {
        for directory in directories(instanceID: instanceID) {
            // Children first: a cgroup with child cgroups cannot be removed either.
            for path in Self.tree(directory).reversed() { rmdir(path) }
        }
    }

    /// A cgroup directory and every cgroup below it, parents before children.
    static func tree(_ directory: String) -> [String] {
        var result = [directory]
        var index = 0
        while index < result.count {
            let current = result[index]
            index += 1
            for entry in subdirectories(of: current) { result.append(current + "/" + entry) }
        }
        return result
    }

    /// The directories in a directory, from the entries' own type (cgroupfs fills it in): a cgroup
    /// holds dozens of control files, and a stat of each cost more than the rest of a start.
    static func subdirectories(of directory: String) -> [String] {
        guard let stream = opendir(directory) else { return [] }
        defer { closedir(stream) }
        var names: [String] = []
        while let entry = readdir(stream) {
            let type = entry.pointee.d_type
            guard type == UInt8(DT_DIR) || type == UInt8(DT_UNKNOWN) else { continue }
            let name = withUnsafePointer(to: entry.pointee.d_name) { pointer in
                pointer.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            if name == "." || name == ".." { continue }
            if type == UInt8(DT_UNKNOWN) {
                var info = stat()
                guard stat(directory + "/" + name, &info) == 0, info.st_mode & S_IFMT == S_IFDIR else { continue }
            }
            names.append(name)
        }
        return names
    }

    /// The instance's cgroup as a path below the hierarchy's root (what an OCI runtime's
    /// `cgroupsPath` names), taken from the memory hierarchy on v1.
    public func relativePath(instanceID: String) -> String? {
        let mounts = CgroupMounts.read()
        switch mode {
        case .disabled: return nil
        case .v2(let parent):
            guard let mount = mounts.unified, parent.hasPrefix(mount) else { return nil }
            return Self.join(String(parent.dropFirst(mount.count)), instanceID)
        case .v1(let parents):
            guard let memory = parents["memory"], let mount = mounts.v1["memory"], memory.hasPrefix(mount) else { return nil }
            return Self.join(String(memory.dropFirst(mount.count)), instanceID)
        }
    }

    /// Instance ids that have a cgroup, for finding leftovers after a crash.
    public func instanceIDs() -> [String] {
        let parent: String
        switch mode {
        case .disabled: return []
        case .v2(let directory): parent = directory
        case .v1(let parents):
            guard let memory = parents["memory"] else { return [] }
            parent = memory
        }
        return Self.subdirectories(of: parent)
    }

    private func directories(instanceID: String) -> [String] {
        switch mode {
        case .disabled: return []
        case .v2(let parent): return [parent + "/" + instanceID]
        case .v1(let parents): return parents.values.sorted().map { $0 + "/" + instanceID }
        }
    }

    static func join(_ parts: String...) -> String {
        var path = ""
        for part in parts {
            let trimmed = part.trimmingCharacters(in: CharacterSet(charactersIn: "/"))
            if !trimmed.isEmpty { path += "/" + trimmed }
        }
        return path.isEmpty ? "/" : path
    }

    static func makeDirectory(_ path: String) throws {
        if mkdir(path, 0o755) != 0 && errno != EEXIST {
            throw CgroupError(path: path, errno: errno)
        }
    }

    static func write(_ value: String, to path: String) throws {
        let fd = open(path, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { throw CgroupError(path: path, errno: errno) }
        defer { close(fd) }
        let bytes = Array(value.utf8)
        guard Glibc.write(fd, bytes, bytes.count) == bytes.count else { throw CgroupError(path: path, errno: errno) }
    }
}

struct CgroupError: Error, CustomStringConvertible {
    let path: String
    let errno: Int32
    var description: String { "\(path): \(String(cString: strerror(errno)))" }
}

/// Where the cgroup hierarchies are mounted, from `/proc/self/mountinfo`.
struct CgroupMounts {
    var unified: String?
    var v1: [String: String] = [:]

    static func read() -> CgroupMounts {
        var mounts = CgroupMounts()
        guard let text = try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8) else { return mounts }
        for line in text.split(separator: "\n") {
            // "... mountpoint options - fstype source superoptions"
            let halves = line.components(separatedBy: " - ")
            guard halves.count == 2 else { continue }
            let left = halves[0].split(separator: " "), right = halves[1].split(separator: " ")
            guard left.count >= 5, right.count >= 3 else { continue }
            let mountPoint = String(left[4])
            if right[0] == "cgroup2" {
                if mounts.unified == nil || mountPoint == "/sys/fs/cgroup" { mounts.unified = mountPoint }
            } else if right[0] == "cgroup" {
                for option in right[2].split(separator: ",") where ["memory", "cpu", "pids", "cpuacct"].contains(String(option)) {
                    mounts.v1[String(option)] = mountPoint
                }
            }
        }
        return mounts
    }
}

import FlotillaCore
import FlotillaImage
import Foundation
import Glibc

/// The OCI runtime bundle's `config.json` for one instance (runtime-spec 1.0): the image's
/// process defaults overridden by the app as Docker overrides them, Flotilla's environment,
/// Docker's default capabilities and masked paths, the sandbox at `/mnt/mesos/sandbox`, the
/// app's volumes, and the instance's cgroup.
struct OCIBundle {
    /// Where the sandbox appears inside the container (Mesos' path, which Marathon apps expect).
    static let containerSandbox = "/mnt/mesos/sandbox"

    /// Docker's default capability set.
    static let defaultCapabilities = [
        "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID",
        "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
    ]

    var spec: InstanceSpec
    var image: ImageConfiguration.ContainerConfig
    var rootfs: String
    var sandbox: String
    /// Files made for the instance and bound over the image's (`/etc/hosts`, `/etc/hostname`, `/etc/resolv.conf`).
    var etcFiles: [String: String]
    /// The network namespace to join (bridge networking); nil shares the node's network.
    var networkNamespace: String?
    var cgroupsPath: String?
    var user: (uid: UInt32, gid: UInt32, additionalGids: [UInt32])
    /// Secret values by name, for `env` entries that refer to them.
    var secrets: [String: String] = [:]
    /// Files holding secret values, bound read-only at their container paths (container path → file on the node).
    var secretFiles: [String: String] = [:]
    /// The agent's own additions to the environment (the workload token).
    var extraEnvironment: [String: String] = [:]

    /// The argument vector: `cmd` runs through `/bin/sh -c` in place of the entrypoint, `args`
    /// replace the image's `Cmd` after its entrypoint, as Mesos' Docker containerizer does.
    static func arguments(definition: AppDefinition, image: ImageConfiguration.ContainerConfig) throws -> [String] {
        if let command = definition.cmd, !command.trimmingCharacters(in: .whitespaces).isEmpty {
            return ["/bin/sh", "-c", command]
        }
        let entrypoint = image.entrypoint ?? []
        let arguments = entrypoint + ((definition.args?.isEmpty == false ? definition.args : image.cmd) ?? [])
        guard !arguments.isEmpty else {
            throw AgentError.launch("the image has no entrypoint or command; give the app 'cmd' or 'args'")
        }
        return arguments
    }

    /// The container's environment: the image's, Flotilla's and Marathon's variables, the
    /// `env` docker parameters, then the app's `env` (later entries win).
    static func environment(
        for spec: InstanceSpec, image: ImageConfiguration.ContainerConfig, secrets: [String: String] = [:], extraEnvironment: [String: String] = [:]
    ) -> [String] {
        var values: [String: String] = [:]
        var order: [String] = []
        func set(_ key: String, _ value: String) {
            if values[key] == nil { order.append(key) }
            values[key] = value
        }
        for entry in image.env ?? [] {
            guard let equals = entry.firstIndex(of: "=") else { continue }
            set(String(entry[..<equals]), String(entry[entry.index(after: equals)...]))
        }
        if values["PATH"] == nil { set("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin") }
        var flotilla = InstanceEnvironment.build(
            for: spec, sandbox: containerSandbox, agentEnvironment: [:], secrets: secrets, extraEnvironment: extraEnvironment)
        // The node's PATH means nothing inside the image; HOME stays the image's (or /root).
        flotilla.removeValue(forKey: "PATH")
        flotilla.removeValue(forKey: "HOME")
        for key in flotilla.keys.sorted() { set(key, flotilla[key]!) }
        if values["HOME"] == nil { set("HOME", "/root") }
        for (key, value) in spec.definition.container?.parameterEnvironment ?? [] { set(key, value) }
        for (key, value) in spec.definition.env.sorted(by: { $0.key < $1.key }) {
            switch value {
            case .value(let text): set(key, text)
            case .secret(let name): if let text = secrets[name] { set(key, text) }
            }
        }
        return order.map { "\($0)=\(values[$0]!)" }
    }

    func configuration() throws -> JSONValue {
        let definition = spec.definition
        let arguments = try Self.arguments(definition: definition, image: image)
        let workingDirectory = definition.container?.workingDirectory ?? image.workingDir.flatMap { $0.isEmpty ? nil : $0 } ?? "/"
        let capabilities = JSONValue.array(Self.defaultCapabilities.map(JSONValue.string))
        var namespaces: [JSONValue] = ["pid", "ipc", "uts", "mount"].map { .object(["type": .string($0)]) }
        if let networkNamespace {
            namespaces.append(.object(["type": "network", "path": .string(networkNamespace)]))
        }
        var mounts: [JSONValue] = [
            Self.mount("/proc", type: "proc", source: "proc", options: ["nosuid", "noexec", "nodev"]),
            Self.mount("/dev", type: "tmpfs", source: "tmpfs", options: ["nosuid", "strictatime", "mode=755", "size=65536k"]),
            Self.mount("/dev/pts", type: "devpts", source: "devpts", options: ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]),
            Self.mount("/dev/shm", type: "tmpfs", source: "shm", options: ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]),
            Self.mount("/dev/mqueue", type: "mqueue", source: "mqueue", options: ["nosuid", "noexec", "nodev"]),
            Self.mount("/sys", type: "sysfs", source: "sysfs", options: ["nosuid", "noexec", "nodev", "ro"]),
            Self.mount("/sys/fs/cgroup", type: "cgroup", source: "cgroup", options: ["nosuid", "noexec", "nodev", "relatime", "ro"]),
            Self.mount(Self.containerSandbox, type: "bind", source: sandbox, options: ["rbind", "rw"]),
        ]
        for (destination, source) in etcFiles.sorted(by: { $0.key < $1.key }) {
            mounts.append(Self.mount(destination, type: "bind", source: source, options: ["rbind", "ro"]))
        }
        for volume in definition.container?.volumes ?? [] where volume.secret == nil {
            let source = volume.hostPath.hasPrefix("/") ? volume.hostPath : sandbox + "/" + volume.hostPath
            mounts.append(Self.mount(volume.containerPath, type: "bind", source: source, options: ["rbind", volume.mode == .readOnly ? "ro" : "rw"]))
        }
        for (destination, file) in secretFiles.sorted(by: { $0.key < $1.key }) {
            mounts.append(Self.mount(destination, type: "bind", source: file, options: ["bind", "ro", "nosuid", "nodev", "noexec"]))
        }
        var resources: [String: JSONValue] = ["devices": .array([.object(["allow": false, "access": "rwm"])])]
        if let memory = Self.memoryLimit(definition) {
            // The instance's own cgroup (the agent's, above this one) carries the limit itself. The
            // container's is a page higher, so the kernel's OOM killer acts in the instance's
            // cgroup and records the kill there: the runtime removes the container's cgroup when
            // the container exits (crun always does), and with it the record. Programs that read
            // their limit from their cgroup (JVMs, Go's GOMEMLIMIT helpers) see it within 4 KiB.
            let container = memory + Self.containerMemoryMargin
            resources["memory"] = .object(["limit": .number(Double(container)), "swap": .number(Double(container))])
        }
        var cpu: [String: JSONValue] = ["shares": .number(Double(max(2, Int(definition.cpus * 1024))))]
        if case .amount(let limit)? = definition.resourceLimits?.cpus {
            cpu["period"] = 100_000
            cpu["quota"] = .number(Double(max(1000, Int(limit * 100_000))))
        }
        resources["cpu"] = .object(cpu)
        var linux: [String: JSONValue] = [
            "namespaces": .array(namespaces),
            "resources": .object(resources),
            "maskedPaths": .array(
                [
                    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                    "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
                ].map(JSONValue.string)),
            "readonlyPaths": .array(["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"].map(JSONValue.string)),
        ]
        if let cgroupsPath { linux["cgroupsPath"] = .string(cgroupsPath) }
        if !(definition.container?.seccompUnconfined ?? false) { linux["seccomp"] = OCISeccomp.defaultProfile() }
        let process: [String: JSONValue] = [
            // runc here needs no terminal: output goes to the instance's log files.
            "terminal": false,
            "user": .object([
                "uid": .number(Double(user.uid)), "gid": .number(Double(user.gid)),
                "additionalGids": .array(user.additionalGids.map { .number(Double($0)) }),
            ]),
            "args": .array(arguments.map(JSONValue.string)),
            "env": .array(Self.environment(for: spec, image: image, secrets: secrets, extraEnvironment: extraEnvironment).map(JSONValue.string)),
            "cwd": .string(workingDirectory),
            "capabilities": .object(["bounding": capabilities, "effective": capabilities, "permitted": capabilities]),
            // As many open files as the agent may have (Docker's containers inherit the daemon's limit).
            "rlimits": .array([.object(["type": "RLIMIT_NOFILE", "hard": .number(Double(Self.openFileLimit)), "soft": .number(Double(Self.openFileLimit))])]),
            "noNewPrivileges": true,
        ]
        var annotations: [String: JSONValue] = ["org.opencontainers.image.ref.name": .string(definition.container?.image ?? "")]
        annotations["io.flotilla.app"] = .string(spec.appID.path)
        annotations["io.flotilla.instance"] = .string(spec.id)
        // Docker's --label: the container's own annotations (runc state and `runc list` show them).
        for (key, value) in definition.container?.parameterLabels ?? [:] { annotations[key] = .string(value) }
        return .object([
            "ociVersion": "1.0.2",
            "annotations": .object(annotations),
            "process": .object(process),
            "root": .object(["path": .string(rootfs), "readonly": .bool(definition.container?.readOnlyRootFilesystem ?? false)]),
            "hostname": .string(Self.hostname(for: spec.id)),
            "mounts": .array(mounts),
            "linux": .object(linux),
        ])
    }

    /// A hostname from the instance id: its last 63 characters that are valid in a hostname.
    static func hostname(for instanceID: String) -> String {
        let allowed = instanceID.lowercased().map { $0.isLetter || $0.isNumber || $0 == "-" ? $0 : "-" }
        return String(String(allowed).suffix(63)).trimmingCharacters(in: CharacterSet(charactersIn: "-"))
    }

    static var openFileLimit: UInt64 {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return 1024 }
        return UInt64(limit.rlim_max)
    }

    /// How much higher the container's memory limit is than its instance's: one page.
    static let containerMemoryMargin: Int64 = 4096

    static func memoryLimit(_ definition: AppDefinition) -> Int64? {
        let limits = definition.resourceLimits
        if limits?.mem == .unlimited { return nil }
        let mebibytes: Double
        if case .amount(let value)? = limits?.mem { mebibytes = value } else { mebibytes = definition.mem }
        return mebibytes > 0 ? Int64(mebibytes * 1024 * 1024) : nil
    }

    static func mount(_ destination: String, type: String, source: String, options: [String]) -> JSONValue {
        .object([
            "destination": .string(destination), "type": .string(type), "source": .string(source),
            "options": .array(options.map(JSONValue.string)),
        ])
    }
}

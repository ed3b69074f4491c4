import FlotillaCore
import FlotillaImage
import Foundation
import Glibc

/// Runs an instance from an OCI image with an OCI runtime (runc, or crun): the image's layers
/// shared read-only under a per-instance overlayfs upper directory (a copy of the layers where
/// overlayfs is not available), a runtime bundle made from the image's config and the app, and
/// `runc run` as the supervised process. runc stays in the foreground for the container's life:
/// it passes the container's output straight to the instance's log files, forwards the signals it
/// gets to the container, and exits with the container's status, so the agent watches, signals and
/// adopts it exactly as it does an exec process. The container itself sits in a child cgroup of
/// the instance's, under the same limits.
/// How containers get their root filesystems (`--container-rootfs`).
public enum ContainerRootfsMode: String, Sendable, CaseIterable {
    /// overlayfs where it can be mounted, else copies.
    case auto
    /// overlayfs only: containers are off where it cannot be mounted.
    case overlay
    /// A copy of the image's layers per instance (slower to start, more disk; for file systems
    /// overlayfs cannot sit on).
    case copy
}

struct OCIDriver: InstanceDriver {
    struct Configuration: Sendable {
        /// The runtime binary (`--oci-runtime`): a path, or a name looked up on PATH.
        var runtime: String
        /// Where the agent keeps its containers: rootfs mounts, upper layers, bundles, runtime state.
        var containersDirectory: String
        var rootfs: ContainerRootfsMode = .auto
    }

    let configuration: Configuration
    let images: ImageStore
    let cgroups: Cgroups
    let bridge: ContainerBridge?
    /// The runtime's resolved path, or why there is none.
    let runtimePath: Result<String, AgentError>
    /// Whether overlayfs mounts work here (root, and a kernel with overlay); else rootfs copies.
    let overlayAvailable: Bool
    /// Whether the runtime's `run` takes `--keep` (runc does; crun before 1.9 does not), which
    /// leaves its record of an exited container for the agent to delete when it cleans up.
    let runtimeKeepsRecords: Bool

    var name: String { "oci" }

    init(configuration: Configuration, images: ImageStore, cgroups: Cgroups, bridge: ContainerBridge?) {
        self.configuration = configuration
        self.images = images
        self.cgroups = cgroups
        self.bridge = bridge
        let searchPath = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        if let path = ProcessSpawner.resolve(configuration.runtime, searchPath: searchPath + ":/usr/sbin:/sbin") {
            runtimePath = .success(path)
        } else {
            runtimePath = .failure(.launch("the OCI runtime '\(configuration.runtime)' is not installed (Debian: apt install runc), or name it with --oci-runtime"))
        }
        try? FileManager.default.createDirectory(atPath: configuration.containersDirectory + "/.state", withIntermediateDirectories: true)
        overlayAvailable = configuration.rootfs != .copy && geteuid() == 0 && Self.probeOverlay(in: configuration.containersDirectory)
        if case .success(let path) = runtimePath {
            runtimeKeepsRecords = Self.helpText(path, ["run", "--help"]).contains("--keep")
        } else {
            runtimeKeepsRecords = false
        }
    }

    var stateRoot: String { configuration.containersDirectory + "/.state" }

    func directory(of instanceID: String) -> String { configuration.containersDirectory + "/" + instanceID }

    func unavailableReason() -> String? {
        if case .failure(let error) = runtimePath { return error.description }
        if geteuid() != 0 { return "containers need the agent to run as root (namespaces, mounts, cgroups)" }
        if configuration.rootfs == .overlay && !overlayAvailable {
            return "overlayfs cannot be mounted under \(configuration.containersDirectory) (--container-rootfs overlay); use auto or copy"
        }
        return nil
    }

    func needsPreparation(_ spec: InstanceSpec) -> Bool { true }

    /// Pulls the image unless the store has it (or `forcePullImage` asks for a fresh pull).
    func prepare(_ spec: InstanceSpec, progress: @escaping @Sendable (String) -> Void) async throws {
        guard let container = spec.definition.container, let name = container.image else { throw AgentError.launch("the app has no image") }
        let reference: ImageReference
        do {
            reference = try ImageReference(parsing: name)
        } catch {
            throw AgentError.launch("'\(name)' is not an image reference: \(error)")
        }
        if !container.forcePullImage, await images.image(named: name) != nil { return }
        do {
            _ = try await images.pull(reference) { step in progress(step.summary) }
        } catch {
            // An image the store has is good enough when a forced pull cannot reach its registry.
            if container.forcePullImage, await images.image(named: name) != nil {
                progress("could not pull \(reference) again (\(error)); using the stored image")
                return
            }
            throw AgentError.launch("cannot pull \(reference): \(error)")
        }
    }

    func start(_ spec: InstanceSpec, context: LaunchContext) async throws -> SupervisedProcess {
        guard let container = spec.definition.container, let name = container.image else { throw AgentError.launch("the app has no image") }
        let runtime = try runtimePath.get()
        guard let image = await images.image(named: name) else {
            throw AgentError.launch("the image \(name) is not in the store; pull it with 'flotilla image pull'")
        }
        let base = directory(of: spec.id)
        let rootfs = base + "/rootfs"
        let bundle = base + "/bundle"
        var state: [String: String] = ["container": spec.id, "image": image.id.description, "bundle": bundle]
        do {
            for path in [base, rootfs, bundle, base + "/etc"] {
                try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
            }
            if overlayAvailable {
                let layers = try await images.layerDirectories(of: image)
                try Self.mountOverlay(layers: layers, upper: base + "/upper", work: base + "/work", target: rootfs)
                state["rootfs"] = "overlay"
            } else {
                try await images.flatten(image, into: rootfs)
                state["rootfs"] = "copy"
            }
            for volume in container.volumes where volume.secret == nil {
                let source = volume.hostPath.hasPrefix("/") ? volume.hostPath : context.sandbox + "/" + volume.hostPath
                // Docker makes a missing host directory; so does Flotilla.
                try FileManager.default.createDirectory(atPath: source, withIntermediateDirectories: true)
            }
            var namespacePath: String?
            var address: String?
            if spec.definition.network == .bridge {
                guard let bridge else { throw AgentError.launch("container/bridge networking is off on this agent (see --bridge-cidr)") }
                let attachment = try bridge.attach(instanceID: spec.id, mappings: Self.bridgeMappings(spec))
                namespacePath = attachment.namespacePath
                address = attachment.address
                state["address"] = attachment.address
            }
            let hostname = OCIBundle.hostname(for: spec.id)
            let etc = try Self.writeEtcFiles(in: base + "/etc", hostname: hostname, address: address, bridged: namespacePath != nil)
            let user = try ContainerUser.resolve(
                container.user ?? spec.definition.user.flatMap { $0.isEmpty ? nil : $0 } ?? image.config.config.user, rootfs: rootfs)
            // The sandbox belongs to the container's user, as Mesos gives it to the task's user
            // (the agent opened the log files, so they stay writable either way).
            if user.uid != 0 || user.gid != 0 { chown(context.sandbox, user.uid, user.gid) }
            let secretFiles = try Self.writeSecretFiles(
                container.volumes, values: context.secrets, in: base + "/secrets", owner: (user.uid, user.gid))
            // The instance's cgroup carries the limits; the runtime puts the container in a child of it.
            _ = try cgroups.createForInstance(spec)
            var configuration = OCIBundle(
                spec: spec, image: image.config.config, rootfs: rootfs, sandbox: context.sandbox, etcFiles: etc, networkNamespace: namespacePath,
                cgroupsPath: cgroups.relativePath(instanceID: spec.id).map { $0 + "/container" }, user: user)
            configuration.secrets = context.secrets
            configuration.secretFiles = secretFiles
            configuration.extraEnvironment = context.extraEnvironment
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys]
            try encoder.encode(try configuration.configuration()).write(to: URL(fileURLWithPath: bundle + "/config.json"), options: .atomic)
            if let signal = image.config.config.stopSignal.flatMap(Self.signalNumber) { state["stopSignal"] = String(signal) }
            // A container of the same id left by a crash would make the runtime refuse to start.
            if FileManager.default.fileExists(atPath: stateRoot + "/" + spec.id) {
                _ = await Self.runQuietly([runtime, "--root", stateRoot, "delete", "--force", spec.id])
            }
            return try ProcessSpawner.spawn(
                path: runtime, arguments: [runtime, "--root", stateRoot, "run", "--bundle", bundle] + (runtimeKeepsRecords ? ["--keep"] : []) + [spec.id],
                environment: ["PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], workingDirectory: bundle,
                sandbox: context.sandbox, cgroupFiles: [], logs: context.logs, state: state)
        } catch {
            await cleanUp(instanceID: spec.id, process: nil, state: state)
            throw error
        }
    }

    /// SIGTERM (or the image's `StopSignal`) goes to the runtime, which hands it to the container's
    /// first process; SIGKILL goes to everything in the instance's cgroups and to the runtime.
    func signal(_ process: SupervisedProcess, instanceID: String, _ signal: Int32) {
        var delivered = signal
        if signal == SIGTERM, let stop = process.state["stopSignal"].flatMap({ Int32($0) }) { delivered = stop }
        ProcessSpawner.signalGroup(process, delivered)
        if signal == SIGKILL {
            for pid in cgroups.processes(instanceID: instanceID) { kill(pid, SIGKILL) }
        }
    }

    func cleanUp(instanceID: String, process: SupervisedProcess?, state: [String: String]) async {
        await cgroups.killAll(instanceID: instanceID, processGroup: process?.pid)
        if case .success(let runtime) = runtimePath {
            _ = await Self.runQuietly([runtime, "--root", stateRoot, "delete", "--force", instanceID])
        }
        bridge?.detach(instanceID: instanceID)
        let base = directory(of: instanceID)
        if FileManager.default.fileExists(atPath: base) {
            umount2(base + "/rootfs", Int32(MNT_DETACH))
            try? FileManager.default.removeItem(atPath: base)
        }
        cgroups.remove(instanceID: instanceID)
    }

    func leftoverInstanceIDs() -> [String] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: configuration.containersDirectory)) ?? []
        let runtimeEntries = (try? FileManager.default.contentsOfDirectory(atPath: stateRoot)) ?? []
        return Array(Set(entries + runtimeEntries + (bridge?.attachedInstanceIDs() ?? [])).filter { !$0.hasPrefix(".") })
    }

    /// A command health check runs inside the container, as Mesos runs them.
    func commandArguments(for command: String, instanceID: String) -> [String] {
        guard case .success(let runtime) = runtimePath else { return ["/bin/sh", "-c", command] }
        return [runtime, "--root", stateRoot, "exec", instanceID, "/bin/sh", "-c", command]
    }

    // MARK: - Helpers

    /// Writes each secret volume's value to a file of its own (mode 0400, owned by the container's
    /// user) under `directory`, which only root can enter; returns container path → file. The
    /// directory goes with the instance's other files when it ends.
    static func writeSecretFiles(
        _ volumes: [ContainerVolume], values: [String: String], in directory: String, owner: (uid: UInt32, gid: UInt32)
    ) throws -> [String: String] {
        let secretVolumes = volumes.filter { $0.secret != nil }
        guard !secretVolumes.isEmpty else { return [:] }
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o711])
        var files: [String: String] = [:]
        for (index, volume) in secretVolumes.enumerated() {
            guard let name = volume.secret, let value = values[name] else {
                throw AgentError.launch("the secret '\(volume.secret ?? "")' for \(volume.containerPath) was not read")
            }
            let file = directory + "/\(index)"
            let fd = open(file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0o400)
            guard fd >= 0 else { throw AgentError.launch("cannot write the secret file for \(volume.containerPath): \(String(cString: strerror(errno)))") }
            defer { close(fd) }
            let bytes = Array(value.utf8)
            var written = 0
            while written < bytes.count {
                let count = bytes[written...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
                guard count > 0 else { throw AgentError.launch("cannot write the secret file for \(volume.containerPath)") }
                written += count
            }
            fchown(fd, owner.uid, owner.gid)
            files[volume.containerPath] = file
        }
        return files
    }

    /// The instance's published ports: each port mapping's host port (assigned by placement) to
    /// its container port (0: the host port, as Marathon does), once per transport it names.
    static func bridgeMappings(_ spec: InstanceSpec) -> [BridgePortMapping] {
        zip(spec.definition.ports, spec.ports).flatMap { appPort, hostPort in
            let containerPort = (appPort.containerPort ?? 0) == 0 ? hostPort : appPort.containerPort!
            return BridgeTransport.allCases
                .filter { transport in appPort.protocol.split(separator: ",").contains { $0 == transport.rawValue } }
                .map { BridgePortMapping(hostPort: hostPort, containerPort: containerPort, transport: $0) }
        }
    }

    static func mountOverlay(layers: [String], upper: String, work: String, target: String) throws {
        for path in [upper, work] { try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true) }
        // overlayfs lists the top layer first.
        let lower = layers.reversed().joined(separator: ":")
        guard !lower.isEmpty else { throw AgentError.launch("the image has no layers") }
        let options = "lowerdir=\(lower),upperdir=\(upper),workdir=\(work)"
        guard options.utf8.count < 4000 else {
            throw AgentError.launch("the image has too many layers (\(layers.count)) for one overlay mount here")
        }
        if mount("overlay", target, "overlay", 0, options) != 0 {
            throw AgentError.launch("cannot mount the container's root filesystem (overlay): \(String(cString: strerror(errno)))")
        }
    }

    static func probeOverlay(in directory: String) -> Bool {
        let probe = directory + "/.overlay-probe-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: probe) }
        do {
            for name in ["lower", "upper", "work", "merged"] {
                try FileManager.default.createDirectory(atPath: probe + "/" + name, withIntermediateDirectories: true)
            }
            try mountOverlay(layers: [probe + "/lower"], upper: probe + "/upper", work: probe + "/work", target: probe + "/merged")
            umount2(probe + "/merged", Int32(MNT_DETACH))
            return true
        } catch {
            return false
        }
    }

    /// `/etc/hosts`, `/etc/hostname` and `/etc/resolv.conf` for the container.
    static func writeEtcFiles(in directory: String, hostname: String, address: String?, bridged: Bool) throws -> [String: String] {
        var hosts = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        hosts += "\(address ?? "127.0.1.1")\t\(hostname)\n"
        let resolver = (try? String(contentsOfFile: "/etc/resolv.conf", encoding: .utf8)) ?? ""
        let resolv = bridged ? ContainerBridge.resolvConf(hostResolvConf: resolver) : resolver
        let files = ["/etc/hosts": hosts, "/etc/hostname": hostname + "\n", "/etc/resolv.conf": resolv]
        var paths: [String: String] = [:]
        for (destination, content) in files {
            let path = directory + "/" + URL(fileURLWithPath: destination).lastPathComponent
            try content.write(toFile: path, atomically: true, encoding: .utf8)
            paths[destination] = path
        }
        return paths
    }

    static func signalNumber(_ name: String) -> Int32? {
        if let number = Int32(name) { return number }
        let upper = name.uppercased()
        let bare = upper.hasPrefix("SIG") ? String(upper.dropFirst(3)) : upper
        let table: [String: Int32] = [
            "TERM": SIGTERM, "INT": SIGINT, "QUIT": SIGQUIT, "HUP": SIGHUP, "USR1": SIGUSR1, "USR2": SIGUSR2, "KILL": SIGKILL, "WINCH": SIGWINCH,
        ]
        return table[bare]
    }

    /// What `runtime arguments…` prints (stdout and stderr), for probing what a runtime supports.
    static func helpText(_ runtime: String, _ arguments: [String]) -> String {
        let process = Process()
        let pipe = Pipe()
        process.executableURL = URL(fileURLWithPath: runtime)
        process.arguments = arguments
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = pipe
        process.standardError = pipe
        do { try process.run() } catch { return "" }
        let output = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return String(decoding: output, as: UTF8.self)
    }

    /// Runs a short runtime command (delete, state) and waits for it off the shared threads.
    static func runQuietly(_ arguments: [String]) async -> Int32 {
        await withCheckedContinuation { continuation in
            let thread = Thread {
                let process = Process()
                process.executableURL = URL(fileURLWithPath: arguments[0])
                process.arguments = Array(arguments.dropFirst())
                process.standardOutput = FileHandle.nullDevice
                process.standardError = FileHandle.nullDevice
                do {
                    try process.run()
                    process.waitUntilExit()
                    continuation.resume(returning: process.terminationStatus)
                } catch {
                    continuation.resume(returning: -1)
                }
            }
            thread.start()
        }
    }
}

/// The user a container's process runs as: Docker's `user` forms (`name`, `uid`, `uid:gid`,
/// `name:group`) resolved against the image's own `/etc/passwd` and `/etc/group`.
enum ContainerUser {
    static func resolve(_ user: String?, rootfs: String) throws -> (uid: UInt32, gid: UInt32, additionalGids: [UInt32]) {
        guard let user, !user.isEmpty else { return (0, 0, []) }
        let parts = user.split(separator: ":", maxSplits: 1).map(String.init)
        let passwd = readInside(rootfs, "etc/passwd")
        let groups = readInside(rootfs, "etc/group")
        var uid: UInt32
        var gid: UInt32 = 0
        var name: String?
        if let number = UInt32(parts[0]) {
            uid = number
            if let entry = passwd.first(where: { $0[safe: 2] == parts[0] }), let primary = entry[safe: 3].flatMap({ UInt32($0) }) {
                gid = primary
                name = entry[0]
            }
        } else {
            guard let entry = passwd.first(where: { $0.first == parts[0] }), let number = entry[safe: 2].flatMap({ UInt32($0) }) else {
                throw AgentError.launch("the image has no user '\(parts[0])' in its /etc/passwd; give a numeric uid")
            }
            uid = number
            gid = entry[safe: 3].flatMap { UInt32($0) } ?? 0
            name = parts[0]
        }
        if parts.count == 2 {
            if let number = UInt32(parts[1]) {
                gid = number
            } else if let entry = groups.first(where: { $0.first == parts[1] }), let number = entry[safe: 2].flatMap({ UInt32($0) }) {
                gid = number
            } else {
                throw AgentError.launch("the image has no group '\(parts[1])' in its /etc/group")
            }
        }
        var additional: [UInt32] = []
        if let name {
            for entry in groups where (entry[safe: 3] ?? "").split(separator: ",").contains(Substring(name)) {
                if let number = entry[safe: 2].flatMap({ UInt32($0) }), number != gid { additional.append(number) }
            }
        }
        return (uid, gid, additional)
    }

    /// The lines of a file of the image, split on `:`; empty when it is missing or would lead
    /// outside the root filesystem (a symlink to the node's own files).
    static func readInside(_ rootfs: String, _ relative: String) -> [[String]] {
        let path = rootfs + "/" + relative
        guard let resolved = realpath(path, nil) else { return [] }
        defer { free(resolved) }
        let real = String(cString: resolved)
        guard let rootReal = realpath(rootfs, nil) else { return [] }
        defer { free(rootReal) }
        guard real.hasPrefix(String(cString: rootReal) + "/"), let text = try? String(contentsOfFile: real, encoding: .utf8) else { return [] }
        return text.split(separator: "\n").map { $0.split(separator: ":", omittingEmptySubsequences: false).map(String.init) }
    }
}

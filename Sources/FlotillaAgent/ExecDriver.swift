import CFlotillaSpawn
import FlotillaCore
import Foundation
import Glibc

/// A process the exec driver started or adopted.
struct RunningProcess: Sendable {
    var pid: Int32
    var startTicks: UInt64
    /// A second pidfd (the watcher owns the first) for signalling without pid-reuse races.
    var signalFD: Int32
}

/// Runs an instance as a plain process: its own session and process group, its own cgroup, its
/// sandbox as working directory, output to its log files.
struct ExecDriver: Sendable {
    let cgroups: Cgroups
    let sandboxRoot: String
    let logMaxBytes: Int64
    let logKeep: Int

    func sandbox(of instanceID: String) -> String { sandboxRoot + "/" + instanceID }

    func logs(of instanceID: String) -> InstanceLogs {
        InstanceLogs(directory: sandbox(of: instanceID), maxBytes: logMaxBytes, keep: logKeep)
    }

    /// The environment an instance sees: Marathon's variables, then the app's own.
    func environment(for spec: InstanceSpec, agentEnvironment: [String: String]) -> [String: String] {
        var environment: [String: String] = [:]
        for key in ["PATH", "LANG", "LC_ALL", "TZ"] { environment[key] = agentEnvironment[key] }
        environment["PATH"] = environment["PATH"] ?? "/usr/local/bin:/usr/bin:/bin"
        environment["HOME"] = sandbox(of: spec.id)
        environment["HOST"] = spec.host
        environment["MESOS_SANDBOX"] = sandbox(of: spec.id)
        environment["FLOTILLA_SANDBOX"] = sandbox(of: spec.id)
        environment["FLOTILLA_APP_ID"] = spec.appID.path
        environment["FLOTILLA_INSTANCE_ID"] = spec.id
        environment["MARATHON_APP_ID"] = spec.appID.path
        environment["MARATHON_APP_VERSION"] = spec.version
        environment["MESOS_TASK_ID"] = spec.id
        for (key, value) in spec.definition.labels where Self.isPortableName(key) {
            environment["MARATHON_APP_LABEL_" + key.uppercased()] = value
        }
        for (index, port) in spec.ports.enumerated() {
            environment["PORT\(index)"] = String(port)
            if let name = spec.definition.portDefinitions[safe: index]?.name, Self.isPortableName(name) {
                environment["PORT_" + name.uppercased()] = String(port)
            }
            if let requested = spec.definition.portDefinitions[safe: index]?.port, requested != 0 {
                environment["PORT_\(requested)"] = String(port)
            }
        }
        if let first = spec.ports.first { environment["PORT"] = String(first) }
        if !spec.ports.isEmpty { environment["PORTS"] = spec.ports.map(String.init).joined(separator: ",") }
        for (key, value) in spec.definition.env {
            if case .value(let text) = value { environment[key] = text }
        }
        return environment
    }

    /// Starts the instance's process. Throws with a message fit for `lastTaskFailure`.
    func launch(_ spec: InstanceSpec, agentEnvironment: [String: String]) throws -> RunningProcess {
        let sandbox = sandbox(of: spec.id)
        let environment = environment(for: spec, agentEnvironment: agentEnvironment)
        let arguments: [String]
        if let command = spec.definition.cmd, !command.isEmpty {
            arguments = ["/bin/sh", "-c", command]
        } else {
            arguments = spec.definition.args ?? []
        }
        guard let program = arguments.first, let path = Self.resolve(program, searchPath: environment["PATH"] ?? "") else {
            throw AgentError.launch("cannot find the program '\(arguments.first ?? "")' on PATH \(environment["PATH"] ?? "")")
        }
        // The agent's own user needs no switch (and an agent that is not root could not make one).
        let account = try spec.definition.user.flatMap { $0.isEmpty ? nil : $0 }.map { try UserAccount.lookUp($0) }
            .flatMap { $0.uid == geteuid() && $0.gid == getegid() ? nil : $0 }
        let logFiles = try logs(of: spec.id).openForProcess()
        defer {
            close(logFiles.stdout)
            close(logFiles.stderr)
        }
        if let account {
            // The instance writes its own sandbox (the log files are opened by the agent).
            chown(sandbox, account.uid, account.gid)
        }
        let cgroupFiles: [String]
        do {
            let limits = spec.definition.resourceLimits
            let memory: Double? = limits?.mem == .unlimited ? nil : (limits?.mem).flatMap { if case .amount(let value) = $0 { value } else { nil } } ?? spec.definition.mem
            let cpuLimit: Double? = (limits?.cpus).flatMap { if case .amount(let value) = $0 { value } else { nil } }
            cgroupFiles = try cgroups.create(instanceID: spec.id, memoryMiB: memory, cpus: spec.definition.cpus, cpuLimit: cpuLimit)
        } catch {
            throw AgentError.launch("cannot create the instance's cgroup: \(error)")
        }
        var stage: Int32 = 0
        var number: Int32 = 0
        let environmentList = environment.map { "\($0.key)=\($0.value)" }.sorted()
        let pid = withCStringArray(arguments) { argv in
            withCStringArray(environmentList) { envp in
                withCStringArray(cgroupFiles) { cgroupList in
                    path.withCString { pathPointer in
                        sandbox.withCString { sandboxPointer in
                            cgroupList.withMemoryRebound(to: UnsafePointer<CChar>?.self) { cgroupPointer in
                                let groups = account?.groups ?? []
                                return groups.withUnsafeBufferPointer { groupPointer in
                                    var request = flotilla_spawn_request(
                                        path: pathPointer, argv: argv.baseAddress, envp: envp.baseAddress,
                                        working_directory: sandboxPointer, cgroup_procs_files: cgroupPointer.baseAddress,
                                        cgroup_count: Int32(cgroupFiles.count), stdout_fd: logFiles.stdout, stderr_fd: logFiles.stderr,
                                        set_user: account == nil ? 0 : 1, uid: account?.uid ?? 0, gid: account?.gid ?? 0,
                                        groups: groupPointer.baseAddress, group_count: Int32(groups.count))
                                    return flotilla_spawn(&request, &stage, &number)
                                }
                            }
                        }
                    }
                }
            }
        }
        guard pid > 0 else {
            cgroups.remove(instanceID: spec.id)
            let what = [
                "", "fork", "setsid", "joining the cgroup", "redirecting output", "entering the sandbox", "exec of \(path)",
                "switching to user '\(spec.definition.user ?? "")'",
            ]
            var hint = ""
            if stage == 5, number == EACCES, let account {
                hint = "; user '\(account.name)' needs to reach \(sandbox): let others traverse the data directory and its parents (chmod o+x)"
            }
            throw AgentError.launch(
                "\(what[safe: Int(stage)] ?? "spawn") failed: \(String(cString: strerror(number)))\(hint)")
        }
        let signalFD = flotilla_pidfd_open(pid)
        return RunningProcess(pid: pid, startTicks: ProcFS.startTicks(of: pid) ?? 0, signalFD: signalFD)
    }

    /// Signals the instance's whole process group, and anything that left the group but not the cgroup.
    func signal(_ process: RunningProcess, instanceID: String, _ signal: Int32) {
        // The group first, while the leader is certainly still there (it cannot be reaped before it
        // gets the signal): the group shares the leader's pid, which is only ours while the
        // leader is the process we started.
        if ProcFS.startTicks(of: process.pid) == process.startTicks {
            kill(-process.pid, signal)
        }
        if process.signalFD >= 0 {
            _ = flotilla_pidfd_signal(process.signalFD, signal)
        }
        if signal == SIGKILL {
            for pid in cgroups.processes(instanceID: instanceID) { kill(pid, SIGKILL) }
        }
    }

    /// After the leader is gone: kill whatever is left of the instance and remove its cgroup.
    /// Kills what is left of an instance (its group, and anything still in its cgroup) and
    /// removes the cgroup once it is empty. Waits without blocking a thread.
    func cleanUp(instanceID: String, processGroup: Int32?) async {
        if let processGroup { kill(-processGroup, SIGKILL) }
        for _ in 0..<50 {
            let left = cgroups.processes(instanceID: instanceID)
            if left.isEmpty { break }
            for pid in left { kill(pid, SIGKILL) }
            try? await Task.sleep(for: .milliseconds(2))
        }
        cgroups.remove(instanceID: instanceID)
    }

    static func resolve(_ program: String, searchPath: String) -> String? {
        if program.contains("/") { return access(program, X_OK) == 0 ? program : nil }
        for directory in searchPath.split(separator: ":") {
            let candidate = "\(directory)/\(program)"
            if access(candidate, X_OK) == 0 { return candidate }
        }
        return nil
    }

    static func isPortableName(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.allSatisfy { $0 == UInt8(ascii: "_") || isalnum(Int32($0)) != 0 }
    }
}

extension Array {
    subscript(safe index: Int) -> Element? { indices.contains(index) ? self[index] : nil }
}

/// Calls `body` with a NULL-terminated array of C strings that lives for the call.
func withCStringArray<Result>(_ strings: [String], _ body: (UnsafeMutableBufferPointer<UnsafeMutablePointer<CChar>?>) -> Result) -> Result {
    var pointers: [UnsafeMutablePointer<CChar>?] = strings.map { strdup($0) }
    pointers.append(nil)
    defer { for pointer in pointers { free(pointer) } }
    return pointers.withUnsafeMutableBufferPointer { body($0) }
}


/// A user an instance runs as (`user` in the app definition), with its groups.
struct UserAccount {
    var name: String
    var uid: uid_t
    var gid: gid_t
    var groups: [gid_t]

    /// Looks the user up in the node's user database.
    static func lookUp(_ name: String) throws -> UserAccount {
        guard let account = find(name) else { throw AgentError.launch("there is no user '\(name)' on this node") }
        return account
    }

    static func find(_ name: String) -> UserAccount? {
        var entry = passwd()
        var result: UnsafeMutablePointer<passwd>?
        var buffer = [CChar](repeating: 0, count: 16_384)
        guard getpwnam_r(name, &entry, &buffer, buffer.count, &result) == 0, result != nil else { return nil }
        var count: Int32 = 64
        var groups = [gid_t](repeating: 0, count: Int(count))
        if getgrouplist(name, entry.pw_gid, &groups, &count) < 0 {
            groups = [gid_t](repeating: 0, count: Int(count))
            _ = getgrouplist(name, entry.pw_gid, &groups, &count)
        }
        return UserAccount(name: name, uid: entry.pw_uid, gid: entry.pw_gid, groups: Array(groups.prefix(Int(max(0, count)))))
    }
}

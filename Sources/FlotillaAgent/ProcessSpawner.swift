import CFlotillaSpawn
import FlotillaCore
import Glibc

/// Starts the process the agent supervises for an instance, the same way for every driver: its own
/// session and process group, joined to its cgroup before it runs a single instruction of its own,
/// output to the instance's log files, and marked with `FLOTILLA_SANDBOX` so that an agent that
/// restarts finds it again (`/proc/<pid>/environ`).
enum ProcessSpawner {
    /// The variable that marks a supervised process as this agent's (its value: the sandbox).
    static let sandboxVariable = "FLOTILLA_SANDBOX"

    static func spawn(
        path: String, arguments: [String], environment: [String: String], workingDirectory: String, sandbox: String, cgroupFiles: [String],
        logs: InstanceLogs, account: UserAccount? = nil, userName: String? = nil, state: [String: String] = [:]
    ) throws -> SupervisedProcess {
        var environment = environment
        environment[sandboxVariable] = sandbox
        let logFiles = try logs.openForProcess()
        defer {
            close(logFiles.stdout)
            close(logFiles.stderr)
        }
        var stage: Int32 = 0
        var number: Int32 = 0
        let environmentList = environment.map { "\($0.key)=\($0.value)" }.sorted()
        let pid = withCStringArray(arguments) { argv in
            withCStringArray(environmentList) { envp in
                withCStringArray(cgroupFiles) { cgroupList in
                    path.withCString { pathPointer in
                        workingDirectory.withCString { directoryPointer in
                            cgroupList.withMemoryRebound(to: UnsafePointer<CChar>?.self) { cgroupPointer in
                                let groups = account?.groups ?? []
                                return groups.withUnsafeBufferPointer { groupPointer in
                                    var request = flotilla_spawn_request(
                                        path: pathPointer, argv: argv.baseAddress, envp: envp.baseAddress,
                                        working_directory: directoryPointer, cgroup_procs_files: cgroupPointer.baseAddress,
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
            let what = [
                "", "clone", "setsid", "joining the cgroup", "redirecting output", "entering the sandbox", "exec of \(path)",
                "switching to user '\(userName ?? "")'",
            ]
            var hint = ""
            if stage == 5, number == EACCES, let account {
                hint = "; user '\(account.name)' needs to reach \(workingDirectory): let others traverse the data directory and its parents (chmod o+x)"
            }
            throw AgentError.launch("\(what[safe: Int(stage)] ?? "spawn") failed: \(String(cString: strerror(number)))\(hint)")
        }
        let pidfd = flotilla_pidfd_open(pid)
        guard pidfd >= 0 else {
            // Without a pidfd the process could be neither watched nor signalled safely.
            let reason = String(cString: strerror(errno))
            kill(-pid, SIGKILL)
            var ignored: Int32 = 0
            waitpid(pid, &ignored, 0)
            throw AgentError.launch("cannot watch the process (pidfd_open: \(reason)); if it says too many open files, raise the agent's open-file limit (one descriptor per instance)")
        }
        let ticks = ProcFS.startTicks(of: pid) ?? 0
        var recorded = state
        recorded["pid"] = String(pid)
        recorded["startTicks"] = String(ticks)
        return SupervisedProcess(pid: pid, startTicks: ticks, signalFD: pidfd, state: recorded)
    }

    /// Signals the process's group and, through its pidfd, the process itself.
    static func signalGroup(_ process: SupervisedProcess, _ signal: Int32) {
        // The group first, while the leader is certainly still there (it cannot be reaped before it
        // gets the signal): the group shares the leader's pid, which is only ours while the
        // leader is the process we started.
        if ProcFS.startTicks(of: process.pid) == process.startTicks {
            kill(-process.pid, signal)
        }
        if process.signalFD >= 0 {
            _ = flotilla_pidfd_signal(process.signalFD, signal)
        }
    }

    static func resolve(_ program: String, searchPath: String) -> String? {
        if program.contains("/") { return access(program, X_OK) == 0 ? program : nil }
        for directory in searchPath.split(separator: ":") {
            let candidate = "\(directory)/\(program)"
            if access(candidate, X_OK) == 0 { return candidate }
        }
        return nil
    }
}

extension Cgroups {
    /// Creates the instance's cgroup with the app's limits; the files its first process joins.
    func createForInstance(_ spec: InstanceSpec) throws -> [String] {
        let limits = spec.definition.resourceLimits
        let memory: Double? =
            limits?.mem == .unlimited
            ? nil : (limits?.mem).flatMap { if case .amount(let value) = $0 { value } else { nil } } ?? spec.definition.mem
        let cpuLimit: Double? = (limits?.cpus).flatMap { if case .amount(let value) = $0 { value } else { nil } }
        do {
            return try create(instanceID: spec.id, memoryMiB: memory, cpus: spec.definition.cpus, cpuLimit: cpuLimit)
        } catch {
            throw AgentError.launch("cannot create the instance's cgroup: \(error)")
        }
    }

    /// Kills everything in the instance's cgroup (and its process group), waiting until it is empty.
    func killAll(instanceID: String, processGroup: Int32?) async {
        if let processGroup { kill(-processGroup, SIGKILL) }
        for _ in 0..<50 {
            let left = processes(instanceID: instanceID)
            if left.isEmpty { break }
            for pid in left { kill(pid, SIGKILL) }
            try? await Task.sleep(for: .milliseconds(2))
        }
    }
}

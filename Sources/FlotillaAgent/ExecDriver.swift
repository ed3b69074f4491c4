import CFlotillaSpawn
import FlotillaCore
import Foundation
import Glibc
import NIOPosix

/// Runs an instance as a plain process: its own session and process group, its own cgroup, its
/// sandbox as working directory, output to its log files.
struct ExecDriver: InstanceDriver {
    let cgroups: Cgroups

    var name: String { "exec" }

    /// The start's blocking work (cgroup directories, clone and exec) runs on the drivers' own
    /// threads: starts go side by side and the agent's actor stays free.
    func start(_ spec: InstanceSpec, context: LaunchContext) async throws -> SupervisedProcess {
        try await DriverThreads.pool.runIfActive { try startBlocking(spec, context: context) }
    }

    private func startBlocking(_ spec: InstanceSpec, context: LaunchContext) throws -> SupervisedProcess {
        let environment = InstanceEnvironment.build(for: spec, sandbox: context.sandbox, agentEnvironment: context.agentEnvironment, secrets: context.secrets,
            extraEnvironment: context.extraEnvironment)
        let arguments: [String]
        if let command = spec.definition.cmd, !command.isEmpty {
            arguments = SimpleCommand.words(of: command, searchPath: environment["PATH"] ?? "") ?? ["/bin/sh", "-c", command]
        } else {
            arguments = spec.definition.args ?? []
        }
        guard let program = arguments.first, let path = ProcessSpawner.resolve(program, searchPath: environment["PATH"] ?? "") else {
            throw AgentError.launch("cannot find the program '\(arguments.first ?? "")' on PATH \(environment["PATH"] ?? "")")
        }
        // The agent's own user needs no switch (and an agent that is not root could not make one).
        let account = try spec.definition.user.flatMap { $0.isEmpty ? nil : $0 }.map { try UserAccount.lookUp($0) }
            .flatMap { $0.uid == geteuid() && $0.gid == getegid() ? nil : $0 }
        if let account {
            // The instance writes its own sandbox (the log files are opened by the agent).
            chown(context.sandbox, account.uid, account.gid)
        }
        let cgroupFiles = try cgroups.createForInstance(spec)
        do {
            return try ProcessSpawner.spawn(
                path: path, arguments: arguments, environment: environment, workingDirectory: context.sandbox, sandbox: context.sandbox,
                cgroupFiles: cgroupFiles, logs: context.logs, account: account, userName: spec.definition.user)
        } catch {
            cgroups.remove(instanceID: spec.id)
            throw error
        }
    }

    /// Signals the instance's whole process group, and anything that left the group but not the cgroup.
    func signal(_ process: SupervisedProcess, instanceID: String, _ signal: Int32) {
        ProcessSpawner.signalGroup(process, signal)
        if signal == SIGKILL {
            for pid in cgroups.processes(instanceID: instanceID) { kill(pid, SIGKILL) }
        }
    }

    /// Kills what is left of an instance (its group, and anything still in its cgroup) and
    /// removes the cgroup once it is empty. Waits without blocking a thread.
    func cleanUp(instanceID: String, process: SupervisedProcess?, state: [String: String]) async {
        await cgroups.killAll(instanceID: instanceID, processGroup: process?.pid)
        // Removing a cgroup can take milliseconds (the kernel offlines its memory): off the actor.
        let cgroups = self.cgroups
        try? await DriverThreads.pool.runIfActive { cgroups.remove(instanceID: instanceID) }
    }
}

/// A `cmd` the shell would only split into words and run (`exec sleep 3600`,
/// `/app/server --port=8080`): exec'd directly, as the shell would end up doing, without starting a
/// shell first (which costs as much as the rest of a start). Anything a shell would interpret —
/// quotes, `$`, globs, redirections, `;`, `&&`, a leading `VAR=value`, a builtin, a path relative
/// to the sandbox — still runs through `/bin/sh -c`.
enum SimpleCommand {
    private static let plain = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./:=,@%+".utf8)
    /// Words a shell treats specially, or whose builtin differs from the program of that name.
    private static let shellWords: Set<String> = [
        "cd", "export", "set", "unset", "ulimit", "umask", "exit", "eval", ".", "source", "read", "wait", "trap", "shift", "alias",
        "unalias", "type", "command", "hash", "jobs", "readonly", "return", "local", "times", "time", "echo", "printf", "kill", "test",
        "pwd", "getopts", "break", "continue", "fg", "bg", "if", "then", "else", "elif", "fi", "case", "esac", "for", "while", "until",
        "do", "done", "in", "function", "select", "exec", "builtin", "let", "declare", "typeset", "newgrp",
    ]

    /// The words to exec (the first found on `searchPath`), or nil when a shell is needed.
    static func words(of command: String, searchPath: String) -> [String]? {
        var words = command.split(whereSeparator: { $0 == " " || $0 == "\t" }).map(String.init)
        guard words.allSatisfy({ $0.utf8.allSatisfy(plain.contains) }) else { return nil }
        // `exec` replaces the shell with the rest: what running it directly does.
        if words.first == "exec" { words.removeFirst() }
        // A relative path names a file in the sandbox, which the shell would find once there.
        guard let program = words.first, !program.contains("="), !shellWords.contains(program),
            !program.contains("/") || program.hasPrefix("/"), ProcessSpawner.resolve(program, searchPath: searchPath) != nil
        else { return nil }
        return words
    }
}

/// Threads for the drivers' blocking calls. They wait on the kernel (a cgroup's creation or
/// removal takes milliseconds on v1; exec reads the program from disk), not on the CPU, so there
/// are as many as the agent runs starts at once rather than one per core as in NIO's shared pool,
/// which would let two slow calls hold every other start and every file read of the agent.
enum DriverThreads {
    static let pool: NIOThreadPool = {
        let pool = NIOThreadPool(numberOfThreads: NodeAgent.maximumConcurrentStarts)
        pool.start()
        return pool
    }()
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

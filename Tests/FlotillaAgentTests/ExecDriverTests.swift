@testable import FlotillaAgent
import FlotillaCore
import Foundation
import Glibc
import Testing

@Suite struct ExecDriverTests {
    let root = FileManager.default.temporaryDirectory.appendingPathComponent("flotilla-agent-\(UUID().uuidString)").path

    func spec(cmd: String, ports: [Int] = [31005], env: [String: String] = [:]) throws -> InstanceSpec {
        var definition = AppDefinition(id: try AppID("/test/echo"), cmd: cmd)
        definition.portDefinitions = ports.enumerated().map { PortDefinition(port: 0, name: $0.offset == 0 ? "http" : nil) }
        definition.env = env.mapValues { .value($0) }
        return InstanceSpec(
            id: InstanceSpec.newID(for: definition.id), appID: definition.id, version: "v1", configVersion: "v1", definition: definition,
            node: "n", host: "127.0.0.1", ports: ports, stagedAt: "2026-01-01T00:00:00.000Z")
    }

    /// The exec driver beside the parts of the agent it relies on: a sandbox and its log files.
    struct Harness {
        let root: String
        let exec = ExecDriver(cgroups: Cgroups(mode: .disabled(reason: "unit test")))

        func logs(of id: String) -> InstanceLogs { InstanceLogs(directory: root + "/" + id, maxBytes: 1 << 20, keep: 2) }

        func launch(_ spec: InstanceSpec, agentEnvironment: [String: String]) async throws -> SupervisedProcess {
            let sandbox = root + "/" + spec.id
            try FileManager.default.createDirectory(atPath: sandbox, withIntermediateDirectories: true)
            return try await exec.start(spec, context: LaunchContext(sandbox: sandbox, logs: logs(of: spec.id), agentEnvironment: agentEnvironment))
        }

        func signal(_ process: SupervisedProcess, instanceID: String, _ signal: Int32) { exec.signal(process, instanceID: instanceID, signal) }
    }

    func driver() -> Harness { Harness(root: root) }

    func waitForExit(_ watcher: ProcessWatcher) async -> (key: String, exit: ProcessExit)? {
        for await exit in watcher.exits { return exit }
        return nil
    }

    @Test func runsInItsSandboxWithMarathonsEnvironment() async throws {
        defer { try? FileManager.default.removeItem(atPath: root) }
        let driver = driver()
        let spec = try spec(cmd: "echo \"$PORT0 $PORT $PORTS $PORT_HTTP $HOST $GREETING $MARATHON_APP_ID\"; pwd", env: ["GREETING": "hi"])
        let watcher = ProcessWatcher()
        defer { watcher.stop() }
        let process = try await driver.launch(spec, agentEnvironment: ["PATH": "/usr/bin:/bin"])
        watcher.watch(pidfd: CFlotillaSpawnBridge.pidfd(for: process.pid), key: spec.id)
        let exit = await waitForExit(watcher)
        #expect(exit?.key == spec.id)
        #expect(exit?.exit == ProcessExit(code: 0, signal: nil))
        let output = try String(contentsOfFile: driver.logs(of: spec.id).stdoutPath, encoding: .utf8)
        #expect(output == "31005 31005 31005 31005 127.0.0.1 hi /test/echo\n\(root)/\(spec.id)\n")
    }

    @Test func reportsExitCodesAndSignals() async throws {
        defer { try? FileManager.default.removeItem(atPath: root) }
        let driver = driver()
        let watcher = ProcessWatcher()
        defer { watcher.stop() }
        let failing = try spec(cmd: "echo broken >&2; exit 3")
        let failingProcess = try await driver.launch(failing, agentEnvironment: [:])
        watcher.watch(pidfd: CFlotillaSpawnBridge.pidfd(for: failingProcess.pid), key: failing.id)
        #expect(await waitForExit(watcher)?.exit == ProcessExit(code: 3, signal: nil))
        #expect(InstanceLogs.tail(of: driver.logs(of: failing.id).stderrPath, lines: 1) == "broken")

        let sleeper = try spec(cmd: "sleep 30")
        let sleeping = try await driver.launch(sleeper, agentEnvironment: ["PATH": "/usr/bin:/bin"])
        watcher.watch(pidfd: CFlotillaSpawnBridge.pidfd(for: sleeping.pid), key: sleeper.id)
        driver.signal(sleeping, instanceID: sleeper.id, SIGTERM)
        #expect(await waitForExit(watcher)?.exit == ProcessExit(code: nil, signal: SIGTERM))
    }

    @Test func stopReachesTheWholeProcessGroup() async throws {
        defer { try? FileManager.default.removeItem(atPath: root) }
        let driver = driver()
        let watcher = ProcessWatcher()
        defer { watcher.stop() }
        // The shell leads the group; its child must die with it.
        // The child outlives any stall of a loaded test run (it is killed below).
        let spec = try spec(cmd: "sleep 600 & echo $! > child.pid; wait")
        let process = try await driver.launch(spec, agentEnvironment: ["PATH": "/usr/bin:/bin"])
        watcher.watch(pidfd: CFlotillaSpawnBridge.pidfd(for: process.pid), key: spec.id)
        let childFile = "\(root)/\(spec.id)/child.pid"
        var child: Int32?
        for _ in 0..<100 where child == nil {
            child = (try? String(contentsOfFile: childFile, encoding: .utf8)).flatMap { Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
            if child == nil { try await Task.sleep(for: .milliseconds(20)) }
        }
        let childPID = try #require(child)
        #expect(ProcFS.sessionID(of: childPID) == process.pid)
        driver.signal(process, instanceID: spec.id, SIGKILL)
        _ = await waitForExit(watcher)
        var gone = false
        for _ in 0..<100 where !gone {
            gone = !ProcFS.isAlive(childPID)
            if !gone { try await Task.sleep(for: .milliseconds(20)) }
        }
        #expect(gone)
    }

    @Test func failsClearlyForAMissingProgram() async throws {
        defer { try? FileManager.default.removeItem(atPath: root) }
        var definition = AppDefinition(id: try AppID("/missing"), args: ["no-such-program-here"])
        definition.portDefinitions = []
        let spec = InstanceSpec(
            id: InstanceSpec.newID(for: definition.id), appID: definition.id, version: "v1", configVersion: "v1", definition: definition,
            node: "n", host: "h", ports: [], stagedAt: "x")
        await #expect(throws: AgentError.self) { try await driver().launch(spec, agentEnvironment: ["PATH": "/usr/bin:/bin"]) }
    }
}

@Suite struct InstanceLogsTests {
    @Test func rotatesBySizeAndKeepsGenerations() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("flotilla-logs-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let logs = InstanceLogs(directory: directory, maxBytes: 100, keep: 2)
        let (out, err) = try logs.openForProcess()
        defer {
            close(out)
            close(err)
        }
        for generation in 1...3 {
            let text = String(repeating: "\(generation)", count: 150)
            _ = text.withCString { write(out, $0, strlen($0)) }
            logs.rotateIfNeeded()
        }
        // The writer keeps appending to the same descriptor after a rotation.
        _ = "tail".withCString { write(out, $0, 4) }
        #expect(try String(contentsOfFile: logs.stdoutPath, encoding: .utf8) == "tail")
        #expect(try String(contentsOfFile: logs.stdoutPath + ".1", encoding: .utf8).hasPrefix("333"))
        #expect(try String(contentsOfFile: logs.stdoutPath + ".2", encoding: .utf8).hasPrefix("222"))
        #expect(!FileManager.default.fileExists(atPath: logs.stdoutPath + ".3"))
    }
}

@Suite struct CgroupsTests {
    @Test func joinsPathsWithoutDoubleSlashes() {
        #expect(Cgroups.join("/sys/fs/cgroup/memory", "/", "flotilla-x") == "/sys/fs/cgroup/memory/flotilla-x")
        #expect(Cgroups.join("/sys/fs/cgroup", "/user.slice/a/", "b") == "/sys/fs/cgroup/user.slice/a/b")
    }

    @Test func disabledModeIsHarmless() throws {
        let cgroups = Cgroups(mode: .disabled(reason: "test"))
        #expect(try cgroups.create(instanceID: "x", memoryMiB: 64, cpus: 1).isEmpty)
        #expect(!cgroups.wasOOMKilled(instanceID: "x"))
        #expect(cgroups.processes(instanceID: "x").isEmpty)
    }
}

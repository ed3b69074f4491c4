import AsyncHTTPClient
import CFlotillaSpawn
import FlotillaCore
import Foundation
import Glibc
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL

/// Why a probe got no answer.
struct ProbeFailure: Error, Sendable {
    var cause: String
}

/// What one health check said.
struct ProbeOutcome: Sendable {
    var passed: Bool
    /// Why it failed, for `lastFailureCause` and the deployment's failure report.
    var cause: String?
}

/// Runs one check of one instance, bounded by the check's timeout: HTTP(S) passes on 200–399, TCP
/// on a completed connect, COMMAND on exit 0 in the instance's environment. A probe that times out
/// fails; it never holds up another instance's checks (each runs in its own task).
struct HealthProbe: Sendable {
    let httpClient: HTTPClient
    let commands: CommandRunner

    /// - Parameter shell: how the instance's driver runs a shell command for it (inside its container).
    func run(
        _ check: HealthCheck, for spec: InstanceSpec, environment: [String: String], sandbox: String,
        shell: @Sendable (String) -> [String] = { ["/bin/sh", "-c", $0] }
    ) async -> ProbeOutcome {
        let timeout = max(0.001, check.effectiveTimeoutSeconds)
        switch check.protocol {
        case .http, .https, .mesosHTTP, .mesosHTTPS:
            guard let port = port(of: check, in: spec) else { return ProbeOutcome(passed: false, cause: "the app has no port \(check.portIndex ?? 0)") }
            let scheme = (check.protocol == .https || check.protocol == .mesosHTTPS) ? "https" : "http"
            var path = check.path ?? "/"
            if !path.hasPrefix("/") { path = "/" + path }
            return await http("\(scheme)://\(spec.host):\(port)\(path)", timeout: timeout, ignore1xx: check.ignoreHttp1xx)
        case .tcp, .mesosTCP:
            guard let port = port(of: check, in: spec) else { return ProbeOutcome(passed: false, cause: "the app has no port \(check.portIndex ?? 0)") }
            return await tcp(host: spec.host, port: port, timeout: timeout)
        case .command:
            return await commands.run(arguments: shell(check.command?.value ?? ""), environment: environment, directory: sandbox, timeout: timeout)
        }
    }

    /// Health checks follow no redirects and, like Marathon's, do not verify certificates (Consul's
    /// checks verify them unless `TLSSkipVerify`: `verifying`).
    static func makeHTTPClient(verifying: Bool = false) -> HTTPClient {
        var configuration = HTTPClient.Configuration(
            certificateVerification: verifying ? .fullVerification : .none, redirectConfiguration: .disallow)
        configuration.connectionPool = .init(idleTimeout: .seconds(5), concurrentHTTP1ConnectionsPerHostSoftLimit: 2)
        return HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
    }

    func port(of check: HealthCheck, in spec: InstanceSpec) -> Int? {
        if let port = check.port { return port }
        let index = check.portIndex ?? 0
        return spec.ports.indices.contains(index) ? spec.ports[index] : nil
    }

    func http(
        _ url: String, timeout: Double, ignore1xx: Bool, method: String = "GET", headers: [String: [String]] = [:], body: String? = nil,
        client: HTTPClient? = nil
    ) async -> ProbeOutcome {
        var request = HTTPClientRequest(url: url)
        request.method = HTTPMethod(rawValue: method)
        request.headers.add(name: "User-Agent", value: "flotilla-health-check")
        for (name, values) in headers {
            if name.lowercased() == "user-agent" { request.headers.remove(name: name) }
            for value in values { request.headers.add(name: name, value: value) }
        }
        if let body { request.body = .bytes(ByteBuffer(string: body)) }
        do {
            let response = try await (client ?? httpClient).execute(request, timeout: .milliseconds(Int64(timeout * 1000)))
            let status = Int(response.status.code)
            _ = try? await response.body.collect(upTo: 64 * 1024)
            if (200..<400).contains(status) || (ignore1xx && (100..<200).contains(status)) {
                return ProbeOutcome(passed: true)
            }
            return ProbeOutcome(passed: false, cause: "\(method) \(url) answered \(status)")
        } catch {
            return ProbeOutcome(passed: false, cause: "\(method) \(url) failed: \(Self.describe(error, timeout: timeout))")
        }
    }

    /// One readiness request: the answer's status, content type and (first 16 KiB of) body, or why
    /// there was none.
    func readiness(_ check: ReadinessCheck, for spec: InstanceSpec) async -> Result<ReadinessResult.Response, ProbeFailure> {
        guard let index = spec.definition.ports.firstIndex(where: { $0.name == check.portName }), spec.ports.indices.contains(index)
        else { return .failure(ProbeFailure(cause: "the app has no port named \(check.portName)")) }
        var path = check.path
        if !path.hasPrefix("/") { path = "/" + path }
        let url = "\(check.protocol == .https ? "https" : "http")://\(spec.host):\(spec.ports[index])\(path)"
        var request = HTTPClientRequest(url: url)
        request.headers.add(name: "User-Agent", value: "flotilla-readiness-check")
        let timeout = max(0.001, check.timeoutSeconds)
        do {
            let response = try await httpClient.execute(request, timeout: .milliseconds(Int64(timeout * 1000)))
            var body = (try? await response.body.collect(upTo: 1 << 20)) ?? ByteBuffer()
            let text = body.readString(length: min(body.readableBytes, 16 * 1024)) ?? ""
            return .success(.init(status: Int(response.status.code), contentType: response.headers.first(name: "Content-Type") ?? "", body: text))
        } catch {
            return .failure(ProbeFailure(cause: "GET \(url) failed: \(Self.describe(error, timeout: timeout))"))
        }
    }

    func tcp(host: String, port: Int, timeout: Double) async -> ProbeOutcome {
        do {
            let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .connectTimeout(.milliseconds(Int64(timeout * 1000)))
                .connect(host: host, port: port).get()
            try? await channel.close()
            return ProbeOutcome(passed: true)
        } catch {
            return ProbeOutcome(passed: false, cause: "TCP connect to \(host):\(port) failed: \(Self.describe(error, timeout: timeout))")
        }
    }

    static func describe(_ error: any Error, timeout: Double) -> String {
        let text = "\(error)"
        if text.contains("imeout") || text.contains("deadline") { return "no answer within \(timeout) s" }
        if text.contains("connectionRefused") || text.contains("refused") { return "connection refused" }
        return text
    }
}

/// Runs COMMAND checks: `/bin/sh -c` in the instance's environment and sandbox, in its own process
/// group so a timeout kills all of it.
final class CommandRunner: Sendable {
    private let watcher = ProcessWatcher()
    private let waiters = WaiterTable()

    init() {
        let watcher = watcher, waiters = waiters
        Task.detached {
            for await (key, exit) in watcher.exits { await waiters.finish(key, exit) }
        }
    }

    func stop() { watcher.stop() }

    func run(_ command: String, environment: [String: String], directory: String, timeout: Double) async -> ProbeOutcome {
        await run(arguments: ["/bin/sh", "-c", command], environment: environment, directory: directory, timeout: timeout)
    }

    /// Runs a program (found on `PATH` unless the first argument is a path) with its arguments.
    func run(arguments program: [String], environment: [String: String], directory: String, timeout: Double) async -> ProbeOutcome {
        guard let first = program.first, !first.isEmpty else { return ProbeOutcome(passed: false, cause: "the check has no command") }
        let arguments = first.contains("/") ? program : ["/usr/bin/env", "--"] + program
        let outputPath = directory + "/.health-check-\(UUID().uuidString.prefix(8))"
        let output = open(outputPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard output >= 0 else { return ProbeOutcome(passed: false, cause: "cannot create \(outputPath): \(String(cString: strerror(errno)))") }
        defer {
            close(output)
            unlink(outputPath)
        }
        var stage: Int32 = 0, number: Int32 = 0
        let environmentList = environment.map { "\($0.key)=\($0.value)" }
        let pid = withCStringArray(arguments) { argv in
            withCStringArray(environmentList) { envp in
                directory.withCString { directoryPointer in
                    arguments[0].withCString { shell in
                        var request = flotilla_spawn_request(
                            path: shell, argv: argv.baseAddress, envp: envp.baseAddress, working_directory: directoryPointer,
                            cgroup_procs_files: nil, cgroup_count: 0, stdout_fd: output, stderr_fd: output, set_user: 0, uid: 0, gid: 0,
                            groups: nil, group_count: 0)
                        return flotilla_spawn(&request, &stage, &number)
                    }
                }
            }
        }
        guard pid > 0 else { return ProbeOutcome(passed: false, cause: "cannot run the check: \(String(cString: strerror(number)))") }
        let key = "check-\(pid)-\(UUID().uuidString)"
        let exit: ProcessExit? = await withTaskGroup(of: ProcessExit?.self) { group in
            group.addTask { await self.waiters.wait(key) }
            group.addTask {
                try? await Task.sleep(for: .milliseconds(Int64(timeout * 1000)))
                return nil
            }
            let pidfd = flotilla_pidfd_open(pid)
            self.watcher.watch(pidfd: pidfd, key: key)
            let first = await group.next() ?? nil
            if first == nil {
                kill(-pid, SIGKILL)
            }
            group.cancelAll()
            return first
        }
        let text = InstanceLogs.tail(of: outputPath, lines: 3)
        guard let exit else {
            return ProbeOutcome(passed: false, cause: "command did not finish within \(timeout) s" + (text.isEmpty ? "" : ": \(text)"))
        }
        if exit.code == 0 { return ProbeOutcome(passed: true) }
        let how = exit.code.map { "exit status \($0)" } ?? "signal \(exit.signal ?? 0)"
        return ProbeOutcome(passed: false, cause: "command failed with \(how)" + (text.isEmpty ? "" : ": \(text)"))
    }
}

/// Continuations waiting for a keyed exit, tolerant of the exit arriving first.
actor WaiterTable {
    private var waiting: [String: CheckedContinuation<ProcessExit?, Never>] = [:]
    private var arrived: [String: ProcessExit] = [:]

    func wait(_ key: String) async -> ProcessExit? {
        if let exit = arrived.removeValue(forKey: key) { return exit }
        return await withTaskCancellationHandler {
            await withCheckedContinuation { continuation in
                if let exit = arrived.removeValue(forKey: key) {
                    continuation.resume(returning: exit)
                } else {
                    waiting[key] = continuation
                }
            }
        } onCancel: {
            Task { await self.cancel(key) }
        }
    }

    func finish(_ key: String, _ exit: ProcessExit) {
        if let continuation = waiting.removeValue(forKey: key) {
            continuation.resume(returning: exit)
        } else {
            arrived[key] = exit
            if arrived.count > 1024 { arrived.removeAll() }
        }
    }

    private func cancel(_ key: String) {
        waiting.removeValue(forKey: key)?.resume(returning: nil)
    }
}

/// HTTP and TCP probes for checks that are not an app's (services registered through the
/// Consul agent API): the same rules as app health checks.
public struct NetworkProbe: Sendable {
    private let probe: HealthProbe
    /// For Consul checks, which verify certificates unless told not to.
    private let verifyingClient: HTTPClient
    /// Where command checks run.
    private let directory: String

    public init(directory: String = "/tmp") {
        probe = HealthProbe(httpClient: HealthProbe.makeHTTPClient(), commands: CommandRunner())
        verifyingClient = HealthProbe.makeHTTPClient(verifying: true)
        self.directory = directory
    }

    public func http(
        url: String, method: String = "GET", headers: [String: [String]] = [:], body: String? = nil, verifyCertificate: Bool = false,
        timeoutSeconds: Double
    ) async -> (passed: Bool, output: String) {
        let outcome = await probe.http(
            url, timeout: timeoutSeconds, ignore1xx: false, method: method, headers: headers, body: body,
            client: verifyCertificate ? verifyingClient : nil)
        return (outcome.passed, outcome.passed ? "HTTP \(method) \(url): OK" : outcome.cause ?? "failed")
    }

    /// A command check: passes on exit 0; the output says why it failed.
    public func command(_ arguments: [String], timeoutSeconds: Double) async -> (passed: Bool, output: String) {
        let outcome = await probe.commands.run(
            arguments: arguments, environment: ProcessInfo.processInfo.environment, directory: directory, timeout: timeoutSeconds)
        return (outcome.passed, outcome.passed ? "\(arguments.joined(separator: " ")): exit status 0" : outcome.cause ?? "failed")
    }

    public func tcp(host: String, port: Int, timeoutSeconds: Double) async -> (passed: Bool, output: String) {
        let outcome = await probe.tcp(host: host, port: port, timeout: timeoutSeconds)
        return (outcome.passed, outcome.passed ? "TCP connect \(host):\(port): Success" : outcome.cause ?? "failed")
    }

    /// Releases the HTTP client and the command watcher; call once, when nothing probes any more.
    public func shutdown() async {
        try? await probe.httpClient.shutdown()
        try? await verifyingClient.shutdown()
        probe.commands.stop()
    }
}

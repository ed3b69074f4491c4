import ArgumentParser
import FlotillaCore
import Foundation
import Glibc
import NIOCore
import NIOHTTP1
import Yams

struct DeployCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "deploy", abstract: "Create or update an app from a JSON or YAML definition and follow the deployment.")

    @Argument(help: "The app definition file (JSON or YAML); - reads standard input.")
    var file: String

    @OptionGroup var change: ChangeOptions
    @OptionGroup var options: ClientOptions

    func run() async throws {
        let definition = try loadDefinition()
        guard let id = definition["id"]?.stringValue else { throw CLIError("\(file): the definition needs an 'id'") }
        let client = try options.client()
        let exists = try await client.request(.GET, APIClient.appPath(id)).status == 200
        let result = try await client.call(
            exists ? .PUT : .POST, exists ? APIClient.appPath(id) + "?force=\(change.force)&partialUpdate=false" : "/v2/apps", body: definition)
        try await change.follow(result, client: client, options: options, id: id, action: exists ? "updating \(id)" : "creating \(id)")
    }

    func loadDefinition() throws -> JSONValue {
        let data: Data
        if file == "-" {
            data = FileHandle.standardInput.readDataToEndOfFile()
        } else {
            guard let contents = FileManager.default.contents(atPath: file) else { throw CLIError("cannot read \(file)") }
            data = contents
        }
        if let json = try? JSONValue.parse(data), case .object = json { return json }
        do {
            guard let yaml = try Yams.load(yaml: String(decoding: data, as: UTF8.self)) else { throw CLIError("\(file) is empty") }
            let converted = try JSONValue(yaml: yaml)
            guard case .object = converted else { throw CLIError("\(file): the definition must be an object") }
            return converted
        } catch let error as CLIError {
            throw error
        } catch {
            throw CLIError("\(file) is neither valid JSON nor valid YAML: \(error)")
        }
    }

}

struct AppsCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "apps", abstract: "List apps.")
    @OptionGroup var options: ClientOptions

    func run() async throws {
        let apps = try await options.client().call(.GET, "/v2/apps")
        if options.json { return printJSON(apps["apps"] ?? .array([])) }
        let rows = (apps["apps"]?.arrayValue ?? []).map { app in
            [
                app.text("id"), "\(app["tasksRunning"]?.intValue ?? 0)/\(app["instances"]?.intValue ?? 0)",
                "\(app["cpus"]?.doubleValue ?? 0)", "\(Int(app["mem"]?.doubleValue ?? 0))",
                app["deployments"]?.arrayValue.isEmpty == false ? "deploying" : "stable", app.text("version"),
            ]
        }
        printTable(["ID", "RUNNING", "CPUS", "MEM", "STATUS", "VERSION"], rows)
    }
}

struct AppCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "app", abstract: "Show one app, its instances and its last failure.")
    @Argument(help: "The app id, e.g. /shop/cart.") var id: String
    @OptionGroup var options: ClientOptions

    func run() async throws {
        let app = try await options.client().call(.GET, APIClient.appPath(id))["app"] ?? .null
        if options.json { return printJSON(app) }
        print("id:        \(app.text("id"))")
        print("command:   \(app["cmd"]?.stringValue ?? (app["args"]?.arrayValue.compactMap(\.stringValue).joined(separator: " ") ?? ""))")
        print("instances: \(app["tasksRunning"]?.intValue ?? 0) running of \(app["instances"]?.intValue ?? 0)")
        print("resources: \(app["cpus"]?.doubleValue ?? 0) cpus, \(Int(app["mem"]?.doubleValue ?? 0)) MiB")
        print("version:   \(app.text("version"))")
        let deployments = app["deployments"]?.arrayValue.map { $0.text("id") } ?? []
        if !deployments.isEmpty { print("deploying: \(deployments.joined(separator: ", "))") }
        if let failure = app["lastTaskFailure"], failure != .null {
            print("last failure: \(failure.text("timestamp")) \(failure.text("state")) \(failure.text("taskId")): \(failure.text("message"))")
        }
        print("")
        TasksCommand.printTasks(app["tasks"]?.arrayValue ?? [])
    }
}

struct ScaleCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "scale", abstract: "Set an app's number of instances.")
    @Argument(help: "The app id.") var id: String
    @Argument(help: "The number of instances.") var instances: Int
    @OptionGroup var change: ChangeOptions
    @OptionGroup var options: ClientOptions

    func validate() throws {
        if instances < 0 { throw ValidationError("the number of instances must be zero or more") }
    }

    func run() async throws {
        let client = try options.client()
        let result = try await client.call(
            .PUT, APIClient.appPath(id) + "?force=\(change.force)", body: .object(["instances": .number(Double(instances))]))
        try await change.follow(result, client: client, options: options, id: id, action: "scaling \(id) to \(instances)")
    }
}

struct RestartCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "restart", abstract: "Replace every instance of an app.")
    @Argument(help: "The app id.") var id: String
    @OptionGroup var change: ChangeOptions
    @OptionGroup var options: ClientOptions

    func run() async throws {
        let client = try options.client()
        let result = try await client.call(.POST, APIClient.appPath(id) + "/restart?force=\(change.force)")
        try await change.follow(result, client: client, options: options, id: id, action: "restarting \(id)")
    }
}

struct RollbackCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rollback", abstract: "Return an app to an earlier version (default: the one before the current).")
    @Argument(help: "The app id.") var id: String
    @Option(help: "The version to return to (see `flotilla versions`).") var to: String?
    @OptionGroup var change: ChangeOptions
    @OptionGroup var options: ClientOptions

    func run() async throws {
        let client = try options.client()
        var target = to
        if target == nil {
            let app = try await client.call(.GET, APIClient.appPath(id))["app"] ?? .null
            let lastConfigChange = app["versionInfo"]?.text("lastConfigChangeAt") ?? app.text("version")
            let versions = try await client.call(.GET, APIClient.appPath(id) + "/versions")["versions"]?.arrayValue.compactMap(\.stringValue) ?? []
            // The newest version older than the current configuration.
            target = versions.sorted(by: >).first { $0 < lastConfigChange }
            guard target != nil else { throw CLIError("\(id) has no earlier configuration to return to") }
        }
        let result = try await client.call(.PUT, APIClient.appPath(id) + "?force=\(change.force)", body: .object(["version": .string(target!)]))
        try await change.follow(result, client: client, options: options, id: id, action: "rolling \(id) back to \(target!)")
    }
}

struct DestroyCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "destroy", abstract: "Stop all instances of an app and remove it.")
    @Argument(help: "The app id.") var id: String
    @OptionGroup var change: ChangeOptions
    @OptionGroup var options: ClientOptions

    func run() async throws {
        let client = try options.client()
        let result = try await client.call(.DELETE, APIClient.appPath(id) + "?force=\(change.force)")
        try await change.follow(result, client: client, options: options, id: id, action: "destroying \(id)", removesApp: true)
    }
}

struct VersionsCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "versions", abstract: "List an app's versions, newest first.")
    @Argument(help: "The app id.") var id: String
    @OptionGroup var options: ClientOptions

    func run() async throws {
        let versions = try await options.client().call(.GET, APIClient.appPath(id) + "/versions")["versions"] ?? .array([])
        if options.json { return printJSON(versions) }
        for version in versions.arrayValue { print(version.stringValue ?? "") }
    }
}

struct TasksCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "tasks", abstract: "List instances, of one app or all.")
    @Argument(help: "The app id (default: every app).") var id: String?
    @OptionGroup var options: ClientOptions

    func run() async throws {
        let path = id.map { APIClient.appPath($0) + "/tasks" } ?? "/v2/tasks"
        let tasks = try await options.client().call(.GET, path)["tasks"] ?? .array([])
        if options.json { return printJSON(tasks) }
        Self.printTasks(tasks.arrayValue)
    }

    static func printTasks(_ tasks: [JSONValue]) {
        printTable(
            ["INSTANCE", "STATE", "HOST", "PORTS", "STARTED", "VERSION"],
            tasks.map { task in
                [
                    task.text("id"), task.text("state"), task.text("host"),
                    task["ports"]?.arrayValue.compactMap { $0.intValue.map(String.init) }.joined(separator: ",") ?? "",
                    task.text("startedAt"), task.text("version"),
                ]
            })
    }
}

struct DeploymentsCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "deployments", abstract: "List deployments in progress.")
    @OptionGroup var options: ClientOptions

    func run() async throws {
        let deployments = try await options.client().call(.GET, "/v2/deployments")
        if options.json { return printJSON(deployments) }
        printTable(
            ["ID", "APPS", "STEP", "ACTIONS", "VERSION"],
            deployments.arrayValue.map { deployment in
                [
                    deployment.text("id"), deployment["affectedApps"]?.arrayValue.compactMap(\.stringValue).joined(separator: ",") ?? "",
                    "\(deployment["currentStep"]?.intValue ?? 0)/\(deployment["totalSteps"]?.intValue ?? 0)",
                    deployment["currentActions"]?.arrayValue.map { $0.text("action") }.joined(separator: ",") ?? "",
                    deployment.text("version"),
                ]
            })
    }
}

struct LogsCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "logs", abstract: "Print an instance's output, or every instance's of an app merged by time.",
        discussion: """
            flotilla logs /shop/cart -f --grep ERROR --since 10m
            flotilla logs shop_cart.6f1c… --stderr
            An app's lines carry their time and instance (one colour per instance on a terminal); \
            --json prints them as NDJSON objects (time, instance, app, node, stream, line).
            """)
    @Argument(help: "An instance id, or an app id.") var target: String
    @Flag(name: .shortAndLong, help: "Keep printing as the output grows (an app's: its new instances too).") var follow = false
    @Flag(help: "Show standard error instead of standard output.") var stderr = false
    @Option(help: "stdout, stderr or both (an app's default: both; an instance's: stdout).") var stream: String?
    @Option(help: "How many lines from the end to start with.") var lines = 100
    @Option(help: "Only lines containing this text (an app's logs).") var grep: String?
    @Flag(help: "--grep is a regular expression.") var regex = false
    @Option(help: "Only lines from then on: an RFC 3339 time or a duration back from now (10m, 2h, 1d).") var since: String?
    @Option(help: "Only lines until then: an RFC 3339 time or a duration back from now.") var until: String?
    @OptionGroup var options: ClientOptions

    func validate() throws {
        if stderr, let stream, stream != "stderr" { throw ValidationError("--stderr and --stream \(stream) disagree") }
        if let stream, !["stdout", "stderr", "both"].contains(stream) { throw ValidationError("--stream must be stdout, stderr or both") }
        if regex && grep == nil { throw ValidationError("--regex needs --grep") }
    }

    func run() async throws {
        let client = try options.client()
        var isApp = target.contains("/")
        if !isApp { isApp = try await client.request(.GET, APIClient.appPath(target)).status == 200 }
        if isApp { return try await appLogs(client) }
        guard grep == nil, since == nil, until == nil, stream != "both" else {
            throw CLIError("--grep, --since, --until and --stream both read an app's logs: give the app's id")
        }
        let chosen = stderr ? "stderr" : (stream ?? "stdout")
        if follow {
            try await client.stream("/flotilla/v1/logs/\(target)?stream=\(chosen)&lines=\(lines)&follow=true") { chunk in
                FileHandle.standardOutput.write(Data(chunk.readableBytesView))
            }
            return
        }
        let reply = try await client.request(.GET, "/flotilla/v1/logs/\(target)?stream=\(chosen)&lines=\(lines)")
        guard reply.status == 200 else { throw CLIError(APIClient.describeError(reply)) }
        FileHandle.standardOutput.write(reply.body)
    }

    /// The merged form, asked for as NDJSON and printed line by line as it comes.
    private func appLogs(_ client: APIClient) async throws {
        var parameters: [(String, String)] = [
            ("app", "/" + target.split(separator: "/").joined(separator: "/")), ("stream", stderr ? "stderr" : (stream ?? "both")),
            ("lines", String(lines)), ("format", "json"),
        ]
        if follow { parameters.append(("follow", "true")) }
        if let grep { parameters.append(("grep", grep)) }
        if regex { parameters.append(("regex", "true")) }
        if let since { parameters.append(("since", since)) }
        if let until { parameters.append(("until", until)) }
        var allowed = CharacterSet.alphanumerics
        allowed.insert(charactersIn: "-._~")
        let query = parameters.map { "\($0)=\($1.addingPercentEncoding(withAllowedCharacters: allowed) ?? $1)" }.joined(separator: "&")
        var printer = LogPrinter(json: options.json, colour: isatty(STDOUT_FILENO) == 1, showingStream: (stderr ? "stderr" : (stream ?? "both")) == "both")
        try await client.stream("/flotilla/v1/logs?" + query) { chunk in printer.take(chunk.readableBytesView) }
        printer.finish()
    }
}

/// Prints an app's NDJSON log lines: as they are with `--json`, else `time instance line` with a
/// colour per instance on a terminal. Notices about nodes that did not answer go to standard error.
struct LogPrinter {
    let json: Bool
    let colour: Bool
    let showingStream: Bool
    private var pending: [UInt8] = []
    private var colours: [String: Int] = [:]
    static let palette = [36, 33, 32, 35, 34, 31, 96, 93, 92, 95, 94, 91]

    init(json: Bool, colour: Bool, showingStream: Bool) {
        self.json = json
        self.colour = colour
        self.showingStream = showingStream
    }

    mutating func take(_ bytes: some Collection<UInt8>) {
        pending += bytes
        guard let last = pending.lastIndex(of: UInt8(ascii: "\n")) else { return }
        var output: [UInt8] = []
        for line in pending[...last].split(separator: UInt8(ascii: "\n")) { render(line, into: &output) }
        pending.removeSubrange(...last)
        FileHandle.standardOutput.write(Data(output))
    }

    mutating func finish() {
        guard !pending.isEmpty else { return }
        pending.append(UInt8(ascii: "\n"))
        take([])
    }

    private mutating func render(_ bytes: ArraySlice<UInt8>, into output: inout [UInt8]) {
        guard let line = LogLine(json: bytes) else {
            // A node that is down or did not answer: said, not printed among the lines.
            if let notice = try? JSONValue.parse(Data(bytes)), let node = notice["node"]?.stringValue {
                FileHandle.standardError.write(Data("flotilla: node \(node): \(notice.text("error")); its lines are missing\n".utf8))
            }
            return
        }
        if json {
            output += bytes
            output.append(UInt8(ascii: "\n"))
            return
        }
        var label = line.instance
        if showingStream { label += ":" + line.stream.rawValue }
        if colour {
            let code = colours[line.instance] ?? Self.palette[colours.count % Self.palette.count]
            colours[line.instance] = code
            label = "\u{1B}[\(code)m\(label)\u{1B}[0m"
        }
        output += "\(line.time) \(label) \(line.text)\n".utf8
    }
}

extension JSONValue {
    /// Converts what Yams parsed into JSON.
    init(yaml: Any) throws {
        switch yaml {
        case let value as String: self = .string(value)
        case let value as Bool: self = .bool(value)
        case let value as Int: self = .number(Double(value))
        case let value as Double: self = .number(value)
        case let value as [Any]: self = .array(try value.map { try JSONValue(yaml: $0) })
        case let value as [String: Any]: self = .object(try value.mapValues { try JSONValue(yaml: $0) })
        case is NSNull: self = .null
        default: throw CLIError("unsupported YAML value \(yaml)")
        }
    }
}

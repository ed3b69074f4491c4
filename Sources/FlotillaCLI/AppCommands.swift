import ArgumentParser
import FlotillaCore
import Foundation
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
    static let configuration = CommandConfiguration(commandName: "logs", abstract: "Print an instance's output (or each instance's of an app).")
    @Argument(help: "An instance id, or an app id.") var target: String
    @Flag(name: .shortAndLong, help: "Keep printing as the output grows.") var follow = false
    @Flag(help: "Show standard error instead of standard output.") var stderr = false
    @Option(help: "How many lines from the end to start with.") var lines = 100
    @OptionGroup var options: ClientOptions

    func run() async throws {
        let client = try options.client()
        var instances = [target]
        var isApp = target.contains("/")
        if !isApp { isApp = try await client.request(.GET, APIClient.appPath(target)).status == 200 }
        if isApp {
            let tasks = try await client.call(.GET, APIClient.appPath(target) + "/tasks")["tasks"]?.arrayValue ?? []
            instances = tasks.map { $0.text("id") }
            guard !instances.isEmpty else { throw CLIError("\(target) has no instances") }
        }
        let stream = stderr ? "stderr" : "stdout"
        if follow {
            guard instances.count == 1 else {
                throw CLIError("\(target) has \(instances.count) instances; follow one of: \(instances.joined(separator: " "))")
            }
            try await client.stream("/flotilla/v1/logs/\(instances[0])?stream=\(stream)&lines=\(lines)&follow=true") { chunk in
                FileHandle.standardOutput.write(Data(chunk.readableBytesView))
            }
            return
        }
        for instance in instances {
            let reply = try await client.request(.GET, "/flotilla/v1/logs/\(instance)?stream=\(stream)&lines=\(lines)")
            guard reply.status == 200 else { throw CLIError(APIClient.describeError(reply)) }
            if instances.count > 1 { print("==> \(instance) <==") }
            FileHandle.standardOutput.write(reply.body)
        }
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

import ArgumentParser
import FlotillaCore
import Foundation
import NIOCore
import NIOHTTP1

struct ServicesCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "services", abstract: "List registered services, or the instances of one with their health.")
    @Argument(help: "A service name (default: all services with their tags).") var name: String?
    @Flag(help: "Only instances whose checks all pass.") var passing = false
    @OptionGroup var options: ClientOptions

    func run() async throws {
        let client = try options.client()
        guard let name else {
            let services = try await client.call(.GET, "/v1/catalog/services")
            if options.json { return printJSON(services) }
            let rows = (services.objectValue ?? [:]).sorted { $0.key < $1.key }.map { name, tags in
                [name, tags.arrayValue.compactMap(\.stringValue).joined(separator: ",")]
            }
            return printTable(["SERVICE", "TAGS"], rows)
        }
        let path = "/v1/health/service/\(name)" + (passing ? "?passing" : "")
        let entries = try await client.call(.GET, path)
        if options.json { return printJSON(entries) }
        printTable(
            ["ID", "ADDRESS", "STATUS", "NODE", "TAGS"],
            entries.arrayValue.map { entry in
                let service = entry["Service"] ?? .null
                let checks = entry["Checks"]?.arrayValue ?? []
                let worst = checks.compactMap { $0["Status"]?.stringValue }.max { rank($0) < rank($1) } ?? "passing"
                return [
                    service.text("ID"), "\(service.text("Address")):\(service["Port"]?.intValue ?? 0)", worst,
                    entry["Node"]?.text("Node") ?? "", service["Tags"]?.arrayValue.compactMap(\.stringValue).joined(separator: ",") ?? "",
                ]
            })
    }

    func rank(_ status: String) -> Int { ["passing": 0, "warning": 1, "critical": 2][status] ?? 3 }
}

struct NodesCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "nodes", abstract: "List the cluster's nodes, or forget one that is down.",
        subcommands: [List.self, Forget.self], defaultSubcommand: List.self)

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List nodes: status (ready or down), leader, resources, attributes.")
        @OptionGroup var options: ClientOptions

        func run() async throws {
            let nodes = try await options.client().call(.GET, "/flotilla/v1/nodes")
            if options.json { return printJSON(nodes) }
            printTable(
                ["NODE", "ADDRESS", "STATUS", "LEADER", "CPUS", "MEM", "INSTANCES", "DRIVERS", "ATTRIBUTES"],
                nodes.arrayValue.map { node in
                    let attributes = (node["attributes"]?.objectValue ?? [:]).sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value.stringValue ?? "")" }
                    let drivers = (node["drivers"]?.arrayValue ?? []).compactMap(\.stringValue)
                    return [
                        node.text("name"), node.text("address"), node.text("status"), node["leader"] == .bool(true) ? "*" : "",
                        NodesCommand.number(node["cpus"]), NodesCommand.number(node["mem"]), NodesCommand.number(node["instances"]), drivers.joined(separator: ","), attributes.joined(separator: " "),
                    ]
                })
        }
    }

    static func number(_ value: JSONValue?) -> String {
        guard let value = value?.doubleValue else { return "" }
        return value == value.rounded() ? String(Int(value)) : String(value)
    }

    struct Forget: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Forget a node that is down (decommissioned): it leaves the node list and the catalog.")
        @Argument(help: "The node's name.") var name: String
        @OptionGroup var options: ClientOptions

        func run() async throws {
            let reply = try await options.client().call(.DELETE, "/flotilla/v1/nodes/\(name)")
            if options.json { return printJSON(reply) }
            print("forgot node \(name)")
        }
    }
}

struct KVCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kv", abstract: "Read and write the key/value store.",
        subcommands: [Get.self, Put.self, Delete.self, List.self])

    struct Get: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print a key's value.")
        @Argument(help: "The key.") var key: String
        @OptionGroup var options: ClientOptions

        func run() async throws {
            let reply = try await options.client().request(.GET, "/v1/kv/\(KVCommand.escape(key))")
            guard reply.status == 200, let entry = reply.json?.arrayValue.first else {
                throw CLIError(reply.status == 404 ? "no key '\(key)'" : APIClient.describeError(reply))
            }
            if options.json { return printJSON(entry) }
            let value = entry["Value"]?.stringValue.flatMap { Data(base64Encoded: $0) } ?? Data()
            FileHandle.standardOutput.write(value)
            if value.last != UInt8(ascii: "\n") { print("") }
        }
    }

    struct Put: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Set a key (the value from the argument, or - for standard input).")
        @Argument(help: "The key.") var key: String
        @Argument(help: "The value; - reads standard input.") var value: String
        @Option(help: "Only if the key's modify index is this (0: only if absent).") var cas: UInt64?
        @OptionGroup var options: ClientOptions

        func run() async throws {
            let data = value == "-" ? FileHandle.standardInput.readDataToEndOfFile() : Data(value.utf8)
            let path = "/v1/kv/\(KVCommand.escape(key))" + (cas.map { "?cas=\($0)" } ?? "")
            let reply = try await options.client().raw(.PUT, path, body: data)
            guard reply.status == 200 else { throw CLIError(APIClient.describeError(reply)) }
            let written = String(decoding: reply.body, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines) == "true"
            if options.json { return printJSON(.object(["key": .string(key), "written": .bool(written)])) }
            guard written else { throw CLIError("not written: '\(key)' changed since index \(cas ?? 0)") }
            print("wrote \(key)")
        }
    }

    struct Delete: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Delete a key, or with --recurse every key under a prefix.")
        @Argument(help: "The key or prefix.") var key: String
        @Flag(help: "Delete everything under the prefix.") var recurse = false
        @OptionGroup var options: ClientOptions

        func run() async throws {
            let result = try await options.client().call(.DELETE, "/v1/kv/\(KVCommand.escape(key))" + (recurse ? "?recurse" : ""))
            if options.json { return printJSON(.object(["key": .string(key), "deleted": result])) }
            print("deleted \(key)\(recurse ? " and everything under it" : "")")
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List keys under a prefix.")
        @Argument(help: "The prefix (default: all keys).") var prefix: String = ""
        @OptionGroup var options: ClientOptions

        func run() async throws {
            let reply = try await options.client().request(.GET, "/v1/kv/\(KVCommand.escape(prefix))?keys")
            let keys = reply.status == 404 ? [] : (reply.json?.arrayValue ?? [])
            guard reply.status == 200 || reply.status == 404 else { throw CLIError(APIClient.describeError(reply)) }
            if options.json { return printJSON(.array(keys)) }
            for key in keys { print(key.stringValue ?? "") }
        }
    }

    static func escape(_ key: String) -> String {
        var allowed = CharacterSet.urlPathAllowed
        allowed.remove(charactersIn: "?#%")
        return key.addingPercentEncoding(withAllowedCharacters: allowed) ?? key
    }
}

struct RoutesCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "routes", abstract: "Show the load balancer's live routes.")
    @OptionGroup var options: ClientOptions

    func run() async throws {
        let routes = try await options.client().call(.GET, "/api/routes")
        if options.json { return printJSON(routes) }
        printTable(
            ["ROUTE", "SERVICE", "DESTINATION", "WEIGHT", "OPTIONS"],
            routes.arrayValue.map { route in
                let weight = route["weight"]?.doubleValue ?? 0
                return [
                    route.text("src"), route.text("service"), route["dst"]?.stringValue ?? "(no healthy instance: 503)",
                    String(format: "%.2f", weight), route.text("opts"),
                ]
            })
    }
}

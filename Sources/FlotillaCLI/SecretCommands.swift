import ArgumentParser
import FlotillaCore
import FlotillaSecrets
import FlotillaServer
import Logging
import FlotillaStore
import Foundation
import NIOHTTP1

/// Keys for the secrets engine: made and rotated by the operator, never sent to the agent's API.
struct SecretsCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "secrets", abstract: "Make and rotate the key secrets are sealed under.", subcommands: [Keygen.self, RotateKey.self])

    struct Keygen: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Print a new secrets key (32 random bytes, base64).",
            discussion: "flotilla secrets keygen > /etc/flotilla/key && chmod 600 /etc/flotilla/key; then flotilla agent --secrets-key-file /etc/flotilla/key")
        @Flag(help: "Print JSON: {\"key\": …}.") var json = false

        func run() {
            let key = SecretsMasterKey.generate()
            if json { printJSON(["key": .string(key)]) } else { print(key) }
        }
    }

    struct RotateKey: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "rotate-key",
            abstract: "Re-seal the store's secrets key under a new key; every secret stays readable.",
            discussion: "On SQLite, run it on the node whose data directory holds the state; on etcd, from anywhere that reaches it (--store etcd://…). Restart the agents with --secrets-key-file NEW afterwards.")
        @Option(help: "The agent's data directory.") var dataDir: String = AgentCommand.defaultDataDirectory()
        @Option(help: "Where the state lives: sqlite[:PATH] (state.db in --data-dir) or etcd://HOST:PORT[,…], as the agent's --store.") var store: String = "sqlite"
        @Option(help: "The etcd key prefix, as the agent's.") var etcdPrefix: String = "/flotilla"
        @Option(help: "The etcd members' CA (PEM).") var etcdCa: String?
        @Option(help: "A client certificate for etcd (PEM).") var etcdCert: String?
        @Option(help: "The private key of --etcd-cert (PEM).") var etcdKey: String?
        @Option(help: "The key the secrets are sealed under now.") var oldKeyFile: String
        @Option(help: "The key to seal them under from now on (make one with 'flotilla secrets keygen').") var newKeyFile: String
        @Flag(help: "Print JSON.") var json = false

        func run() async throws {
            let old = try SecretsMasterKey(file: oldKeyFile)
            let new = try SecretsMasterKey(file: newKeyFile)
            let location = try StoreLocation.parse(store, etcdPrefix: etcdPrefix, caFile: etcdCa, certFile: etcdCert, keyFile: etcdKey)
            let name = try await location.withStore(dataDirectory: dataDir, logger: Logger(label: "flotilla")) { store in
                try await SecretsCipher.rotate(store: store, from: old, to: new)
                return store.displayName
            }
            if json { printJSON(["rotated": true]) } else { print("secrets in \(name) are now sealed under \(newKeyFile)") }
        }
    }
}

/// The secrets themselves, through the agent's Vault-compatible API (`/v1/secret/…`).
struct SecretCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "secret", abstract: "Write, read and list secrets (Vault's KV v2 at secret/).",
        subcommands: [Put.self, Get.self, List.self, Delete.self])

    static func dataPath(_ path: String) -> String { "/v1/secret/data/" + encode(path) }

    static func encode(_ path: String) -> String {
        path.split(separator: "/", omittingEmptySubsequences: false).map {
            String($0).addingPercentEncoding(withAllowedCharacters: .urlPathAllowed.subtracting(CharacterSet(charactersIn: "/?#"))) ?? String($0)
        }.joined(separator: "/")
    }

    struct Put: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Write a new version of a secret.",
            discussion: "Values: key=value, key=@file (the file's content), key=- (standard input), so a value need not sit in shell history.")
        @Argument(help: "The secret's path, such as shop/db.") var path: String
        @Argument(help: "key=value pairs.") var pairs: [String]
        @Option(help: "Write only if this is the current version (0: only if the secret has none).") var cas: Int?
        @OptionGroup var options: ClientOptions

        func run() async throws {
            var data: [String: JSONValue] = [:]
            for pair in pairs {
                guard let equals = pair.firstIndex(of: "="), equals != pair.startIndex else { throw CLIError("'\(pair.prefix(40))' is not key=value") }
                let key = String(pair[..<equals])
                let raw = String(pair[pair.index(after: equals)...])
                if raw == "-" {
                    data[key] = .string(String(decoding: FileHandle.standardInput.readDataToEndOfFile(), as: UTF8.self))
                } else if raw.hasPrefix("@") {
                    guard let contents = FileManager.default.contents(atPath: String(raw.dropFirst())) else { throw CLIError("cannot read \(raw.dropFirst())") }
                    data[key] = .string(String(decoding: contents, as: UTF8.self))
                } else {
                    data[key] = .string(raw)
                }
            }
            var body: [String: JSONValue] = ["data": .object(data)]
            if let cas { body["options"] = ["cas": .number(Double(cas))] }
            let reply = try await options.client().call(.POST, SecretCommand.dataPath(path), body: .object(body))
            if options.json { return printJSON(reply["data"] ?? .null) }
            print("\(path) version \(reply["data"]?["version"]?.intValue ?? 0)")
        }
    }

    struct Get: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Read a secret (its current version, or --version N).")
        @Argument(help: "The secret's path.") var path: String
        @Option(help: "A version other than the current one.") var version: Int?
        @Option(help: "Print only this key's value.") var field: String?
        @OptionGroup var options: ClientOptions

        func run() async throws {
            let query = version.map { "?version=\($0)" } ?? ""
            let reply = try await options.client().call(.GET, SecretCommand.dataPath(path) + query)
            let data = reply["data"]?["data"]?.objectValue ?? [:]
            if let field {
                guard let value = data[field] else { throw CLIError("\(path) has no key '\(field)'") }
                if options.json { return printJSON(value) }
                return print(value.stringValue ?? String(decoding: value.serialized(), as: UTF8.self))
            }
            if options.json { return printJSON(reply["data"] ?? .null) }
            printTable(["KEY", "VALUE"], data.keys.sorted().map { key in
                [key, data[key]!.stringValue ?? String(decoding: data[key]!.serialized(), as: UTF8.self)]
            })
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the secrets and folders below a path.")
        @Argument(help: "A folder (nothing: the top).") var path: String = ""
        @OptionGroup var options: ClientOptions

        func run() async throws {
            let folder = path.isEmpty ? "/v1/secret/metadata" : "/v1/secret/metadata/" + SecretCommand.encode(path)
            let reply = try await options.client().call(.GET, folder + "?list=true")
            let keys = reply["data"]?["keys"]?.arrayValue.compactMap(\.stringValue) ?? []
            if options.json { return printJSON(.array(keys.map(JSONValue.string))) }
            for key in keys { print(key) }
        }
    }

    struct Delete: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Delete a secret's current version (it can be undeleted), or with --all every version and its metadata.")
        @Argument(help: "The secret's path.") var path: String
        @Flag(help: "Remove every version and the metadata, for good.") var all = false
        @OptionGroup var options: ClientOptions

        func run() async throws {
            let target = all ? "/v1/secret/metadata/" + SecretCommand.encode(path) : SecretCommand.dataPath(path)
            _ = try await options.client().call(.DELETE, target)
            if options.json { return printJSON(["deleted": .string(path), "all": .bool(all)]) }
            print(all ? "\(path) and all its versions removed" : "\(path): current version deleted")
        }
    }
}

/// Access control: the first token, and policies.
struct ACLCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "acl", abstract: "Set up access control: the first token and policies.", subcommands: [Bootstrap.self, Policy.self, Token.self])

    struct Bootstrap: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Make the first management token (once per cluster); it is printed once, keep it safe.")
        @OptionGroup var options: ClientOptions

        func run() async throws {
            let reply = try await options.client().call(.PUT, "/v1/acl/bootstrap")
            if options.json { return printJSON(reply) }
            print(reply["SecretID"]?.stringValue ?? "")
            FileHandle.standardError.write(Data("the management token above is shown once: export FLOTILLA_TOKEN=… to use it\n".utf8))
        }
    }

    struct Policy: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Write a policy (Vault's HCL or JSON, with Consul's key_prefix/service_prefix/node_prefix rules too).")
        @Argument(help: "The policy's name.") var name: String
        @Argument(help: "A file holding the policy (- for standard input).") var file: String
        @OptionGroup var options: ClientOptions

        func run() async throws {
            let data = file == "-" ? FileHandle.standardInput.readDataToEndOfFile() : FileManager.default.contents(atPath: file)
            guard let data else { throw CLIError("cannot read \(file)") }
            _ = try await options.client().call(.PUT, "/v1/sys/policies/acl/" + name, body: ["policy": .string(String(decoding: data, as: UTF8.self))])
            if options.json { return printJSON(["name": .string(name)]) }
            print("policy \(name) written")
        }
    }

    struct Token: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Make a token with policies (a subset of the caller's unless it is a management token).")
        @Option(name: .customLong("policy"), help: "A policy for the token (repeatable).") var policies: [String] = []
        @Option(help: "How long it lives (30m, 24h); none: until revoked.") var ttl: String?
        @OptionGroup var options: ClientOptions

        func run() async throws {
            var body: [String: JSONValue] = ["policies": .array(policies.map(JSONValue.string))]
            if let ttl { body["ttl"] = .string(ttl) }
            let reply = try await options.client().call(.POST, "/v1/auth/token/create", body: .object(body))
            if options.json { return printJSON(reply["auth"] ?? .null) }
            print(reply["auth"]?["client_token"]?.stringValue ?? "")
        }
    }
}

/// The node's audit log: every write and every refused request.
struct AuditCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "audit", abstract: "Read the audit log (every write and every refused request).", subcommands: [Tail.self])

    struct Tail: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show the newest entries of the agent's audit log.")
        @Option(name: [.customShort("n"), .customLong("lines")], help: "How many entries.") var lines: Int = 20
        @OptionGroup var options: ClientOptions

        func run() async throws {
            let entries = try await options.client().call(.GET, "/flotilla/v1/audit?n=\(lines)")
            if options.json { return printJSON(entries) }
            printTable(["TIME", "WHO", "CLIENT", "REQUEST", "STATUS", "DECISION"], (entries.arrayValue ?? []).map { entry in
                let who = entry["tokenName"]?.stringValue.map { "\($0) (\(entry.text("accessor").prefix(8)))" } ?? entry.text("accessor")
                return [entry.text("time"), who, entry.text("client"), entry.text("method") + " " + entry.text("path"),
                        "\(entry["status"]?.intValue ?? 0)", entry.text("decision")]
            })
        }
    }
}

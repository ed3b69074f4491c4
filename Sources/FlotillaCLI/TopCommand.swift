import ArgumentParser
import FlotillaCore
import Foundation
import Glibc
import NIOHTTP1

/// `flotilla top`: what apps (or instances) use, live, from `GET /flotilla/v1/stats`.
struct TopCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "top",
        abstract: "Show what apps use (CPU, memory, requests), refreshed live; --instances for each instance.",
        discussion: """
            Figures come from the agents' measurements (every --metrics-interval seconds on each node): CPU in cores \
            averaged over the last interval, memory as the working set, requests per second, the share of 5xx answers \
            and p99 latency through the proxy. In a terminal it redraws every --interval seconds until interrupted; \
            otherwise, or with --once or --json, it prints once.
            """)

    @Option(help: "Only this app.") var app: String?
    @Flag(help: "One row per instance instead of per app.") var instances = false
    @Option(help: "Seconds between refreshes.") var interval: Double = 2
    @Flag(help: "Print once and exit.") var once = false
    @OptionGroup var options: ClientOptions

    func validate() throws {
        guard interval >= 0.5 else { throw ValidationError("--interval must be at least 0.5 seconds") }
    }

    func run() async throws {
        let client = try options.client()
        var path = "/flotilla/v1/stats"
        if let app { path += "?app=" + (app.addingPercentEncoding(withAllowedCharacters: .alphanumerics.union(CharacterSet(charactersIn: "/-_."))) ?? app) }
        let live = !once && !options.json && isatty(STDOUT_FILENO) == 1
        repeat {
            let stats = try await client.call(.GET, path)
            if options.json { return printJSON(stats) }
            if live { print("\u{1B}[H\u{1B}[2J", terminator: "") }
            render(stats)
            if live {
                print("\n\(Timestamp.format(Date()))  every \(Self.number(interval)) s  (Ctrl-C to quit)")
                fflush(nil)
                try await Task.sleep(for: .milliseconds(Int64(interval * 1000)))
            }
        } while live
    }

    private func render(_ stats: JSONValue) {
        if instances {
            printTable(
                ["INSTANCE", "APP", "NODE", "CPU", "MEMORY", "LIMIT", "THROTTLED", "NET IN/S", "NET OUT/S", "OOM"],
                (stats["instances"]?.arrayValue ?? []).map { instance in
                    [
                        instance.text("id"), instance.text("app"), instance.text("node"), Self.cores(instance["cpuCores"]),
                        Self.bytes(instance["memoryBytes"]), Self.bytes(instance["memoryLimitBytes"], none: "none"),
                        instance["cpuThrottledSeconds"]?.doubleValue.map { String(format: "%.1fs", $0) } ?? "-",
                        Self.bytes(instance["networkReceiveBytesPerSecond"]), Self.bytes(instance["networkTransmitBytesPerSecond"]),
                        NodesCommand.number(instance["oomKills"]),
                    ]
                })
        } else {
            printTable(
                ["APP", "INSTANCES", "CPU", "MEMORY", "LIMIT", "REQ/S", "5XX", "P99"],
                (stats["apps"]?.arrayValue ?? []).map { app in
                    [
                        app.text("app"), NodesCommand.number(app["instances"]), Self.cores(app["cpuCores"]), Self.bytes(app["memoryBytes"]),
                        Self.bytes(app["memoryLimitBytes"], none: "none"),
                        app["requestsPerSecond"]?.doubleValue.map { String(format: "%.1f", $0) } ?? "-",
                        app["errorRate"]?.doubleValue.map { String(format: "%.1f%%", $0 * 100) } ?? "-",
                        app["p99Seconds"]?.doubleValue.map { String(format: "%.1fms", $0 * 1000) } ?? "-",
                    ]
                })
        }
        let nodes = stats["nodes"]?.arrayValue ?? []
        if !nodes.isEmpty {
            print("")
            printTable(
                ["NODE", "CPU", "MEMORY", "DISK FREE", "LOAD", "INSTANCES"],
                nodes.map { node in
                    let total = node["memoryTotalBytes"]?.doubleValue ?? 0, available = node["memoryAvailableBytes"]?.doubleValue ?? 0
                    return [
                        node.text("node"), "\(Self.cores(node["cpuCoresUsed"]))/\(NodesCommand.number(node["cpus"]))",
                        "\(Self.bytes(.number(total - available)))/\(Self.bytes(node["memoryTotalBytes"]))",
                        Self.bytes(node["diskFreeBytes"]),
                        ["load1", "load5", "load15"].map { String(format: "%.2f", node[$0]?.doubleValue ?? 0) }.joined(separator: " "),
                        NodesCommand.number(node["instances"]),
                    ]
                })
        }
        for problem in stats["unreachable"]?.arrayValue ?? [] {
            print("node \(problem.text("node")) did not answer: \(problem.text("error"))")
        }
    }

    static func cores(_ value: JSONValue?) -> String {
        guard let value = value?.doubleValue else { return "-" }
        return String(format: "%.2f", value)
    }

    /// 1536 → "1.5KiB".
    static func bytes(_ value: JSONValue?, none: String = "-") -> String {
        guard let value = value?.doubleValue else { return none }
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var scaled = value, unit = 0
        while scaled >= 1024 && unit < units.count - 1 {
            scaled /= 1024
            unit += 1
        }
        return unit == 0 ? "\(Int(scaled))B" : String(format: "%.1f", scaled) + units[unit]
    }

    static func number(_ value: Double) -> String {
        value == value.rounded() ? String(Int(value)) : String(value)
    }
}

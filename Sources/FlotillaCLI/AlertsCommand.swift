import ArgumentParser
import FlotillaCore
import Foundation
import NIOHTTP1

/// `flotilla alerts`: every alert rule's state, from `GET /flotilla/v1/alerts`.
struct AlertsCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "alerts",
        abstract: "Show every alert: its state (ok, warning, critical), value and thresholds.",
        discussion: """
            Alert rules live in apps' definitions (`alerts`) and, for nodes and the cluster, in the agent's --alert-rules \
            file; the leader evaluates them every --metrics-interval \
            seconds. Each change of state is an alert_state_changed_event on /v2/events and goes to the agent's \
            --alert-webhook and --alertmanager. Exits 0; with --firing, 3 when an alert is critical and 2 when one is \
            at warning (for scripts and checks).
            """)

    @Option(help: "Only this app's alerts.") var app: String?
    @Flag(help: "Only alerts at warning or critical.") var firing = false
    @OptionGroup var options: ClientOptions

    func run() async throws {
        let client = try options.client()
        var query: [String] = []
        if let app { query.append("app=" + (app.addingPercentEncoding(withAllowedCharacters: .alphanumerics.union(CharacterSet(charactersIn: "/-_."))) ?? app)) }
        if firing { query.append("state=firing") }
        let answer = try await client.call(.GET, "/flotilla/v1/alerts" + (query.isEmpty ? "" : "?" + query.joined(separator: "&")))
        let alerts = answer["alerts"]?.arrayValue ?? []
        if options.json {
            printJSON(answer)
        } else if alerts.isEmpty {
            print(firing ? "no alert is firing" : "no alert rules (give an app `alerts` in its definition)")
        } else {
            printTable(
                ["FOR", "ALERT", "STATE", "METRIC", "VALUE", "WARNING", "CRITICAL", "SINCE"],
                alerts.map { alert in
                    let pending = alert.text("pending")
                    let subject = alert["app"]?.stringValue ?? alert["node"]?.stringValue.map { "node/" + $0 } ?? "cluster"
                    return [
                        subject, alert.text("alert"),
                        alert.text("state").uppercased() + (pending.isEmpty ? "" : " (\(pending) pending)"),
                        alert.text("metric"), Self.number(alert["value"]), Self.number(alert["warning"]), Self.number(alert["critical"]),
                        alert.text("since"),
                    ]
                })
        }
        guard firing else { return }
        let states = Set(alerts.map { $0.text("state") })
        if states.contains("critical") { throw ExitCode(3) }
        if states.contains("warning") { throw ExitCode(2) }
    }

    static func number(_ value: JSONValue?) -> String {
        guard let number = value?.doubleValue else { return "-" }
        if number == number.rounded(), abs(number) < 1e15 { return String(Int64(number)) }
        return String(format: "%.3g", number)
    }
}
